//! RPM/TPM windows, quota exhaustion and context length, on a paused clock.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use support::*;
use tokio::time::{sleep, sleep_until, Instant};
use tower_ai_sim::{ModelSpec, Outcome, Scenario, Simulator};

// 2023-11-14T22:13:20Z
const WALL: u64 = 1_700_000_000;

fn limited(rpm: u64) -> Simulator {
    Simulator::new(
        Scenario::builder()
            .rpm_limit(rpm)
            .wall_clock(UNIX_EPOCH + Duration::from_secs(WALL))
            .build()
            .unwrap(),
    )
}

#[tokio::test(start_paused = true)]
async fn rpm_window_openai() {
    let sim = limited(60);
    let start = Instant::now();
    let body = chat("gpt-4o", "hi");
    sleep_until(start + Duration::from_millis(10_500)).await;
    for i in 0..60 {
        let (parts, _) = read(send_json(&sim, OPENAI, &body).await).await;
        assert_eq!(parts.status, 200, "request {i}");
        assert_eq!(
            header(&parts, "x-ratelimit-remaining-requests"),
            Some((59 - i).to_string().as_str())
        );
        assert!(header(&parts, "retry-after").is_none());
    }
    // The 61st, 10.5 s into the window: 49.5 s left -> retry-after 50.
    let (parts, v) = read_json(send_json(&sim, OPENAI, &body).await).await;
    assert_eq!(parts.status, 429);
    assert_eq!(header(&parts, "retry-after"), Some("50"));
    assert_eq!(header(&parts, "x-ratelimit-limit-requests"), Some("60"));
    assert_eq!(header(&parts, "x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(header(&parts, "x-ratelimit-reset-requests"), Some("49.5s"));
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["type"], "requests");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Please try again in 49.5s"));

    // Still limited just before the window ends...
    sleep_until(start + Duration::from_millis(59_999)).await;
    let (parts, _) = read(send_json(&sim, OPENAI, &body).await).await;
    assert_eq!(parts.status, 429);
    assert_eq!(header(&parts, "retry-after"), Some("1"));
    assert_eq!(header(&parts, "x-ratelimit-reset-requests"), Some("1ms"));
    // ... and admitted again in the next one.
    sleep_until(start + Duration::from_secs(60)).await;
    let (parts, _) = read(send_json(&sim, OPENAI, &body).await).await;
    assert_eq!(parts.status, 200);
    assert_eq!(header(&parts, "x-ratelimit-remaining-requests"), Some("59"));
    assert_eq!(header(&parts, "x-ratelimit-reset-requests"), Some("1m0s"));

    let stats = sim.stats();
    assert_eq!(
        (stats.total, stats.count(200), stats.count(429)),
        (63, 61, 2)
    );
    assert_eq!(stats.outcome(Outcome::RateLimitedRequests), 2);
}

#[tokio::test(start_paused = true)]
async fn rpm_window_anthropic_headers() {
    let sim = limited(2);
    let mut body = chat("claude", "hi");
    body["max_tokens"] = json!(10);
    sleep(Duration::from_secs(15)).await;
    for _ in 0..2 {
        assert_eq!(send_json(&sim, ANTHROPIC, &body).await.status(), 200);
    }
    let (parts, v) = read_json(send_json(&sim, ANTHROPIC, &body).await).await;
    assert_eq!(parts.status, 429);
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(v["request_id"].as_str().unwrap().starts_with("req_"));
    assert_eq!(header(&parts, "retry-after"), Some("45"));
    assert_eq!(header(&parts, "x-should-retry"), Some("true"));
    assert_eq!(
        header(&parts, "anthropic-ratelimit-requests-limit"),
        Some("2")
    );
    assert_eq!(
        header(&parts, "anthropic-ratelimit-requests-remaining"),
        Some("0")
    );
    // The window ends 60 s after the start: WALL + 60 s.
    assert_eq!(
        header(&parts, "anthropic-ratelimit-requests-reset"),
        Some("2023-11-14T22:14:20Z")
    );
    let date = httpdate::parse_http_date(header(&parts, "date").unwrap()).unwrap();
    assert_eq!(
        date,
        SystemTime::UNIX_EPOCH + Duration::from_secs(WALL + 15)
    );
}

#[tokio::test(start_paused = true)]
async fn rpm_window_gemini_retry_info() {
    let sim = limited(1);
    let path = gemini("gemini-2.0-flash", false, false);
    sleep(Duration::from_millis(33_200)).await;
    assert_eq!(
        send_json(&sim, &path, &gemini_body("hi")).await.status(),
        200
    );
    let (parts, v) = read_json(send_json(&sim, &path, &gemini_body("hi")).await).await;
    assert_eq!(parts.status, 429);
    assert!(
        header(&parts, "retry-after").is_none(),
        "Gemini sends no Retry-After header"
    );
    assert_eq!(v["error"]["code"], 429);
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    let details = v["error"]["details"].as_array().unwrap();
    let retry = details
        .iter()
        .find(|d| d["@type"] == "type.googleapis.com/google.rpc.RetryInfo")
        .unwrap();
    assert_eq!(retry["retryDelay"], "27s"); // 26.8 s left, rounded up
    let quota = details
        .iter()
        .find(|d| d["@type"] == "type.googleapis.com/google.rpc.QuotaFailure")
        .unwrap();
    let quota_id = quota["violations"][0]["quotaId"].as_str().unwrap();
    assert!(quota_id.contains("PerMinute"), "{quota_id}");
}

#[tokio::test(start_paused = true)]
async fn azure_429_has_retry_after_ms() {
    let sim = limited(1);
    let path = "/openai/deployments/d/chat/completions";
    sleep(Duration::from_millis(59_250)).await;
    assert_eq!(send_json(&sim, path, &chat("x", "hi")).await.status(), 200);
    let (parts, v) = read_json(send_json(&sim, path, &chat("x", "hi")).await).await;
    assert_eq!(parts.status, 429);
    assert_eq!(header(&parts, "retry-after-ms"), Some("750"));
    assert_eq!(header(&parts, "retry-after"), Some("1"));
    assert_eq!(header(&parts, "x-ratelimit-reset-requests"), Some("1"));
    assert_eq!(v["error"]["code"], "429");
}

#[tokio::test(start_paused = true)]
async fn tpm_window_and_request_too_large() {
    let sim = Simulator::new(
        Scenario::builder()
            .model(ModelSpec::new("m").completion_tokens(10))
            .tpm_limit(100)
            .build()
            .unwrap(),
    );
    // 40 bytes -> 10 prompt tokens + 10 completion = 20 per request.
    let body = chat("m", &"x".repeat(40));
    for i in 0..5 {
        let (parts, _) = read(send_json(&sim, OPENAI, &body).await).await;
        assert_eq!(parts.status, 200, "request {i}");
        assert_eq!(
            header(&parts, "x-ratelimit-remaining-tokens"),
            Some((80 - 20 * i).to_string().as_str())
        );
    }
    let (parts, v) = read_json(send_json(&sim, OPENAI, &body).await).await;
    assert_eq!(parts.status, 429);
    assert_eq!(header(&parts, "retry-after"), Some("60"));
    assert_eq!(header(&parts, "x-ratelimit-reset-tokens"), Some("1m0s"));
    assert_eq!(v["error"]["type"], "tokens");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");

    // A request that can never fit: no retry-after, "Request too large".
    sleep(Duration::from_secs(60)).await;
    let big = chat("m", &"x".repeat(400));
    let (parts, v) = read_json(send_json(&sim, OPENAI, &big).await).await;
    assert_eq!(parts.status, 429);
    assert!(header(&parts, "retry-after").is_none());
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Request too large"));
    assert_eq!(
        sim.calls().last().unwrap().outcome,
        Outcome::RequestTooLarge
    );
    // ... and it used no capacity.
    assert_eq!(send_json(&sim, OPENAI, &body).await.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn anthropic_tokens_remaining_is_rounded_to_thousands() {
    let sim = Simulator::new(
        Scenario::builder()
            .model(ModelSpec::new("c").completion_tokens(100))
            .tpm_limit(40_000)
            .build()
            .unwrap(),
    );
    let mut body = chat("c", &"x".repeat(2_000)); // 500 + 100 = 600 tokens
    body["max_tokens"] = json!(1000);
    let (parts, _) = read(send_json(&sim, ANTHROPIC, &body).await).await;
    assert_eq!(
        header(&parts, "anthropic-ratelimit-tokens-limit"),
        Some("40000")
    );
    assert_eq!(
        header(&parts, "anthropic-ratelimit-tokens-remaining"),
        Some("39000")
    );
}

#[tokio::test(start_paused = true)]
async fn quota_exhausted_for_one_model() {
    let sim = Simulator::new(
        Scenario::builder()
            .quota_exhausted_for("broke")
            .build()
            .unwrap(),
    );
    let (parts, v) = read_json(send_json(&sim, OPENAI, &chat("broke", "hi")).await).await;
    assert_eq!(parts.status, 429);
    assert_eq!(v["error"]["code"], "insufficient_quota");
    assert_eq!(
        send_json(&sim, OPENAI, &chat("fine", "hi")).await.status(),
        200
    );
}

#[tokio::test(start_paused = true)]
async fn quota_exhaustion_per_dialect() {
    let sim = Simulator::new(
        Scenario::builder()
            .quota_exhausted_after(1)
            .rpm_limit(100)
            .build()
            .unwrap(),
    );
    let mut anthropic_body = chat("c", "hi");
    anthropic_body["max_tokens"] = json!(5);
    assert_eq!(
        send_json(&sim, OPENAI, &chat("m", "hi")).await.status(),
        200
    );

    let (parts, v) = read_json(send_json(&sim, OPENAI, &chat("m", "hi")).await).await;
    assert_eq!(parts.status, 429);
    assert!(header(&parts, "retry-after").is_none());
    assert_eq!(v["error"]["type"], "insufficient_quota");
    assert_eq!(v["error"]["code"], "insufficient_quota");

    let (parts, v) = read_json(send_json(&sim, ANTHROPIC, &anthropic_body).await).await;
    assert_eq!(parts.status, 429);
    assert!(
        header(&parts, "retry-after").is_none(),
        "spend cap: no retry-after"
    );
    assert!(header(&parts, "x-should-retry").is_none());
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(
        v["error"]["details"]["error_code"],
        "enforced_spend_limit_reached"
    );

    let (parts, v) =
        read_json(send_json(&sim, &gemini("g", false, false), &gemini_body("hi")).await).await;
    assert_eq!(parts.status, 429);
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    let quota_id = v["error"]["details"][0]["violations"][0]["quotaId"]
        .as_str()
        .unwrap();
    assert!(quota_id.contains("PerDay"), "{quota_id}");

    // Quota refusals do not use rate-limit capacity and keep coming.
    sleep(Duration::from_secs(3600)).await;
    assert_eq!(
        send_json(&sim, OPENAI, &chat("m", "hi")).await.status(),
        429
    );
    assert_eq!(sim.stats().outcome(Outcome::QuotaExhausted), 4);
}

#[tokio::test]
async fn no_limits_no_429() {
    let sim = Simulator::new(Scenario::default());
    for _ in 0..500 {
        assert_eq!(
            send_json(&sim, OPENAI, &chat("m", "hi")).await.status(),
            200
        );
    }
    assert_eq!(sim.stats().count(200), 500);
}

#[tokio::test]
async fn context_length_per_dialect() {
    let sim = Simulator::new(
        Scenario::builder()
            .model(ModelSpec::new("small").context_window(10))
            .build()
            .unwrap(),
    );
    let long = "x".repeat(44); // 11 tokens
    let fits = "x".repeat(40); // 10 tokens
    let (parts, v) = read_json(send_json(&sim, OPENAI, &chat("small", &long)).await).await;
    assert_eq!(parts.status, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(v["error"]["param"], "messages");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("maximum context length is 10 tokens"));
    assert_eq!(
        send_json(&sim, OPENAI, &chat("small", &fits))
            .await
            .status(),
        200
    );

    let mut body = chat("small", &long);
    body["max_tokens"] = json!(5);
    let (parts, v) = read_json(send_json(&sim, ANTHROPIC, &body).await).await;
    assert_eq!(parts.status, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("prompt is too long"));

    let (parts, v) =
        read_json(send_json(&sim, &gemini("small", false, false), &gemini_body(&long)).await).await;
    assert_eq!(parts.status, 400);
    assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
    assert_eq!(sim.stats().outcome(Outcome::ContextLengthExceeded), 3);
}
