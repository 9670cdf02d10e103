//! [`CircuitBreakerLayer`] and its builder.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tower_ai_core::keys::HostModel;
use tower_ai_core::ErrorKind;
use tower_layer::Layer;

use crate::config::{
    CircuitBreakerConfig, CircuitBreakerConfigBuilder, ConfigError, FailurePolicy,
};
use crate::event::{Emitter, Listener};
use crate::handle::CircuitBreakerHandle;
use crate::registry::Registry;
use crate::service::CircuitBreaker;

/// Wraps services in a [`CircuitBreaker`].
///
/// The layer owns the breakers (one `Arc` of shared state): every service it makes, and
/// every clone of them, shares one breaker per key. Two layers never share state. Get a
/// [`CircuitBreakerHandle`] with [`handle`](Self::handle) to read or force the breakers.
///
/// `K` derives the key from a request ([`HostModel`] by default: provider host + model);
/// `L` is the [`Listener`] (none by default).
pub struct CircuitBreakerLayer<K = HostModel, L = ()> {
    registry: Arc<Registry>,
    key_fn: Arc<K>,
    _listener: PhantomData<fn() -> L>,
}

impl CircuitBreakerLayer {
    /// A layer with the default configuration (see [`CircuitBreakerConfig::builder`]),
    /// keyed by provider host + model, without a listener.
    pub fn new() -> Self {
        Self::from_config(CircuitBreakerConfig::default())
    }

    /// A layer with `config`, keyed by provider host + model, without a listener.
    pub fn from_config(config: CircuitBreakerConfig) -> Self {
        CircuitBreakerLayer {
            registry: Registry::new(config, Emitter::new(())),
            key_fn: Arc::new(HostModel),
            _listener: PhantomData,
        }
    }

    /// A builder for the configuration, the key function and the listener.
    pub fn builder() -> CircuitBreakerBuilder {
        CircuitBreakerBuilder {
            config: CircuitBreakerConfig::builder(),
            key_fn: HostModel,
            listener: (),
        }
    }
}

impl Default for CircuitBreakerLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<K, L> CircuitBreakerLayer<K, L> {
    /// A handle on this layer's breakers.
    pub fn handle(&self) -> CircuitBreakerHandle<K> {
        CircuitBreakerHandle::new(self.registry.clone(), self.key_fn.clone())
    }

    /// The configuration.
    pub fn config(&self) -> &CircuitBreakerConfig {
        &self.registry.cfg
    }
}

impl<K, L> Clone for CircuitBreakerLayer<K, L> {
    fn clone(&self) -> Self {
        CircuitBreakerLayer {
            registry: self.registry.clone(),
            key_fn: self.key_fn.clone(),
            _listener: PhantomData,
        }
    }
}

impl<K, L> fmt::Debug for CircuitBreakerLayer<K, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("config", &self.registry.cfg)
            .finish_non_exhaustive()
    }
}

impl<S, K, L> Layer<S> for CircuitBreakerLayer<K, L> {
    type Service = CircuitBreaker<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::from_parts(inner, self.registry.clone(), self.key_fn.clone())
    }
}

/// Builds a [`CircuitBreakerLayer`]: the [configuration](CircuitBreakerConfigBuilder)'s
/// setters, plus the key function and the listener.
pub struct CircuitBreakerBuilder<K = HostModel, L = ()> {
    config: CircuitBreakerConfigBuilder,
    key_fn: K,
    listener: L,
}

macro_rules! delegate {
    ($( $(#[$m:meta])* $name:ident($($arg:ident: $ty:ty),*); )*) => {$(
        $(#[$m])*
        pub fn $name(mut self, $($arg: $ty),*) -> Self {
            self.config = self.config.$name($($arg),*);
            self
        }
    )*};
}

impl<K, L> CircuitBreakerBuilder<K, L> {
    delegate! {
        /// See [`CircuitBreakerConfigBuilder::count_window`].
        count_window(calls: u32);
        /// See [`CircuitBreakerConfigBuilder::time_window`].
        time_window(length: Duration, buckets: u32);
        /// See [`CircuitBreakerConfigBuilder::failure_rate`].
        failure_rate(rate: f64);
        /// See [`CircuitBreakerConfigBuilder::slow_calls`].
        slow_calls(threshold: Duration, rate: f64);
        /// See [`CircuitBreakerConfigBuilder::minimum_calls`].
        minimum_calls(calls: u32);
        /// See [`CircuitBreakerConfigBuilder::consecutive_failures`].
        consecutive_failures(n: u32);
        /// See [`CircuitBreakerConfigBuilder::open_duration`].
        open_duration(d: Duration);
        /// See [`CircuitBreakerConfigBuilder::open_backoff`].
        open_backoff(multiplier: f64, max: Duration);
        /// See [`CircuitBreakerConfigBuilder::half_open_probes`].
        half_open_probes(n: u32);
        /// See [`CircuitBreakerConfigBuilder::half_open_successes`].
        half_open_successes(n: u32);
        /// See [`CircuitBreakerConfigBuilder::failure_policy`].
        failure_policy(policy: FailurePolicy);
        /// See [`CircuitBreakerConfigBuilder::max_keys`].
        max_keys(n: usize);
        /// See [`CircuitBreakerConfigBuilder::idle_timeout`].
        idle_timeout(d: Duration);
    }

    /// See [`CircuitBreakerConfigBuilder::store`].
    pub fn store(mut self, store: impl crate::store::BreakerStore) -> Self {
        self.config = self.config.store(store);
        self
    }

    /// See [`CircuitBreakerConfigBuilder::failure_kinds`].
    pub fn failure_kinds(self, kinds: impl IntoIterator<Item = ErrorKind>) -> Self {
        self.failure_policy(FailurePolicy::kinds(kinds))
    }

    /// Derive keys with `key_fn` (a [`KeyFn`](tower_ai_core::keys::KeyFn):
    /// [`HostModel`], `ApiKeyHash`, `Global`, or a closure).
    pub fn key_fn<K2>(self, key_fn: K2) -> CircuitBreakerBuilder<K2, L> {
        CircuitBreakerBuilder {
            config: self.config,
            key_fn,
            listener: self.listener,
        }
    }

    /// Send events to `listener`.
    pub fn listener<L2: Listener>(self, listener: L2) -> CircuitBreakerBuilder<K, L2> {
        CircuitBreakerBuilder {
            config: self.config,
            key_fn: self.key_fn,
            listener,
        }
    }

    /// Checks the configuration and makes the layer.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the first value that makes no sense.
    pub fn build(self) -> Result<CircuitBreakerLayer<K, L>, ConfigError>
    where
        L: Listener,
    {
        let config = self.config.build()?;
        Ok(CircuitBreakerLayer {
            registry: Registry::new(config, Emitter::new(self.listener)),
            key_fn: Arc::new(self.key_fn),
            _listener: PhantomData,
        })
    }
}

impl<K, L> fmt::Debug for CircuitBreakerBuilder<K, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
