//! [`RetryAfterAwareLayer`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tower_ai_core::keys::HostModel;
use tower_layer::Layer;

use crate::config::{CooldownConfig, CooldownConfigBuilder};
use crate::cooldown::Cooldowns;
use crate::service::RetryAfterAware;

/// Wraps a service in [`RetryAfterAware`].
///
/// The cooldown state lives here, in one `Arc`: every service this layer makes, and
/// every clone of them, shares it (provider limits belong to an account, not to a
/// connection). Make a second layer for a separate state.
pub struct RetryAfterAwareLayer<K = HostModel> {
    pub(crate) shared: Arc<Shared<K>>,
}

pub(crate) struct Shared<K> {
    pub(crate) config: CooldownConfig,
    pub(crate) cooldowns: Cooldowns,
    pub(crate) key_fn: K,
    seeds: AtomicU64,
}

impl<K> Shared<K> {
    /// The RNG of a service the layer makes (clones fork their own, touching nothing
    /// shared).
    pub(crate) fn next_rng(&self) -> fastrand::Rng {
        fastrand::Rng::with_seed(
            self.seeds
                .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed),
        )
    }
}

impl<K> Clone for RetryAfterAwareLayer<K> {
    fn clone(&self) -> Self {
        RetryAfterAwareLayer {
            shared: self.shared.clone(),
        }
    }
}

impl<K> fmt::Debug for RetryAfterAwareLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryAfterAwareLayer")
            .field("config", &self.shared.config)
            .field("keys", &self.shared.cooldowns.len())
            .finish()
    }
}

impl RetryAfterAwareLayer<HostModel> {
    /// The default gate: key = provider host + model, wait up to 60 s.
    pub fn new() -> Self {
        RetryAfterAwareLayer::with_config(CooldownConfig::default())
    }

    /// A gate with a checked configuration, keyed by host + model.
    pub fn with_config(config: CooldownConfig) -> Self {
        RetryAfterAwareLayer::with_config_and_key(config, HostModel)
    }

    /// A builder; [`CooldownConfigBuilder::build`] returns the layer.
    pub fn builder() -> CooldownConfigBuilder {
        CooldownConfig::builder()
    }
}

impl Default for RetryAfterAwareLayer<HostModel> {
    fn default() -> Self {
        RetryAfterAwareLayer::new()
    }
}

impl<K> RetryAfterAwareLayer<K> {
    /// A gate with a checked configuration and a key function
    /// ([`HostModel`], [`ApiKeyHash`](tower_ai_core::keys::ApiKeyHash),
    /// [`Global`](tower_ai_core::keys::Global) or a closure).
    pub fn with_config_and_key(config: CooldownConfig, key_fn: K) -> Self {
        let seed = config.seed.unwrap_or_else(|| fastrand::u64(..));
        RetryAfterAwareLayer {
            shared: Arc::new(Shared {
                cooldowns: Cooldowns::new(config.tuning),
                config,
                key_fn,
                seeds: AtomicU64::new(seed),
            }),
        }
    }

    /// The same settings with another key function (and a new, empty state).
    pub fn key_fn<K2>(&self, key_fn: K2) -> RetryAfterAwareLayer<K2> {
        RetryAfterAwareLayer::with_config_and_key(self.shared.config.clone(), key_fn)
    }

    /// Keys that currently have state.
    pub fn tracked_keys(&self) -> usize {
        self.shared.cooldowns.len()
    }

    /// Keys with state, requests waiting, and the memory the keys take (see
    /// [`GateStats`]). Reads every shard: for monitoring and tests, not for every request.
    pub fn stats(&self) -> GateStats {
        let c = &self.shared.cooldowns;
        GateStats {
            keys: c.len(),
            waiters: c.waiters(),
            approx_bytes: c.approx_bytes(),
        }
    }

    /// A snapshot of every key cooling down now (its cooldown has not ended), for a
    /// health endpoint: the key (a hash: derive a request's with the key function, e.g.
    /// `HostModel.key(&req)`), when the cooldown ends, and how many requests wait for it.
    /// Reads every shard (at most `max_keys` entries): for monitoring, not for every
    /// request. With the `metrics` feature it also sets the
    /// `tower_ai.retry_after.keys_cooling` gauge.
    pub fn cooling(&self) -> Vec<CoolingKey> {
        let now = tokio::time::Instant::now();
        let keys: Vec<CoolingKey> = self
            .shared
            .cooldowns
            .cooling(now)
            .into_iter()
            .map(|(key, until, waiters)| CoolingKey {
                key,
                until,
                waiters,
            })
            .collect();
        #[cfg(feature = "metrics")]
        crate::meter::keys_cooling(keys.len());
        keys
    }

    /// `true` while the layer's shared [store](crate::store::CooldownStore) cannot be
    /// reached and cooldowns are decided in-process (always `false` without a store).
    pub fn is_degraded(&self) -> bool {
        self.shared
            .config
            .store
            .as_deref()
            .is_some_and(|s| s.is_degraded())
    }

    /// Drops the state of keys idle for longer than the idle time (also done when the
    /// map is full).
    pub fn evict_idle(&self) {
        self.shared
            .cooldowns
            .evict_idle(tokio::time::Instant::now());
    }
}

/// A key cooling down (see [`RetryAfterAwareLayer::cooling`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CoolingKey {
    /// The key (a salted hash; never a secret).
    pub key: tower_ai_core::keys::Key,
    /// When its cooldown ends.
    pub until: tokio::time::Instant,
    /// Requests waiting for it.
    pub waiters: usize,
}

/// What a [`RetryAfterAwareLayer`] holds (see [`RetryAfterAwareLayer::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GateStats {
    /// Keys with state (a cooldown, or a requests bucket being paced).
    pub keys: usize,
    /// Requests waiting for a cooldown to end.
    pub waiters: usize,
    /// The memory the keys take, in bytes: each shard's table at its capacity and each
    /// key's entry. Counted from sizes (an allocator's own overhead per allocation is not
    /// included).
    pub approx_bytes: usize,
}

impl<S, K> Layer<S> for RetryAfterAwareLayer<K> {
    type Service = RetryAfterAware<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryAfterAware::from_shared(inner, self.shared.clone())
    }
}
