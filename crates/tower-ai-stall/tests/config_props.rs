//! Issue #16 point 7: no configuration panics, at build or at run time. Random and
//! extreme values go to every setter; whatever `build` accepts watches a few calls
//! (late heads, a streamed answer) on a paused clock.

use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tower::{service_fn, Layer, ServiceExt};
use tower_ai_core::{AiBody, BoxError};
use tower_ai_stall::StallDetectorLayer;

fn duration() -> impl Strategy<Value = Option<Duration>> {
    // Extremes, and mostly sane values, so that most cases build and run.
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(Duration::ZERO)),
        1 => Just(Some(Duration::MAX)),
        1 => Just(Some(Duration::from_nanos(1))),
        1 => any::<u64>().prop_map(|n| Some(Duration::from_nanos(n))),
        30 => (100u64..120_000).prop_map(|ms| Some(Duration::from_millis(ms))),
    ]
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(0usize), 1 => Just(usize::MAX), 20 => 1usize..1_000_000]
}

static BUILT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

const SSE: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_setting_panics_at_build_or_at_run_time(
        ds in (duration(), duration(), duration(), duration(), duration(), duration()),
        flags in any::<(bool, bool, bool, bool)>(),
        sizes in (size(), size()),
        late_ms in prop_oneof![Just(0u64), 0u64..200_000],
    ) {
        let b = StallDetectorLayer::builder()
            .head(ds.0)
            .unary_head(ds.1)
            .first_byte(ds.2)
            .first_content(ds.3)
            .idle(ds.4)
            .total(ds.5)
            .liveness_resets_idle(flags.0)
            .require_terminal(flags.1)
            .await_first_byte(flags.2)
            .await_first_content(flags.3)
            .max_preamble(sizes.0)
            .max_event(sizes.1);
        let layer = match b.build() {
            Err(e) => { prop_assert!(!e.to_string().is_empty()); return Ok(()); }
            Ok(layer) => layer,
        };
        BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let provider = service_fn(move |_: Request<AiBody>| async move {
                tokio::time::sleep(Duration::from_millis(late_ms)).await;
                Ok::<_, BoxError>(
                    Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(String::from(SSE))?,
                )
            });
            let svc = layer.layer(provider);
            for stream in [true, false] {
                let req = Request::post("https://api.openai.com/v1/chat/completions")
                    .body(AiBody::from(format!(r#"{{"model":"gpt-4o","stream":{stream}}}"#)))
                    .unwrap();
                if let Ok(res) = svc.clone().oneshot(req).await {
                    let _ = res.into_body().collect().await;
                }
            }
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
