//! [`RedisStore`]: one Redis connection shared by every layer of a replica, with a short
//! admission timeout, a small breaker on Redis itself and the replica count. The
//! connection is to one server, or (feature `cluster`) to a Redis Cluster.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, Script, ToRedisArgs, Value};
use tokio::time::Instant;

use crate::periodic::{PerRuntime, Periodic};

/// Why a call to Redis did not give an answer.
///
/// Every variant but [`StoreError::Script`] means "Redis could not be asked": the layers
/// then decide in-process (fail open at limit ÷ N) or refuse (fail closed), as configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Redis is known to be down (the store's own breaker is open): no round trip was made.
    #[error("redis unavailable (skipped for {retry_in:?} after the last failure)")]
    Unavailable {
        /// When the store will try Redis again.
        retry_in: Duration,
    },
    /// Redis did not answer within the store's response timeout.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed (refused, reset, closed).
    #[error("redis connection failed: {0}")]
    Connection(String),
    /// Redis answered with an error, or an answer the script's caller could not read: a bug
    /// or a key of the wrong type, not an outage (the store's breaker does not count it).
    #[error("redis script failed: {0}")]
    Script(String),
}

impl StoreError {
    /// `true` when Redis could not be asked (down, slow, or skipped by the store's breaker);
    /// `false` for an answer that was an error.
    pub fn is_outage(&self) -> bool {
        !matches!(self, StoreError::Script(_))
    }
}

/// Settings of a [`RedisStore`]; see [`RedisStore::builder`].
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    prefix: String,
    response_timeout: Duration,
    connect_timeout: Duration,
    retry_after_outage: Duration,
    replicas: Option<u32>,
    heartbeat: Duration,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        Self {
            prefix: "tower-ai".to_owned(),
            response_timeout: RedisStore::DEFAULT_RESPONSE_TIMEOUT,
            connect_timeout: Duration::from_millis(250),
            retry_after_outage: Duration::from_millis(500),
            replicas: None,
            heartbeat: Duration::from_secs(1),
        }
    }
}

impl RedisStoreBuilder {
    /// The prefix of every key the store writes (default `tower-ai`), so several
    /// applications can share one Redis. A `{` or `}` in it is written `_`: the first
    /// `{…}` of a key is its Redis Cluster hash tag, which must be the layer's tag (see
    /// [`RedisStore::key`]).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into().replace(['{', '}'], "_");
        self
    }

    /// How long a call waits for Redis's answer before the layer decides without it
    /// (default [`RedisStore::DEFAULT_RESPONSE_TIMEOUT`]). Keep it short: every admission
    /// that finds Redis slow pays it once, before the store's breaker opens.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long one attempt to (re)connect may take (default 250 ms).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// After a failed call, how long the store skips Redis before one call tries it again
    /// (default 500 ms). Calls in between fail at once with [`StoreError::Unavailable`].
    pub fn retry_after_outage(mut self, wait: Duration) -> Self {
        self.retry_after_outage = wait;
        self
    }

    /// The number of replicas sharing the limits, used to divide a limit when Redis is
    /// down. Unset (the default), the store counts live replicas by a heartbeat in Redis.
    pub fn replicas(mut self, replicas: u32) -> Self {
        self.replicas = Some(replicas.max(1));
        self
    }

    /// How often the heartbeat refreshes the replica count (default 1 s; a replica is
    /// counted for three periods after its last beat).
    pub fn heartbeat(mut self, period: Duration) -> Self {
        self.heartbeat = period.max(Duration::from_millis(10));
        self
    }

    /// The store, talking to `client`'s server. No I/O happens here: the connection is made
    /// on first use, and a replica starts even while Redis is down.
    pub fn build(self, client: redis::Client) -> RedisStore {
        // No response timeout of redis-rs's own: every call runs under the store's (see
        // `guarded`), and a second timer per call would cost a registration in Tokio's
        // timer wheel and its removal, for an answer given at the same instant. A call cut
        // by either leaves the connection as it is (redis-rs reconnects on a dropped
        // connection, not on a timeout).
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(self.connect_timeout))
            .set_number_of_retries(1)
            .set_max_delay(self.retry_after_outage);
        self.with_target(Target::Single { client, config })
    }

    /// The store, talking to the Redis Cluster of `client` (feature `cluster`): each
    /// script goes to the primary that holds its keys' slot (every key of one call carries
    /// the same hash tag, see [`RedisStore::key`]); redis-rs's cluster client follows
    /// `MOVED` and `ASK` and refreshes its map of the slots by itself.
    ///
    /// No I/O happens here: the connections are made on first use, and a replica starts
    /// even while the cluster is down. The store's response and connect timeouts apply to
    /// each node's connection; the client's own retries (redirections, reconnections) all
    /// happen within the store's response timeout, after which the call decides without
    /// Redis as on one server.
    ///
    /// The store's breaker on Redis is kept per hash tag (in [`RedisStore::SHARDS`]
    /// buckets): while one node is down, the calls of the tags it serves are decided
    /// in-process without a round trip, and the calls of the other nodes' tags go on to
    /// them. One warning is logged per tag's outage; [`RedisStore::is_degraded`] is `true`
    /// while any is.
    #[cfg(feature = "cluster")]
    pub fn build_cluster(self, client: redis::cluster::ClusterClient) -> RedisStore {
        let config = redis::cluster::ClusterConfig::new()
            .set_response_timeout(self.response_timeout)
            .set_connection_timeout(self.connect_timeout);
        self.with_target(Target::Cluster { client, config })
    }

    fn with_target(self, target: Target) -> RedisStore {
        let configured = self.replicas;
        #[cfg(feature = "cluster")]
        let shards = match target {
            Target::Single { .. } => Box::default(),
            Target::Cluster { .. } => (0..RedisStore::SHARDS)
                .map(|_| Breaker::default())
                .collect(),
        };
        RedisStore {
            inner: Arc::new(Inner {
                target,
                conn: PerRuntime::new(true),
                id: instance_id(),
                epoch: Instant::now(),
                breaker: Breaker::default(),
                #[cfg(feature = "cluster")]
                shards,
                degraded: AtomicU32::new(0),
                answered: AtomicBool::new(false),
                skipped: AtomicU64::new(0),
                replicas: AtomicU32::new(configured.unwrap_or(1)),
                heartbeat: Periodic::new(),
                config: self,
            }),
        }
    }
}

/// One connection to Redis, shared by the layers of a replica (clone it freely: clones
/// share the connection, the health state and the replica count).
///
/// - **Connection:** redis-rs's connection manager, multiplexed and reconnecting by itself;
///   scripts run by `EVALSHA` and are loaded again after `SCRIPT FLUSH` or a restart.
/// - **Outages:** every call has a short response timeout; after a failure the store skips
///   Redis for [`retry_after_outage`](RedisStoreBuilder::retry_after_outage), so calls do not
///   each pay the timeout, then lets one call try again. [`is_degraded`](Self::is_degraded)
///   tells whether the last call failed; one warning is logged per outage and one note when
///   Redis is back. On a cluster (feature `cluster`) this breaker is kept per hash tag, so a
///   node down holds back only the calls of the tags it serves.
/// - **Replicas:** [`replicas`](Self::replicas) is the number of replicas sharing the limits,
///   configured or counted by a heartbeat, used to divide a limit while Redis is down.
/// - **Runtimes:** the connection's task, the heartbeat and the layers' background tasks run
///   in the Tokio runtime of the store's first use, and serve calls from any runtime while it
///   lives. Once it is gone (a `#[tokio::test]` ended, an application built a new runtime),
///   the next call makes them again in its own runtime: a store kept in a `static` goes on
///   from one runtime to the next, with no call failed.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    /// Made on first use, inside the runtime (redis-rs spawns the connection's task there),
    /// and made again in the current runtime when that one is gone (its task with it).
    conn: PerRuntime<Conn>,
    id: String,
    epoch: Instant,
    /// The breaker on Redis: of the whole store on one server; on a cluster, of the
    /// commands without a key.
    breaker: Breaker,
    /// On a cluster: the breakers of the hash tags' buckets.
    #[cfg(feature = "cluster")]
    shards: Box<[Breaker]>,
    /// How many breakers are in an outage.
    degraded: AtomicU32,
    /// Redis has answered at least once (the first call gets the connect timeout).
    answered: AtomicBool,
    /// Calls answered `Unavailable` without a round trip.
    skipped: AtomicU64,
    replicas: AtomicU32,
    heartbeat: Periodic,
    config: RedisStoreBuilder,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.config.prefix)
            .field("degraded", &self.is_degraded())
            .field("replicas", &self.replicas())
            .finish_non_exhaustive()
    }
}

/// Heartbeat: this replica is alive until now + ttl; the answer is the number of replicas
/// alive now. On Redis's clock.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
";

impl RedisStore {
    /// The default response timeout: 20 ms, so a call that finds Redis gone decides
    /// without it within 25 ms.
    pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_millis(20);

    /// Settings for a store.
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder::default()
    }

    /// A store with the default settings, for a URL such as `redis://127.0.0.1:6379/` or
    /// `redis+unix:///run/redis.sock`. No I/O happens here.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError::Connection(e.to_string()))?;
        Ok(Self::builder().build(client))
    }

    /// A store with the default settings on the Redis Cluster that `nodes` belong to (URLs
    /// such as `redis://10.0.0.1:6379/`; one reachable node is enough to learn the others).
    /// No I/O happens here. For other settings of the store, or of the cluster client
    /// (TLS, credentials), see [`RedisStoreBuilder::build_cluster`].
    ///
    /// The client is redis-rs's with [`CLUSTER_RETRIES`](Self::CLUSTER_RETRIES) retries
    /// (its default, 16, with waits between them, outlasts any response timeout a store
    /// uses).
    ///
    /// ```no_run
    /// use tower_ai_redis::RedisStore;
    ///
    /// # fn main() -> Result<(), tower_ai_redis::StoreError> {
    /// let store = RedisStore::cluster(["redis://10.0.0.1:6379/", "redis://10.0.0.2:6379/"])?;
    /// # let _ = store; Ok(()) }
    /// ```
    #[cfg(feature = "cluster")]
    pub fn cluster<T: redis::IntoConnectionInfo>(
        nodes: impl IntoIterator<Item = T>,
    ) -> Result<Self, StoreError> {
        let client = redis::cluster::ClusterClient::builder(nodes)
            .retries(Self::CLUSTER_RETRIES)
            .build()
            .map_err(|e| StoreError::Connection(e.to_string()))?;
        Ok(Self::builder().build_cluster(client))
    }

    /// On a cluster, the number of buckets the store's breaker on Redis is kept in, by hash
    /// tag (see [`RedisStoreBuilder::build_cluster`]).
    #[cfg(feature = "cluster")]
    pub const SHARDS: usize = 64;

    /// The retries of [`cluster`](Self::cluster)'s client: enough to follow a redirection
    /// (`MOVED`, `ASK`) after the cluster moved a slot, and to reconnect once.
    #[cfg(feature = "cluster")]
    pub const CLUSTER_RETRIES: u32 = 2;

    /// `true` while Redis is unreachable (the last call failed, or is being skipped); on a
    /// cluster, while the node of any hash tag is.
    pub fn is_degraded(&self) -> bool {
        self.inner.degraded.load(Ordering::Relaxed) != 0
    }

    /// The number of replicas sharing the limits: configured, or the last count of the
    /// heartbeat (1 until it has run; the last count while Redis is down).
    pub fn replicas(&self) -> u32 {
        self.start_heartbeat();
        self.inner.replicas.load(Ordering::Relaxed).max(1)
    }

    /// How long a call may wait for Redis's answer: the response timeout, or the connect
    /// timeout if longer while Redis has not answered yet (the first call also connects).
    pub(crate) fn answer_within(&self) -> Duration {
        let inner = &self.inner;
        if inner.answered.load(Ordering::Relaxed) {
            inner.config.response_timeout
        } else {
            inner
                .config
                .connect_timeout
                .max(inner.config.response_timeout)
        }
    }

    /// How many calls the store's breaker answered [`StoreError::Unavailable`] without a
    /// round trip, while Redis was known to be down.
    pub fn skipped(&self) -> u64 {
        self.inner.skipped.load(Ordering::Relaxed)
    }

    /// This replica's id in Redis (host name, process id and a random part).
    pub fn instance_id(&self) -> &str {
        &self.inner.id
    }

    /// A key of this store: `{prefix}:{kind}:{{tag}}:{key}`. `tag` is the Redis Cluster hash
    /// tag: every key of one decision must carry the same one (e.g. the provider account),
    /// so that one script touches one slot. A `{` or `}` in `tag` is written `_`, and an
    /// empty tag is `_` (Redis hashes a key with an empty `{}` whole, which would put the
    /// keys of one decision in different slots).
    pub fn key(&self, kind: &str, tag: &str, key: &str) -> String {
        let prefix = &self.inner.config.prefix;
        let mut k = String::with_capacity(prefix.len() + kind.len() + tag.len() + key.len() + 6);
        k.push_str(prefix);
        k.push(':');
        k.push_str(kind);
        k.push_str(":{");
        // A `}` in the tag would end the hash tag early; it cannot come from our layers'
        // keys, but a caller-made tag is cleaned rather than trusted.
        k.extend(
            tag.chars()
                .map(|c| if c == '}' || c == '{' { '_' } else { c }),
        );
        if tag.is_empty() {
            k.push('_');
        }
        k.push_str("}:");
        k.push_str(key);
        k
    }

    /// Runs `script` with `keys` and `args`, within the response timeout and through the
    /// store's breaker. `EVALSHA` first; the script is loaded again when Redis has lost it.
    pub async fn run<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&dyn ToRedisArgsDyn],
    ) -> Result<T, StoreError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            arg.push_to(&mut invocation);
        }
        self.run_prepared(&invocation, keys.first().copied()).await
    }

    /// Runs a prepared invocation (keys and arguments already added), as [`run`](Self::run);
    /// `first_key` is the invocation's first key (it picks the breaker on a cluster).
    pub(crate) async fn run_prepared<T: FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
        first_key: Option<&str>,
    ) -> Result<T, StoreError> {
        let mut conn = self.connection()?;
        let breaker = self.breaker_of(first_key);
        self.guarded(breaker, async move {
            invocation.invoke_async::<T>(&mut conn).await
        })
        .await
    }

    /// Runs `cmd`, an `EVALSHA` of `script` written by the caller (its keys and arguments
    /// straight into the command's one buffer, where a [`redis::ScriptInvocation`] keeps a
    /// vector per argument and copies them all into a command per call), as
    /// [`run_prepared`](Self::run_prepared): the script is loaded again when Redis has
    /// lost it.
    pub(crate) async fn run_cmd<T: FromRedisValue>(
        &self,
        cmd: &Cmd,
        script: &Script,
        first_key: Option<&str>,
    ) -> Result<T, StoreError> {
        let mut conn = self.connection()?;
        let breaker = self.breaker_of(first_key);
        self.guarded(breaker, async move {
            match cmd.query_async::<T>(&mut conn).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    script.load_async(&mut conn).await?;
                    cmd.query_async::<T>(&mut conn).await
                }
                result => result,
            }
        })
        .await
    }

    /// An `EVALSHA` of `script` with `keys` keys, to which the caller adds the keys, then
    /// the arguments (see [`run_cmd`](Self::run_cmd)).
    pub(crate) fn evalsha(script: &Script, keys: usize) -> Cmd {
        // Room for a strict admission carrying a few settlements without growing.
        let mut cmd = Cmd::with_capacity(48, 1024);
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
        cmd
    }

    /// Runs one command within the response timeout and through the store's breaker.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let mut conn = self.connection()?;
        self.guarded((&self.inner.breaker, None), async move {
            cmd.query_async::<T>(&mut conn).await
        })
        .await
    }

    /// `true` while the Redis that a call whose first key is `first_key` goes to is in an
    /// outage (its calls fail or are skipped).
    pub(crate) fn is_down(&self, first_key: Option<&str>) -> bool {
        self.breaker_of(first_key)
            .0
            .degraded
            .load(Ordering::Relaxed)
    }

    /// The breaker of a call whose first key is `key`, with the key's hash tag on a
    /// cluster (one breaker for the whole store on one server).
    fn breaker_of<'a>(&'a self, key: Option<&'a str>) -> (&'a Breaker, Option<&'a str>) {
        #[cfg(feature = "cluster")]
        if !self.inner.shards.is_empty() {
            if let Some(tag) = key.and_then(hash_tag) {
                let shards = &self.inner.shards;
                return (&shards[bucket(tag, shards.len())], Some(tag));
            }
        }
        let _ = key;
        (&self.inner.breaker, None)
    }

    fn connection(&self) -> Result<Conn, StoreError> {
        let inner = &self.inner;
        let conn = inner.conn.get_or_try_make(|runtime| {
            let conn = inner.target.connect()?;
            // A task of this runtime, ended with it: while it runs, so does the
            // connection's (redis-rs gives no handle on its own).
            let alive = runtime.spawn(std::future::pending());
            // The first call on a new connection connects (and may load the script).
            inner.answered.store(false, Ordering::Relaxed);
            Ok::<_, StoreError>((conn, alive))
        })?;
        conn.ok_or_else(|| StoreError::Connection("no Tokio runtime".to_owned()))
    }

    async fn guarded<T>(
        &self,
        (breaker, tag): (&Breaker, Option<&str>),
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.start_heartbeat();
        let inner = &self.inner;
        let now = self.now_ms();
        let until = breaker.down_until_ms.load(Ordering::Acquire);
        if now < until {
            inner.skipped.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Unavailable {
                retry_in: Duration::from_millis(until - now),
            });
        }
        if until != 0 {
            // Redis was down: one call tries it again, the others keep skipping it until this
            // one has an answer (or its timeout has passed).
            let probe_until = now + inner.config.response_timeout.as_millis() as u64 + 1;
            if breaker
                .down_until_ms
                .compare_exchange(until, probe_until, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                inner.skipped.fetch_add(1, Ordering::Relaxed);
                return Err(StoreError::Unavailable {
                    retry_in: inner.config.response_timeout,
                });
            }
        }
        // The first call also connects (and loads the script): it gets the connect timeout.
        let timeout = self.answer_within();
        let result = match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(StoreError::Timeout(timeout)),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_timeout() => Err(StoreError::Timeout(timeout)),
            Ok(Err(e)) if is_outage(&e) => Err(StoreError::Connection(e.to_string())),
            Ok(Err(e)) => Err(StoreError::Script(e.to_string())),
        };
        match &result {
            Err(e) if e.is_outage() => self.mark_down(breaker, tag, e),
            _ => self.mark_up(breaker, tag),
        }
        result
    }

    fn mark_down(&self, breaker: &Breaker, tag: Option<&str>, error: &StoreError) {
        let inner = &self.inner;
        let until = self.now_ms() + inner.config.retry_after_outage.as_millis() as u64;
        breaker.down_until_ms.store(until.max(1), Ordering::Release);
        if !breaker.degraded.swap(true, Ordering::AcqRel) {
            inner.degraded.fetch_add(1, Ordering::AcqRel);
            tracing::warn!(
                target: "tower_ai::redis",
                error = %error,
                hash_tag = tag,
                "redis unreachable: limits are decided in-process until it is back"
            );
        }
    }

    fn mark_up(&self, breaker: &Breaker, tag: Option<&str>) {
        let inner = &self.inner;
        if !inner.answered.load(Ordering::Relaxed) {
            inner.answered.store(true, Ordering::Relaxed);
        }
        if breaker.down_until_ms.load(Ordering::Relaxed) != 0 {
            breaker.down_until_ms.store(0, Ordering::Release);
        }
        if breaker.degraded.load(Ordering::Relaxed)
            && breaker.degraded.swap(false, Ordering::AcqRel)
        {
            inner.degraded.fetch_sub(1, Ordering::AcqRel);
            tracing::info!(
                target: "tower_ai::redis",
                hash_tag = tag,
                "redis reachable again: limits shared"
            );
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that "0" stays free to mean "not skipped".
        self.inner.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Starts the heartbeat task on first use (needs a Tokio runtime; without one, or with a
    /// configured replica count, there is nothing to start).
    fn start_heartbeat(&self) {
        let inner = &self.inner;
        if inner.config.replicas.is_some() {
            return;
        }
        let period = inner.config.heartbeat;
        inner
            .heartbeat
            .start(inner, period, move |inner| async move {
                static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(HEARTBEAT));
                let store = RedisStore { inner };
                let key = store.key("replicas", "replicas", "alive");
                let ttl = (period * 3).as_millis() as u64;
                // On an outage (logged once by the store) the last count stays.
                if let Ok(n) = store
                    .run::<u32>(&SCRIPT, &[&key], &[&store.inner.id.as_str(), &ttl])
                    .await
                {
                    store.inner.replicas.store(n.max(1), Ordering::Relaxed);
                }
            });
    }
}

/// A breaker on Redis: after a failure, calls skip Redis until `down_until_ms`, then one
/// tries it again.
#[derive(Default)]
struct Breaker {
    /// Milliseconds since the store's epoch before which Redis is skipped (0: not
    /// skipped).
    down_until_ms: AtomicU64,
    /// In an outage (counted in the store's `degraded`).
    degraded: AtomicBool,
}

/// The hash tag of `key`, as Redis Cluster reads it: what is between the first `{` and
/// the first `}` after it, when that is not empty.
#[cfg(feature = "cluster")]
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')? + 1;
    let len = key[open..].find('}')?;
    (len > 0).then(|| &key[open..open + len])
}

/// The bucket of `tag` among `n` (FNV-1a: a few instructions a byte; tags are short).
#[cfg(feature = "cluster")]
fn bucket(tag: &str, n: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tag.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h % n as u64) as usize
}

/// What a store connects to: one server, or a cluster.
enum Target {
    Single {
        client: redis::Client,
        config: ConnectionManagerConfig,
    },
    #[cfg(feature = "cluster")]
    Cluster {
        client: redis::cluster::ClusterClient,
        config: redis::cluster::ClusterConfig,
    },
}

impl Target {
    /// A connection made lazily: no I/O until its first command (redis-rs spawns its
    /// reconnecting task in the current runtime).
    fn connect(&self) -> Result<Conn, StoreError> {
        match self {
            Target::Single { client, config } => {
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                    .map(Conn::Single)
                    .map_err(|e| StoreError::Connection(e.to_string()))
            }
            #[cfg(feature = "cluster")]
            Target::Cluster { client, config } => Ok(Conn::Cluster(
                client.get_pending_async_connection_with_config(config.clone()),
            )),
        }
    }
}

/// The connection of a store: a clone per call (both kinds are handles to one multiplexed
/// connection and its task).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// An argument of [`RedisStore::run`]: anything redis-rs can send (numbers, strings).
pub trait ToRedisArgsDyn: Sync {
    /// Adds `self` to the invocation's arguments.
    fn push_to(&self, invocation: &mut redis::ScriptInvocation<'_>);
}

impl<T: ToRedisArgs + Sync> ToRedisArgsDyn for T {
    fn push_to(&self, invocation: &mut redis::ScriptInvocation<'_>) {
        invocation.arg(self);
    }
}

/// Redis could not be asked, as opposed to an answer that was an error. On a cluster: no
/// connection to the node of a slot, the cluster down, a slot moving (`TRYAGAIN`, or a
/// redirection still unfollowed when the client's retries ran out) or a primary that a
/// failover turned into a replica (`READONLY`).
fn is_outage(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::Moved
                        | ServerErrorKind::Ask
                        | ServerErrorKind::ReadOnly
                )
        )
}

fn instance_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    format!("{}:{}:{:016x}", host, std::process::id(), fastrand_u64())
}

pub(crate) fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // std's RandomState is seeded per process from the OS: enough to tell replicas apart.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part of `key` Redis Cluster hashes: the first `{…}` with something between the
    /// braces, else the whole key (the cluster specification's "hash tags").
    fn hashed(key: &str) -> &str {
        let Some(open) = key.find('{') else {
            return key;
        };
        match key[open + 1..].find('}') {
            Some(0) | None => key,
            Some(len) => &key[open + 1..open + 1 + len],
        }
    }

    #[test]
    fn the_keys_of_one_tag_hash_alike_whatever_the_prefix_tag_and_label() {
        let client = redis::Client::open("redis://127.0.0.1:1/").unwrap();
        for prefix in ["tower-ai", "a{b", "{app}", "x}y{", ""] {
            let store = RedisStore::builder().prefix(prefix).build(client.clone());
            for tag in ["budget", "", "a}b", "{x}", "tenant{1", "}"] {
                let mut keys: Vec<String> = [
                    "budget:rpm",
                    "budget:conc",
                    "budget:lease:tpm",
                    "breaker",
                    "breaker-index",
                    "cooldown",
                ]
                .iter()
                .flat_map(|kind| {
                    [
                        store.key(kind, tag, "api.openai.com/gpt-4o"),
                        store.key(kind, tag, "{other}/m"),
                        store.key(kind, tag, ""),
                    ]
                })
                .collect();
                // The scripts' derived keys (a spend window's `base:index`).
                keys.push(format!("{}:{}", keys[0], 493_921));
                let first = hashed(&keys[0]);
                assert_ne!(
                    first, keys[0],
                    "{prefix:?} {tag:?}: no hash tag in {}",
                    keys[0]
                );
                for k in &keys {
                    assert_eq!(hashed(k), first, "{prefix:?} {tag:?}: {k} vs {}", keys[0]);
                    // The store's breaker on a cluster reads the tag the same way.
                    #[cfg(feature = "cluster")]
                    assert_eq!(hash_tag(k), Some(first));
                }
            }
        }
    }
}
