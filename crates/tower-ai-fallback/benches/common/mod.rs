//! Shared by the overhead and allocation benches.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use tower::Service;
use tower_ai_core::{AiBody, BoxError};
pub use tower_ai_fallback::{FallbackChain, ModelFallback, Route};

pub const BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Write a haiku about resilient middleware and the models that fail behind it."}],"max_tokens":256,"temperature":0.7,"stream":false}"#;

/// The cheapest provider there is: a ready 200.
#[derive(Debug, Clone)]
pub struct Provider;

impl Service<Request<AiBody>> for Provider {
    type Response = Response<Bytes>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Bytes>, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<AiBody>) -> Self::Future {
        black_box(&req);
        std::future::ready(Ok(Response::new(Bytes::from_static(b"{}"))))
    }
}

/// A typical request: two headers, a JSON body.
pub fn request() -> Request<AiBody> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench")
        .body(AiBody::from(BODY))
        .unwrap()
}

/// One call: `poll_ready`, `call`, one poll of the (always ready) future.
pub fn once<S>(svc: &mut S, req: Request<AiBody>) -> Response<Bytes>
where
    S: Service<Request<AiBody>, Response = Response<Bytes>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let fut = pin!(svc.call(req));
    match fut.poll(&mut cx) {
        Poll::Ready(res) => res.unwrap(),
        Poll::Pending => unreachable!("the provider is always ready"),
    }
}

pub type Fallback = ModelFallback<Provider, AiBody, Bytes>;

/// Three routes on the same endpoint; the first one serves.
pub fn fallback(first: Route<AiBody, Bytes>, share: bool) -> Fallback {
    let chain = FallbackChain::builder()
        .route(first)
        .route(Route::model("gpt-4o-mini"))
        .route(Route::model("o3-mini"))
        .share_budget(share)
        .build()
        .unwrap();
    ModelFallback::new(Provider, chain)
}

/// One route (nothing to fall back to: no copy kept), budget shared.
pub fn single_route() -> Fallback {
    let chain = FallbackChain::builder()
        .route(Route::primary("gpt-4o"))
        .build()
        .unwrap();
    ModelFallback::new(Provider, chain)
}
