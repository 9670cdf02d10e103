//! Leased mode: each replica takes a chunk of a window's requests and tokens from Redis,
//! spends it locally, and gives back what it has left when it takes the next one (or on
//! [`RedisBudget::give_back`](super::RedisBudget::give_back)).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use redis::Script;
use tokio::sync::watch;
use tokio::time::Instant;
use tower_ai_budget::{Spent, StoreDecision, StoreLease, StoreLimits};
use tower_ai_core::keys::Key;
use tower_ai_core::BudgetLimit;

use super::{duration_ms, limit_of, lock, Ask, RedisBudget, FROM_LEASE};

/// Keys whose chunks are held at most (a key past it takes a round trip per request).
const MAX_KEYS: usize = 10_000;

pub(super) const LEASE: &str = include_str!("../scripts/budget_lease.lua");

#[derive(Debug, Default)]
pub(super) struct Leases {
    chunks: Mutex<HashMap<Key, Chunk>>,
    /// The chunk request in flight per key (single flight: a replica's concurrent misses
    /// on one key wait for it instead of each taking a chunk). Only misses touch it.
    flights: Mutex<HashMap<Key, watch::Sender<Flight>>>,
}

/// How a key's chunk request ended, for the misses that waited for it.
#[derive(Debug, Clone, Copy)]
enum Flight {
    /// Still in flight, or dropped before an answer (the waiters ask again).
    Pending,
    /// A chunk came in: the waiters spend from it.
    Chunk,
    /// Redis refused `tokens` for `limit`.
    Refused {
        limit: BudgetLimit,
        retry_after: Option<Duration>,
        tokens: u64,
    },
    /// Redis could not be asked: the waiters decide in-process too.
    Fallback,
}

/// The leader of a key's flight; ends it when dropped (a cancelled leader wakes its
/// waiters, which ask again).
struct Leader<'a> {
    leases: &'a Leases,
    key: Key,
    /// The flight is in the map (not past [`MAX_KEYS`]) and not landed yet.
    flying: bool,
}

impl Leader<'_> {
    fn land(&mut self, flight: Flight) {
        if std::mem::take(&mut self.flying) {
            if let Some(tx) = lock(&self.leases.flights).remove(&self.key) {
                tx.send_replace(flight);
            }
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if self.flying {
            lock(&self.leases.flights).remove(&self.key);
        }
    }
}

/// What this replica holds of one key's window.
#[derive(Debug, Clone)]
struct Chunk {
    /// Redis's window index.
    index: u64,
    /// When the window ends, on this process's clock (since the budget's epoch).
    ends: Duration,
    requests: u64,
    /// Tokens left; negative when usage came in over the estimates (a debt the next
    /// chunk pays).
    tokens: i64,
    /// The key's shared name, to give the chunk back.
    name: String,
    /// A refusal for tokens is cached for the key: a refund ends it.
    refused_tokens: bool,
}

/// Whether leased mode decides these limits (concurrency and spend caps stay strict).
pub(super) fn applies(l: &StoreLimits) -> bool {
    l.max_concurrent.is_none()
        && l.spend_per_hour.is_none()
        && l.spend_per_day.is_none()
        && (l.requests_per_minute.is_some() || l.tokens_per_minute.is_some())
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Leases {
    /// Spends a request from the key's chunk, if it holds enough of this window.
    pub(super) fn try_take(
        &self,
        key: Key,
        l: &StoreLimits,
        tokens: u64,
        now: Duration,
    ) -> Option<StoreDecision> {
        let mut chunks = lock(&self.chunks);
        let c = chunks.get_mut(&key)?;
        if now >= c.ends {
            return None;
        }
        let rpm = l.requests_per_minute.is_some();
        let tpm = l.tokens_per_minute.is_some();
        if (rpm && c.requests == 0) || (tpm && c.tokens < i64_of(tokens)) {
            return None;
        }
        if rpm {
            c.requests -= 1;
        }
        if tpm {
            c.tokens -= i64_of(tokens);
        }
        Some(StoreDecision::Admitted(StoreLease {
            key,
            tokens,
            spend: 0,
            name: String::new(),
            state: [FROM_LEASE, 0, c.index],
        }))
    }

    /// Corrects the chunk of the request's window with its usage (a refund goes back into
    /// the chunk, a charge comes out of it); a window already over is left alone.
    ///
    /// Returns whether tokens came back into the chunk of the window still held while a
    /// refusal for tokens is cached for the key (then to be forgotten).
    pub(super) fn settle(&self, lease: &StoreLease, spent: Spent) -> bool {
        let delta = i64_of(lease.tokens).saturating_sub(i64_of(spent.tokens));
        if delta == 0 {
            return false;
        }
        let mut chunks = lock(&self.chunks);
        match chunks.get_mut(&lease.key) {
            Some(c) if c.index == lease.state[2] => {
                c.tokens = c.tokens.saturating_add(delta);
                delta > 0 && std::mem::take(&mut c.refused_tokens)
            }
            _ => false,
        }
    }
}

impl RedisBudget {
    /// Takes a new chunk for `ask` with at most one chunk request per key in flight: a miss
    /// while another one's request is out waits for it (at most the store's answer time)
    /// and spends from the chunk it brought, asking again only when that is used up.
    pub(super) async fn refill(self, ask: Ask, fraction: f64) -> StoreDecision {
        let inner = &self.inner;
        let leases = &inner.leases;
        let deadline = Instant::now() + inner.store.answer_within();
        loop {
            let now = Instant::now().saturating_duration_since(inner.epoch);
            if let Some(d) = leases.try_take(ask.key, &ask.limits, ask.tokens, now) {
                return d;
            }
            let joined = {
                let mut flights = lock(&leases.flights);
                match flights.get(&ask.key) {
                    Some(tx) => Ok(tx.subscribe()),
                    None => {
                        let flying = flights.len() < MAX_KEYS;
                        if flying {
                            flights.insert(ask.key, watch::channel(Flight::Pending).0);
                        }
                        Err(flying)
                    }
                }
            };
            let mut rx = match joined {
                Ok(rx) => rx,
                Err(flying) => return self.lead(ask, fraction, flying).await,
            };
            // Ends when the leader lands (or is dropped, with its sender).
            let wait = async {
                while rx.changed().await.is_ok() {
                    if !matches!(*rx.borrow(), Flight::Pending) {
                        break;
                    }
                }
            };
            if tokio::time::timeout_at(deadline, wait).await.is_err() {
                // The leader is late: this miss asks for itself.
                return self.refill_now(ask, fraction).await;
            }
            let flight = *rx.borrow();
            match flight {
                Flight::Fallback => return self.fallback(&ask),
                Flight::Refused {
                    limit,
                    retry_after,
                    tokens,
                } if matches!(limit, BudgetLimit::RequestsPerMinute) || ask.tokens >= tokens => {
                    return StoreDecision::Refused { limit, retry_after };
                }
                // A chunk (or nothing): spend from it, or ask again.
                _ => {}
            }
        }
    }

    /// Asks for the key's chunk as the leader of its flight, and tells the waiters.
    async fn lead(&self, ask: Ask, fraction: f64, flying: bool) -> StoreDecision {
        let mut leader = Leader {
            leases: &self.inner.leases,
            key: ask.key,
            flying,
        };
        let tokens = ask.tokens;
        let d = self.refill_now(ask, fraction).await;
        leader.land(match &d {
            StoreDecision::Admitted(lease) if lease.state[0] & 3 == FROM_LEASE => Flight::Chunk,
            StoreDecision::Refused { limit, retry_after } => Flight::Refused {
                limit: *limit,
                retry_after: *retry_after,
                tokens,
            },
            _ => Flight::Fallback,
        });
        d
    }

    /// Takes a new chunk for `ask` (giving back what is left of the key's old one in the
    /// same window) and spends the request from it; falls back in-process when Redis
    /// cannot be asked.
    ///
    /// A chunk whose answer comes back after its window has ended here was counted in that
    /// window, but its request would reach the provider in the next one, on top of what
    /// that window hands out: it is asked for once more, in the window the request goes
    /// out in (the first chunk is lost with its window). A second late answer is spent as
    /// it is: Redis answering slower than a window means windows too short for it.
    async fn refill_now(&self, ask: Ask, fraction: f64) -> StoreDecision {
        match self.refill_once(&ask, fraction, false).await {
            Some(d) => d,
            // (Never `None` when late answers are taken.)
            None => match self.refill_once(&ask, fraction, true).await {
                Some(d) => d,
                None => self.fallback(&ask),
            },
        }
    }

    /// One chunk request for [`refill_now`](Self::refill_now); `None` when the chunk came
    /// back after its window ended and `late_ok` is false.
    async fn refill_once(&self, ask: &Ask, fraction: f64, late_ok: bool) -> Option<StoreDecision> {
        let inner = &self.inner;
        let l = &ask.limits;
        let chunk_of = |limit: Option<u64>| {
            limit.map_or(0, |n| ((n as f64 * fraction).ceil() as u64).clamp(1, n))
        };
        let (back_index, back_requests, back_tokens) = {
            let mut chunks = lock(&inner.leases.chunks);
            match chunks.get_mut(&ask.key) {
                Some(c) => {
                    let back = (c.index, c.requests, c.tokens.max(0) as u64);
                    c.requests = 0;
                    c.tokens = c.tokens.min(0);
                    back
                }
                None => (u64::MAX, 0, 0),
            }
        };
        let keys = [
            inner.store.key(
                "budget:lease:rpm",
                inner.config.tag_of(&ask.name),
                &ask.name,
            ),
            inner.store.key(
                "budget:lease:tpm",
                inner.config.tag_of(&ask.name),
                &ask.name,
            ),
        ];
        // A debt from usage over the estimates is paid from the new chunk.
        let debt = {
            let chunks = lock(&inner.leases.chunks);
            chunks
                .get(&ask.key)
                .map_or(0, |c| (-c.tokens).max(0) as u64)
        };
        let need = ask.tokens.saturating_add(debt);
        let token_chunk = chunk_of(l.tokens_per_minute).max(need);
        let args: [&dyn crate::ToRedisArgsDyn; 9] = [
            &duration_ms(inner.config.minute),
            &l.requests_per_minute.unwrap_or(0),
            &chunk_of(l.requests_per_minute),
            &l.tokens_per_minute.unwrap_or(0),
            &token_chunk,
            &if l.tokens_per_minute.is_some() {
                need
            } else {
                0
            },
            &back_index,
            &back_requests,
            &back_tokens,
        ];
        let started = Instant::now();
        inner.round_trips.fetch_add(1, Ordering::Relaxed);
        let result = inner
            .store
            .run::<Vec<i64>>(lease_script(), &[&keys[0], &keys[1]], &args)
            .await;
        let v = match result {
            Ok(v) => v,
            Err(e) => {
                if !e.is_outage() {
                    tracing::warn!(target: "tower_ai::redis", error = %e, "lease script failed: deciding in-process");
                }
                return Some(self.fallback(ask));
            }
        };
        let get = |i: usize| v.get(i).copied().unwrap_or(0);
        if get(0) != 1 {
            let limit = limit_of(get(1));
            let retry_after = (get(2) >= 0).then(|| Duration::from_millis(get(2) as u64));
            if let Some(after) = retry_after.filter(|d| !d.is_zero()) {
                // Tokens that came back into the chunk while the answer was on its way
                // (requests settled meanwhile) are not refused until the window's end: the
                // next request gives them back and asks again. Checked under the chunks'
                // lock, so a refund after it finds the refusal and ends it.
                let mut chunks = lock(&inner.leases.chunks);
                let chunk = chunks.get_mut(&ask.key);
                let tokens = limit == BudgetLimit::TokensPerMinute;
                let refunded = tokens && chunk.as_ref().is_some_and(|c| c.tokens > 0);
                if !refunded {
                    // (A refund lands only in a chunk.)
                    if let Some(c) = chunk.filter(|_| tokens) {
                        c.refused_tokens = true;
                    }
                    self.remember_denial(ask, limit, started + after);
                }
            }
            return Some(StoreDecision::Refused { limit, retry_after });
        }
        let index = get(1) as u64;
        let left = Duration::from_millis(get(4).max(0) as u64);
        // The window's end on this clock, at the latest: `started` is before Redis read
        // its clock.
        if !late_ok && Instant::now() >= started + left {
            return None;
        }
        let ends = started.saturating_duration_since(inner.epoch) + left;
        let requests =
            (get(2).max(0) as u64).saturating_sub(u64::from(l.requests_per_minute.is_some()));
        let tokens = get(3).max(0).saturating_sub(i64_of(need));
        let mut chunks = lock(&inner.leases.chunks);
        if chunks.len() < MAX_KEYS || chunks.contains_key(&ask.key) {
            let c = chunks.entry(ask.key).or_insert_with(|| Chunk {
                index,
                ends,
                requests: 0,
                tokens: 0,
                name: ask.name.clone(),
                refused_tokens: false,
            });
            if c.index != index {
                c.requests = 0;
                c.tokens = 0;
            } else {
                // The debt was paid from this chunk.
                c.tokens = c.tokens.max(0);
            }
            c.index = index;
            c.ends = ends;
            // Two refills at once: both chunks are this replica's.
            c.requests += requests;
            c.tokens += tokens;
        } else {
            chunks.retain(|_, c| c.ends > ends.saturating_sub(Duration::from_secs(1)));
        }
        inner.seq.fetch_add(1, Ordering::Relaxed);
        Some(StoreDecision::Admitted(StoreLease {
            key: ask.key,
            tokens: ask.tokens,
            spend: 0,
            name: String::new(),
            state: [FROM_LEASE, 0, index],
        }))
    }

    /// Gives back to Redis what this replica holds of every key's chunk in the current
    /// window (call it before a replica stops, so its chunks are not lost for the rest of
    /// their windows). Best effort: on an outage the chunks are lost with their windows.
    pub async fn give_back(&self) {
        let inner = &self.inner;
        let held: Vec<(String, u64, u64, u64)> = {
            let mut chunks = lock(&inner.leases.chunks);
            chunks
                .drain()
                .map(|(_, c)| (c.name, c.index, c.requests, c.tokens.max(0) as u64))
                .collect()
        };
        for (name, index, requests, tokens) in held {
            let keys = [
                inner
                    .store
                    .key("budget:lease:rpm", inner.config.tag_of(&name), &name),
                inner
                    .store
                    .key("budget:lease:tpm", inner.config.tag_of(&name), &name),
            ];
            // Nothing taken: limits 0, so only the give-back runs.
            let args: [&dyn crate::ToRedisArgsDyn; 9] = [
                &duration_ms(inner.config.minute),
                &0u64,
                &0u64,
                &0u64,
                &0u64,
                &0u64,
                &index,
                &requests,
                &tokens,
            ];
            let _ = inner
                .store
                .run::<Vec<i64>>(lease_script(), &[&keys[0], &keys[1]], &args)
                .await;
        }
    }
}

fn lease_script() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(LEASE))
}
