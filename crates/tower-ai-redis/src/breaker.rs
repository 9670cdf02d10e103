//! [`RedisBreakers`]: CircuitBreaker's per-key state shared by every replica through Redis.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis::Script;
use tower_ai_circuit_breaker::store::{BreakerSink, BreakerStore, SharedState};
use tower_ai_core::keys::Key;

use crate::cooldown::{script_failed, RUNNING};
use crate::periodic::Periodic;
use crate::{RedisStore, StoreError};

/// Opens a breaker: `KEYS[1]` (a hash: `st`, `until`, `succ`) becomes `open` until
/// `now + ARGV[1]` ms, or its later end if already open; its probe permits (`KEYS[2]`)
/// are dropped; the index of open breakers (`KEYS[3]`, member `ARGV[2]`) holds the end.
/// The state is kept `ARGV[3]` ms past its end (for the probes). Returns the ms left.
pub(crate) const OPEN: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local untl = now + math.max(1, math.floor(tonumber(ARGV[1]) or 1))
local st = redis.call('HGET', KEYS[1], 'st')
local cur = tonumber(redis.call('HGET', KEYS[1], 'until') or '0') or 0
if st == 'open' and cur > untl then untl = cur end
redis.call('HSET', KEYS[1], 'st', 'open', 'until', untl, 'succ', 0)
redis.call('DEL', KEYS[2])
redis.call('PEXPIREAT', KEYS[1], untl + tonumber(ARGV[3]))
redis.call('ZADD', KEYS[3], untl, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local ttl = redis.call('PTTL', KEYS[3])
if ttl < 0 or now + ttl < untl then redis.call('PEXPIREAT', KEYS[3], untl) end
return untl - now
";

/// Takes a probe permit: `{code, ms}`: 0 closed (no state), 1 open (`ms` left),
/// 2 busy (every one of `ARGV[1]` permits out; ask again in `ms`), 3 granted (permit
/// `ARGV[2]`, expiring after `ARGV[3]` ms). An open state whose end has passed becomes
/// half-open here, atomically, so the permits of all replicas are counted in one place.
pub(crate) const PROBE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local st = redis.call('HGET', KEYS[1], 'st')
if not st then return {0, 0} end
local untl = tonumber(redis.call('HGET', KEYS[1], 'until') or '0') or 0
if st == 'open' and now < untl then return {1, untl - now} end
if st == 'open' then redis.call('HSET', KEYS[1], 'st', 'half', 'succ', 0) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  local retry = 250
  if first[2] then retry = math.max(1, math.min(retry, tonumber(first[2]) - now)) end
  return {2, retry}
end
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[2], ttl)
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return {3, 0}
";

/// A probe ended: permit `ARGV[1]` given back; `ARGV[2]` = 1 for a success, counted
/// toward `ARGV[3]` successes, which close (delete) the state and its index entry
/// (`KEYS[3]`, member `ARGV[4]`). `{code, ms}`: 0 closed, 1 open (`ms` left), 4 half-open.
pub(crate) const PROBE_DONE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local st = redis.call('HGET', KEYS[1], 'st')
if not st then return {0, 0} end
redis.call('ZREM', KEYS[2], ARGV[1])
if st == 'open' then
  local untl = tonumber(redis.call('HGET', KEYS[1], 'until') or '0') or 0
  return {1, math.max(0, untl - now)}
end
if ARGV[2] ~= '1' then return {4, 0} end
local succ = redis.call('HINCRBY', KEYS[1], 'succ', 1)
if succ >= tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[4])
  return {0, 0}
end
return {4, 0}
";

static OPEN_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(OPEN));
static PROBE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(PROBE));
static PROBE_DONE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(PROBE_DONE));
static RUNNING_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RUNNING));

/// The most labels tracked for the refresher (a bound on hostile key churn; when full,
/// the map starts again from the breakers that call next).
const MAX_TRACKED: usize = 10_000;

/// CircuitBreaker's per-key state in Redis, shared by every replica: give it to
/// [`CircuitBreakerBuilder::store`](tower_ai_circuit_breaker::CircuitBreakerBuilder::store).
///
/// - **Shared:** the state (open, half-open, closed) and the end of an open period, per
///   key (named by the key function's label, `host/model` by default). A breaker that
///   opens in one replica opens the shared state at once (one round trip, off the call's
///   path); every replica reads the open breakers (one round trip for them all) every
///   [`refresh`](Self::refresh) period (default 500 ms, at most 1 s) and opens its own.
/// - **Probes:** when an open period ends, a replica takes a probe permit from Redis
///   before it lets a probe through (a Lua script counts the permits of all replicas), so
///   the probes in flight across the replicas stay within `half_open_probes`; the calls
///   that arrive meanwhile are refused, as a half-open breaker refuses calls beyond its
///   permits. The successes of all replicas' probes count toward `half_open_successes`;
///   one failed probe reopens it for all. A permit expires after
///   [`permit_ttl`](Self::permit_ttl) (default 10 min), so a crashed replica's permit
///   comes back.
/// - **Local:** the failure window stays per replica (each replica measures the calls it
///   sends, with no round trip per call; behind a load balancer each sees the same failure
///   rate, and the first to trip opens it for all). The closed state's call path is the
///   in-process one: one atomic load.
///
/// When Redis is down or slow the breakers decide in-process (each replica probes on its
/// own permits), after at most the store's response timeout, and share again when it is
/// back.
///
/// ```no_run
/// use tower_ai_circuit_breaker::CircuitBreakerLayer;
/// use tower_ai_redis::{RedisBreakers, RedisStore};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::open("redis://127.0.0.1:6379/")?;
/// let breaker = CircuitBreakerLayer::builder()
///     .half_open_probes(2)
///     .store(RedisBreakers::new(store))
///     .build()?;
/// # let _ = breaker;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisBreakers {
    inner: Arc<Inner>,
}

/// The local breakers of one label: their keys and where their answers go.
type Tracked = Vec<(Key, BreakerSink)>;

struct Inner {
    store: RedisStore,
    tag: String,
    index: String,
    refresh: Duration,
    permit_ttl: Duration,
    /// Local breakers by label (several layers may share one store).
    tracked: Mutex<HashMap<Box<str>, Tracked>>,
    /// The probe permits this replica holds, by label.
    permits: Mutex<HashMap<Box<str>, Vec<u64>>>,
    next_permit: AtomicU64,
    refresher: Periodic,
}

impl fmt::Debug for RedisBreakers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBreakers")
            .field("tag", &self.inner.tag)
            .field("refresh", &self.inner.refresh)
            .field("store", &self.inner.store)
            .finish_non_exhaustive()
    }
}

impl RedisBreakers {
    /// The default hash tag of the breaker keys (every breaker of the layer in one Redis
    /// Cluster slot).
    pub const DEFAULT_TAG: &'static str = "breakers";
    /// The default refresh period.
    pub const DEFAULT_REFRESH: Duration = Duration::from_millis(500);
    /// The default lifetime of a probe permit.
    pub const DEFAULT_PERMIT_TTL: Duration = Duration::from_secs(600);

    /// Breakers shared through `store`.
    pub fn new(store: RedisStore) -> Self {
        Self::with(
            store,
            Self::DEFAULT_TAG,
            Self::DEFAULT_REFRESH,
            Self::DEFAULT_PERMIT_TTL,
        )
    }

    /// How often the open breakers are read, kept within 10 ms..=1 s (default
    /// [`DEFAULT_REFRESH`](Self::DEFAULT_REFRESH)).
    pub fn refresh(self, period: Duration) -> Self {
        let period = period.clamp(Duration::from_millis(10), Duration::from_secs(1));
        let i = &self.inner;
        Self::with(i.store.clone(), &i.tag, period, i.permit_ttl)
    }

    /// How long a probe permit lasts if its replica never says how the probe ended (a
    /// crash), at least 1 s (default [`DEFAULT_PERMIT_TTL`](Self::DEFAULT_PERMIT_TTL)).
    /// Keep it above the longest call.
    pub fn permit_ttl(self, ttl: Duration) -> Self {
        let i = &self.inner;
        Self::with(
            i.store.clone(),
            &i.tag,
            i.refresh,
            ttl.max(Duration::from_secs(1)),
        )
    }

    /// The Redis Cluster hash tag of the keys (default [`DEFAULT_TAG`](Self::DEFAULT_TAG)).
    pub fn tag(self, tag: impl Into<String>) -> Self {
        let i = &self.inner;
        Self::with(i.store.clone(), &tag.into(), i.refresh, i.permit_ttl)
    }

    fn with(store: RedisStore, tag: &str, refresh: Duration, permit_ttl: Duration) -> Self {
        RedisBreakers {
            inner: Arc::new(Inner {
                index: store.key("breaker-index", tag, ""),
                store,
                tag: tag.to_owned(),
                refresh,
                permit_ttl,
                tracked: Mutex::default(),
                permits: Mutex::default(),
                next_permit: AtomicU64::new(0),
                refresher: Periodic::new(),
            }),
        }
    }

    /// The store.
    pub fn store(&self) -> &RedisStore {
        &self.inner.store
    }

    fn keys(&self, label: &str) -> [String; 2] {
        let s = &self.inner.store;
        [
            s.key("breaker", &self.inner.tag, label),
            s.key("breaker-probes", &self.inner.tag, label),
        ]
    }

    fn ms(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }

    /// Opens `label`'s shared breaker for `open_for` (or its later end); returns the time
    /// left of the open state now held.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis could not be asked or the script failed.
    pub async fn open(&self, label: &str, open_for: Duration) -> Result<Duration, StoreError> {
        let [state, probes] = self.keys(label);
        let keep = Self::ms(self.inner.permit_ttl);
        let left: i64 = self
            .inner
            .store
            .run(
                &OPEN_SCRIPT,
                &[state.as_str(), probes.as_str(), self.inner.index.as_str()],
                &[&Self::ms(open_for).max(1), &label, &keep],
            )
            .await?;
        Ok(Duration::from_millis(left.max(0).unsigned_abs()))
    }

    /// Asks for a probe permit of `label` among at most `max`.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis could not be asked or the script failed.
    pub async fn take_permit(&self, label: &str, max: u32) -> Result<SharedState, StoreError> {
        let [state, probes] = self.keys(label);
        let id = self.inner.next_permit.fetch_add(1, Ordering::Relaxed);
        let member = format!("{}#{id}", self.inner.store.instance_id());
        let (code, ms): (i64, i64) = self
            .inner
            .store
            .run(
                &PROBE_SCRIPT,
                &[state.as_str(), probes.as_str()],
                &[&max, &member, &Self::ms(self.inner.permit_ttl)],
            )
            .await?;
        let ms = Duration::from_millis(ms.max(0).unsigned_abs());
        Ok(match code {
            0 => SharedState::Closed,
            1 => SharedState::Open(ms),
            2 => SharedState::Busy(ms),
            _ => {
                self.inner
                    .permits
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(label.into())
                    .or_default()
                    .push(id);
                SharedState::Granted
            }
        })
    }

    /// Gives back one of this replica's permits of `label`, with a success or not.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis could not be asked or the script failed.
    pub async fn return_permit(
        &self,
        label: &str,
        success: bool,
        needed: u32,
    ) -> Result<SharedState, StoreError> {
        let id = {
            let mut permits = self.inner.permits.lock().unwrap_or_else(|e| e.into_inner());
            let id = permits.get_mut(label).and_then(Vec::pop);
            if permits.get(label).is_some_and(Vec::is_empty) {
                permits.remove(label);
            }
            id
        };
        let member = match id {
            Some(id) => format!("{}#{id}", self.inner.store.instance_id()),
            None => String::new(),
        };
        let [state, probes] = self.keys(label);
        let (code, ms): (i64, i64) = self
            .inner
            .store
            .run(
                &PROBE_DONE_SCRIPT,
                &[state.as_str(), probes.as_str(), self.inner.index.as_str()],
                &[&member, &u8::from(success), &needed, &label],
            )
            .await?;
        Ok(match code {
            0 => SharedState::Closed,
            1 => SharedState::Open(Duration::from_millis(ms.max(0).unsigned_abs())),
            _ => SharedState::HalfOpen,
        })
    }

    /// Every open breaker, by label, with the time left (one round trip).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis could not be asked or the script failed.
    pub async fn open_breakers(&self) -> Result<Vec<(String, Duration)>, StoreError> {
        let list: Vec<(String, i64)> = self
            .inner
            .store
            .run(
                &RUNNING_SCRIPT,
                &[self.inner.index.as_str()],
                &[&MAX_TRACKED],
            )
            .await?;
        Ok(list
            .into_iter()
            .map(|(l, ms)| (l, Duration::from_millis(ms.max(0).unsigned_abs())))
            .collect())
    }

    /// Reads the open breakers and opens the local ones of the same labels.
    async fn refresh_tracked(&self) {
        if self
            .inner
            .tracked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            return;
        }
        let Ok(open) = self.open_breakers().await else {
            return; // down: decided in-process; the store logged it once
        };
        let targets: Vec<(Key, BreakerSink, Duration)> = {
            let tracked = self.inner.tracked.lock().unwrap_or_else(|e| e.into_inner());
            open.iter()
                .filter_map(|(label, left)| tracked.get(label.as_str()).map(|t| (t, *left)))
                .flat_map(|(t, left)| t.iter().map(move |(k, s)| (*k, s.clone(), left)))
                .collect()
        };
        for (key, sink, left) in targets {
            sink.apply(key, SharedState::Open(left));
        }
    }

    fn start_refresher(&self) {
        let inner = &self.inner;
        inner
            .refresher
            .start(inner, inner.refresh, |inner| async move {
                RedisBreakers { inner }.refresh_tracked().await;
            });
    }

    /// Runs `work` in the runtime and hands its answer to `sink` (without a runtime, or on
    /// an error, the breaker is told to decide in-process).
    fn spawn_answer<F>(&self, key: Key, sink: &BreakerSink, work: F)
    where
        F: std::future::Future<Output = Result<SharedState, StoreError>> + Send + 'static,
    {
        let sink = sink.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            sink.apply(key, SharedState::Unavailable);
            return;
        };
        runtime.spawn(async move {
            let state = work.await.unwrap_or_else(|e| {
                script_failed(&e);
                SharedState::Unavailable
            });
            sink.apply(key, state);
        });
    }
}

impl BreakerStore for RedisBreakers {
    fn opened(&self, key: Key, label: &str, open_for: Duration, sink: &BreakerSink) {
        let this = self.clone();
        let label = label.to_owned();
        // The answer is what Redis holds (perhaps a later end); when the opening could
        // not be shared, the breaker is told so (it then probes on its own permits, as
        // Redis would call the key closed).
        self.spawn_answer(key, sink, async move {
            this.open(&label, open_for).await.map(SharedState::Open)
        });
    }

    fn probe(&self, key: Key, label: &str, max: u32, sink: &BreakerSink) {
        let this = self.clone();
        let label = label.to_owned();
        self.spawn_answer(
            key,
            sink,
            async move { this.take_permit(&label, max).await },
        );
    }

    fn probe_done(&self, key: Key, label: &str, success: bool, needed: u32, sink: &BreakerSink) {
        let this = self.clone();
        let label = label.to_owned();
        self.spawn_answer(key, sink, async move {
            this.return_permit(&label, success, needed).await
        });
    }

    fn track(&self, key: Key, label: &str, sink: &BreakerSink) {
        {
            let mut tracked = self.inner.tracked.lock().unwrap_or_else(|e| e.into_inner());
            if tracked.len() >= MAX_TRACKED {
                tracked.clear();
            }
            let list = tracked.entry(label.into()).or_default();
            list.retain(|(k, _)| *k != key);
            list.push((key, sink.clone()));
        }
        self.start_refresher();
    }

    fn is_degraded(&self) -> bool {
        self.inner.store.is_degraded()
    }
}
