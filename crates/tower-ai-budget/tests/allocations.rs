//! The admit path allocates nothing once its key exists.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service};
use tower_ai_budget::TokenBudgetLayer;
use tower_ai_core::{AiBody, RequestMeta};

const BODY: &str =
    r#"{"model":"gpt-4o","max_tokens":256,"messages":[{"role":"user","content":"Hello"}]}"#;

#[derive(Clone, Copy)]
struct Bare(&'static str);

impl Service<Request<AiBody>> for Bare {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<AiBody>) -> Self::Future {
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(
            self.0.as_bytes(),
        )))))
    }
}

/// A service whose clone allocates (as a boxed or `Arc`-free owned service does): calling
/// it must not clone it.
#[derive(Clone)]
struct Owned(Box<str>);

impl Service<Request<AiBody>> for Owned {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<AiBody>) -> Self::Future {
        // The budget parsed the request once and handed the result on.
        assert!(req.extensions().get::<RequestMeta>().is_some());
        std::future::ready(Ok(Response::new(Full::new(Bytes::copy_from_slice(
            self.0.as_bytes(),
        )))))
    }
}

fn once<S, B>(svc: &mut S, req: Request<AiBody>)
where
    S: Service<Request<AiBody>, Response = Response<B>>,
    B: http_body::Body,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let fut = pin!(svc.call(req));
    let Poll::Ready(Ok(res)) = fut.poll(&mut cx) else {
        panic!("not ready")
    };
    // Read the body to its end: the reservation is settled there.
    let mut body = pin!(res.into_body());
    while let Poll::Ready(Some(_)) = http_body::Body::poll_frame(body.as_mut(), &mut cx) {}
}

fn allocations_per_call<S, B>(mut svc: S, meta: bool) -> u64
where
    S: Service<Request<AiBody>, Response = Response<B>>,
    B: http_body::Body,
{
    let make = || {
        let mut r = Request::new(AiBody::from(BODY));
        if meta {
            RequestMeta::get_or_insert(&mut r);
        }
        r
    };
    once(&mut svc, make()); // the key is created once
    let reqs: Vec<_> = (0..100).map(|_| make()).collect();
    let info = allocation_counter::measure(|| {
        for r in reqs {
            once(&mut svc, r);
        }
    });
    info.count_total / 100
}

#[tokio::test]
async fn admit_and_settle_allocate_nothing() {
    let rpm = TokenBudgetLayer::builder()
        .requests_per_minute(1_000_000)
        .max_concurrent(1000)
        .build()
        .unwrap();
    assert_eq!(allocations_per_call(rpm.layer(Bare("{}")), false), 0);
    let tpm = TokenBudgetLayer::builder()
        .requests_per_minute(1_000_000)
        .tokens_per_minute(1_000_000_000)
        .max_concurrent(1000)
        .build()
        .unwrap();
    // With the meta already in the request (an upstream layer read it) and a body
    // without usage, the token path allocates nothing either.
    assert_eq!(allocations_per_call(tpm.layer(Bare("{}")), true), 0);
    // Reading a JSON usage is a scan, not a parse: nothing allocated either.
    let usage = r#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":9,"completion_tokens":3}}"#;
    assert_eq!(allocations_per_call(tpm.layer(Bare(usage)), true), 0);
    // An inner service whose clone allocates: the admitted path calls it in place, so
    // nothing is allocated for it either (the response body's copy aside, made inside
    // the inner service and counted separately below).
    let owned = Owned(usage.into());
    let inner_only = {
        let mut svc = owned.clone();
        let make = || {
            let mut r = Request::new(AiBody::from(BODY));
            RequestMeta::get_or_insert(&mut r);
            r
        };
        let reqs: Vec<_> = (0..100).map(|_| make()).collect();
        allocation_counter::measure(|| {
            for r in reqs {
                once(&mut svc, r);
            }
        })
        .count_total
            / 100
    };
    assert_eq!(
        allocations_per_call(tpm.layer(owned.clone()), true),
        inner_only
    );
    // Estimating tokens from a request body without a RequestMeta parses it (core's
    // RequestMeta::parse allocates the model name) and stores it for the layers below
    // (checked by `Owned`): reported, not hidden.
    let parse = allocations_per_call(tpm.layer(owned), false);
    println!("allocations per call when the request body must be parsed: {parse}");
}
