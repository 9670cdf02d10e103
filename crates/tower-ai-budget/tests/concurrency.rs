//! The fast path under contention, on real threads: the request limit and the concurrency
//! cap hold however the admissions race (permits are taken by atomic steps, without the
//! lock), and every place in flight comes back.
//!
//! These tests use the real clock: each runs well inside one minute, so the minute window
//! never slides during it.

mod support;

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use tower::{Layer, Service};
use tower_ai_budget::TokenBudgetLayer;
use tower_ai_core::{AiBody, BoxError, BudgetLimit};

use support::exceeded;

const THREADS: usize = 4;

/// Counts the requests in flight at the provider: one more on `call`, one less when the
/// response body is dropped.
#[derive(Clone, Default)]
struct Provider {
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

/// A response body that says when it is gone.
struct Tracked(Arc<AtomicUsize>);

impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(None)
    }
}

impl Service<Request<AiBody>> for Provider {
    type Response = Response<Tracked>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Tracked>, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<AiBody>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        std::future::ready(Ok(Response::new(Tracked(self.in_flight.clone()))))
    }
}

/// One call, polled once (nothing here waits): the response, or the error.
fn once<S>(svc: &mut S) -> Result<S::Response, S::Error>
where
    S: Service<Request<AiBody>>,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    match pin!(svc.call(Request::new(AiBody::from("{}")))).poll(&mut cx) {
        Poll::Ready(r) => r,
        Poll::Pending => panic!("a rejecting budget never waits"),
    }
}

/// Runs `per_thread` calls on each of [`THREADS`] threads, each with its own clone of
/// `svc`, started together; `hold` responses are kept alive at once per thread (dropped
/// oldest first). Returns (admitted, refused by `limit`).
fn hammer<S>(svc: &S, per_thread: usize, hold: usize, limit: BudgetLimit) -> (usize, usize)
where
    S: Service<Request<AiBody>, Error = BoxError> + Clone + Send + 'static,
    S::Response: Send,
{
    let start = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (mut svc, start) = (svc.clone(), start.clone());
            std::thread::spawn(move || {
                let mut held = std::collections::VecDeque::new();
                let (mut ok, mut refused) = (0, 0);
                start.wait();
                for _ in 0..per_thread {
                    match once(&mut svc) {
                        Ok(res) => {
                            ok += 1;
                            held.push_back(res);
                            if held.len() > hold {
                                held.pop_front();
                            }
                        }
                        Err(e) => {
                            assert_eq!(exceeded(&e).0, limit, "refused by another limit");
                            refused += 1;
                        }
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("no thread panics"))
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
}

#[test]
fn the_request_limit_holds_exactly_under_contention() {
    // 3,200 a minute: fast permits come in batches of 100, taken by atomic steps.
    const LIMIT: usize = 3_200;
    let layer = TokenBudgetLayer::builder()
        .requests_per_minute(LIMIT as u64)
        .reject()
        .build()
        .unwrap();
    let provider = Provider::default();
    let svc = layer.layer(provider.clone());
    let (ok, refused) = hammer(&svc, 2_000, 0, BudgetLimit::RequestsPerMinute);
    assert_eq!(ok + refused, THREADS * 2_000);
    // Never more than the limit, and no permit lost: every one of the minute's requests
    // was admitted before any was refused for good.
    assert_eq!(ok, LIMIT, "admitted");
    assert_eq!(provider.calls.load(Ordering::SeqCst), LIMIT);
}

#[test]
fn the_concurrency_cap_holds_under_contention_and_every_place_comes_back() {
    const CAP: u32 = 6;
    let layer = TokenBudgetLayer::builder()
        .requests_per_minute(1 << 40)
        .max_concurrent(CAP)
        .reject()
        .build()
        .unwrap();
    let provider = Provider::default();
    let svc = layer.layer(provider.clone());
    // Each thread keeps up to two answers alive: eight wanted places for six.
    let (ok, refused) = hammer(&svc, 20_000, 2, BudgetLimit::Concurrency);
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
    let max = provider.max_in_flight.load(Ordering::SeqCst);
    assert!(max <= CAP as usize, "{max} in flight, cap {CAP}");
    assert_eq!(provider.in_flight.load(Ordering::SeqCst), 0);
    // Every place came back: all six can be taken again, and not a seventh.
    let mut one = svc.clone();
    let held: Vec<_> = (0..CAP)
        .map(|_| once(&mut one).expect("a free place"))
        .collect();
    let err = once(&mut one).expect_err("the cap is reached");
    assert_eq!(exceeded(&err).0, BudgetLimit::Concurrency);
    drop(held);
}
