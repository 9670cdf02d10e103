//! The per-key cooldown state: when a key may send again, and how much it may send.
//!
//! Every key that has shown something worth remembering (a requested wait, an exhausted
//! bucket, a requests bucket running low) gets an [`Entry`] of atomics. A key without
//! an entry, and every key while no entry exists at all, passes with a read-only check.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::Instant;
use tower_ai_core::keys::{Key, KeyMap};
use tower_ai_core::RateLimitInfo;

const SHARDS: usize = 16;
const UNPACED: u64 = u64::MAX;

type Map = KeyMap<Arc<Entry>>;

/// What the gate says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Send now. `seq` numbers the send within its key (when the key has an entry).
    Go { seq: Option<u64> },
    /// Not before `until`; `spread` when the capacity after it is unknown, so that
    /// waiters must be spread out.
    Wait { until: Instant, spread: bool },
}

/// One key's state; times are nanoseconds since [`Cooldowns::base`], 0 = none.
#[derive(Debug, Default)]
pub(crate) struct Entry {
    until: AtomicU64,
    spread: AtomicBool,
    /// Sends numbered so far.
    sent: AtomicU64,
    /// Sends numbered below this are within the provider's remaining capacity.
    budget_end: AtomicU64,
    /// 1 + the number of the send whose headers were applied last.
    info_order: AtomicU64,
    /// When the requests bucket refills.
    reset_at: AtomicU64,
    /// The requests bucket's size, 0 = unknown.
    limit: AtomicU64,
    last_seen: AtomicU64,
    /// Requests waiting for this key's cooldown.
    waiters: AtomicUsize,
}

/// A waiting request's place, given back when dropped.
#[derive(Debug)]
pub(crate) struct WaitSlot {
    entry: Arc<Entry>,
    total: Arc<AtomicUsize>,
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        self.entry.waiters.fetch_sub(1, Relaxed);
        self.total.fetch_sub(1, Relaxed);
    }
}

/// Keys a shard's table is sized for: its share of `max_keys`, and an eighth more.
fn table_keys(t: &Tuning) -> usize {
    let cap = (t.max_keys / SHARDS).max(1);
    cap.saturating_add(cap / 8)
}

/// Adds one to `n` if it is below `max`.
fn take_one(n: &AtomicUsize, max: usize) -> bool {
    n.fetch_update(Relaxed, Relaxed, |v| (v < max).then_some(v + 1))
        .is_ok()
}

/// What a response taught.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Lesson {
    /// A requested wait (429/503/529), measured from the response.
    pub(crate) wait: Option<Duration>,
    /// Rate-limit headers, measured from the send.
    pub(crate) info: Option<RateLimitInfo>,
}

/// Settings the state needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    pub(crate) max_cooldown: Duration,
    pub(crate) pace_below: u64,
    pub(crate) reset_margin: Duration,
    pub(crate) recheck: Duration,
    pub(crate) idle: Duration,
    pub(crate) max_keys: usize,
    pub(crate) max_waiters_per_key: usize,
    pub(crate) max_waiters: usize,
}

/// Every key's state, in a bounded, sharded map.
#[derive(Debug)]
pub(crate) struct Cooldowns {
    base: Instant,
    entries: AtomicUsize,
    /// Requests waiting in all.
    waiters: Arc<AtomicUsize>,
    shards: Box<[RwLock<Map>]>,
    /// Keys a shard's table is sized for: its share of `max_keys`, and an eighth more.
    table_keys: usize,
    /// A shard's table with this capacity has grown past what `table_keys` need (see
    /// `insert`).
    table_grown: AtomicUsize,
    tuning: Tuning,
    /// When the `keys_cooling` gauge was last counted (0: never).
    #[cfg(feature = "metrics")]
    gauge_at: AtomicU64,
}

impl Cooldowns {
    pub(crate) fn new(tuning: Tuning) -> Self {
        Cooldowns {
            base: Instant::now(),
            entries: AtomicUsize::new(0),
            waiters: Arc::default(),
            shards: (0..SHARDS).map(|_| RwLock::new(Map::default())).collect(),
            table_keys: table_keys(&tuning),
            // A table grows by doubling at least, and the one sized for `table_keys`
            // holds fewer than twice as many (std's holds 7/8 of its power-of-two
            // buckets); raised past the sized table's capacity after a rehash, should
            // that ever be larger.
            table_grown: AtomicUsize::new(table_keys(&tuning).saturating_mul(2).max(8)),
            tuning,
            #[cfg(feature = "metrics")]
            gauge_at: AtomicU64::new(0),
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        // +1: 0 means "none".
        u64::try_from(t.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    fn instant(&self, n: u64) -> Instant {
        self.base + Duration::from_nanos(n.saturating_sub(1))
    }

    fn shard(&self, key: Key) -> &RwLock<Map> {
        // Middle bits: hashbrown takes its tag byte from the top 7 bits and its bucket
        // from the low ones, so a shard chosen by either would leave its map with
        // skewed tags or buckets.
        &self.shards[(key.as_u64() >> 32) as usize % SHARDS]
    }

    /// Keys with state.
    pub(crate) fn len(&self) -> usize {
        self.entries.load(Relaxed)
    }

    /// Requests waiting in all.
    pub(crate) fn waiters(&self) -> usize {
        self.waiters.load(Relaxed)
    }

    /// The memory the keys take, in bytes: each shard's table at its capacity and each
    /// entry (two reference counts and the atomics).
    pub(crate) fn approx_bytes(&self) -> usize {
        use std::mem::size_of;
        self.shards
            .iter()
            .map(|s| {
                let s = s.read().unwrap_or_else(|p| p.into_inner());
                s.capacity() * (size_of::<(Key, Arc<Entry>)>() + 1)
                    + s.len() * (size_of::<Entry>() + 2 * size_of::<usize>())
            })
            .sum()
    }

    /// A place among the waiters for `key`'s cooldown, if the caps leave one.
    pub(crate) fn enter_wait(&self, key: Key) -> Option<WaitSlot> {
        let entry = {
            let shard = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
            shard.get(&key).cloned()
        }?;
        if !take_one(&self.waiters, self.tuning.max_waiters) {
            return None;
        }
        if !take_one(&entry.waiters, self.tuning.max_waiters_per_key) {
            self.waiters.fetch_sub(1, Relaxed);
            return None;
        }
        Some(WaitSlot {
            entry,
            total: self.waiters.clone(),
        })
    }

    /// Whether a request for `key` may go now. Read-only while no key has state.
    pub(crate) fn admit(&self, key: Key, now: Instant) -> Admit {
        if self.entries.load(Relaxed) == 0 {
            return Admit::Go { seq: None };
        }
        let shard = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
        match shard.get(&key) {
            None => Admit::Go { seq: None },
            Some(e) => self.admit_entry(e, now),
        }
    }

    fn admit_entry(&self, e: &Entry, now: Instant) -> Admit {
        let n = self.nanos(now);
        if n.saturating_sub(e.last_seen.load(Relaxed)) > 1_000_000_000 {
            e.last_seen.store(n, Relaxed);
        }
        let until = e.until.load(Relaxed);
        if until > n {
            return Admit::Wait {
                until: self.instant(until),
                spread: e.spread.load(Relaxed),
            };
        }
        // The bucket refilled since the last headers: a fresh `limit` of sends.
        let reset = e.reset_at.load(Relaxed);
        if reset != 0
            && n >= reset
            && e.reset_at
                .compare_exchange(reset, 0, Relaxed, Relaxed)
                .is_ok()
        {
            let limit = e.limit.load(Relaxed);
            let sent = e.sent.load(Relaxed);
            e.budget_end
                .store(if limit > 0 { sent + limit } else { UNPACED }, Relaxed);
        }
        let mut sent = e.sent.load(Relaxed);
        loop {
            let end = e.budget_end.load(Relaxed);
            if end != UNPACED && sent >= end {
                let reset = e.reset_at.load(Relaxed);
                let until = if reset > n {
                    self.instant(reset)
                } else {
                    // Out of capacity and no refill time known yet: look again soon
                    // (answers in flight will tell).
                    now + self.tuning.recheck
                };
                return Admit::Wait {
                    until,
                    spread: false,
                };
            }
            match e
                .sent
                .compare_exchange_weak(sent, sent + 1, Relaxed, Relaxed)
            {
                Ok(_) => return Admit::Go { seq: Some(sent) },
                Err(actual) => sent = actual,
            }
        }
    }

    /// Learns a cooldown from the shared state: `key` cools down until `until` (cut to
    /// `max_cooldown` from `now`, and only ever extended).
    pub(crate) fn learn_shared(&self, key: Key, now: Instant, until: Instant) {
        let entry = {
            let shard = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
            shard.get(&key).cloned()
        };
        let e = entry.unwrap_or_else(|| self.insert(key, now));
        let until = self.nanos(until.min(now + self.tuning.max_cooldown));
        if e.until.load(Relaxed) < until {
            e.spread.store(e.limit.load(Relaxed) == 0, Relaxed);
            e.until.fetch_max(until, Relaxed);
        }
    }

    /// Learns from a response to a request for `key` sent at `sent_at` (send number
    /// `seq`, if it had one). Returns the cooldown's end, if one is now active, and
    /// whether this response moved it later.
    pub(crate) fn learn(
        &self,
        key: Key,
        seq: Option<u64>,
        sent_at: Instant,
        now: Instant,
        lesson: Lesson,
    ) -> Option<(Instant, bool)> {
        let t = &self.tuning;
        let exhausted = lesson.info.and_then(|i| i.exhausted_for());
        let low = lesson.info.is_some_and(|i| {
            let b = i.requests;
            match (b.remaining, b.reset) {
                (Some(r), Some(_)) => {
                    r <= t.pace_below || b.limit.is_some_and(|l| r.saturating_mul(10) <= l)
                }
                _ => false,
            }
        });
        let worth_an_entry = lesson.wait.is_some() || exhausted.is_some() || low;
        if !worth_an_entry && (self.entries.load(Relaxed) == 0 || lesson.info.is_none()) {
            return None;
        }
        let entry = {
            let shard = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
            shard.get(&key).cloned()
        };
        let entry = match entry {
            Some(e) => e,
            None if worth_an_entry => self.insert(key, now),
            None => return None,
        };
        let e = &*entry;
        let mut until = 0;
        if let Some(w) = lesson.wait {
            until = self.nanos(now + w.min(t.max_cooldown));
        }
        if let Some(d) = exhausted {
            until = until.max(self.nanos(sent_at + d.min(t.max_cooldown) + t.reset_margin));
        }
        if let Some(info) = lesson.info {
            let b = info.requests;
            if let (Some(remaining), Some(reset)) = (b.remaining, b.reset) {
                let order = seq.map_or(0, |s| s + 1);
                if order >= e.info_order.load(Relaxed) {
                    e.info_order.store(order, Relaxed);
                    e.limit.store(b.limit.unwrap_or(0), Relaxed);
                    e.reset_at.store(
                        self.nanos(sent_at + reset.min(t.max_cooldown) + t.reset_margin),
                        Relaxed,
                    );
                    e.budget_end.store(order.saturating_add(remaining), Relaxed);
                }
            }
        }
        if until != 0 {
            e.spread.store(e.limit.load(Relaxed) == 0, Relaxed);
            let before = e.until.fetch_max(until, Relaxed);
            return Some((self.instant(before.max(until)), until > before));
        }
        None
    }

    fn insert(&self, key: Key, now: Instant) -> Arc<Entry> {
        let n = self.nanos(now);
        let mut shard = self.shard(key).write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = shard.get(&key) {
            return e.clone();
        }
        let cap = (self.tuning.max_keys / SHARDS).max(1);
        if shard.len() >= cap {
            let idle = u64::try_from(self.tuning.idle.as_nanos()).unwrap_or(u64::MAX);
            let before = shard.len();
            shard.retain(|_, e| {
                e.until.load(Relaxed) > n || n.saturating_sub(e.last_seen.load(Relaxed)) < idle
            });
            let mut full = false;
            if shard.len() >= cap {
                // Still full of live keys: drop the least recently seen of those with no
                // cooldown running and nobody waiting (they lose only their pacing). A
                // cooldown is never forgotten before it ends, so no caller can lift one
                // by teaching the gate about other keys; when every key holds one, the
                // new key's lesson is not kept (the provider will say it again).
                match shard
                    .iter()
                    .filter(|(_, e)| e.until.load(Relaxed) <= n && e.waiters.load(Relaxed) == 0)
                    .min_by_key(|(_, e)| e.last_seen.load(Relaxed))
                    .map(|(k, _)| *k)
                {
                    Some(oldest) => {
                        shard.remove(&oldest);
                    }
                    None => full = true,
                }
            }
            self.entries.fetch_sub(before - shard.len(), Relaxed);
            if full {
                tracing::debug!("retry_after_aware full of keys cooling down: lesson not kept");
                return Arc::new(Entry::default());
            }
        }
        let e = Arc::new(Entry {
            budget_end: AtomicU64::new(UNPACED),
            last_seen: AtomicU64::new(n),
            ..Entry::default()
        });
        // A full shard that forgets a key for each new one fills its table with deleted
        // slots, and a std `HashMap` more than half full then doubles its table rather
        // than rehash it in place: twice the bytes per key, for nothing. Rehashed into
        // the size the shard's bound needs instead; the eighth of room on top of the
        // bound makes a rehash clear at least that many slots.
        shard.reserve(1);
        if shard.capacity() >= self.table_grown.load(Relaxed) {
            shard.shrink_to(self.table_keys);
            self.table_grown
                .fetch_max(shard.capacity().saturating_add(1), Relaxed);
        }
        shard.insert(key, e.clone());
        self.entries.fetch_add(1, Relaxed);
        e
    }

    /// Every key whose cooldown has not ended at `now`: its key, the end, and the
    /// requests waiting for it. Reads every shard.
    pub(crate) fn cooling(&self, now: Instant) -> Vec<(Key, Instant, usize)> {
        let n = self.nanos(now);
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.read().unwrap_or_else(|p| p.into_inner());
            out.extend(shard.iter().filter_map(|(k, e)| {
                let until = e.until.load(Relaxed);
                (until > n).then(|| (*k, self.instant(until), e.waiters.load(Relaxed)))
            }));
        }
        out
    }

    /// How many keys' cooldowns have not ended at `now`.
    #[cfg(feature = "metrics")]
    pub(crate) fn cooling_count(&self, now: Instant) -> usize {
        let n = self.nanos(now);
        self.shards
            .iter()
            .map(|s| {
                let s = s.read().unwrap_or_else(|p| p.into_inner());
                s.values().filter(|e| e.until.load(Relaxed) > n).count()
            })
            .sum()
    }

    /// Refreshes the `keys_cooling` gauge, at most once a second (a storm of 429s
    /// counts the map once a second, not once an answer).
    #[cfg(feature = "metrics")]
    pub(crate) fn refresh_gauge(&self, now: Instant) {
        let n = self.nanos(now);
        let last = self.gauge_at.load(Relaxed);
        if last != 0 && n.saturating_sub(last) < 1_000_000_000 {
            return;
        }
        if self
            .gauge_at
            .compare_exchange(last, n, Relaxed, Relaxed)
            .is_ok()
        {
            crate::meter::keys_cooling(self.cooling_count(now));
        }
    }

    /// Removes keys idle for longer than the idle time, with no cooldown.
    pub(crate) fn evict_idle(&self, now: Instant) {
        let n = self.nanos(now);
        let idle = u64::try_from(self.tuning.idle.as_nanos()).unwrap_or(u64::MAX);
        for shard in self.shards.iter() {
            let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
            let before = shard.len();
            shard.retain(|_, e| {
                e.until.load(Relaxed) > n || n.saturating_sub(e.last_seen.load(Relaxed)) < idle
            });
            self.entries.fetch_sub(before - shard.len(), Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_ai_core::Bucket;

    fn tuning() -> Tuning {
        Tuning {
            max_cooldown: Duration::from_secs(120),
            pace_below: 4,
            reset_margin: Duration::ZERO,
            recheck: Duration::from_millis(250),
            idle: Duration::from_secs(60),
            max_keys: 32,
            max_waiters_per_key: 2,
            max_waiters: 3,
        }
    }

    fn bucket(limit: u64, remaining: u64, reset: Duration) -> RateLimitInfo {
        RateLimitInfo {
            requests: Bucket {
                limit: Some(limit),
                remaining: Some(remaining),
                reset: Some(reset),
            },
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requested_wait_blocks_until_it_ends() {
        let c = Cooldowns::new(tuning());
        let k = Key::of("a");
        let now = Instant::now();
        assert_eq!(c.admit(k, now), Admit::Go { seq: None });
        let until = c.learn(
            k,
            None,
            now,
            now,
            Lesson {
                wait: Some(Duration::from_secs(7)),
                info: None,
            },
        );
        assert_eq!(until, Some((now + Duration::from_secs(7), true)));
        assert_eq!(
            c.admit(k, now + Duration::from_millis(6_999)),
            Admit::Wait {
                until: now + Duration::from_secs(7),
                spread: true
            }
        );
        assert!(matches!(
            c.admit(k, now + Duration::from_secs(7)),
            Admit::Go { .. }
        ));
        // Other keys are untouched.
        assert!(matches!(
            c.admit(Key::of("b"), now),
            Admit::Go { seq: None }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn paces_by_remaining_capacity_counting_sends_in_flight() {
        let c = Cooldowns::new(tuning());
        let k = Key::of("a");
        let t0 = Instant::now();
        // A response shows 3 left: entry made (3 <= pace_below 4).
        c.learn(
            k,
            None,
            t0,
            t0,
            Lesson {
                wait: None,
                info: Some(bucket(10, 3, Duration::from_secs(60))),
            },
        );
        let seqs: Vec<_> = (0..3).map(|_| c.admit(k, t0)).collect();
        assert_eq!(
            seqs,
            vec![
                Admit::Go { seq: Some(0) },
                Admit::Go { seq: Some(1) },
                Admit::Go { seq: Some(2) }
            ]
        );
        assert_eq!(
            c.admit(k, t0),
            Admit::Wait {
                until: t0 + Duration::from_secs(60),
                spread: false
            }
        );
        // The answer to send 0 says 2 left: sends 1 and 2 were after it, so none left.
        c.learn(
            k,
            Some(0),
            t0,
            t0,
            Lesson {
                wait: None,
                info: Some(bucket(10, 2, Duration::from_secs(60))),
            },
        );
        assert!(matches!(c.admit(k, t0), Admit::Wait { .. }));
        // At the reset, `limit` sends go, then the gate closes again.
        let t1 = t0 + Duration::from_secs(60);
        for _ in 0..10 {
            assert!(matches!(c.admit(k, t1), Admit::Go { .. }));
        }
        assert_eq!(
            c.admit(k, t1),
            Admit::Wait {
                until: t1 + Duration::from_millis(250),
                spread: false
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn churn_never_lifts_a_running_cooldown() {
        let c = Cooldowns::new(tuning());
        let now = Instant::now();
        let wait = |s| Lesson {
            wait: Some(Duration::from_secs(s)),
            info: None,
        };
        let victim = Key::of("victim");
        c.learn(victim, None, now, now, wait(60));
        // Every other key is seen later than the victim.
        for i in 0..10_000u32 {
            let t = now + Duration::from_micros(u64::from(i) + 1);
            c.learn(Key::of(&i), None, t, t, wait(60));
        }
        assert!(c.len() <= 32 + SHARDS, "{} keys kept", c.len());
        assert!(
            matches!(
                c.admit(victim, now + Duration::from_secs(1)),
                Admit::Wait { .. }
            ),
            "the cooldown survives key churn"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_with_idle_eviction() {
        let c = Cooldowns::new(tuning());
        let now = Instant::now();
        for i in 0..10_000u32 {
            c.learn(
                Key::of(&i),
                None,
                now,
                now,
                Lesson {
                    wait: Some(Duration::from_millis(1)),
                    info: None,
                },
            );
        }
        assert!(c.len() <= 32 + SHARDS, "{} keys kept", c.len());
        c.evict_idle(now + Duration::from_secs(3600));
        assert_eq!(c.len(), 0);
        assert_eq!(c.admit(Key::of(&1u32), now), Admit::Go { seq: None });
    }
}
