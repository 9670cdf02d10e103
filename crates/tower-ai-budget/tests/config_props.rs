//! Issue #16 point 7: no configuration panics, at build or at run time. Random and
//! extreme values go to every setter; whatever `build` accepts serves a few calls
//! (with usage, past a refusal, across a window) on a paused clock.

mod support;

use std::time::Duration;

use proptest::prelude::*;
use support::*;
use tower::Layer;
use tower_ai_budget::{PriceTable, TokenBudgetLayer};

fn big() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        0u64..1000,
        any::<u64>()
    ]
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(0usize), 1 => Just(1), 1 => Just(usize::MAX), 20 => 1usize..100_000]
}

fn amount() -> impl Strategy<Value = f64> {
    prop_oneof![
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(0.0),
        1 => Just(-1.0),
        1 => Just(1e300),
        1 => Just(f64::MIN_POSITIVE),
        30 => 0.01f64..100.0,
    ]
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        1 => Just(Duration::ZERO),
        1 => Just(Duration::MAX),
        1 => Just(Duration::from_nanos(1)),
        20 => (1u64..100_000).prop_map(Duration::from_millis),
    ]
}

static BUILT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_setting_panics_at_build_or_at_run_time(
        limits in (proptest::option::of(big()), proptest::option::of(big()), proptest::option::of(prop_oneof![Just(0u32), Just(u32::MAX), 0u32..8]), proptest::option::of(amount()), proptest::option::of(amount())),
        prices in (amount(), amount()),
        wait in proptest::option::of(duration()),
        sizes in (size(), size(), size(), size(), size()),
        default_output in big(),
        soft in proptest::option::of(amount()),
    ) {
        let (rpm, tpm, conc, hour, day) = limits;
        let mut b = TokenBudgetLayer::builder()
            .max_keys(sizes.0)
            .max_waiters_per_key(sizes.1)
            .max_waiters(sizes.2)
            .max_usage_body(sizes.3)
            .max_event(sizes.4)
            .default_output_tokens(default_output)
            .prices(PriceTable::new().model("gpt-4o", prices.0, prices.1));
        if let Some(n) = rpm { b = b.requests_per_minute(n); }
        if let Some(n) = tpm { b = b.tokens_per_minute(n); }
        if let Some(n) = conc { b = b.max_concurrent(n); }
        if let Some(a) = hour { b = b.spend_per_hour(a); }
        if let Some(a) = day { b = b.spend_per_day(a); }
        if let Some(f) = soft { b = b.soft_limit(f); }
        b = match wait { Some(d) => b.wait(d), None => b.reject() };
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        match b.build() {
            Err(e) => prop_assert!(!e.to_string().is_empty()),
            Ok(layer) => rt.block_on(async {
                BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let svc = layer.layer(Provider::new(|_| Ok(json_usage(1_000, u64::MAX / 2))));
                for i in 0..4u64 {
                    let req = chat_for("gpt-4o", 10 + i * 1000, Some(u64::MAX >> i));
                    if let Ok(res) = send(&svc, req).await {
                        drain(res).await;
                    }
                    tokio::time::advance(Duration::from_secs(61)).await;
                }
            }),
        }
        // The infallible constructor.
        rt.block_on(async {
            let svc = TokenBudgetLayer::new(rpm.unwrap_or(0), tpm.unwrap_or(0)).layer(Provider::new(|_| Ok(no_usage())));
            if let Ok(res) = send(&svc, chat(10, Some(1))).await {
                drain(res).await;
            }
        });
    }
}

#[tokio::test(start_paused = true)]
async fn new_with_a_zero_limit_is_the_strictest_budget_not_a_panic() {
    // Issue #16: `TokenBudgetLayer::new(0, _)` panicked.
    let svc = TokenBudgetLayer::new(0, 1_000_000).layer(Provider::new(|_| Ok(no_usage())));
    let first = send(&svc, chat(10, Some(1))).await;
    assert!(first.is_ok(), "one request per minute");
    let err = send(&svc, chat(10, Some(1))).await.unwrap_err();
    assert_eq!(
        exceeded(&err).0,
        tower_ai_core::BudgetLimit::RequestsPerMinute
    );
}

#[test]
fn most_random_settings_build() {
    // The property above must run layers, not only refusals: its strategies are
    // weighted toward sane values. Run it here and count.
    no_setting_panics_at_build_or_at_run_time();
    let built = BUILT.load(std::sync::atomic::Ordering::Relaxed);
    assert!(built >= 16, "only {built} of 256 random settings built");
}
