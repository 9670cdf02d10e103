//! [`RedisCooldowns`]: RetryAfterAware's cooldowns shared by every replica through Redis.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use redis::Script;
use tokio::time::Instant;
use tower_ai_retry_after::store::{Check, CooldownStore, SharedCooldown, StoreFuture};

use crate::periodic::Periodic;
use crate::{RedisStore, StoreError};

/// Extends a cooldown: `KEYS[1]` holds the absolute end (milliseconds on Redis's clock)
/// and expires then; `KEYS[2]` indexes every running cooldown by its end (member: the
/// label, `ARGV[2]`). `ARGV[1]`: the wait in milliseconds. The end only ever moves later
/// (`max(existing, now + wait)`). Returns the milliseconds left of the cooldown now held.
pub(crate) const EXTEND: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wait = tonumber(ARGV[1])
if not wait or wait < 1 then return 0 end
local untl = now + math.floor(wait)
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if cur >= untl then return cur - now end
redis.call('SET', KEYS[1], untl, 'PXAT', untl)
redis.call('ZADD', KEYS[2], untl, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local ttl = redis.call('PTTL', KEYS[2])
if ttl < 0 or now + ttl < untl then redis.call('PEXPIREAT', KEYS[2], untl) end
return untl - now
";

/// The milliseconds left of `KEYS[1]`'s cooldown (0: none).
pub(crate) const REMAINING: &str = r"
local left = redis.call('PTTL', KEYS[1])
if left > 0 then return left end
return 0
";

/// Every running cooldown of the index `KEYS[1]` (at most `ARGV[1]`), as a flat list of
/// label and milliseconds left; forgets the ended ones.
pub(crate) const RUNNING: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local r = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
for i = 2, #r, 2 do r[i] = tonumber(r[i]) - now end
return r
";

static EXTEND_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(EXTEND));
static REMAINING_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REMAINING));
static RUNNING_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RUNNING));

/// The most cooldowns a leased copy holds (the index read takes at most this many).
const MAX_COPIED: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Strict,
    Leased { refresh: Duration },
}

/// RetryAfterAware's cooldowns in Redis, shared by every replica: give it to
/// [`CooldownConfigBuilder::store`](tower_ai_retry_after::CooldownConfigBuilder::store).
///
/// A cooldown learned by one replica (a `429` with `retry-after: 5`) is an absolute end
/// on Redis's clock, only ever extended (`max(existing, new)`), in a key that expires at
/// that end. Each replica still keeps the cooldowns it knows in-process until they end,
/// so a key known to be cooling costs no round trip.
///
/// - **Strict** ([`strict`](Self::strict)): a request the local state lets go asks Redis
///   (one round trip, `PTTL` in a script); a replica that learns a cooldown hands its
///   response out only once Redis holds it, so every replica is held from then on.
/// - **Leased** ([`leased`](Self::leased)): no round trip per request; each replica reads
///   every running cooldown (one round trip for them all) every
///   [`refresh`](Self::refresh) period (default 500 ms, at most 1 s), from when it is
///   made in a Tokio runtime (else from its first request), and checks requests against
///   that copy. Publishing is as in strict mode.
///
/// Why a per-replica refresher rather than pub/sub for leased mode: a subscription needs a
/// connection of its own per replica and loses every message sent while it reconnects,
/// so a replica would need a full read after each reconnect anyway; the refresher is that
/// read, one round trip per period whatever the traffic, and its staleness is bounded by
/// the period even across outages.
///
/// Keys are named by the key function's label (`host/model` by default): see
/// [`tower_ai_retry_after::store::CooldownStore`]. When Redis is down or slow, requests are
/// decided in-process (each replica's own cooldowns) after at most the store's response
/// timeout, and shared again when it is back.
///
/// ```no_run
/// use tower_ai_redis::{RedisCooldowns, RedisStore};
/// use tower_ai_retry_after::RetryAfterAwareLayer;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::open("redis://127.0.0.1:6379/")?;
/// let gate = RetryAfterAwareLayer::builder()
///     .store(RedisCooldowns::strict(store))
///     .build()?;
/// # let _ = gate;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisCooldowns {
    inner: Arc<Inner>,
}

struct Inner {
    store: RedisStore,
    mode: Mode,
    tag: String,
    index: String,
    /// Leased: the running cooldowns read last, by label.
    copy: RwLock<HashMap<Box<str>, Instant>>,
    /// Leased: the copy holds at least one cooldown.
    active: AtomicBool,
    refresher: Periodic,
}

impl fmt::Debug for RedisCooldowns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCooldowns")
            .field("mode", &self.inner.mode)
            .field("tag", &self.inner.tag)
            .field("store", &self.inner.store)
            .finish_non_exhaustive()
    }
}

impl RedisCooldowns {
    /// The default hash tag of the cooldown keys: every cooldown of the layer is in one
    /// Redis Cluster slot (the scripts touch a cooldown and the index of all of them).
    pub const DEFAULT_TAG: &'static str = "cooldowns";

    /// The default refresh period of leased mode.
    pub const DEFAULT_REFRESH: Duration = Duration::from_millis(500);

    /// Strict mode: one round trip per request the local state lets go.
    pub fn strict(store: RedisStore) -> Self {
        Self::with_mode(store, Mode::Strict, Self::DEFAULT_TAG)
    }

    /// Leased mode: requests are checked against a copy of the running cooldowns read
    /// every [`DEFAULT_REFRESH`](Self::DEFAULT_REFRESH).
    pub fn leased(store: RedisStore) -> Self {
        Self::with_mode(
            store,
            Mode::Leased {
                refresh: Self::DEFAULT_REFRESH,
            },
            Self::DEFAULT_TAG,
        )
    }

    /// Leased mode: starts reading the running cooldowns now (made within a Tokio
    /// runtime), rather than at the first request.
    fn start(self) -> Self {
        if let Mode::Leased { refresh } = self.inner.mode {
            self.start_refresher(refresh);
        }
        self
    }

    /// The refresh period of leased mode, kept within 10 ms..=1 s (no effect in strict
    /// mode).
    pub fn refresh(self, period: Duration) -> Self {
        let mode = match self.inner.mode {
            Mode::Strict => Mode::Strict,
            Mode::Leased { .. } => Mode::Leased {
                refresh: period.clamp(Duration::from_millis(10), Duration::from_secs(1)),
            },
        };
        Self::with_mode(self.inner.store.clone(), mode, &self.inner.tag)
    }

    /// The Redis Cluster hash tag of the keys (default [`DEFAULT_TAG`](Self::DEFAULT_TAG)),
    /// e.g. the provider account when several accounts share one cluster.
    pub fn tag(self, tag: impl Into<String>) -> Self {
        Self::with_mode(self.inner.store.clone(), self.inner.mode, &tag.into())
    }

    fn with_mode(store: RedisStore, mode: Mode, tag: &str) -> Self {
        Self::made(store, mode, tag).start()
    }

    fn made(store: RedisStore, mode: Mode, tag: &str) -> Self {
        RedisCooldowns {
            inner: Arc::new(Inner {
                index: store.key("cooldown-index", tag, ""),
                store,
                mode,
                tag: tag.to_owned(),
                copy: RwLock::default(),
                active: AtomicBool::new(false),
                refresher: Periodic::new(),
            }),
        }
    }

    /// The store.
    pub fn store(&self) -> &RedisStore {
        &self.inner.store
    }

    /// The key holding `label`'s cooldown.
    fn key(&self, label: &str) -> String {
        self.inner.store.key("cooldown", &self.inner.tag, label)
    }

    /// Shares a cooldown of `wait` for `label` now; returns what Redis holds then.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis could not be asked or the script failed.
    pub async fn extend(&self, label: &str, wait: Duration) -> Result<Duration, StoreError> {
        let key = self.key(label);
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        let left: i64 = self
            .inner
            .store
            .run(
                &EXTEND_SCRIPT,
                &[key.as_str(), self.inner.index.as_str()],
                &[&ms, &label],
            )
            .await?;
        Ok(Duration::from_millis(left.max(0).unsigned_abs()))
    }

    /// The shared cooldown left for `label` (zero: none), one round trip.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis could not be asked or the script failed.
    pub async fn remaining(&self, label: &str) -> Result<Duration, StoreError> {
        let key = self.key(label);
        let left: i64 = self
            .inner
            .store
            .run(&REMAINING_SCRIPT, &[key.as_str()], &[])
            .await?;
        Ok(Duration::from_millis(left.max(0).unsigned_abs()))
    }

    /// Every running cooldown, by label, with the time left (one round trip).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when Redis could not be asked or the script failed.
    pub async fn running(&self) -> Result<Vec<(String, Duration)>, StoreError> {
        let list: Vec<(String, i64)> = self
            .inner
            .store
            .run(
                &RUNNING_SCRIPT,
                &[self.inner.index.as_str()],
                &[&MAX_COPIED],
            )
            .await?;
        Ok(list
            .into_iter()
            .map(|(l, ms)| (l, Duration::from_millis(ms.max(0).unsigned_abs())))
            .collect())
    }

    /// Leased mode: reads the running cooldowns into the local copy.
    async fn refresh_copy(&self) {
        let Ok(list) = self.running().await else {
            // Down: the last copy stays (its cooldowns end by themselves); the store
            // logged the outage once.
            return;
        };
        let now = Instant::now();
        let copy: HashMap<Box<str>, Instant> = list
            .into_iter()
            .map(|(l, left)| (l.into_boxed_str(), now + left))
            .collect();
        let active = !copy.is_empty();
        *self.inner.copy.write().unwrap_or_else(|e| e.into_inner()) = copy;
        self.inner.active.store(active, Ordering::Relaxed);
    }

    /// Leased mode: starts the refresher on first use (in the runtime of the first call).
    fn start_refresher(&self, refresh: Duration) {
        let inner = &self.inner;
        inner.refresher.start(inner, refresh, |inner| async move {
            RedisCooldowns { inner }.refresh_copy().await;
        });
    }
}

impl CooldownStore for RedisCooldowns {
    fn consult(&self) -> bool {
        match self.inner.mode {
            Mode::Strict => true,
            Mode::Leased { refresh } => {
                self.start_refresher(refresh);
                self.inner.active.load(Ordering::Relaxed)
            }
        }
    }

    fn check(&self, label: &str) -> Check {
        match self.inner.mode {
            Mode::Strict => {
                let this = self.clone();
                let label = label.to_owned();
                Check::Later(Box::pin(async move {
                    match this.remaining(&label).await {
                        Ok(left) if !left.is_zero() => SharedCooldown::Cooling(left),
                        Ok(_) => SharedCooldown::Clear,
                        Err(e) => {
                            script_failed(&e);
                            SharedCooldown::Unavailable
                        }
                    }
                }))
            }
            Mode::Leased { .. } => {
                let copy = self.inner.copy.read().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                Check::Now(match copy.get(label) {
                    Some(&until) if until > now => SharedCooldown::Cooling(until - now),
                    _ => SharedCooldown::Clear,
                })
            }
        }
    }

    fn publish(&self, label: &str, wait: Duration) -> Option<StoreFuture<()>> {
        let this = self.clone();
        let label = label.to_owned();
        Some(Box::pin(async move {
            if let Err(e) = this.extend(&label, wait).await {
                script_failed(&e);
            }
        }))
    }

    fn is_degraded(&self) -> bool {
        self.inner.store.is_degraded()
    }
}

/// A script's error is a bug or a foreign key of the wrong type, not an outage (which the
/// store logs once): said at each occurrence.
pub(crate) fn script_failed(e: &StoreError) {
    if !e.is_outage() {
        tracing::warn!(target: "tower_ai::redis", error = %e, "redis script failed: decided in-process");
    }
}
