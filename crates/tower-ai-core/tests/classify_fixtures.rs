//! Every row of the summary table in docs/protocols.md#summary, with the providers' real
//! bodies and headers.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tower_ai_core::{classify_at, Classification, ClassifyConfig, ErrorKind, Provider, WaitSource};

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn run(p: Provider, status: u16, hs: &[(&str, &str)], body: &str) -> Classification {
    classify_at(
        p,
        StatusCode::from_u16(status).unwrap(),
        &headers(hs),
        body.as_bytes(),
        &ClassifyConfig::default(),
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_711_483_199),
    )
}

fn kind(c: &Classification) -> ErrorKind {
    c.kind.expect("an error kind")
}

// ---------------------------------------------------------------- OpenAI

#[test]
fn openai_rate_limit_is_retryable_with_its_wait() {
    let body = r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Used 29000, Requested 1538. Please try again in 6.596s. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
    let c = run(
        Provider::OpenAi,
        429,
        &[
            ("x-ratelimit-limit-tokens", "30000"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "6.596s"),
            ("x-request-id", "req_abc"),
        ],
        body,
    );
    assert_eq!(kind(&c), ErrorKind::RateLimited);
    assert!(c.is_retryable());
    let w = c.wait.unwrap();
    assert_eq!(
        (w.delay, w.source),
        (Duration::from_millis(6596), WaitSource::Message)
    );
    let e = c.error.as_ref().unwrap();
    assert_eq!(e.code.as_deref(), Some("rate_limit_exceeded"));
    assert_eq!(e.request_id.as_deref(), Some("req_abc"));
    assert_eq!(
        c.rate_limit.exhausted_for(),
        Some(Duration::from_millis(6596))
    );

    // With a Retry-After header, the header wins over the message.
    let c = run(Provider::OpenAi, 429, &[("retry-after", "56")], body);
    assert_eq!(c.wait.unwrap().delay, Duration::from_secs(56));
}

#[test]
fn openai_slow_down_is_a_rate_limit() {
    let body = r#"{"error":{"message":"Request rate increased too quickly.","type":"rate_limit_error","param":null,"code":"slow_down"}}"#;
    let c = run(Provider::OpenAi, 429, &[("retry-after", "3")], body);
    assert_eq!(kind(&c), ErrorKind::RateLimited);
    // The legacy 503 "Slow Down" form too.
    let c = run(Provider::OpenAi, 503, &[], body);
    assert_eq!(kind(&c), ErrorKind::RateLimited);
}

#[test]
fn openai_billing_429s_are_never_retryable() {
    let legacy = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    let credits = r#"{"error":{"message":"You have no credits remaining...","type":"insufficient_quota","code":"credit_balance_exhausted"}}"#;
    let null_code = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":null}}"#;
    for body in [legacy, credits, null_code] {
        let c = run(Provider::OpenAi, 429, &[], body);
        assert_eq!(kind(&c), ErrorKind::QuotaExhausted, "{body}");
        assert!(!c.is_retryable());
    }
    for code in [
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
    ] {
        let body = format!(
            r#"{{"error":{{"message":"limit","type":"invalid_request_error","code":"{code}"}}}}"#
        );
        let c = run(Provider::OpenAi, 429, &[("retry-after", "20")], &body);
        assert_eq!(kind(&c), ErrorKind::QuotaExhausted, "{code}");
        assert!(
            !c.is_retryable(),
            "{code}: a retry-after does not make billing retryable"
        );
    }
}

#[test]
fn openai_request_too_large_for_tpm_never_fits() {
    let body = r#"{"error":{"message":"Request too large for gpt-4o in organization org-78asdf87asdf9aaa8976 on tokens per min (TPM): Limit 30000, Requested 31538. The input or output tokens must be reduced in order to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
    let c = run(Provider::OpenAi, 429, &[], body);
    assert_eq!(kind(&c), ErrorKind::RequestTooLarge);
    assert!(!c.is_retryable());
    assert!(ErrorKind::RequestTooLarge.is_fallback_trigger());
}

#[test]
fn openai_context_length_auth_server_overload() {
    let ctx = r#"{"error":{"message":"This model's maximum context length is 4097 tokens. However, your messages resulted in 4294 tokens. Please reduce the length of the messages.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
    assert_eq!(
        kind(&run(Provider::OpenAi, 400, &[], ctx)),
        ErrorKind::ContextLengthExceeded
    );

    let auth = r#"{"error":{"message":"Incorrect API key provided: sk-VKMIs***************************************wjh3. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
    let c = run(Provider::OpenAi, 401, &[], auth);
    assert_eq!(kind(&c), ErrorKind::Unauthorized);
    assert!(!c.is_retryable() && !ErrorKind::Unauthorized.is_fallback_trigger());

    let server = r#"{"error":{"message":"The server had an error while processing your request. Sorry about that!","type":"server_error","param":null,"code":null}}"#;
    let c = run(Provider::OpenAi, 500, &[], server);
    assert_eq!(kind(&c), ErrorKind::ServerError);
    assert!(c.is_retryable() && ErrorKind::ServerError.is_breaker_failure());

    let overloaded = r#"{"error":{"message":"That model is currently overloaded with other requests.","type":"service_unavailable_error","param":null,"code":"server_is_overloaded"}}"#;
    let c = run(Provider::OpenAi, 503, &[("retry-after", "2")], overloaded);
    assert_eq!(kind(&c), ErrorKind::Overloaded);
    assert_eq!(c.wait.unwrap().delay, Duration::from_secs(2));

    assert_eq!(
        kind(&run(
            Provider::OpenAi,
            403,
            &[],
            r#"{"error":{"message":"Country, region, or territory not supported","type":"request_forbidden","code":"unsupported_country_region_territory"}}"#
        )),
        ErrorKind::Forbidden
    );
    assert_eq!(
        kind(&run(
            Provider::OpenAi,
            404,
            &[],
            r#"{"error":{"message":"The model `gpt-9` does not exist","type":"invalid_request_error","code":"model_not_found"}}"#
        )),
        ErrorKind::NotFound
    );
}

#[test]
fn openai_429_with_no_headers_and_no_wait() {
    // openai-node#1477: a Responses 429 with neither retry-after nor x-ratelimit-*.
    let c = run(
        Provider::OpenAi,
        429,
        &[("x-request-id", "req_1"), ("openai-processing-ms", "12")],
        r#"{"error":{"message":"Rate limit exceeded","type":"requests","code":"rate_limit_exceeded"}}"#,
    );
    assert_eq!(kind(&c), ErrorKind::RateLimited);
    assert!(
        c.wait.is_none(),
        "no wait asked: the retry layer's own backoff applies"
    );
    assert!(c.rate_limit.is_empty());
}

// ---------------------------------------------------------------- Azure

#[test]
fn azure_shapes() {
    let c = run(
        Provider::AzureOpenAi,
        429,
        &[
            ("retry-after-ms", "2000"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "10"),
        ],
        r#"{"error":{"code":"429","message": "Rate limit is exceeded. Try again in 2 seconds."}}"#,
    );
    assert_eq!(kind(&c), ErrorKind::RateLimited);
    let w = c.wait.unwrap();
    assert_eq!(
        (w.delay, w.source),
        (Duration::from_secs(2), WaitSource::RetryAfterMs)
    );
    assert_eq!(c.error.as_ref().unwrap().code.as_deref(), Some("429"));
    assert_eq!(c.rate_limit.requests.reset, Some(Duration::from_secs(10)));

    // "Please retry after 86400 seconds": a wait far beyond the maximum, reported as such.
    let c = run(
        Provider::AzureOpenAi,
        429,
        &[],
        r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-02-01 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 86400 seconds."}}"#,
    );
    let w = c.wait.unwrap();
    assert!(w.exceeds_max());
    assert_eq!(
        (w.requested, w.delay),
        (Duration::from_secs(86400), Duration::from_secs(120))
    );

    let filtered = r#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's content management policy.","type":null,"param":"prompt","code":"content_filter","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{"hate":{"filtered":true,"severity":"high"}}}}}"#;
    let c = run(Provider::AzureOpenAi, 400, &[], filtered);
    assert_eq!(kind(&c), ErrorKind::ContentFiltered);
    // The same without `innererror`: the string `code` decides, beside a numeric `status`.
    let bare = r#"{"error":{"message":"The response was filtered","type":null,"param":"prompt","code":"content_filter","status":400}}"#;
    let c = run(Provider::AzureOpenAi, 400, &[], bare);
    assert_eq!(kind(&c), ErrorKind::ContentFiltered);
    assert_eq!(
        c.error.as_ref().unwrap().code.as_deref(),
        Some("content_filter")
    );
    assert!(ErrorKind::ContentFiltered.is_fallback_trigger() && !c.is_retryable());
}

// ---------------------------------------------------------------- Anthropic

#[test]
fn anthropic_rate_limit_with_retry_after_and_should_retry() {
    let body = r#"{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed the rate limit for your organization of 50,000 input tokens per minute."},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}"#;
    let c = run(
        Provider::Anthropic,
        429,
        &[
            ("retry-after", "7"),
            ("x-should-retry", "true"),
            ("request-id", "req_011CSHoEeqs5C35K2UUqR7Fy"),
            ("anthropic-ratelimit-input-tokens-limit", "50000"),
            ("anthropic-ratelimit-input-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2024-03-26T20:00:06Z",
            ),
            ("date", "Tue, 26 Mar 2024 19:59:59 GMT"),
        ],
        body,
    );
    assert_eq!(kind(&c), ErrorKind::RateLimited);
    assert!(c.is_retryable());
    assert_eq!(c.should_retry, Some(true));
    assert_eq!(c.wait.unwrap().delay, Duration::from_secs(7));
    assert_eq!(
        c.rate_limit.input_tokens.reset,
        Some(Duration::from_secs(7))
    );
    assert_eq!(
        c.error.as_ref().unwrap().request_id.as_deref(),
        Some("req_011CSHoEeqs5C35K2UUqR7Fy")
    );
}

#[test]
fn anthropic_observed_429_without_retry_after() {
    // anthropic-sdk-typescript#357: requests bucket empty, reset one second after `date`.
    let c = run(
        Provider::Anthropic,
        429,
        &[
            ("anthropic-ratelimit-requests-limit", "5"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2024-03-26T20:00:00Z"),
            ("anthropic-ratelimit-tokens-limit", "25000"),
            ("anthropic-ratelimit-tokens-remaining", "16000"),
            ("anthropic-ratelimit-tokens-reset", "2024-03-26T20:00:00Z"),
            ("date", "Tue, 26 Mar 2024 19:59:59 GMT"),
            ("request-id", "req_01T5fCVnYdf9X5ZW6KayReBK"),
            ("x-should-retry", "true"),
        ],
        r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of requests has exceeded your rate limit."}}"#,
    );
    assert_eq!(kind(&c), ErrorKind::RateLimited);
    assert!(c.is_retryable());
    assert_eq!(c.rate_limit.exhausted_for(), Some(Duration::from_secs(1)));
}

#[test]
fn anthropic_spend_limits_are_quota() {
    let body = r#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your API usage limits: your organization has crossed its monthly API usage threshold, set based on your organization's API tier. You will regain access on 2026-09-01 at 00:00 UTC.","details":{"error_code":"enforced_spend_limit_reached"}},"request_id":"req_018EeWyXxfu5pfWkrYcMdjWG"}"#;
    let c = run(
        Provider::Anthropic,
        429,
        &[("x-should-retry", "true")],
        body,
    );
    assert_eq!(kind(&c), ErrorKind::QuotaExhausted);
    assert!(
        !c.is_retryable(),
        "x-should-retry: true cannot make a spend cap retryable"
    );
    assert_eq!(
        c.error.as_ref().unwrap().code.as_deref(),
        Some("enforced_spend_limit_reached")
    );

    // The same message without the details code, and no retry-after: still quota.
    let bare = r#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your API usage limits."}}"#;
    assert_eq!(
        kind(&run(Provider::Anthropic, 429, &[], bare)),
        ErrorKind::QuotaExhausted
    );
    // A self-set workspace spend limit is a 400 invalid_request_error.
    let ws = r#"{"type":"error","error":{"type":"invalid_request_error","message":"You have reached your specified workspace API usage limits. You will regain access on 2026-10-01 at 00:00 UTC."}}"#;
    assert_eq!(
        kind(&run(Provider::Anthropic, 400, &[], ws)),
        ErrorKind::QuotaExhausted
    );
    let billing = r#"{"type":"error","error":{"type":"billing_error","message":"Your credit balance is too low."}}"#;
    assert_eq!(
        kind(&run(Provider::Anthropic, 402, &[], billing)),
        ErrorKind::QuotaExhausted
    );
}

#[test]
fn anthropic_overload_server_timeout_and_client_errors() {
    let c = run(
        Provider::Anthropic,
        529,
        &[("x-should-retry", "true")],
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    );
    assert_eq!(kind(&c), ErrorKind::Overloaded);
    assert!(
        c.is_retryable()
            && ErrorKind::Overloaded.is_breaker_failure()
            && ErrorKind::Overloaded.is_fallback_trigger()
    );
    assert_eq!(
        kind(&run(
            Provider::Anthropic,
            500,
            &[],
            r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#
        )),
        ErrorKind::ServerError
    );
    assert_eq!(
        kind(&run(
            Provider::Anthropic,
            504,
            &[],
            r#"{"type":"error","error":{"type":"timeout_error","message":"Request timed out"}}"#
        )),
        ErrorKind::Timeout
    );
    assert_eq!(
        kind(&run(
            Provider::Anthropic,
            401,
            &[],
            r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#
        )),
        ErrorKind::Unauthorized
    );
    assert_eq!(
        kind(&run(
            Provider::Anthropic,
            403,
            &[],
            r#"{"type":"error","error":{"type":"permission_error","message":"no"}}"#
        )),
        ErrorKind::Forbidden
    );
    assert_eq!(
        kind(&run(
            Provider::Anthropic,
            404,
            &[],
            r#"{"type":"error","error":{"type":"not_found_error","message":"The requested resource could not be found."},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}"#
        )),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind(&run(
            Provider::Anthropic,
            413,
            &[],
            r#"{"type":"error","error":{"type":"request_too_large","message":"Request exceeds the maximum allowed number of bytes."}}"#
        )),
        ErrorKind::RequestTooLarge
    );
    let ctx = r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"}}"#;
    assert_eq!(
        kind(&run(Provider::Anthropic, 400, &[], ctx)),
        ErrorKind::ContextLengthExceeded
    );
    let c = run(
        Provider::Anthropic,
        409,
        &[("x-should-retry", "true")],
        r#"{"type":"error","error":{"type":"conflict_error","message":"conflict"}}"#,
    );
    assert_eq!(kind(&c), ErrorKind::Unknown);
    assert!(
        c.is_retryable(),
        "x-should-retry: true makes an unknown 409 retryable"
    );
    let c = run(
        Provider::Anthropic,
        500,
        &[("x-should-retry", "false")],
        r#"{"type":"error","error":{"type":"api_error","message":"x"}}"#,
    );
    assert!(!c.is_retryable(), "x-should-retry: false forbids a retry");
}

// ---------------------------------------------------------------- Gemini

const GEMINI_PER_MINUTE: &str = r#"{
  "error": {
    "code": 429,
    "message": "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
    "status": "RESOURCE_EXHAUSTED",
    "details": [
      {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [
          {
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_input_token_count",
            "quotaId": "GenerateContentInputTokensPerModelPerMinute-FreeTier",
            "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"},
            "quotaValue": "250000"
          }
        ]
      },
      {
        "@type": "type.googleapis.com/google.rpc.Help",
        "links": [{"description": "Learn more about Gemini API quotas", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]
      },
      {
        "@type": "type.googleapis.com/google.rpc.RetryInfo",
        "retryDelay": "26s"
      }
    ]
  }
}"#;

#[test]
fn gemini_per_minute_quota_is_retryable_after_retry_info() {
    let c = run(Provider::Gemini, 429, &[], GEMINI_PER_MINUTE);
    assert_eq!(kind(&c), ErrorKind::RateLimited);
    assert!(c.is_retryable());
    let w = c.wait.unwrap();
    assert_eq!(
        (w.delay, w.source),
        (Duration::from_secs(26), WaitSource::RetryInfo)
    );
    assert_eq!(
        c.error.as_ref().unwrap().error_type.as_deref(),
        Some("RESOURCE_EXHAUSTED")
    );
}

#[test]
fn gemini_per_day_and_zero_limit_are_quota() {
    let per_day = GEMINI_PER_MINUTE.replace(
        "GenerateContentInputTokensPerModelPerMinute-FreeTier",
        "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
    );
    let c = run(Provider::Gemini, 429, &[], &per_day);
    assert_eq!(kind(&c), ErrorKind::QuotaExhausted);
    assert!(
        !c.is_retryable(),
        "RetryInfo is present, but a per-day quota does not come back in 26 s"
    );

    let zero = r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details.\n* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 0, model: gemini-2.5-pro\nPlease retry in 38.863719904s.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"38s"}]}}"#;
    assert_eq!(
        kind(&run(Provider::Gemini, 429, &[], zero)),
        ErrorKind::QuotaExhausted
    );

    let cloud_code = r#"{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"RATE_LIMIT_EXCEEDED","domain":"cloudcode-pa.googleapis.com","metadata":{"quota_limit":"Gemini25ProRequestsPerDay"}}]}}"#;
    assert_eq!(
        kind(&run(Provider::Gemini, 429, &[], cloud_code)),
        ErrorKind::QuotaExhausted
    );
}

#[test]
fn gemini_other_statuses() {
    let key = r#"{"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}]}}"#;
    let c = run(Provider::Gemini, 400, &[], key);
    assert_eq!(kind(&c), ErrorKind::Unauthorized);
    assert_eq!(
        c.error.as_ref().unwrap().code.as_deref(),
        Some("API_KEY_INVALID")
    );
    let unavailable = r#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#;
    assert_eq!(
        kind(&run(Provider::Gemini, 503, &[], unavailable)),
        ErrorKind::Overloaded
    );
    let internal_ctx = r#"{"error":{"code":500,"message":"An internal error has occurred. Your input context is too long.","status":"INTERNAL"}}"#;
    assert_eq!(
        kind(&run(Provider::Gemini, 500, &[], internal_ctx)),
        ErrorKind::ContextLengthExceeded
    );
    let internal =
        r#"{"error":{"code":500,"message":"An internal error has occurred.","status":"INTERNAL"}}"#;
    assert_eq!(
        kind(&run(Provider::Gemini, 500, &[], internal)),
        ErrorKind::ServerError
    );
    let deadline =
        r#"{"error":{"code":504,"message":"Deadline exceeded","status":"DEADLINE_EXCEEDED"}}"#;
    assert_eq!(
        kind(&run(Provider::Gemini, 504, &[], deadline)),
        ErrorKind::Timeout
    );
    let denied =
        r#"{"error":{"code":403,"message":"Permission denied","status":"PERMISSION_DENIED"}}"#;
    assert_eq!(
        kind(&run(Provider::Gemini, 403, &[], denied)),
        ErrorKind::Forbidden
    );
    let precondition = r#"{"error":{"code":400,"message":"User location is not supported for the API use.","status":"FAILED_PRECONDITION"}}"#;
    assert_eq!(
        kind(&run(Provider::Gemini, 400, &[], precondition)),
        ErrorKind::Forbidden
    );
    let ctx = r#"{"error":{"code":400,"message":"The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).","status":"INVALID_ARGUMENT"}}"#;
    assert_eq!(
        kind(&run(Provider::Gemini, 400, &[], ctx)),
        ErrorKind::ContextLengthExceeded
    );
    // The non-SSE stream form wraps the error in a one-element array.
    let arr = format!("[{unavailable}]");
    let c = run(Provider::Gemini, 503, &[], &arr);
    assert_eq!(
        c.error.as_ref().unwrap().error_type.as_deref(),
        Some("UNAVAILABLE")
    );
}

// ---------------------------------------------------------------- OpenAI-compatible servers

#[test]
fn compatible_servers() {
    let vllm_flat = r#"{"object":"error","message":"The model `llama-9` does not exist.","type":"NotFoundError","param":null,"code":404}"#;
    let c = run(Provider::Generic, 404, &[], vllm_flat);
    assert_eq!(kind(&c), ErrorKind::NotFound);
    assert_eq!(c.error.as_ref().unwrap().code.as_deref(), Some("404"));
    let llama_ctx = r#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error","n_prompt_tokens":9000,"n_ctx":8192}}"#;
    assert_eq!(
        kind(&run(Provider::Generic, 400, &[], llama_ctx)),
        ErrorKind::ContextLengthExceeded
    );
    let llama_loading =
        r#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#;
    assert_eq!(
        kind(&run(Provider::Generic, 503, &[], llama_loading)),
        ErrorKind::Overloaded
    );
    let ollama = r#"{"error":"server busy, please try again.  maximum pending requests exceeded"}"#;
    let c = run(Provider::Generic, 503, &[], ollama);
    assert_eq!(kind(&c), ErrorKind::Overloaded);
    assert_eq!(
        c.message(),
        Some("server busy, please try again.  maximum pending requests exceeded")
    );
    assert_eq!(
        kind(&run(
            Provider::Generic,
            502,
            &[],
            "<html><body>Bad Gateway</body></html>"
        )),
        ErrorKind::ServerError
    );
    let c = run(Provider::Generic, 408, &[], "");
    assert_eq!(kind(&c), ErrorKind::Timeout);
    assert!(c.is_retryable());
    let c = run(
        Provider::Generic,
        422,
        &[],
        r#"{"detail":[{"loc":["body","model"],"msg":"field required"}]}"#,
    );
    assert_eq!(kind(&c), ErrorKind::BadRequest);
}

#[test]
fn successes_are_not_read() {
    let c = run(
        Provider::OpenAi,
        200,
        &[("retry-after", "5")],
        "{\"error\":\"ignored\"}",
    );
    assert!(c.is_success() && c.wait.is_none() && c.error.is_none());
    let c = run(Provider::OpenAi, 304, &[], "");
    assert!(c.is_success());
}

#[test]
fn bad_bodies_classify_by_status() {
    for body in [
        "",
        "not json",
        "{\"error\":",
        "{\"error\":{\"type\":5,\"message\":[1,2]}}",
        "null",
        "[]",
        "[1,2,3]",
        "\u{0}\u{1}garbage",
    ] {
        let c = run(Provider::OpenAi, 429, &[], body);
        assert_eq!(kind(&c), ErrorKind::RateLimited, "{body:?}");
        let c = run(Provider::Anthropic, 529, &[], body);
        assert_eq!(kind(&c), ErrorKind::Overloaded, "{body:?}");
    }
    // A long non-JSON body keeps only a bounded message.
    let html = "<html>".repeat(10_000);
    let c = run(Provider::Generic, 500, &[], &html);
    assert!(c.message().unwrap().len() <= 1024);
}
