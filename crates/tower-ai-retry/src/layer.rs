//! [`AiRetryLayer`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tower_layer::Layer;

use crate::config::{AiRetryConfig, AiRetryConfigBuilder};
use crate::service::AiRetry;

/// Wraps a service in [`AiRetry`].
///
/// Holds the configuration (one `Arc`) and the [`RetryBudget`](crate::RetryBudget):
/// every service this layer makes, and every clone of them, shares one budget.
#[derive(Debug, Clone)]
pub struct AiRetryLayer {
    pub(crate) shared: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    /// One configuration, shared by refcount with every service and future.
    pub(crate) config: Arc<AiRetryConfig>,
    /// Seeds handed to each service the layer makes (clones fork their own).
    seeds: AtomicU64,
}

impl Shared {
    pub(crate) fn next_rng(&self) -> fastrand::Rng {
        let n = self
            .seeds
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        fastrand::Rng::with_seed(n)
    }
}

impl AiRetryLayer {
    /// Retries with the default configuration and `max_attempts` attempts in all.
    ///
    /// Infallible: a count outside 1..=100 is clamped into it (0 is 1, no retry; above
    /// 100 is 100), with a warning traced. For an error instead, use
    /// [`builder`](AiRetryLayer::builder)`().max_attempts(n).build()`.
    pub fn new(max_attempts: u32) -> Self {
        if !(1..=100).contains(&max_attempts) {
            tracing::warn!(
                max_attempts,
                "AiRetryLayer::new: max_attempts clamped to 1..=100"
            );
        }
        let config = AiRetryConfig {
            max_attempts: max_attempts.clamp(1, 100),
            ..AiRetryConfig::default()
        };
        AiRetryLayer::with_config(config)
    }

    /// A layer with a checked configuration.
    pub fn with_config(config: AiRetryConfig) -> Self {
        let seed = config.seed.unwrap_or_else(|| fastrand::u64(..));
        AiRetryLayer {
            shared: Arc::new(Shared {
                config: Arc::new(config),
                seeds: AtomicU64::new(seed),
            }),
        }
    }

    /// A builder; [`AiRetryConfigBuilder::build`] returns the layer.
    pub fn builder() -> AiRetryConfigBuilder {
        AiRetryConfig::builder()
    }

    /// The configuration.
    pub fn config(&self) -> &AiRetryConfig {
        &self.shared.config
    }
}

impl<S> Layer<S> for AiRetryLayer {
    type Service = AiRetry<S>;

    fn layer(&self, inner: S) -> AiRetry<S> {
        AiRetry::from_shared(inner, self.shared.clone())
    }
}
