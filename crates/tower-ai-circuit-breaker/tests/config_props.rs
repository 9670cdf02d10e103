//! Issue #16 point 7: no configuration panics, at build or at run time. Random and
//! extreme values go to every setter; whatever `build` accepts is driven through a trip
//! (open), the wait to half-open, and a probe, on a paused clock.

mod support;

use std::time::Duration;

use proptest::prelude::*;
use support::*;
use tower::ServiceExt;
use tower_ai_circuit_breaker::{CircuitBreakerLayer, ConfigError};

fn duration() -> impl Strategy<Value = Duration> {
    // Extremes, and mostly sane values, so that most cases build and run.
    prop_oneof![
        1 => Just(Duration::ZERO),
        1 => Just(Duration::MAX),
        1 => Just(Duration::from_nanos(1)),
        1 => Just(Duration::from_secs(7 * 24 * 3600)),
        1 => Just(Duration::from_secs(u64::MAX)),
        1 => any::<u64>().prop_map(Duration::from_nanos),
        40 => (1_000u64..100_000).prop_map(Duration::from_millis),
    ]
}

fn rate() -> impl Strategy<Value = f64> {
    prop_oneof![
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(0.0),
        1 => Just(-0.0),
        1 => Just(1.0),
        1 => Just(f64::MIN_POSITIVE),
        1 => -2.0f64..2.0,
        30 => 0.01f64..1.0,
    ]
}

fn count() -> impl Strategy<Value = u32> {
    prop_oneof![1 => Just(0), 1 => Just(1), 1 => Just(u32::MAX), 1 => any::<u32>(), 30 => 1u32..20]
}

#[derive(Debug, Clone)]
struct Settings {
    window: Option<(Duration, u32)>,
    count_window: u32,
    failure_rate: f64,
    slow: Option<(Duration, f64)>,
    minimum_calls: u32,
    consecutive: Option<u32>,
    open: Duration,
    backoff: Option<(f64, Duration)>,
    probes: u32,
    successes: u32,
    max_keys: usize,
    idle: Duration,
}

fn settings() -> impl Strategy<Value = Settings> {
    (
        proptest::option::of((duration(), count())),
        count(),
        rate(),
        proptest::option::of((duration(), rate())),
        count(),
        proptest::option::of(count()),
        duration(),
        proptest::option::of((prop_oneof![rate(), Just(2.0), Just(1e300)], duration())),
        count(),
        count(),
        prop_oneof![1 => Just(0usize), 1 => Just(1), 1 => Just(usize::MAX), 20 => 1usize..100],
        duration(),
    )
        .prop_map(
            |(
                window,
                count_window,
                failure_rate,
                slow,
                minimum_calls,
                consecutive,
                open,
                backoff,
                probes,
                successes,
                max_keys,
                idle,
            )| Settings {
                window,
                count_window,
                failure_rate,
                slow,
                minimum_calls,
                consecutive,
                open,
                backoff,
                probes,
                successes,
                max_keys,
                idle,
            },
        )
}

fn builder(s: &Settings) -> tower_ai_circuit_breaker::CircuitBreakerBuilder {
    let mut b = CircuitBreakerLayer::builder()
        .count_window(s.count_window)
        .failure_rate(s.failure_rate)
        .minimum_calls(s.minimum_calls)
        .open_duration(s.open)
        .half_open_probes(s.probes)
        .half_open_successes(s.successes)
        .max_keys(s.max_keys)
        .idle_timeout(s.idle);
    if let Some((len, buckets)) = s.window {
        b = b.time_window(len, buckets);
    }
    if let Some((t, r)) = s.slow {
        b = b.slow_calls(t, r);
    }
    if let Some(n) = s.consecutive {
        b = b.consecutive_failures(n);
    }
    if let Some((m, max)) = s.backoff {
        b = b.open_backoff(m, max);
    }
    b
}

static BUILT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_setting_panics_at_build_or_at_run_time(s in settings()) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            // A refusal is a clear error, never a panic.
            if let Err(e) = builder(&s).build() {
                assert!(!e.to_string().is_empty());
                return;
            }
            BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let r = rig(builder(&s));
            // Enough failures to trip any window this can build (bounded: a huge
            // minimum_calls is simply not reached).
            let n = s.minimum_calls.clamp(1, 200).max(s.consecutive.unwrap_or(1).min(200));
            for _ in 0..n {
                let _ = r.call("m", FAIL).await;
            }
            // Wait out the open duration (bounded by the config), probe, succeed.
            tokio::time::advance(s.open.min(Duration::from_secs(8 * 24 * 3600))).await;
            for _ in 0..3 {
                let _ = r.call("m", OK).await;
                tokio::time::advance(Duration::from_secs(1)).await;
            }
            let _ = r.svc.clone().oneshot(req("other", Do::Late(200, 5))).await;
            let _ = r.handle.all_metrics();
        });
    }
}

#[test]
fn the_open_duration_is_bounded_and_a_trip_at_the_bound_does_not_panic() {
    // Issue #16: `open_duration(Duration::MAX)` passed validation and the first trip
    // panicked ("overflow when adding duration to instant").
    let err = CircuitBreakerLayer::builder()
        .open_duration(Duration::MAX)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::TooLong {
                what: "open_duration",
                ..
            }
        ),
        "{err}"
    );
    let err = CircuitBreakerLayer::builder()
        .count_window(u32::MAX)
        .build()
        .unwrap_err();
    assert!(matches!(err, ConfigError::TooMany { .. }), "{err}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let r = rig(CircuitBreakerLayer::builder()
            .count_window(5)
            .minimum_calls(5)
            .open_duration(tower_ai_circuit_breaker::MAX_DURATION));
        for _ in 0..5 {
            r.call("m", FAIL).await;
        }
        assert_eq!(r.call("m", OK).await, Got::Open);
    });
}

#[test]
fn most_random_settings_build() {
    // The property above must run layers, not only refusals: its strategies are
    // weighted toward sane values. Run it here and count.
    no_setting_panics_at_build_or_at_run_time();
    let built = BUILT.load(std::sync::atomic::Ordering::Relaxed);
    assert!(built >= 16, "only {built} of 256 random settings built");
}
