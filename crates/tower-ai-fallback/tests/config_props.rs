//! Issue #16 point 7: no chain configuration panics, at build or at run time. Random and
//! extreme route names, models, context windows and attempt caps; whatever `build`
//! accepts serves calls whose every route fails, on a paused clock.

use bytes::Bytes;
use http::{HeaderName, Request, Response};
use proptest::prelude::*;
use tower::{service_fn, Layer, ServiceExt};
use tower_ai_core::{AiBody, BoxError};
use tower_ai_fallback::{FallbackChain, ModelFallbackLayer, Route};

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just(String::new()),
        1 => Just("a\nb".to_owned()),
        1 => Just("é".repeat(300)),
        20 => "[a-z0-9-]{1,12}",
    ]
}

static BUILT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_chain_panics_at_build_or_at_run_time(
        routes in proptest::collection::vec((name(), proptest::option::of(name()), proptest::option::of(prop_oneof![Just(0u64), Just(u64::MAX), 1u64..1_000_000])), 0..5),
        max_attempts in proptest::option::of(proptest::option::of(prop_oneof![Just(0u32), Just(1), Just(u32::MAX), 1u32..10])),
        header in any::<bool>(),
        status in prop_oneof![Just(400u16), Just(429), Just(500), Just(503), Just(200)],
    ) {
        let mut b = FallbackChain::<AiBody, Bytes>::builder();
        for (i, (n, model, window)) in routes.iter().enumerate() {
            let mut r = if i == 0 { Route::primary(n.as_str()) } else { Route::model(model.clone().unwrap_or_default()).name(n.as_str()) };
            if let Some(w) = window {
                r = r.context_window(*w);
            }
            b = b.route(r);
        }
        if let Some(m) = max_attempts {
            b = b.max_attempts(m);
        }
        if header {
            b = b.served_header(HeaderName::from_static("x-route"));
        }
        let chain = match b.build() {
            Err(e) => { prop_assert!(!e.to_string().is_empty()); return Ok(()); }
            Ok(c) => c,
        };
        BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let provider = service_fn(move |_: Request<AiBody>| async move {
                Ok::<_, BoxError>(Response::builder().status(status).body(Bytes::new())?)
            });
            let svc = ModelFallbackLayer::new(chain).layer(provider);
            for body in [r#"{"model":"gpt-4o","messages":[]}"#, "not json", ""] {
                let req = Request::post("https://api.openai.com/v1/chat/completions")
                    .header("idempotency-key", "k")
                    .body(AiBody::from(body))
                    .unwrap();
                let _ = svc.clone().oneshot(req).await;
            }
        });
    }
}

#[test]
fn most_random_chains_build() {
    no_chain_panics_at_build_or_at_run_time();
    let built = BUILT.load(std::sync::atomic::Ordering::Relaxed);
    assert!(built >= 16, "only {built} of 256 random chains built");
}
