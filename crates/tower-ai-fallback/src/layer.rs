//! The [`ModelFallbackLayer`].

use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use crate::config::{ConfigError, FallbackChain, FallbackChainBuilder};
use crate::service::ModelFallback;

/// Wraps a service in [`ModelFallback`] with a [`FallbackChain`].
///
/// Every service the layer makes shares the chain (one `Arc`): its routes, their boxed
/// services and the policy. There is no other shared state; the attempt budget is per
/// request.
pub struct ModelFallbackLayer<ReqB, ResB> {
    chain: FallbackChain<ReqB, ResB>,
}

impl<ReqB, ResB> ModelFallbackLayer<ReqB, ResB> {
    /// A layer for `chain`.
    pub fn new(chain: FallbackChain<ReqB, ResB>) -> Self {
        ModelFallbackLayer { chain }
    }

    /// The request as sent, then each of `models` on the same service by rewriting the
    /// body's `"model"` value (see [`FallbackChain::models`]).
    ///
    /// # Errors
    ///
    /// An empty or duplicate model name.
    pub fn models<I, M>(models: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = M>,
        M: Into<Arc<str>>,
    {
        FallbackChain::models(models).map(Self::new)
    }

    /// A builder for the chain; pass what it builds to [`ModelFallbackLayer::new`].
    pub fn builder() -> FallbackChainBuilder<ReqB, ResB> {
        FallbackChainBuilder::new()
    }

    /// The chain (for [`FallbackChain::served`]).
    pub fn chain(&self) -> &FallbackChain<ReqB, ResB> {
        &self.chain
    }
}

impl<ReqB, ResB> From<FallbackChain<ReqB, ResB>> for ModelFallbackLayer<ReqB, ResB> {
    fn from(chain: FallbackChain<ReqB, ResB>) -> Self {
        ModelFallbackLayer::new(chain)
    }
}

impl<ReqB, ResB> Clone for ModelFallbackLayer<ReqB, ResB> {
    fn clone(&self) -> Self {
        ModelFallbackLayer {
            chain: self.chain.clone(),
        }
    }
}

impl<ReqB, ResB> fmt::Debug for ModelFallbackLayer<ReqB, ResB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelFallbackLayer")
            .field("chain", &self.chain)
            .finish()
    }
}

impl<S, ReqB, ResB> Layer<S> for ModelFallbackLayer<ReqB, ResB> {
    type Service = ModelFallback<S, ReqB, ResB>;

    fn layer(&self, inner: S) -> Self::Service {
        ModelFallback::new(inner, self.chain.clone())
    }
}
