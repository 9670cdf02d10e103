//! The types axum and tonic need to be `Send + Sync + 'static`.

use http::{Request, Response};
use tower_ai_circuit_breaker::{
    future::ResponseFuture, BreakerBody, CircuitBreaker, CircuitBreakerHandle, CircuitBreakerLayer,
    CircuitEvent, Metrics,
};
use tower_ai_core::AiBody;

fn send_sync<T: Send + Sync + 'static>() {}
fn send<T: Send + 'static>() {}

#[test]
fn public_types_are_send_and_sync() {
    type Inner =
        tower::util::BoxCloneSyncService<Request<AiBody>, Response<AiBody>, std::io::Error>;
    send_sync::<CircuitBreakerLayer>();
    send_sync::<CircuitBreakerLayer<tower_ai_core::keys::Global, fn(&CircuitEvent)>>();
    send_sync::<CircuitBreaker<Inner>>();
    send_sync::<CircuitBreakerHandle>();
    send_sync::<Metrics>();
    send_sync::<CircuitEvent>();
    send::<ResponseFuture<std::future::Ready<Result<Response<AiBody>, std::io::Error>>>>();
    send_sync::<ResponseFuture<std::future::Ready<Result<Response<AiBody>, std::io::Error>>>>();
    send_sync::<BreakerBody<AiBody>>();
    send_sync::<BreakerBody<tower_ai_sim::SimBody>>();
}
