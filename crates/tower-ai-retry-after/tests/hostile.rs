//! RetryAfterAware against a flood of waiters (issue #16 point 3), and the memory it holds
//! per key.

use std::convert::Infallible;
use std::time::Duration;

use http::{Request, Response};
use tokio_test::{assert_pending, assert_ready, task};
use tower::{Layer, Service, ServiceExt};
use tower_ai_core::keys::Key;
use tower_ai_core::{AiError, BoxError};
use tower_ai_retry_after::RetryAfterAwareLayer;

mod support;
use support::{request, resp, stack, Handle, Mock};

/// A 429 with `retry-after: 30` for `model`: its key cools down for 30 s.
async fn cool(svc: &tower_ai_retry_after::RetryAfterAware<Mock>, handle: &mut Handle, model: &str) {
    let first = tokio::spawn(svc.clone().oneshot(request(model)));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(resp(429, &[("retry-after", "30")]));
    assert_eq!(first.await.unwrap().unwrap().status(), 429);
}

fn cooling_down(err: &BoxError) -> bool {
    matches!(
        err.downcast_ref::<AiError>(),
        Some(AiError::CoolingDown { .. })
    )
}

/// The default per-key cap (256): the request past it fails at once, and a cancelled
/// waiter gives its place back.
#[tokio::test(start_paused = true)]
async fn waiters_per_key_are_capped_by_default() {
    let layer = RetryAfterAwareLayer::builder().seed(1).build().unwrap();
    let (svc, mut handle) = stack(&layer);
    cool(&svc, &mut handle, "gpt-4o").await;
    let mut waiters: Vec<_> = (0..256)
        .map(|_| task::spawn(svc.clone().oneshot(request("gpt-4o"))))
        .collect();
    for w in &mut waiters {
        assert_pending!(w.poll());
    }
    let mut over = task::spawn(svc.clone().oneshot(request("gpt-4o")));
    let err = assert_ready!(over.poll()).expect_err("past the cap: refused at once");
    assert!(cooling_down(&err), "{err}");
    drop(waiters.pop());
    let mut next = task::spawn(svc.clone().oneshot(request("gpt-4o")));
    assert_pending!(next.poll());
    assert_eq!(layer.stats().waiters, 256);
}

/// Both caps configured: per key, then in all; places come back when waiters are sent or
/// dropped.
#[tokio::test(start_paused = true)]
async fn waiters_in_all_are_capped_and_places_come_back() {
    let layer = RetryAfterAwareLayer::builder()
        .release_spread(Duration::ZERO)
        .max_waiters_per_key(2)
        .max_waiters(3)
        .seed(1)
        .build()
        .unwrap();
    let (svc, mut handle) = stack(&layer);
    cool(&svc, &mut handle, "gpt-4o").await;
    cool(&svc, &mut handle, "gpt-4o-mini").await;
    let mut waiting = Vec::new();
    for model in ["gpt-4o", "gpt-4o", "gpt-4o-mini"] {
        let mut w = task::spawn(svc.clone().oneshot(request(model)));
        assert_pending!(w.poll());
        waiting.push(w);
    }
    // "gpt-4o" is at its own cap; "gpt-4o-mini" has room of its own, not in all.
    for model in ["gpt-4o", "gpt-4o-mini"] {
        let mut w = task::spawn(svc.clone().oneshot(request(model)));
        let err = assert_ready!(w.poll()).expect_err("refused at once");
        assert!(cooling_down(&err), "{err}");
    }
    assert_eq!(layer.stats().waiters, 3);
    drop(waiting.remove(0));
    assert_eq!(layer.stats().waiters, 2);
    let mut mini = task::spawn(svc.clone().oneshot(request("gpt-4o-mini")));
    assert_pending!(mini.poll());
    assert_eq!(layer.stats().waiters, 3);
    // The cooldowns end: every waiter is sent and gives its place back.
    tokio::time::advance(Duration::from_secs(30)).await;
    for w in waiting.iter_mut().chain(std::iter::once(&mut mini)) {
        assert_pending!(w.poll());
    }
    assert_eq!(layer.stats().waiters, 0);
    for _ in 0..3 {
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(resp(200, &[]));
    }
    for w in waiting.iter_mut().chain(std::iter::once(&mut mini)) {
        assert_eq!(assert_ready!(w.poll()).unwrap().status(), 200);
    }
}

/// A provider that answers every request at once with the response its function makes.
#[derive(Clone, Copy)]
struct Answers(fn() -> Response<String>);

impl Service<Request<String>> for Answers {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<String>, Infallible>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<String>) -> Self::Future {
        std::future::ready(Ok((self.0)()))
    }
}

/// A 429 with `retry-after: 60`: a cooldown for the key.
fn too_many() -> Response<String> {
    resp(429, &[("retry-after", "60")])
}

/// Bytes per key with a cooldown, counted by the allocator and by `stats()`.
#[tokio::test(start_paused = true)]
async fn memory_per_key() {
    const N: u64 = 5_000;
    let layer = RetryAfterAwareLayer::builder()
        .build()
        .unwrap()
        .key_fn(|req: &Request<String>| req.extensions().get::<Key>().copied());
    let mut svc = layer.layer(Answers(too_many));
    let held = sent(&mut svc, 0, N);
    let stats = layer.stats();
    assert_eq!(stats.keys as u64, N);
    let measured = held.max(0) as u64 / N;
    let reported = stats.approx_bytes as u64 / N;
    println!("{measured} bytes per key allocated, {reported} reported by stats()");
    assert!(
        reported * 4 >= measured * 3 && reported * 4 <= measured * 5,
        "stats() says {reported}, the allocator {measured}"
    );
    assert!(measured <= 200, "{measured} bytes per key");
}

/// A success whose requests bucket runs low: worth a key (its pacing), with no cooldown,
/// so that a full shard forgets its least recently seen key for a new one.
fn low() -> Response<String> {
    resp(
        200,
        &[
            ("x-ratelimit-limit-requests", "100"),
            ("x-ratelimit-remaining-requests", "1"),
            ("x-ratelimit-reset-requests", "1s"),
        ],
    )
}

/// The bytes allocated and held while keys `from..from + n` are sent, one request each.
fn sent<S: Service<Request<String>>>(svc: &mut S, from: u64, n: u64) -> i64 {
    allocation_counter::measure(|| {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        for i in from..from + n {
            let mut r = request("gpt-4o");
            r.extensions_mut().insert(Key::of(&i));
            let mut fut = std::pin::pin!(svc.call(r));
            assert!(std::future::Future::poll(fut.as_mut(), &mut cx).is_ready());
        }
    })
    .bytes_current
}

/// Full shards (`max_keys` 1,000) that forget a key for each new one, through a hundred
/// times as many keys: the bytes per key stay those of the full map. Before, the shards'
/// tables filled with deleted slots and doubled: ~120 -> 158 bytes per key by the
/// allocator, 115 -> ~137 by `stats()` (10,000 keys through sixty times as many: 116 ->
/// 141).
#[tokio::test(start_paused = true)]
async fn full_shards_churning_keys_keep_their_size() {
    const MAX: u64 = 1_000;
    let layer = RetryAfterAwareLayer::builder()
        .max_keys(MAX as usize)
        .build()
        .unwrap()
        .key_fn(|req: &Request<String>| req.extensions().get::<Key>().copied());
    let mut svc = layer.layer(Answers(low));
    let mut held = sent(&mut svc, 0, MAX);
    let full = layer.stats();
    let full_alloc = held.max(0) as u64 / full.keys as u64;
    let full_stats = (full.approx_bytes / full.keys) as u64;
    held += sent(&mut svc, MAX, 100 * MAX);
    let after = layer.stats();
    let after_alloc = held.max(0) as u64 / after.keys as u64;
    let after_stats = (after.approx_bytes / after.keys) as u64;
    println!(
        "{} keys, then {} more: {} keys, {full_alloc} -> {after_alloc} bytes per key allocated, {full_stats} -> {after_stats} by stats()",
        full.keys,
        100 * MAX,
        after.keys
    );
    assert!(after.keys as u64 <= MAX, "{} keys", after.keys);
    assert!(
        after_stats * 100 <= full_stats * 110,
        "stats(): {full_stats} bytes per key when full, {after_stats} after the churn"
    );
    assert!(
        after_alloc * 100 <= full_alloc * 110,
        "allocator: {full_alloc} bytes per key when full, {after_alloc} after the churn"
    );
}
