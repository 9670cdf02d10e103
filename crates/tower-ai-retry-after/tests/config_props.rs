//! Issue #16 point 7: no configuration panics, at build or at run time. Random and
//! extreme values go to every setter; whatever `build` accepts gates a few calls
//! (cooldowns learned from absurd waits, waiters, pacing) on a paused clock.

use std::time::Duration;

use http::{Request, Response};
use proptest::prelude::*;
use tower::{service_fn, Layer, ServiceExt};
use tower_ai_core::{BoxError, ClassifyLayer};
use tower_ai_retry_after::RetryAfterAwareLayer;

fn duration() -> impl Strategy<Value = Duration> {
    // Extremes, and mostly sane values, so that most cases build and run.
    prop_oneof![
        1 => Just(Duration::ZERO),
        1 => Just(Duration::MAX),
        1 => Just(Duration::from_nanos(1)),
        1 => Just(Duration::from_secs(u64::MAX)),
        1 => any::<u64>().prop_map(Duration::from_nanos),
        40 => (1_000u64..50_000).prop_map(Duration::from_millis),
    ]
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(0usize), 1 => Just(1), 1 => Just(usize::MAX), 20 => 1usize..64]
}

static BUILT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_setting_panics_at_build_or_at_run_time(
        wait in proptest::option::of(duration()),
        durations in (duration(), duration(), duration(), duration(), duration()),
        pace in prop_oneof![Just(0u64), Just(u64::MAX), 0u64..10],
        sizes in (size(), size(), size()),
        seed in any::<u64>(),
        header in prop_oneof![Just("0"), Just("3"), Just("18446744073709551615"), Just("Fri, 31 Dec 9999 23:59:59 GMT"), Just("-1")],
    ) {
        let (spread, max_cooldown, margin, recheck, idle) = durations;
        let mut b = RetryAfterAwareLayer::builder()
            .release_spread(spread)
            .max_cooldown(max_cooldown)
            .pace_below(pace)
            .reset_margin(margin)
            .recheck(recheck)
            .idle(idle)
            .max_keys(sizes.0)
            .max_waiters_per_key(sizes.1)
            .max_waiters(sizes.2)
            .seed(seed);
        b = match wait { Some(d) => b.wait(d), None => b.fail_fast() };
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        let layer = match b.build() {
            Err(e) => { prop_assert!(!e.to_string().is_empty()); return Ok(()); }
            Ok(layer) => layer,
        };
        BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        rt.block_on(async move {
            let mut n = 0u32;
            let provider = service_fn(move |_: Request<String>| {
                n += 1;
                let res = if n % 2 == 1 {
                    Response::builder()
                        .status(429)
                        .header("retry-after", header)
                        .header("x-ratelimit-remaining-requests", "0")
                        .header("x-ratelimit-reset-requests", "99999h")
                        .body(String::new())
                } else {
                    Response::builder().status(200).body(String::new())
                };
                async move { Ok::<_, BoxError>(res?) }
            });
            let svc = layer.layer(ClassifyLayer::new().layer(provider));
            let mut tasks = Vec::new();
            for i in 0..6 {
                let req = Request::post("https://api.openai.com/v1/chat/completions")
                    .body(format!(r#"{{"model":"m{}"}}"#, i % 2))
                    .unwrap();
                tasks.push(tokio::spawn(svc.clone().oneshot(req)));
                tokio::time::advance(Duration::from_millis(500)).await;
            }
            for t in tasks {
                // A waiter may be held as long as the config allows: bounded here.
                let _ = tokio::time::timeout(Duration::from_secs(3600), t).await;
            }
            let _ = layer.stats();
            layer.evict_idle();
        });
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
