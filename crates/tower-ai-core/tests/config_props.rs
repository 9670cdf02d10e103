//! Issue #16 point 7: `ClassifyConfig`'s public fields take any value without a panic,
//! in `classify` and in the `Classify` layer (error bodies read on a paused clock).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tower::{service_fn, Layer, ServiceExt};
use tower_ai_core::{classify_at, BoxError, ClassifyConfig, ClassifyLayer, Provider};

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        Just(Duration::from_nanos(1)),
        any::<u64>().prop_map(Duration::from_secs),
        any::<u64>().prop_map(Duration::from_nanos),
    ]
}

fn config() -> impl Strategy<Value = ClassifyConfig> {
    (
        duration(),
        prop_oneof![Just(0usize), Just(1), Just(usize::MAX), 0usize..4096],
        duration(),
    )
        .prop_map(
            |(max_wait, max_error_body, error_body_timeout)| ClassifyConfig {
                max_wait,
                max_error_body,
                error_body_timeout,
            },
        )
}

const BODIES: [&str; 3] = [
    r#"{"error":{"message":"Rate limit reached. Please try again in 20s.","type":"requests","code":"rate_limit_exceeded"}}"#,
    r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"999999999999s"}]}}"#,
    "not json",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_classify_config_works(cfg in config(), which in 0usize..3, retry_after in prop_oneof![Just("0"), Just("18446744073709551615"), Just("Fri, 31 Dec 9999 23:59:59 GMT"), Just("1.5")]) {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", retry_after.parse().unwrap());
        headers.insert("retry-after-ms", "18446744073709551615".parse().unwrap());
        for provider in [Provider::OpenAi, Provider::Gemini, Provider::Anthropic] {
            let _ = classify_at(provider, StatusCode::TOO_MANY_REQUESTS, &headers, BODIES[which].as_bytes(), &cfg, SystemTime::now());
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async {
            let h = headers.clone();
            let svc = ClassifyLayer::with_config(cfg).layer(service_fn(move |_: Request<String>| {
                let mut res = Response::builder().status(429).body(Full::new(Bytes::from_static(BODIES[which].as_bytes()))).unwrap();
                *res.headers_mut() = h.clone();
                async move { Ok::<_, BoxError>(res) }
            }));
            let req = Request::post("https://api.openai.com/v1/chat/completions").body(String::new()).unwrap();
            let res = svc.oneshot(req).await.unwrap();
            // The body still reaches the caller whole, whatever the limits.
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], BODIES[which].as_bytes());
        });
    }
}
