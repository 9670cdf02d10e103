//! [`RedisBudget`]: TokenBudget's limits shared by every replica through Redis.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::Script;
use tokio::time::Instant;
use tower_ai_budget::{
    BudgetStore, Spent, StoreAdmit, StoreDecision, StoreLease, StoreLimits, StoreRequest,
};
use tower_ai_core::keys::Key;
use tower_ai_core::BudgetLimit;

use crate::store::RedisStore;

mod lease;
mod local;
mod settle;

use lease::Leases;
use local::Local;
use settle::{Ages, Fate, KeyNames, Kind, Pending, Settlements, MAX_CARRIED, OWN_KEYS};

/// The admission script: the settle function, then the admission (which applies the
/// settlements it carries first).
const ADMIT: &str = concat!(
    include_str!("scripts/budget_settle.lua"),
    include_str!("scripts/budget_admit.lua")
);

/// The most keys whose denial is remembered (the oldest are forgotten past it).
const MAX_DENIALS: usize = 10_000;

/// How [`RedisBudget`] shares the limits.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Mode {
    /// One round trip per admission: atomic decisions in Redis, never more than the limit
    /// plus the burst in any window. A settlement is queued and carried to Redis by the
    /// replica's next admission (applied first, in the same script), or sent on its own
    /// after [`settle_delay`](RedisBudgetBuilder::settle_delay) when no admission comes;
    /// until it lands the request's reservation stays counted.
    Strict,
    /// For high-rate keys: each replica takes a chunk of the requests and tokens limits
    /// (`fraction` of each, e.g. `0.01`) atomically from Redis, spends it from local
    /// atomics, and gives back what it has not used; a round trip only per chunk, and at
    /// most one per key in flight on a replica (misses while it is out wait for its chunk,
    /// up to the store's response timeout). Tokens a request reserved and did not use go
    /// back into its replica's chunk, and end a refusal for tokens cached until the
    /// window's end (the next request gives them back with its chunk and asks again).
    /// Concurrency and spend caps stay strict.
    Leased {
        /// The chunk, as a fraction of each limit (at least one unit).
        fraction: f64,
    },
}

/// Settings of a [`RedisBudget`]; see [`RedisBudget::builder`].
#[derive(Debug, Clone)]
pub struct RedisBudgetBuilder {
    store: RedisStore,
    mode: Mode,
    tag: String,
    /// Each key's name is its own hash tag.
    tag_per_key: bool,
    minute: Duration,
    hour: Duration,
    day: Duration,
    /// `None`: a sixtieth of the limit (see [`burst`](Self::burst)).
    request_burst: Option<u64>,
    token_burst: Option<u64>,
    fail_closed: u8,
    hold: Duration,
    settle_delay: Duration,
}

/// TokenBudget's state in Redis, so the limits hold across every replica (give it to
/// [`TokenBudgetBuilder::store`](tower_ai_budget::TokenBudgetBuilder::store)).
///
/// - **Requests and tokens per minute** are decided by GCRA (the generic cell rate
///   algorithm) on Redis's clock: each request or token moves the key's theoretical
///   arrival time on by `minute / limit`, so the key never admits more than its limit plus
///   its burst in any minute (a request larger than the burst needs the key idle enough
///   to take it: the bound is the limit plus the larger of the burst and the request). A
///   request's token estimate is reserved before the call; when the response's usage is
///   known the difference is refunded or charged, as the in-process layer reconciles.
/// - **Spend per hour and per day** are calendar windows (the hour and the day of Redis's
///   clock, UTC) counted in integer micro-units of the currency.
/// - **Concurrency** is an expiring semaphore: a sorted set whose members expire after
///   [`hold`](RedisBudgetBuilder::hold), so the places of a replica that crashed come back.
/// - **Settlements** (strict mode) cost no round trip of their own while requests keep
///   coming: each is queued and carried by this replica's next admission, in the same
///   script, applied before that admission is decided; without one within
///   [`settle_delay`](RedisBudgetBuilder::settle_delay) (2 ms) the queue is sent on its
///   own. Until a settlement lands its reservation and its place stay counted, so the
///   limits hold. While Redis cannot take them they wait, at most 10,000 (see
///   [`settlements_dropped`](RedisBudget::settlements_dropped) for what is given up).
/// - **Denials are cached** until the time Redis gave: a refused key costs no round trip
///   until then (for a request at least as large as the one refused).
/// - **Redis down or slow** (no answer within the store's response timeout): each replica
///   decides in-process at the limit divided by [`RedisStore::replicas`], with the same
///   algorithms, and goes back to Redis by itself when it answers again: the first script
///   of each key then adds to the key in Redis what the fall-back admitted that its GCRA
///   still counts, so a Redis that lost the key (restarted empty) does not give the key's
///   burst again on top of it. A limit named in
///   [`fail_closed`](RedisBudgetBuilder::fail_closed) refuses instead. While only some
///   replicas find Redis slow (a loaded machine past the store's response timeout), their
///   shares are on top of what the others still count in Redis: up to the limit ÷ N more
///   per such replica. Give the store a response timeout that a loaded Redis meets.
///
/// Keys in Redis are named by the key function's label, the same in every replica:
/// `Global` (`global`) and `HostModel` (`host/model`) are; `ApiKeyHash`'s label is a hash
/// seeded at random per process, so replicas share it only when every one is given the
/// same seed ([`tower_ai_core::keys::set_seed`], at startup), or use a key function whose
/// label is stable (a tenant id, say). Two budgets with
/// different limits whose keys have the same label must not share a name in Redis: give
/// each its own [`hash_tag`](RedisBudgetBuilder::hash_tag).
///
/// In leased mode a replica's chunks sit behind one short lock per call (no round trip);
/// concurrency limits and spend caps stay strict (a budget with either is decided as in
/// strict mode).
///
/// ```no_run
/// use std::time::Duration;
/// use tower_ai_budget::TokenBudgetLayer;
/// use tower_ai_core::BudgetLimit;
/// use tower_ai_redis::{RedisBudget, RedisStore};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::open("redis://127.0.0.1:6379/")?;
/// let budget = TokenBudgetLayer::builder()
///     .requests_per_minute(500)
///     .tokens_per_minute(30_000)
///     .spend_per_day(50.0)
///     .prices(tower_ai_budget::PriceTable::new().model("gpt-4o", 2.50, 10.00))
///     .store(
///         RedisBudget::builder(store)
///             .burst(10, 2_000)
///             .fail_closed(BudgetLimit::SpendPerDay) // a hard cap, even while Redis is down
///             .build(),
///     )
///     .build()?;
/// # let _ = budget; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisBudget {
    inner: Arc<Inner>,
}

struct Inner {
    store: RedisStore,
    config: RedisBudgetBuilder,
    admit: Script,
    /// Settlements waiting for the next admission (or the flusher) to carry them.
    settlements: Settlements,
    /// Members of the concurrency semaphore: this replica's id and a sequence number.
    seq: AtomicU64,
    /// Admissions sent to Redis, and those decided in-process because it could not answer.
    round_trips: AtomicU64,
    fallbacks: AtomicU64,
    epoch: Instant,
    denials: Mutex<HashMap<Key, Denial>>,
    /// The in-process fall-back (limits ÷ replicas).
    local: Local,
    leases: Leases,
}

/// A refusal remembered until `until`.
#[derive(Debug, Clone, Copy)]
struct Denial {
    until: Instant,
    limit: BudgetLimit,
    tokens: u64,
    spend: u64,
}

impl fmt::Debug for RedisBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBudget")
            .field("mode", &self.inner.config.mode)
            .field("store", &self.inner.store)
            .finish_non_exhaustive()
    }
}

fn bit(limit: BudgetLimit) -> u8 {
    match limit {
        BudgetLimit::RequestsPerMinute => 1,
        BudgetLimit::TokensPerMinute => 2,
        BudgetLimit::Concurrency => 4,
        BudgetLimit::SpendPerHour => 8,
        BudgetLimit::SpendPerDay => 16,
        _ => 0,
    }
}

fn limit_of(code: i64) -> BudgetLimit {
    match code {
        1 => BudgetLimit::RequestsPerMinute,
        2 => BudgetLimit::TokensPerMinute,
        3 => BudgetLimit::Concurrency,
        4 => BudgetLimit::SpendPerHour,
        _ => BudgetLimit::SpendPerDay,
    }
}

/// Nano-units (the budget's) to micro-units (Redis's), rounded up for a cost.
pub(crate) fn micro_up(nanos: u64) -> u64 {
    nanos.div_ceil(1000)
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisBudgetBuilder {
    /// Strict (the default) or leased.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Leased mode with chunks of `fraction` of each limit (e.g. `0.01`): see
    /// [`Mode::Leased`].
    pub fn leased(self, fraction: f64) -> Self {
        let fraction = if fraction.is_finite() && fraction > 0.0 {
            fraction.min(1.0)
        } else {
            0.01
        };
        self.mode(Mode::Leased { fraction })
    }

    /// The Redis Cluster hash tag of this budget's keys (default `budget`): every key of
    /// one decision carries it, so each script touches one slot. Use the provider account.
    pub fn hash_tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = tag.into();
        self.tag_per_key = false;
        self
    }

    /// Each key's name (the budget key's label, e.g. a tenant's) is the Redis Cluster hash
    /// tag of its own keys, instead of one [`hash_tag`](Self::hash_tag) for the whole
    /// budget: on a cluster the budget's keys spread over the nodes (each key's decisions
    /// on the node of its slot), while every key of one decision still shares one slot.
    ///
    /// A settlement then rides only with an admission of its own key (others' keys are in
    /// other slots), and the flusher sends one key's settlements per script. On one server
    /// it changes only the keys' names.
    pub fn hash_tag_per_key(mut self) -> Self {
        self.tag_per_key = true;
        self
    }

    /// The hash tag of `name`'s keys.
    fn tag_of<'a>(&'a self, name: &'a str) -> &'a str {
        if self.tag_per_key {
            name
        } else {
            &self.tag
        }
    }

    /// How many requests and tokens a key may take at once beyond the steady pace of
    /// `minute / limit` apart. In any window the key admits at most the limit plus the
    /// burst (plus the request itself when it is larger than the burst). Default: a
    /// sixtieth of each limit (a second's worth of a per-minute limit), so requests that
    /// come together are not paced one by one; `burst(0, 0)` paces strictly.
    pub fn burst(mut self, requests: u64, tokens: u64) -> Self {
        self.request_burst = Some(requests);
        self.token_burst = Some(tokens);
        self
    }

    /// The bursts for `l`: as set, or a sixtieth of each limit.
    pub(crate) fn bursts(&self, l: &StoreLimits) -> (u64, u64) {
        (
            self.request_burst
                .unwrap_or_else(|| l.requests_per_minute.map_or(0, |n| n / 60)),
            self.token_burst
                .unwrap_or_else(|| l.tokens_per_minute.map_or(0, |n| n / 60)),
        )
    }

    /// The length of the "minute" of the requests and tokens limits (default 60 s), so a
    /// test can use a short one. At least 1 ms.
    pub fn minute(mut self, length: Duration) -> Self {
        self.minute = length.max(Duration::from_millis(1));
        self
    }

    /// The lengths of the spend caps' "hour" and "day" (default 1 h and 24 h), for tests.
    /// At least 1 ms each.
    pub fn spend_windows(mut self, hour: Duration, day: Duration) -> Self {
        self.hour = hour.max(Duration::from_millis(1));
        self.day = day.max(Duration::from_millis(1));
        self
    }

    /// While Redis is unreachable, refuse requests under `limit` (e.g. a hard spend cap)
    /// instead of deciding in-process at the limit ÷ replicas. Call once per limit.
    pub fn fail_closed(mut self, limit: BudgetLimit) -> Self {
        self.fail_closed |= bit(limit);
        self
    }

    /// How long a request holds its place in the concurrency semaphore at most (default
    /// 10 min): a place is given back when the response ends, or after this if its replica
    /// died. Set it above the longest response you serve.
    pub fn hold(mut self, hold: Duration) -> Self {
        self.hold = hold.max(Duration::from_millis(1));
        self
    }

    /// How long a strict settlement waits for this replica's next admission to carry it
    /// before it is sent on its own (default 2 ms). Every settlement waiting then goes in
    /// one script: a replica pays at most one round trip per admission and one per delay.
    /// Until a settlement lands its reservation stays counted (the safe side), so a longer
    /// delay only gives other replicas a refund or a free place later.
    pub fn settle_delay(mut self, delay: Duration) -> Self {
        self.settle_delay = delay;
        self
    }

    /// The budget store.
    pub fn build(self) -> RedisBudget {
        RedisBudget {
            inner: Arc::new(Inner {
                store: self.store.clone(),
                admit: Script::new(ADMIT),
                settlements: Settlements::new(
                    KeyNames::new(self.store.clone(), self.tag.clone(), self.tag_per_key),
                    Ages {
                        minute: self.minute,
                        hold: self.hold,
                        day: self.day.max(self.hour),
                    },
                    duration_us(self.minute),
                    self.settle_delay,
                ),
                seq: AtomicU64::new(0),
                round_trips: AtomicU64::new(0),
                fallbacks: AtomicU64::new(0),
                epoch: Instant::now(),
                denials: Mutex::new(HashMap::new()),
                local: Local::default(),
                leases: Leases::default(),
                config: self,
            }),
        }
    }
}

/// Where a lease was made: `state[0] & 3`.
const FROM_REDIS: u64 = 0;
const FROM_LOCAL: u64 = 1;
const FROM_LEASE: u64 = 2;

/// The window a lease spent from a chunk was counted in (see [`crate::testing::leased_window`]).
pub(crate) fn leased_window(lease: &StoreLease) -> Option<u64> {
    (lease.state[0] & 3 == FROM_LEASE).then_some(lease.state[2])
}

impl RedisBudget {
    /// Settings for a budget on `store`.
    pub fn builder(store: RedisStore) -> RedisBudgetBuilder {
        RedisBudgetBuilder {
            store,
            mode: Mode::Strict,
            tag: "budget".to_owned(),
            tag_per_key: false,
            minute: Duration::from_secs(60),
            hour: Duration::from_secs(3600),
            day: Duration::from_secs(86_400),
            request_burst: None,
            token_burst: None,
            fail_closed: 0,
            hold: Duration::from_secs(600),
            settle_delay: Duration::from_millis(2),
        }
    }

    /// A strict budget on `store` with the default settings.
    pub fn strict(store: RedisStore) -> Self {
        Self::builder(store).build()
    }

    /// The store this budget talks through.
    pub fn store(&self) -> &RedisStore {
        &self.inner.store
    }

    /// Admissions (and lease refills) sent to Redis so far.
    pub fn round_trips(&self) -> u64 {
        self.inner.round_trips.load(Ordering::Relaxed)
    }

    /// Admissions decided in-process (or refused, fail-closed) because Redis could not
    /// answer in time.
    pub fn fallbacks(&self) -> u64 {
        self.inner.fallbacks.load(Ordering::Relaxed)
    }

    /// Strict settlements not applied yet: queued for an admission or the flusher to carry
    /// them to Redis, or sent and not answered yet (their reservations stay counted until
    /// then).
    pub fn settlements_pending(&self) -> usize {
        self.inner.settlements.pending()
    }

    /// Strict settlements given up, whole or in part, so far: a refund sent when Redis did
    /// not answer (it may have been applied: applying it twice would give back what was
    /// used), a part older than its window, a settlement Redis refused, or the oldest when
    /// the queue was full (10,000). A refund or a place given up stays counted (the safe
    /// side); only a charge (usage over the estimate) given up counts less than was used.
    /// Logged once per outage.
    pub fn settlements_dropped(&self) -> u64 {
        self.inner.settlements.dropped()
    }

    /// Sends every queued settlement now (e.g. at shutdown, or before reading Redis's
    /// state); what Redis could not take stays queued, and the error says why.
    pub async fn flush(&self) -> Result<(), crate::StoreError> {
        self.inner.settlements.flush().await
    }

    /// The Redis keys of `name`'s state, in the order the scripts take them: both GCRA
    /// theoretical arrival times (requests and tokens, one string `"requests:tokens"`),
    /// the bases of the spend per hour and per day windows' keys, concurrency.
    pub fn keys_of(&self, name: &str) -> [String; 4] {
        let s = &self.inner.store;
        let tag = self.inner.config.tag_of(name);
        [
            s.key("budget:tat", tag, name),
            s.key("budget:hour", tag, name),
            s.key("budget:day", tag, name),
            s.key("budget:conc", tag, name),
        ]
    }

    /// A refusal remembered for `request`'s key, if one still holds for a request of its
    /// size.
    fn cached_denial(&self, request: &StoreRequest<'_>, now: Instant) -> Option<StoreDecision> {
        let denials = lock(&self.inner.denials);
        let d = denials.get(&request.key)?;
        if now >= d.until {
            return None;
        }
        let applies = match d.limit {
            BudgetLimit::RequestsPerMinute => true,
            BudgetLimit::TokensPerMinute => request.tokens >= d.tokens,
            BudgetLimit::SpendPerHour | BudgetLimit::SpendPerDay => request.spend >= d.spend,
            _ => false,
        };
        applies.then(|| StoreDecision::Refused {
            limit: d.limit,
            retry_after: Some(d.until - now),
        })
    }

    /// Caches Redis's refusal of `ask` for `limit` until `until` (the cache bounded).
    fn remember_denial(&self, ask: &Ask, limit: BudgetLimit, until: Instant) {
        let key = ask.key;
        let denial = Denial {
            until,
            limit,
            tokens: ask.tokens,
            spend: ask.spend,
        };
        let mut denials = lock(&self.inner.denials);
        if denials.len() >= MAX_DENIALS && !denials.contains_key(&key) {
            let now = Instant::now();
            denials.retain(|_, d| d.until > now);
            if denials.len() >= MAX_DENIALS {
                return;
            }
        }
        denials.insert(key, denial);
    }

    /// Forgets `key`'s cached refusal if it was for tokens.
    fn forget_token_denial(&self, key: Key) {
        let mut denials = lock(&self.inner.denials);
        if denials
            .get(&key)
            .is_some_and(|d| d.limit == BudgetLimit::TokensPerMinute)
        {
            denials.remove(&key);
        }
    }

    fn member(&self, seq: u64) -> String {
        format!("{}:{seq}", self.inner.store.instance_id())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The arguments of one admission, owned by its round trip.
struct Ask {
    key: Key,
    name: String,
    tokens: u64,
    spend: u64,
    limits: StoreLimits,
}

impl RedisBudget {
    /// The strict round trip: the script's verdict, or the fall-back when Redis cannot be
    /// asked.
    async fn ask(self, ask: Ask) -> StoreDecision {
        let inner = &self.inner;
        let c = &inner.config;
        let l = &ask.limits;
        let names = inner.settlements.names();
        // The limits this request is decided on (the script's ARGV[1]): those above 0 that
        // it costs something under. A request larger than its whole token limit was
        // refused before (`admit`).
        let window_us = duration_us(c.minute);
        let window = window_us as f64;
        let rpm = l.requests_per_minute.filter(|&n| n > 0);
        let tpm = l.tokens_per_minute.filter(|&n| n > 0 && ask.tokens > 0);
        let conc = l.max_concurrent.filter(|&n| n > 0);
        let spend = micro_up(ask.spend);
        let hour_cap = l.spend_per_hour.map_or(0, |n| n / 1000);
        let day_cap = l.spend_per_day.map_or(0, |n| n / 1000);
        let hour = hour_cap > 0 && spend > 0;
        let day = day_cap > 0 && spend > 0;
        // Back on Redis after an outage: what the fall-back admitted that its GCRA still
        // counts is added to the key in Redis by this script (a Redis restarted empty
        // would otherwise give the key's whole burst again on top of it). Nothing to do,
        // and no lock, once the fall-back's last lead has passed.
        let replicas = || u64::from(inner.store.replicas().max(1));
        let lead = if (rpm.is_some() || tpm.is_some()) && inner.local.may_lead() {
            inner.local.take_lead(
                ask.key,
                l,
                replicas(),
                tpm.is_some(),
                Instant::now().saturating_duration_since(inner.epoch),
            )
        } else {
            None
        };
        let dims = u8::from(rpm.is_some())
            | u8::from(tpm.is_some()) << 1
            | u8::from(conc.is_some()) << 2
            | u8::from(hour) << 3
            | u8::from(day) << 4
            | u8::from(lead.is_some()) << 5;
        // The TAT key (requests and tokens) routes the script (on a cluster) and picks the
        // store's breaker.
        let first = names.key(Kind::Tat, &ask.name);
        let seq = inner.seq.fetch_add(1, Ordering::Relaxed);
        let member = if l.max_concurrent.is_some() {
            self.member(seq)
        } else {
            String::new()
        };
        // This replica's settlements ride along, applied before the admission is decided
        // (not while Redis is in an outage: the flusher keeps trying them, and a fall-back
        // admission stays cheap).
        inner.settlements.start();
        let carried = if inner.store.is_down(Some(&first)) {
            Vec::new()
        } else if inner.config.tag_per_key {
            inner.settlements.take_for(MAX_CARRIED, &ask.name)
        } else {
            inner.settlements.take(MAX_CARRIED)
        };
        // A settlement of this name whose keys are all among the admission's names none of
        // its own.
        let flags = |p: &Pending| {
            let parts = p.parts();
            let own = p.name == ask.name
                && (parts & 1 == 0 || tpm.is_some())
                && (parts & 2 == 0 || (hour && day))
                && (parts & 4 == 0 || conc.is_some());
            if own && parts != 0 {
                parts | OWN_KEYS
            } else {
                parts
            }
        };
        let keys = 1
            + ((dims >> 2) & 0b111).count_ones() as usize
            + carried
                .iter()
                .map(|p| Pending::key_count(flags(p)))
                .sum::<usize>();
        let mut cmd = RedisStore::evalsha(&inner.admit, keys);
        cmd.arg(first.as_str());
        for (on, kind) in [
            (conc.is_some(), Kind::Conc),
            (hour, Kind::Hour),
            (day, Kind::Day),
        ] {
            if on {
                names.write(&mut cmd, kind, &ask.name);
            }
        }
        for p in &carried {
            p.write_keys(&mut cmd, names, flags(p));
        }
        cmd.arg(dims);
        // GCRA's increment and room, in doubles as the script computed them: T = window /
        // limit, c * T, max(burst, c) * T.
        let (request_burst, token_burst) = c.bursts(l);
        if let Some(n) = rpm {
            let t = window / n as f64;
            cmd.arg(t).arg(request_burst.max(1) as f64 * t);
        }
        if let Some(n) = tpm {
            let t = window / n as f64;
            cmd.arg(ask.tokens as f64 * t)
                .arg(token_burst.max(ask.tokens) as f64 * t);
        }
        if let Some(n) = conc {
            cmd.arg(n).arg(member.as_str()).arg(duration_ms(c.hold));
        }
        if hour {
            cmd.arg(hour_cap).arg(duration_ms(c.hour));
        }
        if day {
            cmd.arg(day_cap).arg(duration_ms(c.day));
        }
        if hour || day {
            cmd.arg(spend);
        }
        if let Some((requests, tokens)) = lead {
            cmd.arg(requests).arg(tokens);
        }
        for p in &carried {
            let f = flags(p);
            if f & !OWN_KEYS != 0 {
                p.write_args(&mut cmd, f, window_us);
            }
        }
        let started = Instant::now();
        inner.round_trips.fetch_add(1, Ordering::Relaxed);
        let result = inner
            .store
            .run_cmd::<Vec<i64>>(&cmd, &inner.admit, Some(&first))
            .await;
        drop(cmd);
        inner.settlements.sent(carried, Fate::of(&result));
        if let (Some(lead), Err(_)) = (lead, &result) {
            inner.local.give_back(
                ask.key,
                l,
                replicas(),
                lead,
                Instant::now().saturating_duration_since(inner.epoch),
            );
        }
        match result {
            Ok(v) if v.first() == Some(&1) => StoreDecision::Admitted(StoreLease {
                key: ask.key,
                tokens: ask.tokens,
                spend: ask.spend,
                name: ask.name,
                state: [
                    seq << 2 | FROM_REDIS,
                    v.get(1).copied().unwrap_or(0) as u64,
                    v.get(2).copied().unwrap_or(0) as u64,
                ],
            }),
            Ok(v) => {
                let limit = limit_of(v.get(1).copied().unwrap_or(1));
                let retry_ms = v.get(2).copied().unwrap_or(0);
                let retry_after = (retry_ms >= 0).then(|| Duration::from_millis(retry_ms as u64));
                if let Some(after) = retry_after.filter(|d| !d.is_zero()) {
                    self.remember_denial(&ask, limit, started + after);
                }
                StoreDecision::Refused { limit, retry_after }
            }
            Err(e) => {
                if !e.is_outage() {
                    tracing::warn!(target: "tower_ai::redis", error = %e, "budget script failed: deciding in-process");
                }
                self.fallback(&ask)
            }
        }
    }

    /// Decides in-process at the limits ÷ replicas (or refuses, for a fail-closed limit).
    fn fallback(&self, ask: &Ask) -> StoreDecision {
        let inner = &self.inner;
        inner.fallbacks.fetch_add(1, Ordering::Relaxed);
        let l = &ask.limits;
        let closed = inner.config.fail_closed;
        let set = [
            (
                BudgetLimit::RequestsPerMinute,
                l.requests_per_minute.is_some(),
            ),
            (BudgetLimit::TokensPerMinute, l.tokens_per_minute.is_some()),
            (BudgetLimit::Concurrency, l.max_concurrent.is_some()),
            (BudgetLimit::SpendPerHour, l.spend_per_hour.is_some()),
            (BudgetLimit::SpendPerDay, l.spend_per_day.is_some()),
        ];
        if let Some((limit, _)) = set.iter().find(|(b, on)| *on && closed & bit(*b) != 0) {
            return StoreDecision::Refused {
                limit: *limit,
                retry_after: Some(Duration::from_millis(500)),
            };
        }
        let n = u64::from(inner.store.replicas().max(1));
        let now = Instant::now();
        match inner.local.admit(
            ask.key,
            &inner.config,
            l,
            n,
            ask.tokens,
            ask.spend,
            now.saturating_duration_since(inner.epoch),
        ) {
            Ok(()) => StoreDecision::Admitted(StoreLease {
                key: ask.key,
                tokens: ask.tokens,
                spend: ask.spend,
                name: String::new(),
                state: [FROM_LOCAL, 0, 0],
            }),
            Err((limit, retry_after)) => StoreDecision::Refused { limit, retry_after },
        }
    }
}

impl BudgetStore for RedisBudget {
    fn admit(&self, limits: &StoreLimits, request: &StoreRequest<'_>) -> StoreAdmit {
        // Larger than a whole limit: never, and no round trip to say so.
        let never = |limit| {
            StoreAdmit::Ready(StoreDecision::Refused {
                limit,
                retry_after: None,
            })
        };
        if limits.tokens_per_minute.is_some_and(|n| request.tokens > n) {
            return never(BudgetLimit::TokensPerMinute);
        }
        let spend = micro_up(request.spend);
        if limits.spend_per_hour.is_some_and(|n| spend > n / 1000) {
            return never(BudgetLimit::SpendPerHour);
        }
        if limits.spend_per_day.is_some_and(|n| spend > n / 1000) {
            return never(BudgetLimit::SpendPerDay);
        }
        let now = Instant::now();
        let leased = match self.inner.config.mode {
            Mode::Leased { fraction } if lease::applies(limits) => Some(fraction),
            _ => None,
        };
        // A chunk held here is spent before a cached refusal is read: a miss that waited
        // past the store's response timeout for its key's chunk request takes a chunk of
        // its own, and if the window has no room caches its refusal while that chunk has.
        if leased.is_some() {
            if let Some(d) = self.inner.leases.try_take(
                request.key,
                limits,
                request.tokens,
                now.saturating_duration_since(self.inner.epoch),
            ) {
                return StoreAdmit::Ready(d);
            }
        }
        if let Some(refused) = self.cached_denial(request, now) {
            return StoreAdmit::Ready(refused);
        }
        if let Some(fraction) = leased {
            // No chunk left (or a limit that stays strict): a round trip.
            let this = self.clone();
            let ask = Ask {
                key: request.key,
                name: request.label(),
                tokens: request.tokens,
                spend: request.spend,
                limits: *limits,
            };
            return StoreAdmit::Pending(Box::pin(this.refill(ask, fraction)));
        }
        let this = self.clone();
        let ask = Ask {
            key: request.key,
            name: request.label(),
            tokens: request.tokens,
            spend: request.spend,
            limits: *limits,
        };
        StoreAdmit::Pending(Box::pin(this.ask(ask)))
    }

    fn settle(&self, limits: &StoreLimits, lease: StoreLease, spent: Spent) {
        let inner = &self.inner;
        match lease.state[0] & 3 {
            FROM_LOCAL => {
                inner.local.settle(
                    lease.key,
                    limits,
                    u64::from(inner.store.replicas().max(1)),
                    &inner.config,
                    lease.tokens,
                    lease.spend,
                    spent,
                    Instant::now().saturating_duration_since(inner.epoch),
                );
                return;
            }
            FROM_LEASE => {
                // Spent from a chunk (leased mode holds no concurrency or spend in
                // Redis): settled in the chunk. Tokens that came back end a refusal for
                // tokens cached until the window's end: the window's tokens were held
                // as reservations, and a request now asks again, giving these back with
                // its chunk (else a replica whose requests came in first held its
                // refunds to the window's end while every replica was refused).
                if inner.leases.settle(&lease, spent) {
                    self.forget_token_denial(lease.key);
                }
                return;
            }
            _ => {}
        }
        self.settle_in_redis(limits, lease, spent);
    }
}

impl RedisBudget {
    /// Queues the settlement of a request admitted by Redis (see [`Mode::Strict`]).
    fn settle_in_redis(&self, limits: &StoreLimits, lease: StoreLease, spent: Spent) {
        let token_delta = if limits.tokens_per_minute.is_none() {
            0
        } else {
            i128::from(spent.tokens) - i128::from(lease.tokens)
        };
        let spend_delta = if limits.spend_per_hour.is_none() && limits.spend_per_day.is_none() {
            0
        } else {
            i128::from(micro_up(spent.spend)) - i128::from(micro_up(lease.spend))
        };
        let member = if limits.max_concurrent.is_some() {
            self.member(lease.state[0] >> 2)
        } else {
            String::new()
        };
        if token_delta == 0 && spend_delta == 0 && member.is_empty() {
            return;
        }
        // Queued: carried by this replica's next admission, or flushed after the delay.
        // The reservation stays counted in Redis until then.
        self.inner.settlements.push(Pending {
            queued: Instant::now(),
            name: lease.name,
            tpm: limits.tokens_per_minute.unwrap_or(0),
            tokens: token_delta.clamp(i64::MIN.into(), i64::MAX.into()) as i64,
            spend: spend_delta.clamp(i64::MIN.into(), i64::MAX.into()) as i64,
            hour: lease.state[1],
            day: lease.state[2],
            member,
        });
    }
}
