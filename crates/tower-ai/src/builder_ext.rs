//! [`ServiceBuilderExt`]: each layer as a `ServiceBuilder` method.

use tower::layer::util::Stack;
use tower::ServiceBuilder;
use tower_ai_core::ClassifyLayer;

/// Adds tower-ai's layers to a [`ServiceBuilder`] by name, as tower's own `.timeout(d)`
/// and `.retry(p)` do.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_ai::prelude::*;
/// # fn client() -> tower_ai_sim::SimService { tower_ai_sim::Simulator::new(tower_ai_sim::Scenario::builder().build().unwrap()).service() }
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let svc = ServiceBuilder::new()
///     .ai_retry(AiRetryLayer::new(3))
///     .circuit_breaker(CircuitBreakerLayer::new())
///     .retry_after(RetryAfterAwareLayer::new())
///     .stall_detector(StallDetectorLayer::new())
///     .classify()
///     .service(client());
/// # let _ = svc;
/// # }
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed<L> + Sized {
    /// Adds [`ClassifyLayer`] with its defaults: put it next to the client.
    fn classify(self) -> ServiceBuilder<Stack<ClassifyLayer, L>>;

    /// Adds the whole [`AiStack`](crate::AiStack).
    #[cfg(all(
        feature = "retry",
        feature = "retry-after",
        feature = "circuit-breaker",
        feature = "stall"
    ))]
    #[allow(clippy::type_complexity)] // AiStack's five layer types, as AiStack spells them
    fn ai_stack<F, B, CB, RA, T>(
        self,
        stack: crate::AiStack<F, B, CB, RA, T>,
    ) -> ServiceBuilder<Stack<crate::AiStack<F, B, CB, RA, T>, L>>;

    /// Adds an [`AiRetryLayer`](tower_ai_retry::AiRetryLayer).
    #[cfg(feature = "retry")]
    fn ai_retry(
        self,
        layer: tower_ai_retry::AiRetryLayer,
    ) -> ServiceBuilder<Stack<tower_ai_retry::AiRetryLayer, L>>;

    /// Adds a [`RetryAfterAwareLayer`](tower_ai_retry_after::RetryAfterAwareLayer).
    #[cfg(feature = "retry-after")]
    fn retry_after<K>(
        self,
        layer: tower_ai_retry_after::RetryAfterAwareLayer<K>,
    ) -> ServiceBuilder<Stack<tower_ai_retry_after::RetryAfterAwareLayer<K>, L>>;

    /// Adds a [`CircuitBreakerLayer`](tower_ai_circuit_breaker::CircuitBreakerLayer).
    #[cfg(feature = "circuit-breaker")]
    fn circuit_breaker<K, Li>(
        self,
        layer: tower_ai_circuit_breaker::CircuitBreakerLayer<K, Li>,
    ) -> ServiceBuilder<Stack<tower_ai_circuit_breaker::CircuitBreakerLayer<K, Li>, L>>;

    /// Adds a [`TokenBudgetLayer`](tower_ai_budget::TokenBudgetLayer).
    #[cfg(feature = "budget")]
    fn token_budget<K, Li>(
        self,
        layer: tower_ai_budget::TokenBudgetLayer<K, Li>,
    ) -> ServiceBuilder<Stack<tower_ai_budget::TokenBudgetLayer<K, Li>, L>>;

    /// Adds a [`ModelFallbackLayer`](tower_ai_fallback::ModelFallbackLayer).
    #[cfg(feature = "fallback")]
    fn model_fallback<ReqB, ResB>(
        self,
        layer: tower_ai_fallback::ModelFallbackLayer<ReqB, ResB>,
    ) -> ServiceBuilder<Stack<tower_ai_fallback::ModelFallbackLayer<ReqB, ResB>, L>>;

    /// Adds a [`StallDetectorLayer`](tower_ai_stall::StallDetectorLayer).
    #[cfg(feature = "stall")]
    fn stall_detector(
        self,
        layer: tower_ai_stall::StallDetectorLayer,
    ) -> ServiceBuilder<Stack<tower_ai_stall::StallDetectorLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn classify(self) -> ServiceBuilder<Stack<ClassifyLayer, L>> {
        self.layer(ClassifyLayer::new())
    }

    #[cfg(all(
        feature = "retry",
        feature = "retry-after",
        feature = "circuit-breaker",
        feature = "stall"
    ))]
    #[allow(clippy::type_complexity)] // AiStack's five layer types, as AiStack spells them
    fn ai_stack<F, B, CB, RA, T>(
        self,
        stack: crate::AiStack<F, B, CB, RA, T>,
    ) -> ServiceBuilder<Stack<crate::AiStack<F, B, CB, RA, T>, L>> {
        self.layer(stack)
    }

    #[cfg(feature = "retry")]
    fn ai_retry(
        self,
        layer: tower_ai_retry::AiRetryLayer,
    ) -> ServiceBuilder<Stack<tower_ai_retry::AiRetryLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "retry-after")]
    fn retry_after<K>(
        self,
        layer: tower_ai_retry_after::RetryAfterAwareLayer<K>,
    ) -> ServiceBuilder<Stack<tower_ai_retry_after::RetryAfterAwareLayer<K>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "circuit-breaker")]
    fn circuit_breaker<K, Li>(
        self,
        layer: tower_ai_circuit_breaker::CircuitBreakerLayer<K, Li>,
    ) -> ServiceBuilder<Stack<tower_ai_circuit_breaker::CircuitBreakerLayer<K, Li>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "budget")]
    fn token_budget<K, Li>(
        self,
        layer: tower_ai_budget::TokenBudgetLayer<K, Li>,
    ) -> ServiceBuilder<Stack<tower_ai_budget::TokenBudgetLayer<K, Li>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "fallback")]
    fn model_fallback<ReqB, ResB>(
        self,
        layer: tower_ai_fallback::ModelFallbackLayer<ReqB, ResB>,
    ) -> ServiceBuilder<Stack<tower_ai_fallback::ModelFallbackLayer<ReqB, ResB>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "stall")]
    fn stall_detector(
        self,
        layer: tower_ai_stall::StallDetectorLayer,
    ) -> ServiceBuilder<Stack<tower_ai_stall::StallDetectorLayer, L>> {
        self.layer(layer)
    }
}

mod sealed {
    pub trait Sealed<T> {}
    impl<T> Sealed<T> for tower::ServiceBuilder<T> {}
}
