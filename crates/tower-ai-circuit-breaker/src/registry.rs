//! The per-key map of breakers: bounded, idle keys evicted, and found on the hot path
//! without a lock, an allocation or a write to a shared cache line.
//!
//! Each key's breaker ([`Core`]) is reached through one [`Lane`] per thread stripe that
//! called it (made on the stripe's first call, so a key one thread calls holds one lane,
//! however many stripes there are): a small `Arc` whose reference count and count-window
//! counter live on its own cache lines. A call clones the lane of its thread's stripe and
//! counts its success in it (writes only that thread makes), so two tasks on two cores do
//! not bounce a cache line between them. Each service keeps the lane of the last key
//! it called (reused while its breaker is not evicted and the thread's stripe is the
//! lane's); otherwise lanes are found through a small per-thread cache (16 direct-mapped
//! slots keyed by layer and key); a miss takes the shard's `RwLock` for reading, and only
//! a new key takes it for writing.
//!
//! A lane lives while something other than its breaker holds it: when a thread's cache
//! slot or a service's last lane moves to another key and only the breaker is left
//! holding the lane, the breaker lets it go and keeps its counts ([`let_go`]). An idle
//! key holds its breaker, its label and its slot in the map (~180 bytes), not a
//! 256-byte padded lane per stripe that ever called it; a key that comes back makes a
//! lane again (an allocation, on the miss path only).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tower_ai_core::keys::{Key, KeyMap};

use crate::breaker::{Core, Shared};
use crate::clock;
use crate::config::CircuitBreakerConfig;
use crate::event::Emitter;
use crate::store::BreakerSink;
use crate::window::{thread_stripe, StripeCalls};

/// A thread stripe's way to a breaker, made by [`Core::lane`] and let go by [`let_go`]
/// once nothing but its breaker holds it.
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct Lane {
    pub(crate) core: Arc<Core>,
    pub(crate) stripe: usize,
    /// The stripe's share of the window (the breaker sums its lanes).
    pub(crate) calls: StripeCalls,
}

/// Drops a reference to `lane` kept for later calls (a thread's cache slot, a service's
/// last lane) that now points elsewhere. If only the breaker still holds the lane, the
/// breaker lets go of it: a key nobody calls holds no lane. (A lane whose last other
/// holder was a call is let go by the next `let_go` or lookup of its key, or when the
/// key is forgotten.)
#[inline]
pub(crate) fn let_go(lane: Arc<Lane>) {
    // Held elsewhere too (a call, a clone of the service, another slot): no use looking.
    // Only a hint; the breaker decides under its lock.
    if Arc::strong_count(&lane) <= 2 {
        let_go_slow(lane);
    }
}

#[cold]
#[inline(never)]
fn let_go_slow(lane: Arc<Lane>) {
    let core = lane.core.clone();
    core.release(lane);
}

impl Lane {
    /// Whether a lane kept from an earlier call is still the one to use: its breaker was
    /// not evicted (a new call would count into a breaker nobody reads), and it is the
    /// calling thread's stripe (a service moved to another thread must not write the
    /// first thread's cache lines).
    #[inline]
    pub(crate) fn is_current(&self) -> bool {
        !self.core.evicted.load(Ordering::Relaxed) && self.stripe == thread_stripe()
    }
}

/// A key in the map: its breaker, which owns its lanes until the entry is dropped.
#[derive(Debug)]
struct Entry {
    core: Arc<Core>,
}

impl Entry {
    /// Stripe `stripe`'s lane, made if it is the stripe's first call.
    fn lane(&self, stripe: usize) -> Arc<Lane> {
        self.core.lane(stripe)
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.core.detach();
    }
}

type Shard = RwLock<KeyMap<Entry>>;

const SHARDS: usize = 16;
const CACHE_SLOTS: usize = 16;

/// The breakers of one layer.
#[derive(Debug)]
pub(crate) struct Registry {
    uid: u64,
    pub(crate) cfg: Arc<CircuitBreakerConfig>,
    pub(crate) emitter: Emitter,
    shards: Box<[Shard]>,
    per_shard: usize,
    /// The capacity of a shard's table sized for `per_shard` keys.
    table: usize,
    /// Where a shared store's answers go (only with a store).
    sink: Option<BreakerSink>,
    /// What every breaker of the layer shares.
    shared: Arc<Shared>,
}

struct Slot {
    layer: u64,
    key: Key,
    lane: Arc<Lane>,
}

thread_local! {
    static CACHE: RefCell<[Option<Slot>; CACHE_SLOTS]> =
        const { RefCell::new([const { None }; CACHE_SLOTS]) };
}

fn slot_of(layer: u64, key: Key) -> usize {
    ((key.as_u64() ^ layer.wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 60) as usize % CACHE_SLOTS
}

impl Registry {
    pub(crate) fn new(cfg: CircuitBreakerConfig, emitter: Emitter) -> Arc<Registry> {
        static UID: AtomicU64 = AtomicU64::new(1);
        let per_shard = cfg.max_keys.div_ceil(SHARDS).max(1);
        Arc::new_cyclic(|me| {
            let sink = cfg.store.is_some().then(|| BreakerSink::new(me.clone()));
            let cfg = Arc::new(cfg);
            let epoch = clock::now();
            Registry {
                uid: UID.fetch_add(1, Ordering::Relaxed),
                shared: Shared::new(cfg.clone(), epoch, emitter.clone(), sink.clone()),
                sink,
                cfg,
                emitter,
                shards: (0..SHARDS).map(|_| Shard::default()).collect(),
                per_shard,
                table: KeyMap::<()>::with_capacity_and_hasher(per_shard, Default::default())
                    .capacity(),
            }
        })
    }

    fn shard(&self, key: Key) -> &Shard {
        &self.shards[(key.as_u64() >> 32) as usize % SHARDS]
    }

    /// The calling thread's lane to `key`'s breaker, created if needed (`label` is called
    /// only then). `None` when the map is full of keys that cannot be evicted (forced).
    #[inline]
    pub(crate) fn lane(&self, key: Key, label: impl FnOnce() -> String) -> Option<Arc<Lane>> {
        let i = slot_of(self.uid, key);
        let hit = CACHE
            .try_with(|c| {
                let c = c.borrow();
                match &c[i] {
                    Some(s)
                        if s.layer == self.uid
                            && s.key == key
                            && !s.lane.core.evicted.load(Ordering::Relaxed) =>
                    {
                        Some(s.lane.clone())
                    }
                    _ => None,
                }
            })
            .ok()
            .flatten();
        if hit.is_some() {
            return hit;
        }
        self.lane_slow(key, i, label)
    }

    #[cold]
    fn lane_slow(&self, key: Key, i: usize, label: impl FnOnce() -> String) -> Option<Arc<Lane>> {
        let stripe = thread_stripe();
        let lane = self
            .lookup(key, stripe)
            .or_else(|| self.insert(key, label, |e| e.lane(stripe)))?;
        let old = CACHE
            .try_with(|c| {
                let mut c = c.try_borrow_mut().ok()?;
                c[i].replace(Slot {
                    layer: self.uid,
                    key,
                    lane: lane.clone(),
                })
            })
            .ok()
            .flatten();
        if let Some(old) = old {
            let_go(old.lane);
        }
        Some(lane)
    }

    fn lookup(&self, key: Key, stripe: usize) -> Option<Arc<Lane>> {
        let map = self.shard(key).read().unwrap_or_else(|e| e.into_inner());
        map.get(&key).map(|e| e.lane(stripe))
    }

    /// `f` of `key`'s entry, made if needed. `None` when the map is full of forced keys.
    fn insert<R>(
        &self,
        key: Key,
        label: impl FnOnce() -> String,
        f: impl FnOnce(&Entry) -> R,
    ) -> Option<R> {
        let now = clock::now();
        let mut map = self.shard(key).write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get(&key) {
            return Some(f(e));
        }
        // Forget idle keys; if still full, the least recently used one that is not forced.
        let idle = self.cfg.idle_timeout;
        map.retain(|_, e| {
            let keep = e.core.is_forced() || e.core.idle_for(now) < idle;
            if !keep {
                e.core.evicted.store(true, Ordering::Relaxed);
            }
            keep
        });
        if map.len() >= self.per_shard {
            let victim = map
                .iter()
                .filter(|(_, e)| !e.core.is_forced())
                .min_by_key(|(_, e)| e.core.last_used())
                .map(|(k, _)| *k);
            match victim {
                Some(k) => {
                    if let Some(e) = map.remove(&k) {
                        e.core.evicted.store(true, Ordering::Relaxed);
                        tracing::debug!(circuit.key = %e.core.label, "circuit breaker map full: forgot the least recently used key");
                    }
                }
                None => {
                    tracing::warn!(
                        "circuit breaker map full of forced keys: a new key passes unguarded"
                    );
                    return None;
                }
            }
        }
        let core = Arc::new(Core::new(key, Arc::from(label()), self.shared.clone(), now));
        let entry = map.entry(key).or_insert(Entry { core });
        let r = f(entry);
        // A full shard that forgets a key for each new one fills its table with deleted
        // slots, and the table then doubles (a table more than half full grows rather
        // than rehashes in place): twice the bytes per key, for nothing. Rehashed into
        // the table its bound needs instead (64 keys moved every few dozen new keys).
        if map.capacity() > self.table {
            map.shrink_to(self.per_shard);
        }
        drop(map);
        if let (Some(store), Some(sink), Some(core)) = (&self.cfg.store, &self.sink, self.get(key))
        {
            store.track(key, &core.label, sink);
        }
        Some(r)
    }

    /// The breaker of `key`, if it is tracked.
    pub(crate) fn get(&self, key: Key) -> Option<Arc<Core>> {
        let map = self.shard(key).read().unwrap_or_else(|e| e.into_inner());
        map.get(&key).map(|e| e.core.clone())
    }

    /// The breaker of `key`, created (labelled `label`) if needed.
    pub(crate) fn get_or_insert(
        &self,
        key: Key,
        label: impl FnOnce() -> String,
    ) -> Option<Arc<Core>> {
        if let Some(c) = self.get(key) {
            return Some(c);
        }
        self.insert(key, label, |e| e.core.clone())
    }

    /// Every tracked breaker.
    pub(crate) fn all(&self) -> Vec<Arc<Core>> {
        self.shards
            .iter()
            .flat_map(|s| {
                let map = s.read().unwrap_or_else(|e| e.into_inner());
                map.values().map(|e| e.core.clone()).collect::<Vec<_>>()
            })
            .collect()
    }

    /// How many keys are tracked.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Forgets `key`.
    pub(crate) fn remove(&self, key: Key) -> bool {
        let mut map = self.shard(key).write().unwrap_or_else(|e| e.into_inner());
        match map.remove(&key) {
            Some(e) => {
                e.core.evicted.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn reg(max: usize) -> Arc<Registry> {
        let cfg = CircuitBreakerConfig::builder()
            .max_keys(max)
            .idle_timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        Registry::new(cfg, Emitter::new(()))
    }

    #[test]
    fn lanes_are_cached_per_thread_and_shared_per_key() {
        let r = reg(64);
        let a = r.lane(Key::of("a"), || "a".into()).unwrap();
        let a2 = r
            .lane(Key::of("a"), || unreachable!("no second insert"))
            .unwrap();
        assert!(Arc::ptr_eq(&a, &a2));
        let b = r.lane(Key::of("b"), || "b".into()).unwrap();
        assert!(!Arc::ptr_eq(&a.core, &b.core));
        assert_eq!(r.len(), 2);
        // another layer with the same key has its own breaker
        let r2 = reg(64);
        let other = r2.lane(Key::of("a"), || "a".into()).unwrap();
        assert!(!Arc::ptr_eq(&a.core, &other.core));
    }

    #[test]
    fn the_map_stays_bounded() {
        let r = reg(SHARDS); // one key per shard
        for i in 0..10_000u32 {
            r.lane(Key::of(&i), || i.to_string()).unwrap();
        }
        assert!(r.len() <= SHARDS, "{}", r.len());
        // an evicted key's cached lane is not used again
        let k = Key::of(&0u32);
        r.remove(k);
        let fresh = r.lane(k, || "0".into()).unwrap();
        assert!(!fresh.core.evicted.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_are_forgotten() {
        let r = reg(1024);
        let a = r.lane(Key::of("a"), || "a".into()).unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        r.lane(Key::of("b"), || "b".into()).unwrap();
        // "a" is only swept from its own shard; sweep every shard by inserting widely.
        for i in 0..200u32 {
            r.lane(Key::of(&i), || i.to_string()).unwrap();
        }
        assert!(a.core.evicted.load(Ordering::Relaxed));
        assert!(r.get(Key::of("a")).is_none());
    }
}
