//! Classification of a provider's response: one pass over status, headers and a bounded
//! error body, whose result every layer reads from the response's extensions.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};
use serde_json::Value;

use crate::duration;
use crate::kind::ErrorKind;
use crate::provider::Provider;
use crate::ratelimit::{RateLimitInfo, RequestedWait, WaitSource};

/// Limits for classification. Every field comes from the user, so none can make a wait
/// or a read unbounded.
///
/// Every value of every field is valid, so the fields are public and there is nothing
/// to check: `0` reads no error body (the response is classified from its status and
/// headers) and clamps every requested wait to zero (flagged as
/// [`exceeds_max`](RequestedWait::exceeds_max)); `Duration::MAX` and `usize::MAX` mean
/// no limit of this config's own (the error body is still read only until it ends, and
/// a provider's wait is still whatever it asked). Nothing is computed from them that can
/// overflow: the timer saturates, and the buffer grows with the bytes that arrive, never
/// to `max_error_body` up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassifyConfig {
    /// The longest wait a provider may ask for and get: longer requests are clamped to
    /// this and flagged with [`RequestedWait::exceeds_max`]. Default 120 s (what the
    /// OpenAI SDKs accept since 2.52).
    pub max_wait: Duration,
    /// How many bytes of a non-2xx body are read to classify it. Default 64 KiB; real
    /// error bodies are under 2 KiB. A longer body is classified on its first
    /// `max_error_body` bytes and still reaches the caller whole.
    pub max_error_body: usize,
    /// How long reading an error body may take before it is classified on what arrived.
    /// Default 10 s.
    pub error_body_timeout: Duration,
}

impl Default for ClassifyConfig {
    fn default() -> Self {
        ClassifyConfig {
            max_wait: Duration::from_secs(120),
            max_error_body: 64 * 1024,
            error_body_timeout: Duration::from_secs(10),
        }
    }
}

/// What a provider said in an error body, as far as it follows a known shape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProviderError {
    /// OpenAI and Anthropic `error.type` (`insufficient_quota`, `overloaded_error`); Gemini
    /// `error.status` (`RESOURCE_EXHAUSTED`).
    pub error_type: Option<String>,
    /// OpenAI `error.code` (numbers are written as text), Anthropic
    /// `error.details.error_code`, Gemini `ErrorInfo.reason`.
    pub code: Option<String>,
    /// The human-readable message, cut to 1 KiB.
    pub message: Option<String>,
    /// `x-request-id` (OpenAI), `request-id` (Anthropic) or the body's `request_id`.
    pub request_id: Option<String>,
}

/// The verdict on one response: what kind of failure it is (if any), what the provider
/// asked for, and its rate-limit state.
///
/// [`Classify`](crate::Classify) puts one into the extensions of every non-2xx response;
/// [`Classification::of`] returns it, or a cheap status-and-headers verdict for a
/// response that has none (a success, or a stack without `Classify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    /// The response status (200 for errors found inside a stream).
    pub status: StatusCode,
    /// The provider whose dialect was read.
    pub provider: Provider,
    /// `None` for a success.
    pub kind: Option<ErrorKind>,
    /// The wait the provider asked for, if any.
    pub wait: Option<RequestedWait>,
    /// The provider's `x-should-retry` header, if it sent one.
    pub should_retry: Option<bool>,
    /// Rate-limit headers.
    pub rate_limit: RateLimitInfo,
    /// What the error body said, for the caller and for logs.
    pub error: Option<Arc<ProviderError>>,
}

impl Classification {
    /// A success of the given status: no kind, no wait.
    pub fn success(status: StatusCode, provider: Provider) -> Self {
        Classification {
            status,
            provider,
            kind: None,
            wait: None,
            should_retry: None,
            rate_limit: RateLimitInfo::default(),
            error: None,
        }
    }

    /// A failure of `kind` that no response carried (a transport error, a stall, a layer's
    /// refusal), so it has no status of its own.
    pub fn failure(kind: ErrorKind, provider: Provider) -> Self {
        Classification {
            kind: Some(kind),
            ..Classification::success(StatusCode::OK, provider)
        }
    }

    /// The classification of `res`: the one [`Classify`](crate::Classify) attached, or
    /// else one made from its status and headers alone (no allocation for a success).
    pub fn of<B>(res: &http::Response<B>) -> Cow<'_, Classification> {
        match res.extensions().get::<Classification>() {
            Some(c) => Cow::Borrowed(c),
            None if !is_error_status(res.status()) => {
                Cow::Owned(Classification::success(res.status(), Provider::Generic))
            }
            None => Cow::Owned(classify_head(
                Provider::Generic,
                res.status(),
                res.headers(),
                &ClassifyConfig::default(),
                SystemTime::now(),
            )),
        }
    }

    /// Whether this is a success (no error kind).
    pub fn is_success(&self) -> bool {
        self.kind.is_none()
    }

    /// Whether sending the request again may succeed.
    ///
    /// The kind decides, with the provider's `x-should-retry` header as a tie-breaker:
    /// `false` forbids any retry; `true` allows one for kinds that are not known to be
    /// permanent (an unknown 409, say), but never for quota, context-length, auth or
    /// malformed-request errors, which no retry can fix.
    pub fn is_retryable(&self) -> bool {
        let Some(kind) = self.kind else { return false };
        match self.should_retry {
            Some(false) => false,
            Some(true) => kind.is_retryable() || kind == ErrorKind::Unknown,
            None => kind.is_retryable(),
        }
    }

    /// The provider's message, if its body had one.
    pub fn message(&self) -> Option<&str> {
        self.error.as_ref()?.message.as_deref()
    }
}

/// Classifies a response from its status, headers and (for non-2xx) the first bytes of
/// its body. Never panics, whatever the input; reads at most `body.len()` bytes, which the
/// caller bounds by [`ClassifyConfig::max_error_body`].
pub fn classify(
    provider: Provider,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    config: &ClassifyConfig,
) -> Classification {
    classify_at(provider, status, headers, body, config, SystemTime::now())
}

/// [`classify`] with the wall-clock `now` given, against which HTTP-dates are measured
/// when the response has no `Date` header.
pub fn classify_at(
    provider: Provider,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    config: &ClassifyConfig,
    now: SystemTime,
) -> Classification {
    let mut c = classify_head(provider, status, headers, config, now);
    if c.kind.is_none() {
        return c;
    }
    let facts = BodyFacts::parse(body);
    let kind = refine(status, &facts, c.wait.is_some());
    c.kind = Some(kind);
    if c.wait.is_none() {
        c.wait = facts
            .retry_delay
            .and_then(|d| RequestedWait::new(d, WaitSource::RetryInfo, config.max_wait))
            .or_else(|| {
                let d = facts.error.message.as_deref().and_then(wait_in_message)?;
                RequestedWait::new(d, WaitSource::Message, config.max_wait)
            });
    }
    let mut error = facts.error;
    error.request_id = header_str(headers, "x-request-id")
        .or_else(|| header_str(headers, "request-id"))
        .map(|s| truncate(s, 200).to_owned())
        .or(error.request_id);
    if error != ProviderError::default() {
        c.error = Some(Arc::new(error));
    }
    c
}

/// Classification from status and headers only, as far as they go. For a 2xx this reads
/// no header and allocates nothing.
pub(crate) fn classify_head(
    provider: Provider,
    status: StatusCode,
    headers: &HeaderMap,
    config: &ClassifyConfig,
    now: SystemTime,
) -> Classification {
    if !is_error_status(status) {
        return Classification::success(status, provider);
    }
    Classification {
        status,
        provider,
        kind: Some(refine(status, &BodyFacts::default(), false)),
        wait: RequestedWait::from_headers(headers, config.max_wait, now),
        should_retry: match header_str(headers, "x-should-retry") {
            Some("true") => Some(true),
            Some("false") => Some(false),
            _ => None,
        },
        rate_limit: RateLimitInfo::from_headers(headers, now),
        error: None,
    }
}

/// Whether a status is an error (4xx, 5xx, or anything outside 100–399): what `Classify`
/// reads the body of.
pub(crate) fn is_error_status(status: StatusCode) -> bool {
    !(status.is_success() || status.is_informational() || status.is_redirection())
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The facts a body gives, in every known dialect.
#[derive(Debug, Default)]
struct BodyFacts {
    error: ProviderError,
    /// Gemini `QuotaFailure.violations[].quotaId` mentions a per-day quota, or an
    /// `ErrorInfo` names a per-day `quota_limit`.
    per_day_quota: bool,
    /// Gemini `RetryInfo.retryDelay`.
    retry_delay: Option<Duration>,
    /// Azure `innererror.code: ResponsibleAIPolicyViolation`.
    policy_violation: bool,
}

impl BodyFacts {
    fn parse(body: &[u8]) -> Self {
        let mut facts = BodyFacts::default();
        let Ok(root) = serde_json::from_slice::<Value>(body) else {
            // Not JSON (an HTML error page from a proxy, a truncated body): keep a bit of
            // the text as the message, classify by status.
            let text = String::from_utf8_lossy(&body[..body.len().min(1024)]);
            let text = text.trim();
            if !text.is_empty() {
                facts.error.message = Some(truncate(text, 1024).to_owned());
            }
            return facts;
        };
        // Gemini's non-SSE stream errors come as a one-element array.
        let root = match &root {
            Value::Array(a) if a.len() == 1 => &a[0],
            other => other,
        };
        let err = match root.get("error") {
            Some(Value::String(s)) => {
                // Ollama: {"error": "server busy, …"}
                facts.error.message = Some(truncate(s, 1024).to_owned());
                return facts;
            }
            Some(e @ Value::Object(_)) => e,
            // vLLM's older flat shape: {"object":"error","message":…,"type":…,"code":…}
            _ => root,
        };
        let text = |v: Option<&Value>| -> Option<String> {
            match v? {
                Value::String(s) => Some(truncate(s, 1024).to_owned()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
        };
        facts.error.message = text(err.get("message"));
        // Gemini's `status` is a canonical code name ("RESOURCE_EXHAUSTED") and its `code`
        // the HTTP status; Azure's errors can carry a numeric `status` beside a string `code`
        // ("content_filter"), which must stay the code.
        let gemini_status = err.get("status").and_then(Value::as_str);
        facts.error.error_type = text(err.get("type").filter(|t| !t.is_null()))
            .or_else(|| gemini_status.map(|s| truncate(s, 1024).to_owned()));
        facts.error.code = text(err.get("details").and_then(|d| d.get("error_code")))
            .or_else(|| text(err.get("code")).filter(|_| gemini_status.is_none()));
        facts.error.request_id = text(root.get("request_id"));
        facts.policy_violation = err
            .get("innererror")
            .and_then(|i| i.get("code"))
            .and_then(Value::as_str)
            == Some("ResponsibleAIPolicyViolation");
        if let Some(Value::Array(details)) = err.get("details") {
            for d in details.iter().take(16) {
                let ty = d.get("@type").and_then(Value::as_str).unwrap_or("");
                if ty.ends_with("google.rpc.RetryInfo") {
                    facts.retry_delay = d
                        .get("retryDelay")
                        .and_then(Value::as_str)
                        .and_then(duration::protobuf_duration);
                } else if ty.ends_with("google.rpc.QuotaFailure") {
                    if let Some(Value::Array(vs)) = d.get("violations") {
                        facts.per_day_quota |= vs.iter().take(32).any(|v| {
                            v.get("quotaId")
                                .and_then(Value::as_str)
                                .is_some_and(|q| q.contains("PerDay"))
                        });
                    }
                } else if ty.ends_with("google.rpc.ErrorInfo") {
                    if facts.error.code.is_none() {
                        facts.error.code = text(d.get("reason"));
                    }
                    facts.per_day_quota |= d
                        .get("metadata")
                        .and_then(|m| m.get("quota_limit"))
                        .and_then(Value::as_str)
                        .is_some_and(|q| q.contains("PerDay"));
                }
            }
        }
        facts
    }
}

/// OpenAI's billing codes: 429s that no retry fixes (docs/protocols.md#openai-error-codes).
const OPENAI_BILLING_CODES: [&str; 5] = [
    "insufficient_quota",
    "credit_balance_exhausted",
    "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded",
    "organization_usage_limit_exceeded",
];

/// Anthropic's `error.details.error_code`s for spend caps.
const ANTHROPIC_SPEND_CODES: [&str; 2] = [
    "enforced_spend_limit_reached",
    "contract_spend_limit_reached",
];

fn refine(status: StatusCode, f: &BodyFacts, has_wait: bool) -> ErrorKind {
    let ty = f.error.error_type.as_deref().unwrap_or("");
    let code = f.error.code.as_deref().unwrap_or("");
    let msg = f.error.message.as_deref().unwrap_or("");
    let says = |needle: &str| contains_ignore_case(msg, needle);
    let context_length = code == "context_length_exceeded"
        || ty == "exceed_context_size_error"
        || says("maximum context length")
        || says("context window")
        || says("prompt is too long")
        || says("input context is too long")
        || says("exceeds the available context size")
        // Gemini: "The input token count (N) exceeds the maximum number of tokens allowed (M)."
        || says("exceeds the maximum number of tokens");
    let content_filter = code == "content_filter" || f.policy_violation;
    match status.as_u16() {
        401 => ErrorKind::Unauthorized,
        402 => ErrorKind::QuotaExhausted,
        403 => ErrorKind::Forbidden,
        404 => ErrorKind::NotFound,
        408 => ErrorKind::Timeout,
        413 => ErrorKind::RequestTooLarge,
        429 => {
            if ty == "insufficient_quota"
                || OPENAI_BILLING_CODES.contains(&code)
                || ANTHROPIC_SPEND_CODES.contains(&code)
                || f.per_day_quota
                || says("limit: 0")
                // Anthropic's tier spend cap: a rate_limit_error with no retry-after
                // whose message speaks of usage limits.
                || (!has_wait && ty == "rate_limit_error" && says("usage limit"))
            {
                ErrorKind::QuotaExhausted
            } else if says("request too large") && says("requested") {
                ErrorKind::RequestTooLarge
            } else {
                ErrorKind::RateLimited
            }
        }
        400 | 422 => {
            if context_length {
                ErrorKind::ContextLengthExceeded
            } else if content_filter {
                ErrorKind::ContentFiltered
            } else if code == "API_KEY_INVALID" || says("api key not valid") {
                ErrorKind::Unauthorized
            } else if says("spend limit") || says("usage limit") {
                ErrorKind::QuotaExhausted
            } else if ty == "FAILED_PRECONDITION" {
                ErrorKind::Forbidden
            } else {
                ErrorKind::BadRequest
            }
        }
        409 => ErrorKind::Unknown,
        500 if context_length => ErrorKind::ContextLengthExceeded,
        503 if code == "slow_down" => ErrorKind::RateLimited,
        503 | 529 => ErrorKind::Overloaded,
        504 => ErrorKind::Timeout,
        500..=599 => ErrorKind::ServerError,
        _ => ErrorKind::BadRequest,
    }
}

/// "Please try again in 6.596s." / "in 644ms" (OpenAI), "Please retry in 38.86s." (Gemini),
/// "Try again in 2 seconds." / "retry after 86400 seconds" (Azure).
fn wait_in_message(msg: &str) -> Option<Duration> {
    const NEEDLES: [&str; 3] = ["try again in ", "retry in ", "retry after "];
    let lower = msg.to_ascii_lowercase();
    NEEDLES.iter().find_map(|n| {
        let at = lower.find(n)? + n.len();
        let token = lower[at..].split_whitespace().next()?;
        duration::go_duration(token.trim_end_matches(['.', ',', ';', ')']))
    })
}

fn contains_ignore_case(hay: &str, needle: &str) -> bool {
    hay.as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_with_waits() {
        assert_eq!(
            wait_in_message("Please try again in 6.596s. Visit"),
            Some(Duration::from_millis(6596))
        );
        assert_eq!(
            wait_in_message("Please try again in 644ms."),
            Some(Duration::from_millis(644))
        );
        assert_eq!(
            wait_in_message("Please retry in 38.863719904s."),
            Some(Duration::new(38, 863_719_904))
        );
        assert_eq!(
            wait_in_message("Try again in 2 seconds."),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            wait_in_message("Please retry after 86400 seconds."),
            Some(Duration::from_secs(86400))
        );
        assert_eq!(wait_in_message("Please try again later"), None);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let s = "é".repeat(600);
        let t = truncate(&s, 1023);
        assert!(t.len() <= 1023 && t.is_char_boundary(t.len()));
    }
}
