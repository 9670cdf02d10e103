//! Property tests: parsers never panic on arbitrary input, and no parsed wait ever exceeds
//! the configured maximum.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use proptest::prelude::*;
use tower_ai_core::stream::{StreamDialect, StreamScanner};
use tower_ai_core::{
    classify_at, duration, ClassifyConfig, Provider, RateLimitInfo, RequestMeta, RequestedWait,
};

const WAIT_HEADERS: [&str; 6] = [
    "retry-after",
    "retry-after-ms",
    "x-ms-retry-after-ms",
    "x-amz-retry-after",
    "ratelimit",
    "date",
];
const RL_HEADERS: [&str; 8] = [
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "x-ratelimit-limit-requests",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "ratelimit",
    "ratelimit-policy",
    "date",
];

fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,40}",
        "-?[0-9]{1,25}(\\.[0-9]{0,12})?",
        "[0-9.]{1,8}(h|m|s|ms|us|ns){1,3}",
        "(inf|NaN|-inf|1e[0-9]{1,4}|-0|0)",
        "20[0-9]{2}-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9](\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})",
        "\"[a-z]{0,5}\";r=[0-9]{0,17};t=[0-9]{0,17}(,\"x\";q=[0-9]{1,16})?",
        "(Mon|Tue), [0-9]{2} (Jan|Mar) [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT",
    ]
}

fn headers_from(names: &[&'static str], values: Vec<(usize, String)>) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (i, v) in values {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.append(HeaderName::from_static(names[i % names.len()]), v);
        }
    }
    h
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn waits_are_bounded(values in proptest::collection::vec((0usize..6, header_value()), 0..6), max_ms in 0u64..10_000_000) {
        let max = Duration::from_millis(max_ms);
        let h = headers_from(&WAIT_HEADERS, values);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        if let Some(w) = RequestedWait::from_headers(&h, max, now) {
            prop_assert!(w.delay <= max);
            prop_assert!(w.delay <= w.requested);
            prop_assert!(w.requested <= duration::CEILING);
            prop_assert!(!w.delay.is_zero() || max.is_zero());
            prop_assert_eq!(w.exceeds_max(), w.requested > max);
        }
    }

    #[test]
    fn rate_limit_headers_never_panic(values in proptest::collection::vec((0usize..8, header_value()), 0..10)) {
        let h = headers_from(&RL_HEADERS, values);
        let info = RateLimitInfo::from_headers(&h, SystemTime::UNIX_EPOCH);
        if let Some(d) = info.exhausted_for() {
            prop_assert!(d <= duration::CEILING);
        }
    }

    #[test]
    fn classify_never_panics_and_bounds_waits(
        status in 100u16..600,
        body in proptest::collection::vec(any::<u8>(), 0..512),
        values in proptest::collection::vec((0usize..6, header_value()), 0..4),
        max_s in 0u64..1000,
    ) {
        let cfg = ClassifyConfig { max_wait: Duration::from_secs(max_s), ..Default::default() };
        let h = headers_from(&WAIT_HEADERS, values);
        let c = classify_at(Provider::Generic, StatusCode::from_u16(status).unwrap(), &h, &body, &cfg, SystemTime::UNIX_EPOCH);
        if let Some(w) = c.wait {
            prop_assert!(w.delay <= cfg.max_wait);
        }
        if let Some(m) = c.message() {
            prop_assert!(m.len() <= 1024);
        }
    }

    #[test]
    fn classify_json_shaped_bodies(
        status in prop_oneof![Just(400u16), Just(429), Just(500), Just(503), Just(529)],
        ty in "[a-z_]{0,20}", code in "[a-z_0-9]{0,20}", msg in "[ -~]{0,200}", delay in "[0-9.]{0,12}s?",
        max_s in 0u64..300,
    ) {
        let body = serde_json::json!({"error": {"type": ty, "code": code, "message": msg,
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]}});
        let cfg = ClassifyConfig { max_wait: Duration::from_secs(max_s), ..Default::default() };
        let c = classify_at(Provider::Gemini, StatusCode::from_u16(status).unwrap(), &HeaderMap::new(), body.to_string().as_bytes(), &cfg, SystemTime::UNIX_EPOCH);
        prop_assert!(c.kind.is_some());
        if let Some(w) = c.wait { prop_assert!(w.delay <= cfg.max_wait); }
    }

    #[test]
    fn go_duration_and_rfc3339_never_panic(s in "\\PC{0,50}") {
        let _ = duration::go_duration(&s);
        let _ = duration::rfc3339(&s);
        let _ = duration::protobuf_duration(&s);
        let _ = duration::number(&s, 1e-3);
        let _ = duration::http_date(&s);
    }

    #[test]
    fn scanners_and_meta_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), split in 1usize..50) {
        for d in [StreamDialect::OpenAiChat, StreamDialect::OpenAiResponses, StreamDialect::Anthropic, StreamDialect::Gemini] {
            let mut s = StreamScanner::new(d);
            for c in bytes.chunks(split) { let _ = s.feed(c); }
            let _ = s.finish();
        }
        let m = RequestMeta::parse("/v1/chat/completions", &bytes);
        prop_assert!(m.input_tokens_estimate >= 1);
        let _ = tower_ai_core::top_level_string(&bytes, b"model");
    }
}
