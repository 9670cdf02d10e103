//! The cost of reading a response once: `cargo bench -p tower-ai-core --bench classify`.
//!
//! Classification happens once per *error* response (successes are not read), so the
//! figure that matters is a typical 429 with its headers and body.

use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, StatusCode};
use std::hint::black_box;
use tower_ai_core::{classify_at, ClassifyConfig, Provider, RateLimitInfo, RequestMeta};

const OPENAI_429: &[u8] = br#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, Used 29500, Requested 1200. Please try again in 1.4s. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
const GEMINI_429: &[u8] = br#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_input_token_count","quotaId":"GenerateContentInputTokensPerModelPerMinute-FreeTier","quotaDimensions":{"location":"global","model":"gemini-2.5-flash"},"quotaValue":"250000"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"26s"}]}}"#;

fn openai_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("retry-after", "2"),
        ("x-ratelimit-limit-requests", "5000"),
        ("x-ratelimit-limit-tokens", "30000"),
        ("x-ratelimit-remaining-requests", "4999"),
        ("x-ratelimit-remaining-tokens", "0"),
        ("x-ratelimit-reset-requests", "12ms"),
        ("x-ratelimit-reset-tokens", "1.4s"),
        ("x-request-id", "req_123"),
        ("content-type", "application/json"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h
}

fn bench(c: &mut Criterion) {
    let cfg = ClassifyConfig::default();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let headers = openai_headers();
    let mut g = c.benchmark_group("classify");
    g.bench_function("openai_429_rate_limit", |b| {
        b.iter(|| {
            classify_at(
                Provider::OpenAi,
                StatusCode::TOO_MANY_REQUESTS,
                black_box(&headers),
                black_box(OPENAI_429),
                &cfg,
                now,
            )
        })
    });
    g.bench_function("gemini_429_retry_info", |b| {
        b.iter(|| {
            classify_at(
                Provider::Gemini,
                StatusCode::TOO_MANY_REQUESTS,
                black_box(&HeaderMap::new()),
                black_box(GEMINI_429),
                &cfg,
                now,
            )
        })
    });
    g.bench_function("success_200_head_only", |b| {
        b.iter(|| {
            classify_at(
                Provider::OpenAi,
                black_box(StatusCode::OK),
                black_box(&headers),
                b"",
                &cfg,
                now,
            )
        })
    });
    g.bench_function("rate_limit_headers", |b| {
        b.iter(|| RateLimitInfo::from_headers(black_box(&headers), now))
    });
    let mut plain = HeaderMap::new();
    for (k, v) in [
        ("content-type", "application/json"),
        ("date", "Tue, 26 Mar 2024 19:59:59 GMT"),
        ("server", "x"),
    ] {
        plain.insert(k, HeaderValue::from_static(v));
    }
    g.bench_function("rate_limit_headers_none_present", |b| {
        b.iter(|| RateLimitInfo::from_headers(black_box(&plain), now))
    });
    let body = br#"{"model":"gpt-4o","stream":true,"max_tokens":256,"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Summarise the plot of Hamlet in three sentences, please."}]}"#;
    g.bench_function("request_meta_parse", |b| {
        b.iter(|| RequestMeta::parse(black_box("/v1/chat/completions"), black_box(body)))
    });
    g.bench_function("model_scan", |b| {
        b.iter(|| tower_ai_core::top_level_string(black_box(body), b"model"))
    });
    let req = http::Request::post("https://api.openai.com/v1/chat/completions")
        .body(bytes::Bytes::from_static(body))
        .unwrap();
    g.bench_function("host_model_key", |b| {
        b.iter(|| tower_ai_core::keys::KeyFn::key(&tower_ai_core::keys::HostModel, black_box(&req)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
