//! The memory TokenBudget holds per key, counted by the allocator and by the layer's own
//! `stats().approx_bytes`, and its bound under a flood of hostile keys.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service};
use tower_ai_budget::{PriceTable, TokenBudgetBuilder, TokenBudgetLayer};
use tower_ai_core::keys::Key;
use tower_ai_core::{AiBody, RequestMeta};

const BODY: &str =
    r#"{"model":"gpt-4o","max_tokens":16,"messages":[{"role":"user","content":"Hi"}]}"#;
const USAGE: &str = r#"{"usage":{"prompt_tokens":3,"completion_tokens":2}}"#;

#[derive(Clone, Copy)]
struct Bare;

impl Service<Request<AiBody>> for Bare {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<AiBody>) -> Self::Future {
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(
            USAGE.as_bytes(),
        )))))
    }
}

fn keyed(req: &Request<AiBody>) -> Option<Key> {
    req.extensions().get::<Key>().copied()
}

/// One request for key `i`, sent and its body read to the end: the key is idle after.
fn once<S, B>(svc: &mut S, i: u64)
where
    S: Service<Request<AiBody>, Response = Response<B>>,
    B: http_body::Body,
{
    let mut req = Request::new(AiBody::from(BODY));
    req.extensions_mut().insert(Key::of(&i));
    RequestMeta::get_or_insert(&mut req);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let fut = pin!(svc.call(req));
    let Poll::Ready(Ok(res)) = fut.poll(&mut cx) else {
        panic!("not admitted")
    };
    let mut body = pin!(res.into_body());
    while let Poll::Ready(Some(_)) = http_body::Body::poll_frame(body.as_mut(), &mut cx) {}
}

/// The bytes allocated and still held after one request for each of `keys`.
fn sent<S, B>(svc: &mut S, keys: std::ops::Range<u64>) -> i64
where
    S: Service<Request<AiBody>, Response = Response<B>>,
    B: http_body::Body,
{
    allocation_counter::measure(|| {
        for i in keys {
            once(svc, i);
        }
    })
    .bytes_current
}

type Builder = TokenBudgetBuilder<fn(&Request<AiBody>) -> Option<Key>>;

type Build = fn(Builder) -> Builder;

/// Keyed by the request's [`Key`], refusing at limits these tests do not reach.
fn roomy() -> Builder {
    TokenBudgetLayer::builder()
        .key_fn(keyed as fn(&Request<AiBody>) -> Option<Key>)
        .requests_per_minute(1_000_000)
        .tokens_per_minute(100_000_000)
        .reject()
}

const N: u64 = 10_000;

/// Bytes per idle key: (allocator, the layer's own count).
fn per_key(configure: Build) -> (u64, u64) {
    let layer = configure(
        TokenBudgetLayer::builder()
            .key_fn(keyed as fn(&Request<AiBody>) -> Option<Key>)
            .reject(),
    )
    .build()
    .unwrap();
    let mut svc = layer.layer(Bare);
    once(&mut svc, u64::MAX);
    let held = sent(&mut svc, 0..N);
    let stats = layer.stats();
    assert_eq!(stats.keys as u64, N + 1);
    (held.max(0) as u64 / N, stats.approx_bytes as u64 / (N + 1))
}

#[tokio::test(start_paused = true)]
async fn memory_per_idle_key() {
    // Measured: 150, 166, 142 and 174 bytes (310, 610, 1,102 and 2,478 when every window
    // was its full ring of slots and every key had a 128-byte fast state and its own
    // table of reservations). Each bound is the figure + ~10 %, and at most 200.
    let configs: [(&str, Build, u64); 4] = [
        ("concurrency", |b| b.max_concurrent(8), 168),
        ("requests/min", |b| b.requests_per_minute(1000), 184),
        (
            "requests + tokens/min",
            |b| b.requests_per_minute(1000).tokens_per_minute(100_000),
            160,
        ),
        (
            "requests + tokens/min + spend/hour + spend/day",
            |b| {
                b.requests_per_minute(1000)
                    .tokens_per_minute(100_000)
                    .spend_per_hour(10.0)
                    .spend_per_day(100.0)
                    .prices(PriceTable::new().model("gpt-4o", 2.5, 10.0))
            },
            192,
        ),
    ];
    for (name, configure, bound) in configs {
        let (measured, reported) = per_key(configure);
        println!("{name}: {measured} bytes per idle key allocated, {reported} reported by stats()");
        // The layer's own count follows the allocator's within 25 %.
        assert!(
            reported * 4 >= measured * 3 && reported * 4 <= measured * 5,
            "{name}: stats() says {reported}, the allocator {measured}"
        );
        // Regression bound: an idle key's windows are inline (16 bytes each), its fast
        // state unpadded and only where used, its entry without a reservation table.
        assert!(
            measured <= bound,
            "{name}: {measured} bytes per idle key, more than {bound}"
        );
    }
}

/// 200,000 hostile keys (one request each, then idle) with the default `max_keys`: the
/// map holds at most 10,001 keys, and the memory stays under 64 MiB.
#[tokio::test(start_paused = true)]
async fn a_flood_of_keys_is_bounded() {
    let layer = roomy().build().unwrap();
    let mut svc = layer.layer(Bare);
    let held = sent(&mut svc, 0..200_000);
    let stats = layer.stats();
    println!(
        "200,000 keys: {} held, {} overflowed, {held} bytes allocated, {} reported",
        stats.keys, stats.overflowed, stats.approx_bytes
    );
    assert!(stats.keys <= 10_001);
    assert_eq!(stats.overflowed, 200_000 - 10_000);
    assert!(held < 64 << 20, "{held}");
    assert!(stats.approx_bytes < 64 << 20);
}

/// A full map (the default `max_keys`, 10,000) that forgets a key whose windows have
/// passed for each new one, through ten times as many keys: the bytes per key stay those
/// of the full map. Before, the table filled with deleted slots and doubled: 138 -> 162
/// bytes per key by `stats()`, 169 by the allocator.
#[tokio::test(start_paused = true)]
async fn a_full_map_churning_keys_keeps_its_size() {
    const MAX: u64 = 10_000;
    let layer = roomy().build().unwrap();
    let mut svc = layer.layer(Bare);
    let mut held = sent(&mut svc, 0..MAX);
    let full = layer.stats();
    assert_eq!(full.keys as u64, MAX);
    let full_alloc = held.max(0) as u64 / MAX;
    let full_stats = full.approx_bytes as u64 / MAX;
    // A minute's window empties 61 s after a key's request: a little more than a 61st
    // of the keys each second keeps the map at its bound, each new key in the place of
    // one whose windows have passed (the few more share the overflow key).
    let per_sec = MAX / 61 + 1;
    let mut i = MAX;
    while i < 11 * MAX {
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        held += sent(&mut svc, i..i + per_sec);
        i += per_sec;
    }
    let after = layer.stats();
    assert!(after.keys as u64 >= MAX, "{} keys", after.keys);
    let after_alloc = held.max(0) as u64 / after.keys as u64;
    let after_stats = after.approx_bytes as u64 / after.keys as u64;
    println!(
        "{MAX} keys, then {} more at {per_sec} a second: {full_alloc} -> {after_alloc} bytes per key allocated, {full_stats} -> {after_stats} by stats()",
        10 * MAX
    );
    assert!(
        after_stats * 100 <= full_stats * 105,
        "stats(): {full_stats} bytes per key when full, {after_stats} after the churn"
    );
    assert!(
        after_alloc * 100 <= full_alloc * 110,
        "allocator: {full_alloc} bytes per key when full, {after_alloc} after the churn"
    );
}
