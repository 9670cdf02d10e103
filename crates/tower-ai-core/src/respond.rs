//! What a server built on tower-ai answers its own callers when the stack refuses or fails.
//!
//! A gateway (an axum or tonic service that forwards to a model API through a tower-ai
//! stack) gets a [`BoxError`](crate::BoxError) back when there is no provider response to
//! pass on. [`ErrorReply::from_error`] turns it into what the server should answer: a
//! status, a `retry-after` when the layer that refused knows when capacity returns, a
//! stable machine-readable `code`, a specific message, and the provider's request id
//! when one is known. [`ErrorReply::to_response`] writes it in the caller's dialect
//! (OpenAI or Anthropic); with the `tonic` feature, `ErrorReply::to_status` (and
//! `From<AiError> for tonic::Status`) gives the gRPC status with `google.rpc.RetryInfo`,
//! `ErrorInfo` and `RequestInfo` details; with the `axum` feature, `AiError` implements
//! `IntoResponse` (OpenAI's shape).
//!
//! | error | HTTP | `code` | `retry-after` | gRPC |
//! | --- | --- | --- | --- | --- |
//! | `BudgetExceeded` (can fit later) | 429 | `budget_exceeded` | until it fits (the budget's own prediction; 1 s when it has none, e.g. concurrency) | `RESOURCE_EXHAUSTED` + `RetryInfo` |
//! | `BudgetExceeded` (can never fit) | 400 | `request_too_large` | — | `INVALID_ARGUMENT` |
//! | `ModelTooLong` | 400 | `model_too_long` | — | `INVALID_ARGUMENT` |
//! | `CoolingDown` | 429 | `cooling_down` | until the cooldown ends | `RESOURCE_EXHAUSTED` + `RetryInfo` |
//! | `CircuitOpen` | 503 | `circuit_open` | until the breaker half-opens | `UNAVAILABLE` + `RetryInfo` |
//! | `Stalled` | 504 | `stalled` | — | `DEADLINE_EXCEEDED` |
//! | `DeadlineExceeded` (the caller's deadline) | 504 | `deadline_exceeded` | — | `DEADLINE_EXCEEDED` |
//! | `Transport` (timeout) | 504 | `upstream_timeout` | — | `DEADLINE_EXCEEDED` |
//! | `Transport` (connection, other) | 502 | `upstream_unreachable` / `upstream_error` | — | `UNAVAILABLE` |
//! | `Truncated` | 502 | `truncated` | — | `UNAVAILABLE` |
//! | `Provider`, `RetriesExhausted` (upstream 4xx) | the upstream's status | by kind: `rate_limit_exceeded`, `insufficient_quota`, `context_length_exceeded`, … | the provider's, if it asked | by status |
//! | `Provider`, `RetriesExhausted` (upstream 401/403) | 502 | `upstream_unauthorized` / `upstream_forbidden` | — | `UNAVAILABLE` |
//! | `Provider`, `RetriesExhausted` (upstream 5xx, in-stream error) | 502 (504 for a timeout) | by kind: `upstream_overloaded`, `upstream_error`, … | the provider's, if it asked | `UNAVAILABLE` |
//! | `AllRoutesFailed` | as its last route's failure; 429 when every route was rate limited | `all_routes_failed` | the shortest wait any route asked for | as the status |
//! | any other error | 502 (504 when it is a timeout) | `upstream_error` / `upstream_timeout` | — | `UNAVAILABLE` / `DEADLINE_EXCEEDED` |
//!
//! Messages never hold a client error's text (it may carry a URL with a key) nor an
//! upstream's authentication message (the credentials are usually the server's own, not
//! the caller's); a budget's key is not named (it may be derived from the caller's
//! key). `x-should-retry: false` is set when retrying cannot help (a quota, a request
//! that never fits), which the official OpenAI and Anthropic SDKs honour.

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::time::Duration;

use http::{HeaderValue, StatusCode};
use tokio::time::Instant;

use crate::classify::Classification;
use crate::error::{AiError, BudgetLimit};
use crate::kind::ErrorKind;

/// Whose error shape a reply is written in: the caller's API dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ErrorDialect {
    /// `{"error":{"message","type","param","code"}}`, request id in `x-request-id`.
    #[default]
    OpenAi,
    /// `{"type":"error","error":{"type","message","code"},"request_id"}`, request id also in
    /// `request-id`.
    Anthropic,
}

impl ErrorDialect {
    /// The dialect of a request to `path`: Anthropic for the Messages API (`…/v1/messages`,
    /// `…/v1/messages/count_tokens`), OpenAI for everything else.
    pub fn of_path(path: &str) -> Self {
        let path = path.trim_end_matches('/');
        if path.ends_with("/v1/messages") || path.ends_with("/v1/messages/count_tokens") {
            ErrorDialect::Anthropic
        } else {
            ErrorDialect::OpenAi
        }
    }

    /// The dialect of `req`: Anthropic when it carries `anthropic-version` or goes to the
    /// Messages API, else OpenAI.
    pub fn of_request<B>(req: &http::Request<B>) -> Self {
        if req.headers().contains_key("anthropic-version") {
            ErrorDialect::Anthropic
        } else {
            ErrorDialect::of_path(req.uri().path())
        }
    }
}

/// What a server should answer for a failure: see the [module docs](self) for the table.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ErrorReply {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable machine-readable code (`budget_exceeded`, `circuit_open`, …).
    pub code: &'static str,
    /// A specific, human-readable message (never a secret).
    pub message: String,
    /// When capacity is expected back, if known: sent as `retry-after` in whole seconds,
    /// rounded up (at least 1).
    pub retry_after: Option<Duration>,
    /// Whether sending the request again may succeed (`x-should-retry`).
    pub retryable: bool,
    /// The provider's request id, when the failure came from a provider's answer.
    pub request_id: Option<String>,
}

/// Labels (breaker and cooldown keys) are cut to this many bytes in messages.
const MAX_LABEL: usize = 128;

impl ErrorReply {
    fn new(status: StatusCode, code: &'static str, message: String) -> Self {
        ErrorReply {
            status,
            code,
            message,
            retry_after: None,
            retryable: status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error(),
            request_id: None,
        }
    }

    fn retry_after(mut self, wait: Option<Duration>) -> Self {
        self.retry_after = wait;
        self
    }

    fn retryable(mut self, yes: bool) -> Self {
        self.retryable = yes;
        self
    }

    /// The reply for any error a tower-ai stack returned: the [`AiError`] in its source
    /// chain (see [`AiError::reply`]), else a 502 (504 when the error is a timeout) that
    /// does not repeat the error's text.
    pub fn from_error(err: &(dyn StdError + 'static)) -> Self {
        match AiError::find(err) {
            Some(ai) => ai.reply(),
            None => match ErrorKind::of_error(err) {
                ErrorKind::Timeout => transport(ErrorKind::Timeout),
                _ => transport(ErrorKind::Unknown),
            },
        }
    }

    /// The reply for a provider's error *response* that a server does not pass on as it
    /// is (a gRPC service turning it into a status, say): from its [`Classification`]
    /// (`Classification::of(&res)`), as the table's upstream rows say.
    pub fn from_classification(c: &Classification) -> Self {
        upstream(c, "", None)
    }

    /// The `retry-after` header value: whole seconds, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after.map(|d| {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            secs.max(1)
        })
    }

    /// The error's `type` in `dialect`: what an official SDK reads to pick its exception.
    pub fn error_type(&self, dialect: ErrorDialect) -> &'static str {
        let quota = self.code == "insufficient_quota";
        match dialect {
            ErrorDialect::OpenAi => match self.status.as_u16() {
                429 if quota => "insufficient_quota",
                429 => "rate_limit_error",
                401 => "authentication_error",
                403 => "permission_error",
                503 => "service_unavailable_error",
                500..=599 => "server_error",
                _ => "invalid_request_error",
            },
            ErrorDialect::Anthropic => match self.status.as_u16() {
                401 => "authentication_error",
                402 => "billing_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                503 | 529 => "overloaded_error",
                504 => "timeout_error",
                500..=599 => "api_error",
                _ => "invalid_request_error",
            },
        }
    }

    /// The JSON body in `dialect`.
    pub fn body(&self, dialect: ErrorDialect) -> serde_json::Value {
        let kind = self.error_type(dialect);
        match dialect {
            ErrorDialect::OpenAi => serde_json::json!({
                "error": {
                    "message": self.message,
                    "type": kind,
                    "param": null,
                    "code": self.code,
                }
            }),
            ErrorDialect::Anthropic => {
                let mut body = serde_json::json!({
                    "type": "error",
                    "error": {"type": kind, "message": self.message, "code": self.code},
                });
                if let Some(id) = &self.request_id {
                    body["request_id"] = serde_json::Value::from(id.as_str());
                }
                body
            }
        }
    }

    /// The HTTP response in `dialect`: status, `content-type: application/json`,
    /// `retry-after`, `x-should-retry`, the request id header, and the body. Usable as an
    /// axum response as it is (`http::Response<String>` implements `IntoResponse`).
    pub fn to_response(&self, dialect: ErrorDialect) -> http::Response<String> {
        let mut res = http::Response::new(self.body(dialect).to_string());
        *res.status_mut() = self.status;
        let headers = res.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after_secs() {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        headers.insert(
            "x-should-retry",
            HeaderValue::from_static(if self.retryable { "true" } else { "false" }),
        );
        if let Some(id) = self
            .request_id
            .as_deref()
            .and_then(|id| HeaderValue::from_str(id).ok())
        {
            let name = match dialect {
                ErrorDialect::OpenAi => "x-request-id",
                ErrorDialect::Anthropic => "request-id",
            };
            headers.insert(name, id);
        }
        res
    }

    /// The gRPC status code for this reply.
    #[cfg(feature = "tonic")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self.status.as_u16() {
            429 | 402 => Code::ResourceExhausted,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            408 | 504 => Code::DeadlineExceeded,
            409 => Code::Aborted,
            400..=499 => Code::InvalidArgument,
            500 => Code::Internal,
            _ => Code::Unavailable,
        }
    }

    /// The gRPC status: [`grpc_code`](Self::grpc_code), the message, and rich error
    /// details (`google.rpc.RetryInfo` when a delay is known, `ErrorInfo` with the code as
    /// its reason and domain `tower-ai`, `RequestInfo` with the provider's request id).
    #[cfg(feature = "tonic")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
    pub fn to_status(&self) -> tonic::Status {
        use tonic_types::{ErrorDetails, StatusExt as _};
        let mut details = ErrorDetails::new();
        if let Some(secs) = self.retry_after_secs() {
            details.set_retry_info(Some(Duration::from_secs(secs)));
        }
        details.set_error_info(
            self.code,
            "tower-ai",
            std::collections::HashMap::<String, String>::new(),
        );
        if let Some(id) = &self.request_id {
            details.set_request_info(id.clone(), "");
        }
        tonic::Status::with_error_details(self.grpc_code(), self.message.clone(), details)
    }
}

/// The response for any error a tower-ai stack returned, in `dialect`: shorthand for
/// [`ErrorReply::from_error`] then [`ErrorReply::to_response`].
pub fn error_response(
    err: &(dyn StdError + 'static),
    dialect: ErrorDialect,
) -> http::Response<String> {
    ErrorReply::from_error(err).to_response(dialect)
}

/// An error handler for axum's `HandleErrorLayer` (or any `map_err`): the OpenAI-shaped
/// response for `err`.
pub async fn handle_error(err: crate::BoxError) -> http::Response<String> {
    error_response(&*err, ErrorDialect::OpenAi)
}

fn label(key: &str) -> &str {
    if key.len() <= MAX_LABEL {
        return key;
    }
    let mut end = MAX_LABEL;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    &key[..end]
}

fn until(at: Instant) -> Duration {
    at.saturating_duration_since(Instant::now())
}

/// The code for a failure of `kind` read from an upstream's answer.
fn kind_code(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::RateLimited => "rate_limit_exceeded",
        ErrorKind::QuotaExhausted => "insufficient_quota",
        ErrorKind::Overloaded => "upstream_overloaded",
        ErrorKind::ServerError => "upstream_error",
        ErrorKind::Timeout => "upstream_timeout",
        ErrorKind::Connection => "upstream_unreachable",
        ErrorKind::Stalled => "stalled",
        ErrorKind::ContextLengthExceeded => "context_length_exceeded",
        ErrorKind::ContentFiltered => "content_filter",
        ErrorKind::RequestTooLarge => "request_too_large",
        ErrorKind::Unauthorized => "upstream_unauthorized",
        ErrorKind::Forbidden => "upstream_forbidden",
        ErrorKind::NotFound => "model_not_found",
        ErrorKind::BadRequest => "invalid_request",
        ErrorKind::DeadlineExceeded => "deadline_exceeded",
        _ => "upstream_error",
    }
}

/// The status for a failure of `kind` that has no HTTP status of its own (an in-stream
/// error, a layer's verdict).
fn kind_status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::RateLimited | ErrorKind::QuotaExhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Timeout | ErrorKind::Stalled | ErrorKind::DeadlineExceeded => {
            StatusCode::GATEWAY_TIMEOUT
        }
        ErrorKind::ContextLengthExceeded | ErrorKind::ContentFiltered | ErrorKind::BadRequest => {
            StatusCode::BAD_REQUEST
        }
        ErrorKind::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// The reply for what an upstream said (a response's or an in-stream error's
/// classification); `prefix` says what the stack did about it.
/// The reply for a request that got no answer from the provider, by what went wrong; the
/// client's own error text is never repeated (it can hold a URL with a key).
fn transport(kind: ErrorKind) -> ErrorReply {
    match kind {
        ErrorKind::Timeout => ErrorReply::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            "the upstream provider did not answer in time".to_owned(),
        ),
        ErrorKind::Connection => ErrorReply::new(
            StatusCode::BAD_GATEWAY,
            "upstream_unreachable",
            "the upstream provider could not be reached (connection failed)".to_owned(),
        ),
        _ => ErrorReply::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "the request to the upstream provider failed".to_owned(),
        ),
    }
}

fn upstream(c: &Classification, prefix: &str, extra_wait: Option<Duration>) -> ErrorReply {
    let kind = c.kind.unwrap_or(ErrorKind::Unknown);
    let http_status = c.status.is_client_error() || c.status.is_server_error();
    let status = match (kind, http_status) {
        // The upstream refused the server's credentials: not the caller's to fix.
        (ErrorKind::Unauthorized | ErrorKind::Forbidden, _) => StatusCode::BAD_GATEWAY,
        (ErrorKind::Timeout | ErrorKind::Stalled, _) => StatusCode::GATEWAY_TIMEOUT,
        (_, true) if c.status.is_client_error() => c.status,
        (_, true) => StatusCode::BAD_GATEWAY,
        (_, false) => kind_status(kind),
    };
    let mut message = String::from(prefix);
    let provider = c.provider.as_str();
    if http_status {
        let _ = write!(
            message,
            "the upstream provider ({provider}) answered {} ({})",
            c.status.as_u16(),
            kind.as_str()
        );
    } else {
        let _ = write!(
            message,
            "the upstream provider ({provider}) reported an error ({})",
            kind.as_str()
        );
    }
    let safe = !matches!(kind, ErrorKind::Unauthorized | ErrorKind::Forbidden);
    if let Some(m) = c.message().filter(|_| safe) {
        let _ = write!(message, ": {m}");
    }
    let wait = extra_wait.or(c.wait.map(|w| w.delay));
    let retryable = c.is_retryable() && kind != ErrorKind::QuotaExhausted;
    let mut reply = ErrorReply::new(status, kind_code(kind), message)
        .retry_after(wait.filter(|_| retryable))
        .retryable(retryable);
    reply.request_id = c.error.as_ref().and_then(|e| e.request_id.clone());
    reply
}

impl AiError {
    /// What a server should answer its caller for this error: status, code, message,
    /// `retry-after` (computed against tokio's clock now). See
    /// [`respond`](crate::respond) for the table.
    pub fn reply(&self) -> ErrorReply {
        match self {
            AiError::Provider { classification } => upstream(classification, "", None),
            AiError::Transport { kind, .. } => transport(*kind),
            AiError::CircuitOpen { key, until: at } => {
                let wait = until(*at);
                ErrorReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "circuit_open",
                    format!(
                        "the upstream {} is failing: its circuit breaker is open and lets a \
                         probe through in {} s",
                        label(key),
                        secs(wait)
                    ),
                )
                .retry_after(Some(wait))
            }
            AiError::CoolingDown { key, until: at } => {
                let wait = until(*at);
                ErrorReply::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "cooling_down",
                    format!(
                        "the upstream {} asked for a pause: requests resume in {} s",
                        label(key),
                        secs(wait)
                    ),
                )
                .retry_after(Some(wait))
            }
            AiError::BudgetExceeded {
                limit,
                retry_after: Some(wait),
                ..
            } => {
                let spend = matches!(limit, BudgetLimit::SpendPerHour | BudgetLimit::SpendPerDay);
                ErrorReply::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "budget_exceeded",
                    format!(
                        "the {limit} budget is used up: the request fits again in {} s",
                        secs(*wait)
                    ),
                )
                .retry_after(Some(*wait))
                // A spend cap frees up in hours: no client should sit waiting on it.
                .retryable(!spend || *wait <= Duration::from_secs(60))
            }
            AiError::BudgetExceeded {
                limit,
                retry_after: None,
                ..
            } => ErrorReply::new(
                StatusCode::BAD_REQUEST,
                "request_too_large",
                format!("the request is larger than the {limit} budget allows: it can never fit"),
            )
            .retryable(false),
            AiError::Stalled { .. } => ErrorReply::new(
                StatusCode::GATEWAY_TIMEOUT,
                "stalled",
                format!("the upstream {self}"),
            ),
            AiError::DeadlineExceeded { .. } => ErrorReply::new(
                StatusCode::GATEWAY_TIMEOUT,
                "deadline_exceeded",
                self.to_string(),
            ),
            AiError::Truncated { bytes_received } => ErrorReply::new(
                StatusCode::BAD_GATEWAY,
                "truncated",
                format!(
                    "the upstream stream ended without its terminal event after \
                     {bytes_received} bytes: the answer is incomplete"
                ),
            ),
            AiError::RetriesExhausted {
                attempts,
                last,
                wait,
            } => upstream(
                last,
                &format!("gave up after {attempts} attempt(s): "),
                wait.map(|w| w.requested),
            ),
            AiError::AllRoutesFailed { failures } => all_routes_failed(failures),
            AiError::ModelTooLong { len, max } => ErrorReply::new(
                StatusCode::BAD_REQUEST,
                "model_too_long",
                format!("model name of {len} bytes: at most {max} are accepted"),
            )
            .retryable(false),
        }
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn all_routes_failed(failures: &[crate::RouteFailure]) -> ErrorReply {
    let kinds = || {
        failures
            .iter()
            .map(|f| f.classification.kind.unwrap_or(ErrorKind::Unknown))
    };
    let mut message = format!("all {} route(s) failed", failures.len());
    for (i, f) in failures.iter().enumerate() {
        let kind = f.classification.kind.unwrap_or(ErrorKind::Unknown);
        let _ = write!(
            message,
            "{} {}: {}",
            if i == 0 { ":" } else { ";" },
            label(&f.route),
            kind.as_str()
        );
        if f.classification.status != StatusCode::OK {
            let _ = write!(message, " (HTTP {})", f.classification.status.as_u16());
        }
    }
    let limited = !failures.is_empty()
        && kinds().all(|k| matches!(k, ErrorKind::RateLimited | ErrorKind::QuotaExhausted));
    let last = failures.last().map(|f| &f.classification);
    let (status, retryable) = if limited {
        let quota = kinds().all(|k| k == ErrorKind::QuotaExhausted);
        (StatusCode::TOO_MANY_REQUESTS, !quota)
    } else {
        let kind = last.and_then(|c| c.kind).unwrap_or(ErrorKind::Unknown);
        let status = match kind_status(kind) {
            s if s.is_server_error() => s,
            // A client error on the last route after others failed for other reasons:
            // the request may well be fine elsewhere.
            _ => StatusCode::BAD_GATEWAY,
        };
        (status, true)
    };
    let wait = failures
        .iter()
        .filter_map(|f| f.classification.wait.map(|w| w.delay))
        .min();
    let mut reply = ErrorReply::new(status, "all_routes_failed", message)
        .retry_after(wait.filter(|_| retryable))
        .retryable(retryable);
    reply.request_id = last
        .and_then(|c| c.error.as_ref())
        .and_then(|e| e.request_id.clone());
    reply
}

#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
impl From<AiError> for tonic::Status {
    fn from(err: AiError) -> Self {
        err.reply().to_status()
    }
}

#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
impl From<&AiError> for tonic::Status {
    fn from(err: &AiError) -> Self {
        err.reply().to_status()
    }
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl axum_core::response::IntoResponse for AiError {
    /// The reply in OpenAI's shape (use [`ErrorReply::to_response`] for another dialect).
    fn into_response(self) -> axum_core::response::Response {
        let res = self.reply().to_response(ErrorDialect::OpenAi);
        res.map(axum_core::body::Body::from)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::classify::ProviderError;
    use crate::error::{RouteFailure, StallPhase};
    use crate::provider::Provider;
    use crate::ratelimit::{RequestedWait, WaitSource};

    /// Each variant's index. Exhaustive on purpose (no `_` arm): a new variant does not
    /// compile here until it is given an index, and [`VARIANTS`] counts them so that
    /// `every_variant_has_a_row` fails until the table has a row for it.
    fn variant(e: &AiError) -> usize {
        match e {
            AiError::Provider { .. } => 0,
            AiError::Transport { .. } => 1,
            AiError::CircuitOpen { .. } => 2,
            AiError::CoolingDown { .. } => 3,
            AiError::BudgetExceeded { .. } => 4,
            AiError::Stalled { .. } => 5,
            AiError::Truncated { .. } => 6,
            AiError::RetriesExhausted { .. } => 7,
            AiError::AllRoutesFailed { .. } => 8,
            AiError::ModelTooLong { .. } => 9,
            AiError::DeadlineExceeded { .. } => 10,
        }
    }
    const VARIANTS: usize = 11;

    struct Row {
        error: AiError,
        status: u16,
        code: &'static str,
        retry_after: Option<&'static str>,
        should_retry: &'static str,
        openai_type: &'static str,
        anthropic_type: &'static str,
        grpc: &'static str,
        message_has: &'static str,
        request_id: Option<&'static str>,
    }

    fn upstream_error(
        status: u16,
        kind: ErrorKind,
        message: &str,
        wait: Option<Duration>,
    ) -> Classification {
        let mut c = Classification::failure(kind, Provider::OpenAi);
        c.status = StatusCode::from_u16(status).unwrap();
        c.wait = wait.and_then(|w| RequestedWait::new(w, WaitSource::RetryAfter, w));
        c.error = Some(Arc::new(ProviderError {
            message: Some(message.to_owned()),
            request_id: Some("req_123".to_owned()),
            ..ProviderError::default()
        }));
        c
    }

    fn rows() -> Vec<Row> {
        let now = Instant::now();
        let secret_io: crate::BoxError =
            "error sending request for url (https://x.example/v1?key=AIzaSECRET)".into();
        vec![
            Row {
                error: AiError::BudgetExceeded {
                    key: "sk-hash".into(),
                    limit: BudgetLimit::RequestsPerMinute,
                    retry_after: Some(Duration::from_millis(2_300)),
                },
                status: 429,
                code: "budget_exceeded",
                retry_after: Some("3"),
                should_retry: "true",
                openai_type: "rate_limit_error",
                anthropic_type: "rate_limit_error",
                grpc: "ResourceExhausted",
                message_has: "requests per minute budget is used up: the request fits again in 3 s",
                request_id: None,
            },
            Row {
                error: AiError::BudgetExceeded {
                    key: "k".into(),
                    limit: BudgetLimit::Concurrency,
                    retry_after: Some(Duration::ZERO),
                },
                status: 429,
                code: "budget_exceeded",
                retry_after: Some("1"),
                should_retry: "true",
                openai_type: "rate_limit_error",
                anthropic_type: "rate_limit_error",
                grpc: "ResourceExhausted",
                message_has: "concurrent requests budget",
                request_id: None,
            },
            Row {
                error: AiError::BudgetExceeded {
                    key: "k".into(),
                    limit: BudgetLimit::SpendPerDay,
                    retry_after: Some(Duration::from_secs(7_200)),
                },
                status: 429,
                code: "budget_exceeded",
                retry_after: Some("7200"),
                should_retry: "false",
                openai_type: "rate_limit_error",
                anthropic_type: "rate_limit_error",
                grpc: "ResourceExhausted",
                message_has: "spend per day budget",
                request_id: None,
            },
            Row {
                error: AiError::BudgetExceeded {
                    key: "k".into(),
                    limit: BudgetLimit::TokensPerMinute,
                    retry_after: None,
                },
                status: 400,
                code: "request_too_large",
                retry_after: None,
                should_retry: "false",
                openai_type: "invalid_request_error",
                anthropic_type: "invalid_request_error",
                grpc: "InvalidArgument",
                message_has: "larger than the tokens per minute budget allows",
                request_id: None,
            },
            Row {
                error: AiError::ModelTooLong {
                    len: 1 << 20,
                    max: 256,
                },
                status: 400,
                code: "model_too_long",
                retry_after: None,
                should_retry: "false",
                openai_type: "invalid_request_error",
                anthropic_type: "invalid_request_error",
                grpc: "InvalidArgument",
                message_has: "1048576 bytes",
                request_id: None,
            },
            Row {
                error: AiError::CoolingDown {
                    key: "api.openai.com/gpt-4o".into(),
                    until: now + Duration::from_millis(4_500),
                },
                status: 429,
                code: "cooling_down",
                retry_after: Some("5"),
                should_retry: "true",
                openai_type: "rate_limit_error",
                anthropic_type: "rate_limit_error",
                grpc: "ResourceExhausted",
                message_has: "api.openai.com/gpt-4o asked for a pause: requests resume in 5 s",
                request_id: None,
            },
            Row {
                error: AiError::CircuitOpen {
                    key: "api.anthropic.com/claude".into(),
                    until: now + Duration::from_secs(30),
                },
                status: 503,
                code: "circuit_open",
                retry_after: Some("30"),
                should_retry: "true",
                openai_type: "service_unavailable_error",
                anthropic_type: "overloaded_error",
                grpc: "Unavailable",
                message_has: "circuit breaker is open and lets a probe through in 30 s",
                request_id: None,
            },
            Row {
                error: AiError::Stalled {
                    phase: StallPhase::Idle,
                    after: Duration::from_secs(30),
                    bytes_received: 512,
                },
                status: 504,
                code: "stalled",
                retry_after: None,
                should_retry: "true",
                openai_type: "server_error",
                anthropic_type: "timeout_error",
                grpc: "DeadlineExceeded",
                message_has: "stream stalled between chunks after 30s (512 bytes received)",
                request_id: None,
            },
            Row {
                error: AiError::DeadlineExceeded {
                    sent: false,
                    bytes_received: 0,
                },
                status: 504,
                code: "deadline_exceeded",
                retry_after: None,
                should_retry: "true",
                openai_type: "server_error",
                anthropic_type: "timeout_error",
                grpc: "DeadlineExceeded",
                message_has: "the request's deadline passed before it was sent",
                request_id: None,
            },
            Row {
                error: AiError::Truncated { bytes_received: 99 },
                status: 502,
                code: "truncated",
                retry_after: None,
                should_retry: "true",
                openai_type: "server_error",
                anthropic_type: "api_error",
                grpc: "Unavailable",
                message_has: "after 99 bytes: the answer is incomplete",
                request_id: None,
            },
            Row {
                error: AiError::Transport {
                    kind: ErrorKind::Timeout,
                    source: "operation timed out".into(),
                },
                status: 504,
                code: "upstream_timeout",
                retry_after: None,
                should_retry: "true",
                openai_type: "server_error",
                anthropic_type: "timeout_error",
                grpc: "DeadlineExceeded",
                message_has: "did not answer in time",
                request_id: None,
            },
            Row {
                error: AiError::Transport {
                    kind: ErrorKind::Connection,
                    source: secret_io,
                },
                status: 502,
                code: "upstream_unreachable",
                retry_after: None,
                should_retry: "true",
                openai_type: "server_error",
                anthropic_type: "api_error",
                grpc: "Unavailable",
                message_has: "could not be reached",
                request_id: None,
            },
            Row {
                error: AiError::Provider {
                    classification: upstream_error(
                        400,
                        ErrorKind::ContextLengthExceeded,
                        "This model's maximum context length is 128000 tokens.",
                        None,
                    ),
                },
                status: 400,
                code: "context_length_exceeded",
                retry_after: None,
                should_retry: "false",
                openai_type: "invalid_request_error",
                anthropic_type: "invalid_request_error",
                grpc: "InvalidArgument",
                message_has: "answered 400 (context_length_exceeded): This model's maximum",
                request_id: Some("req_123"),
            },
            Row {
                // An in-stream error event (HTTP 200): judged by its kind.
                error: AiError::Provider {
                    classification: {
                        let mut c = upstream_error(200, ErrorKind::Overloaded, "Overloaded", None);
                        c.status = StatusCode::OK;
                        c
                    },
                },
                status: 502,
                code: "upstream_overloaded",
                retry_after: None,
                should_retry: "true",
                openai_type: "server_error",
                anthropic_type: "api_error",
                grpc: "Unavailable",
                message_has: "reported an error (overloaded): Overloaded",
                request_id: Some("req_123"),
            },
            Row {
                // The upstream refused the server's own key: not passed on, nor its text.
                error: AiError::Provider {
                    classification: upstream_error(
                        401,
                        ErrorKind::Unauthorized,
                        "Incorrect API key provided: sk-upstr*****1234",
                        None,
                    ),
                },
                status: 502,
                code: "upstream_unauthorized",
                retry_after: None,
                should_retry: "false",
                openai_type: "server_error",
                anthropic_type: "api_error",
                grpc: "Unavailable",
                message_has: "answered 401 (unauthorized)",
                request_id: Some("req_123"),
            },
            Row {
                error: AiError::RetriesExhausted {
                    attempts: 3,
                    last: upstream_error(
                        429,
                        ErrorKind::RateLimited,
                        "Rate limit reached for requests",
                        Some(Duration::from_secs(7)),
                    ),
                    wait: None,
                },
                status: 429,
                code: "rate_limit_exceeded",
                retry_after: Some("7"),
                should_retry: "true",
                openai_type: "rate_limit_error",
                anthropic_type: "rate_limit_error",
                grpc: "ResourceExhausted",
                message_has:
                    "gave up after 3 attempt(s): the upstream provider (openai) answered 429",
                request_id: Some("req_123"),
            },
            Row {
                error: AiError::RetriesExhausted {
                    attempts: 1,
                    last: upstream_error(
                        503,
                        ErrorKind::Overloaded,
                        "The server is overloaded",
                        None,
                    ),
                    wait: None,
                },
                status: 502,
                code: "upstream_overloaded",
                retry_after: None,
                should_retry: "true",
                openai_type: "server_error",
                anthropic_type: "api_error",
                grpc: "Unavailable",
                message_has: "answered 503 (overloaded)",
                request_id: Some("req_123"),
            },
            Row {
                error: AiError::AllRoutesFailed {
                    failures: vec![
                        RouteFailure {
                            route: "primary".into(),
                            classification: upstream_error(529, ErrorKind::Overloaded, "x", None),
                            message: "Overloaded".into(),
                        },
                        RouteFailure {
                            route: "gpt-4o-mini".into(),
                            classification: Classification::failure(
                                ErrorKind::Overloaded,
                                Provider::OpenAi,
                            ),
                            message: "circuit open".into(),
                        },
                    ],
                },
                status: 502,
                code: "all_routes_failed",
                retry_after: None,
                should_retry: "true",
                openai_type: "server_error",
                anthropic_type: "api_error",
                grpc: "Unavailable",
                message_has:
                    "all 2 route(s) failed: primary: overloaded (HTTP 529); gpt-4o-mini: overloaded",
                request_id: None,
            },
            Row {
                error: AiError::AllRoutesFailed {
                    failures: vec![
                        RouteFailure {
                            route: "a".into(),
                            classification: upstream_error(
                                429,
                                ErrorKind::RateLimited,
                                "slow down",
                                Some(Duration::from_secs(20)),
                            ),
                            message: "slow down".into(),
                        },
                        RouteFailure {
                            route: "b".into(),
                            classification: upstream_error(
                                429,
                                ErrorKind::RateLimited,
                                "slow down",
                                Some(Duration::from_secs(4)),
                            ),
                            message: "slow down".into(),
                        },
                    ],
                },
                status: 429,
                code: "all_routes_failed",
                retry_after: Some("4"),
                should_retry: "true",
                openai_type: "rate_limit_error",
                anthropic_type: "rate_limit_error",
                grpc: "ResourceExhausted",
                message_has: "a: rate_limited (HTTP 429); b: rate_limited (HTTP 429)",
                request_id: Some("req_123"),
            },
        ]
    }

    #[tokio::test(start_paused = true)]
    async fn every_variant_has_a_row() {
        let rows = rows();
        for i in 0..VARIANTS {
            assert!(
                rows.iter().any(|r| variant(&r.error) == i),
                "AiError variant #{i} has no row in the table"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_table() {
        for row in rows() {
            let name = format!("{:?}", row.error);
            let reply = row.error.reply();
            assert_eq!(reply.status.as_u16(), row.status, "{name}");
            assert_eq!(reply.code, row.code, "{name}");
            assert!(
                reply.message.contains(row.message_has),
                "{name}: {:?}",
                reply.message
            );
            for secret in ["SECRET", "sk-upstr", "sk-hash"] {
                assert!(!reply.message.contains(secret), "{name}: {}", reply.message);
            }
            for dialect in [ErrorDialect::OpenAi, ErrorDialect::Anthropic] {
                let res = reply.to_response(dialect);
                assert_eq!(res.status().as_u16(), row.status, "{name}");
                let h = res.headers();
                assert_eq!(h["content-type"], "application/json");
                assert_eq!(
                    h.get("retry-after").map(|v| v.to_str().unwrap()),
                    row.retry_after,
                    "{name}"
                );
                assert_eq!(h["x-should-retry"], row.should_retry, "{name}");
                let body: serde_json::Value = serde_json::from_str(res.body()).unwrap();
                match dialect {
                    ErrorDialect::OpenAi => {
                        let e = &body["error"];
                        assert_eq!(e["code"], row.code, "{name}");
                        assert_eq!(e["type"], row.openai_type, "{name}");
                        assert_eq!(e["message"], reply.message.as_str());
                        assert!(e["param"].is_null());
                        assert_eq!(
                            h.get("x-request-id").map(|v| v.to_str().unwrap()),
                            row.request_id
                        );
                    }
                    ErrorDialect::Anthropic => {
                        assert_eq!(body["type"], "error");
                        let e = &body["error"];
                        assert_eq!(e["type"], row.anthropic_type, "{name}");
                        assert_eq!(e["code"], row.code, "{name}");
                        assert_eq!(e["message"], reply.message.as_str());
                        assert_eq!(body["request_id"].as_str(), row.request_id, "{name}");
                        assert_eq!(
                            h.get("request-id").map(|v| v.to_str().unwrap()),
                            row.request_id
                        );
                    }
                }
            }
            #[cfg(feature = "tonic")]
            {
                use tonic_types::StatusExt as _;
                let status = tonic::Status::from(row.error);
                assert_eq!(format!("{:?}", status.code()), row.grpc, "{name}");
                assert_eq!(status.message(), reply.message);
                let details = status.get_error_details();
                let delay = details
                    .retry_info()
                    .and_then(|r| r.retry_delay)
                    .map(|d| d.as_secs().to_string());
                assert_eq!(delay.as_deref(), row.retry_after, "{name}: RetryInfo");
                assert_eq!(
                    details.error_info().map(|i| i.reason.as_str()),
                    Some(row.code)
                );
                assert_eq!(
                    details.request_info().map(|i| i.request_id.as_str()),
                    row.request_id
                );
            }
            #[cfg(not(feature = "tonic"))]
            let _ = row.grpc;
        }
    }

    #[cfg(feature = "axum")]
    #[tokio::test(start_paused = true)]
    async fn into_response_for_axum() {
        use axum_core::response::IntoResponse as _;
        let res = AiError::CircuitOpen {
            key: "api.openai.com/gpt-4o".into(),
            until: Instant::now() + Duration::from_secs(9),
        }
        .into_response();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()["retry-after"], "9");
        assert_eq!(res.headers()["content-type"], "application/json");
    }

    #[test]
    fn foreign_errors_do_not_repeat_their_text() {
        let err: crate::BoxError = "connect error: https://h.example/?key=AIzaSECRET".into();
        let reply = ErrorReply::from_error(&*err);
        assert_eq!((reply.status.as_u16(), reply.code), (502, "upstream_error"));
        assert!(!reply.message.contains("SECRET"));
        let wrapped: crate::BoxError = Box::new(AiError::Stalled {
            phase: StallPhase::Head,
            after: Duration::from_secs(5),
            bytes_received: 0,
        });
        assert_eq!(ErrorReply::from_error(&*wrapped).code, "stalled");
    }

    #[test]
    fn dialect_of_requests() {
        assert_eq!(
            ErrorDialect::of_path("/v1/messages"),
            ErrorDialect::Anthropic
        );
        assert_eq!(
            ErrorDialect::of_path("/v1/chat/completions"),
            ErrorDialect::OpenAi
        );
        let req = http::Request::post("/proxy")
            .header("anthropic-version", "2023-06-01")
            .body(())
            .unwrap();
        assert_eq!(ErrorDialect::of_request(&req), ErrorDialect::Anthropic);
    }

    #[test]
    fn long_labels_are_cut_on_a_char_boundary() {
        let key = "é".repeat(1_000);
        let e = AiError::CircuitOpen {
            key,
            until: Instant::now(),
        };
        assert!(e.reply().message.len() < 400);
    }
}
