//! Issue #16 point 7: no configuration panics, at build or at run time. Random and
//! extreme values go to every setter; whatever `build` accepts is driven through
//! retries (a provider wait, a backoff, a transport error) on a paused clock.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use proptest::prelude::*;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_ai_core::{BoxError, ClassifyLayer};
use tower_ai_retry::{AiRetryLayer, Backoff, Jitter, OnExhausted};

fn duration() -> impl Strategy<Value = Duration> {
    // Extremes, and mostly sane values, so that most cases build and run.
    prop_oneof![
        1 => Just(Duration::ZERO),
        1 => Just(Duration::MAX),
        1 => Just(Duration::from_nanos(1)),
        1 => Just(Duration::from_secs(86_400)),
        1 => Just(Duration::from_secs(u64::MAX)),
        1 => any::<u64>().prop_map(Duration::from_nanos),
        40 => (1_000u64..20_000).prop_map(Duration::from_millis),
    ]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(0.0),
        1 => Just(1.0),
        1 => Just(1e300),
        1 => -2.0f64..200.0,
        30 => 1.0f64..3.0,
    ]
}

fn jitter() -> impl Strategy<Value = Jitter> {
    prop_oneof![
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated),
        Just(Jitter::None)
    ]
}

type Settings = (
    u32,
    Option<Duration>,
    (Duration, f64, Duration, Jitter),
    Duration,
    Option<(Duration, u32, f64)>,
    u64,
);

fn settings() -> impl Strategy<Value = Settings> {
    (
        prop_oneof![Just(0u32), Just(u32::MAX), 0u32..8],
        proptest::option::of(duration()),
        (duration(), float(), duration(), jitter()),
        duration(),
        proptest::option::of((
            duration(),
            prop_oneof![Just(0u32), Just(u32::MAX), 0u32..20],
            float(),
        )),
        any::<u64>(),
    )
}

async fn drive(layer: AiRetryLayer) {
    let mut n = 0u32;
    let provider = service_fn(move |_: Request<String>| {
        n += 1;
        let i = n;
        async move {
            match i % 4 {
                0 => Err::<Response<Full<Bytes>>, BoxError>(Box::new(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                ))),
                1 => Ok(Response::builder()
                    .status(429)
                    .header("retry-after", "3")
                    .body(Full::new(Bytes::new()))?),
                2 => Ok(Response::builder()
                    .status(503)
                    .header("retry-after-ms", "18446744073709551615")
                    .body(Full::new(Bytes::new()))?),
                _ => Ok(Response::builder()
                    .status(500)
                    .body(Full::new(Bytes::new()))?),
            }
        }
    });
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(ClassifyLayer::new())
        .service(provider);
    for _ in 0..3 {
        let req = Request::post("https://api.openai.com/v1/chat/completions")
            .body(r#"{"model":"gpt-4o"}"#.to_owned())
            .unwrap();
        let _ = svc.clone().oneshot(req).await;
    }
}

static BUILT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_setting_panics_at_build_or_at_run_time(s in settings()) {
        let (attempts, elapsed, (base, mult, cap, jit), max_wait, budget, seed) = s;
        let mut b = AiRetryLayer::builder()
            .max_attempts(attempts)
            .backoff(Backoff::new(base, mult, cap, jit))
            .max_wait(max_wait)
            .on_exhausted(if seed % 2 == 0 { OnExhausted::Error } else { OnExhausted::ReturnLast })
            .seed(seed);
        if let Some(d) = elapsed {
            b = b.max_elapsed(d);
        }
        b = match budget {
            Some((ttl, min, ratio)) => b.budget(ttl, min, ratio),
            None => b.no_budget(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        match b.build() {
            Err(e) => prop_assert!(!e.to_string().is_empty()),
            Ok(layer) => {
                BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                rt.block_on(drive(layer))
            }
        }
        // The infallible constructor, with the same count.
        rt.block_on(drive(AiRetryLayer::new(attempts)));
    }
}

#[test]
fn most_random_settings_build() {
    // The property above must run layers, not only refusals: its strategies are
    // weighted toward sane values. Run it here and count.
    no_setting_panics_at_build_or_at_run_time();
    let built = BUILT.load(std::sync::atomic::Ordering::Relaxed);
    assert!(built >= 16, "only {built} of 256 random settings built");
}
