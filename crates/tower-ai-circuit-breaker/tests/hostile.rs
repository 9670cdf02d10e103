//! Hostile callers (issue #16): model names sized by the caller pin nothing.

mod support;

use std::time::Duration;

use support::*;
use tower::ServiceExt;
use tower_ai_circuit_breaker::{CircuitBreakerLayer, CircuitState};
use tower_ai_core::keys::MAX_LABEL_LEN;
use tower_ai_core::AiError;

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
