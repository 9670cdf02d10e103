//! Hostile callers (issue #16): model names sized by the caller pin nothing.

mod support;

use std::future::Future;
use std::task::{Context, Waker};
use std::time::Duration;

use http::{Request, Response};
use support::*;
use tower::{service_fn, Service, ServiceExt};
use tower_ai_circuit_breaker::{CircuitBreakerLayer, CircuitState};
use tower_ai_core::keys::{HostModel, KeyFn, MAX_LABEL_LEN};
use tower_ai_core::{AiError, BoxError};
use tower_layer::Layer;

#[tokio::test(start_paused = true)]
async fn huge_model_names_share_one_short_labelled_circuit() {
    // 64 model names of 1 MiB once kept 64 labels of 1 MiB (67 MB) in the registry and in
    // every CircuitOpen error.
    let r = rig(CircuitBreakerLayer::builder()
        .count_window(10)
        .minimum_calls(5)
        .failure_rate(0.5)
        .open_duration(Duration::from_secs(10)));
    for i in 0..64u8 {
        let model = format!("{}{}", char::from(b'a' + i % 26), "x".repeat(1 << 20));
        r.call(&model, FAIL).await;
    }
    assert_eq!(r.handle.key_count(), 1, "one circuit for every absurd name");
    for m in r.handle.all_metrics() {
        assert!(m.label.len() <= MAX_LABEL_LEN, "{} bytes", m.label.len());
    }
    let model = "y".repeat(1 << 20);
    assert_eq!(r.state(&model), CircuitState::Open);
    let err = r.svc.clone().oneshot(req(&model, OK)).await.unwrap_err();
    let Some(AiError::CircuitOpen { key, .. }) = err.downcast_ref::<AiError>() else {
        panic!("{err}")
    };
    assert!(key.len() <= MAX_LABEL_LEN, "{} bytes", key.len());
    // A real model is its own circuit, untouched.
    assert_eq!(r.call("gpt-4o", OK).await, Got::Status(200));
}

/// The most an idle circuit may hold, in bytes (see the test below): issue #16's bound.
/// 190 measured on x86_64 Linux: its breaker (104), its label (43), its slot in the map
/// (~34) and its share of the lanes the thread's cache and the service still hold (17 of
/// 256 bytes for 512 keys). It was 536 while every key kept the lane of each thread
/// stripe that called it (256 bytes, cache-padded) and a breaker of 184 bytes.
const IDLE_CIRCUIT_BYTES: u64 = 200;

/// What an idle circuit holds (a key that had a few successful calls from one thread and
/// is closed, the default config): its breaker, its label and its slot in the map, as the
/// allocator counts them. Its calls are still counted (3 below), but the lane they went
/// through was let go once only the breaker held it. It was 1,208 bytes with two stripes
/// when every stripe's lane (256 bytes) and count-window counter (128 bytes) were made
/// with the key, so ~6 KiB with 16 stripes; then 536 with the lane of each stripe that
/// called it kept for the key's life.
#[tokio::test(start_paused = true)]
async fn an_idle_circuit_holds_no_lane() {
    idle_circuits(CircuitBreakerLayer::new(), "count window (the default)");
}

/// The same with a time window: its buckets were the breaker's, one 128-byte line per
/// thread stripe for every 8 buckets, made with the key (823 bytes an idle circuit on
/// two stripes); they are now the lanes', and a lane let go leaves its calls in one word
/// while they fall in one bucket.
#[tokio::test(start_paused = true)]
async fn an_idle_circuit_of_a_time_window_holds_no_bucket_line() {
    let layer = CircuitBreakerLayer::builder()
        .time_window(Duration::from_secs(60), 6)
        .build()
        .unwrap();
    idle_circuits(layer, "time window");
}

fn idle_circuits(layer: CircuitBreakerLayer, what: &str) {
    const KEYS: u64 = 512; // half the default max_keys: none is evicted
    let mut svc = layer.layer(service_fn(|_: Request<String>| async {
        Ok::<_, BoxError>(Response::new(String::new()))
    }));
    let mut cx = Context::from_waker(Waker::noop());
    let mut calls = |i: u64| {
        for _ in 0..3 {
            assert!(svc.poll_ready(&mut cx).is_ready());
            let fut = std::pin::pin!(svc.call(req(&format!("model-{i:06}"), OK)));
            assert!(fut.poll(&mut cx).is_ready());
        }
    };
    calls(0); // the thread's stripe and cache, made once
    let held = allocation_counter::measure(|| (1..=KEYS).for_each(&mut calls));
    let handle = layer.handle();
    assert_eq!(handle.key_count(), KEYS as usize + 1);
    let last = req(&format!("model-{KEYS:06}"), OK);
    let m = handle
        .metrics(KeyFn::<String>::key(&HostModel, &last).unwrap())
        .unwrap();
    assert_eq!((m.state, m.calls), (CircuitState::Closed, 3));
    let per = held.bytes_current.max(0) as u64 / KEYS;
    println!(
        "{what}: {per} bytes per idle circuit ({KEYS} circuits: {} bytes)",
        held.bytes_current
    );
    assert!(
        per <= IDLE_CIRCUIT_BYTES,
        "{what}: {per} bytes per idle circuit, more than {IDLE_CIRCUIT_BYTES}"
    );
}
