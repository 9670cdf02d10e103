//! The one error type of tower-ai.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::classify::Classification;
use crate::kind::ErrorKind;
use crate::ratelimit::RequestedWait;

/// The boxed error every tower-ai service returns, as tower's own middleware do.
/// Downcast it with `err.downcast_ref::<AiError>()`, or ask [`AiError::find`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which limit of a token budget refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BudgetLimit {
    /// Requests per minute.
    RequestsPerMinute,
    /// Tokens per minute.
    TokensPerMinute,
    /// Requests in flight at once.
    Concurrency,
    /// Money spent per hour.
    SpendPerHour,
    /// Money spent per day.
    SpendPerDay,
}

impl fmt::Display for BudgetLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BudgetLimit::RequestsPerMinute => "requests per minute",
            BudgetLimit::TokensPerMinute => "tokens per minute",
            BudgetLimit::Concurrency => "concurrent requests",
            BudgetLimit::SpendPerHour => "spend per hour",
            BudgetLimit::SpendPerDay => "spend per day",
        })
    }
}

/// Where a stream stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StallPhase {
    /// No response head arrived in time.
    Head,
    /// The head arrived, but no body byte did.
    FirstByte,
    /// Bytes arrived (pings, comments), but no content event did.
    FirstContent,
    /// The stream went quiet between chunks for longer than the idle limit.
    Idle,
    /// The whole stream took longer than its total deadline.
    Total,
}

impl fmt::Display for StallPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StallPhase::Head => "waiting for the response head",
            StallPhase::FirstByte => "waiting for the first byte",
            StallPhase::FirstContent => "waiting for the first content",
            StallPhase::Idle => "between chunks",
            StallPhase::Total => "over the total deadline",
        })
    }
}

/// One route's last failure, as [`AiError::AllRoutesFailed`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFailure {
    /// The route's name.
    pub route: String,
    /// Its last verdict.
    pub classification: Classification,
    /// A short description: the provider's message, or the error's.
    pub message: String,
}

/// Everything that can go wrong in a tower-ai stack, with the facts a caller needs.
///
/// A provider's error *response* (a 429 with its body) normally reaches the caller as a
/// response, untouched; `AiError` is for what cannot: a transport failure, a layer's
/// refusal, a stall, an error event inside a 200 stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AiError {
    /// The provider said no, in a form that is not a response of its own: an error event
    /// inside a 200 stream, or a final answer a layer was configured to turn into an error.
    #[error("provider error ({kind}, status {status}){msg}",
        kind = classification.kind.map_or("unknown", |k| k.as_str()),
        status = classification.status.as_u16(),
        msg = classification.message().map(|m| format!(": {m}")).unwrap_or_default())]
    Provider {
        /// The classification of what the provider said.
        classification: Classification,
    },
    /// The request never got a response: connect failure, reset, timeout.
    #[error("transport error ({kind}): {source}")]
    Transport {
        /// [`ErrorKind::Connection`], [`ErrorKind::Timeout`] or [`ErrorKind::Unknown`].
        kind: ErrorKind,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// The circuit for `key` is open: the request was not sent.
    #[error("circuit open for {key} until {until:?}")]
    CircuitOpen {
        /// The breaker's key (provider host and model by default).
        key: String,
        /// When the breaker lets a probe through.
        until: Instant,
    },
    /// `key` is cooling down after the provider asked for a wait.
    #[error("cooling down {key} until {until:?}")]
    CoolingDown {
        /// The cooldown key.
        key: String,
        /// When requests for `key` may go out again.
        until: Instant,
    },
    /// The request does not fit the token budget.
    #[error("budget exceeded for {key}: {limit}{}", retry_after.map(|d| format!(" (fits in {d:?})")).unwrap_or_default())]
    BudgetExceeded {
        /// The budget key.
        key: String,
        /// Which limit refused it.
        limit: BudgetLimit,
        /// When it would fit, if it ever can (`None` for a request larger than the limit).
        retry_after: Option<Duration>,
    },
    /// A streamed answer stopped making progress.
    #[error("stream stalled {phase} after {after:?} ({bytes_received} bytes received)")]
    Stalled {
        /// Where it stalled.
        phase: StallPhase,
        /// The deadline that expired.
        after: Duration,
        /// Body bytes received before the stall.
        bytes_received: u64,
    },
    /// The request's [`Deadline`](crate::Deadline) passed: its caller has given up. Either
    /// it was not sent (`sent: false`: the deadline had passed, or left nothing, when it
    /// reached StallDetector, so the provider never saw it), or its call was cut at that
    /// instant (`sent: true`), waiting for the answer or reading it. Kind
    /// [`ErrorKind::DeadlineExceeded`]: not retried, no fallback, and not counted by a
    /// circuit breaker, since the time may have gone in waits above the call (a budget's,
    /// a cooldown's, a retry's) and says nothing about the provider. StallDetector's own
    /// deadlines (head, idle, total) give [`AiError::Stalled`], which does count.
    #[error("the request's deadline passed {}", if *sent {
        format!("waiting for the answer ({bytes_received} bytes received)")
    } else {
        "before it was sent".to_owned()
    })]
    DeadlineExceeded {
        /// Whether the request had been handed to the provider.
        sent: bool,
        /// Body bytes received before the cut.
        bytes_received: u64,
    },
    /// A stream ended without its dialect's terminal marker: the answer is incomplete.
    #[error("stream ended without its terminal event ({bytes_received} bytes received)")]
    Truncated {
        /// Body bytes received.
        bytes_received: u64,
    },
    /// Retries ended without a success.
    #[error("gave up after {attempts} attempt(s): {}", last.kind.map_or("unknown", |k| k.as_str()))]
    RetriesExhausted {
        /// Attempts made, the first included.
        attempts: u32,
        /// The last attempt's verdict.
        last: Classification,
        /// The wait the provider asked for when it was longer than allowed (the reason to
        /// stop), if so.
        wait: Option<RequestedWait>,
    },
    /// Every route of a fallback chain failed.
    #[error("all {} route(s) failed", failures.len())]
    AllRoutesFailed {
        /// Each route's last failure, in chain order.
        failures: Vec<RouteFailure>,
    },
    /// The request's model name is longer than any real one
    /// ([`MAX_MODEL_LEN`](crate::keys::MAX_MODEL_LEN) bytes): refused before it is sent
    /// or kept anywhere. A gateway answers it with a 400.
    #[error("model name of {len} bytes is longer than the {max}-byte maximum")]
    ModelTooLong {
        /// The model name's length, in bytes.
        len: usize,
        /// The maximum, in bytes.
        max: usize,
    },
}

impl AiError {
    /// The kind of failure, as the layers above judge it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AiError::Provider { classification } => {
                classification.kind.unwrap_or(ErrorKind::Unknown)
            }
            AiError::Transport { kind, .. } => *kind,
            AiError::CircuitOpen { .. } => ErrorKind::Overloaded,
            AiError::CoolingDown { .. } => ErrorKind::RateLimited,
            AiError::BudgetExceeded {
                limit, retry_after, ..
            } => match (limit, retry_after) {
                (_, None) => ErrorKind::RequestTooLarge,
                (BudgetLimit::SpendPerHour | BudgetLimit::SpendPerDay, _) => {
                    ErrorKind::QuotaExhausted
                }
                _ => ErrorKind::RateLimited,
            },
            AiError::Stalled { .. } | AiError::Truncated { .. } => ErrorKind::Stalled,
            AiError::DeadlineExceeded { .. } => ErrorKind::DeadlineExceeded,
            AiError::RetriesExhausted { last, .. } => last.kind.unwrap_or(ErrorKind::Unknown),
            AiError::AllRoutesFailed { failures } => failures
                .last()
                .and_then(|f| f.classification.kind)
                .unwrap_or(ErrorKind::Unknown),
            AiError::ModelTooLong { .. } => ErrorKind::BadRequest,
        }
    }

    /// Wraps a client's error as [`AiError::Transport`], judging its kind with
    /// [`ErrorKind::of_error`]; an error that already is (or wraps) an `AiError` is
    /// returned as it is.
    ///
    /// Clients put the URL in their messages (reqwest does), and a URL may carry a
    /// credential (Gemini's `?key=`). When the text of the error or of any error in its
    /// `source()` chain holds one (see [`redact_secrets`]), the source kept is a
    /// [`RedactedError`] with the redacted text instead of the client's error; otherwise
    /// the client's error is kept as it is, for downcasting.
    pub fn transport(err: BoxError) -> BoxError {
        if err.is::<AiError>() {
            return err;
        }
        let kind = match ErrorKind::of_error(&*err) {
            k @ (ErrorKind::Timeout | ErrorKind::Connection) => k,
            _ => ErrorKind::Unknown,
        };
        Box::new(AiError::Transport {
            kind,
            source: RedactedError::scrub(err),
        })
    }

    /// The `AiError` in an error's `source()` chain, if there is one.
    pub fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a AiError> {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if let Some(ai) = e.downcast_ref::<AiError>() {
                return Some(ai);
            }
            cur = e.source();
        }
        None
    }
}

/// A client's error whose text held a credential: the text of the error and of its
/// `source()` chain, joined with `": "`, with every credential replaced by
/// [`redact_secrets`]. Made by [`AiError::transport`] and by any layer that reports a
/// client's error in text ([`RouteFailure::message`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedactedError {
    message: String,
}

impl RedactedError {
    /// `err` itself when neither it nor its chain holds a credential, else a
    /// `RedactedError` with its chain's text, redacted.
    pub fn scrub(err: BoxError) -> BoxError {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
        let mut dirty = false;
        while let Some(e) = cur {
            if matches!(redact_secrets(&e.to_string()), std::borrow::Cow::Owned(_)) {
                dirty = true;
                break;
            }
            cur = e.source();
        }
        if !dirty {
            return err;
        }
        Box::new(RedactedError {
            message: redacted_chain(&*err),
        })
    }

    /// The redacted text.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for RedactedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RedactedError {}

/// The text of an error and of its `source()` chain (each message once, joined with
/// `": "`), with every credential redacted by [`redact_secrets`]: what a layer that
/// reports a client's error as text (a [`RouteFailure::message`]) writes.
pub fn redacted_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        let text = e.to_string();
        // Many errors repeat their source's text in their own: keep it once.
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cur = e.source();
    }
    redact_secrets(&out).into_owned()
}

/// The query parameters whose values are credentials: Gemini's `key` (its documented
/// `?key=API_KEY`), Azure's `api-key`, and OAuth 2.0's `access_token` (RFC 6750 §2.3).
const SECRET_PARAMS: [&str; 4] = ["key", "api-key", "api_key", "access_token"];

/// What a redacted credential is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// `text` with credentials replaced by [`REDACTED`]: the values of the query parameters
/// `key`, `api-key`, `api_key` and `access_token` (after `?`, `&` or `;`, names compared
/// without case), and the token after `Bearer ` (RFC 6750 §2.1). Borrowed when there is
/// nothing to redact.
///
/// ```
/// use tower_ai_core::redact_secrets;
/// let msg = "error sending request for url (https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent?key=AIzaSyA-secret&alt=sse)";
/// assert_eq!(
///     redact_secrets(msg),
///     "error sending request for url (https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent?key=[REDACTED]&alt=sse)"
/// );
/// assert_eq!(redact_secrets("Authorization: Bearer sk-abc.def"), "Authorization: Bearer [REDACTED]");
/// assert_eq!(redact_secrets("monkey=1"), "monkey=1");
/// ```
pub fn redact_secrets(text: &str) -> std::borrow::Cow<'_, str> {
    let bytes = text.as_bytes();
    // The spans of secret values, in order.
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let value_end = |from: usize| {
        bytes[from..]
            .iter()
            .position(|&b| {
                b.is_ascii_whitespace()
                    || matches!(b, b'&' | b'#' | b';' | b'"' | b'\'' | b')' | b'>' | b',')
            })
            .map_or(bytes.len(), |p| from + p)
    };
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if matches!(b, b'?' | b'&' | b';') {
            let rest = &text[i + 1..];
            if let Some(name) = SECRET_PARAMS.iter().find(|p| {
                rest.len() > p.len()
                    && rest.as_bytes()[p.len()] == b'='
                    && rest[..p.len()].eq_ignore_ascii_case(p)
            }) {
                let start = i + 1 + name.len() + 1;
                let end = value_end(start);
                if end > start && !text[start..].starts_with(REDACTED) {
                    spans.push((start, end));
                }
                i = end;
                continue;
            }
        }
        if (b == b'b' || b == b'B')
            && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric())
            && text
                .get(i..i + 7)
                .is_some_and(|w| w.eq_ignore_ascii_case("bearer "))
        {
            let mut start = i + 7;
            while bytes.get(start) == Some(&b' ') {
                start += 1;
            }
            let end = value_end(start);
            if end > start && !text[start..].starts_with(REDACTED) {
                spans.push((start, end));
            }
            i = end.max(i + 7);
            continue;
        }
        i += 1;
    }
    if spans.is_empty() {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end) in spans {
        out.push_str(&text[at..start]);
        out.push_str(REDACTED);
        at = end;
    }
    out.push_str(&text[at..]);
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_messages() {
        let e = AiError::BudgetExceeded {
            key: "tenant-a".into(),
            limit: BudgetLimit::TokensPerMinute,
            retry_after: Some(Duration::from_secs(3)),
        };
        assert_eq!(e.kind(), ErrorKind::RateLimited);
        assert_eq!(
            e.to_string(),
            "budget exceeded for tenant-a: tokens per minute (fits in 3s)"
        );
        let e = AiError::Stalled {
            phase: StallPhase::Idle,
            after: Duration::from_secs(30),
            bytes_received: 512,
        };
        assert_eq!(e.kind(), ErrorKind::Stalled);
        assert_eq!(
            e.to_string(),
            "stream stalled between chunks after 30s (512 bytes received)"
        );
    }

    #[test]
    fn transport_wraps_once() {
        let io: BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let wrapped = AiError::transport(io);
        let ai = wrapped.downcast_ref::<AiError>().unwrap();
        assert_eq!(ai.kind(), ErrorKind::Connection);
        let again = AiError::transport(wrapped);
        assert!(matches!(
            again.downcast_ref::<AiError>(),
            Some(AiError::Transport { .. })
        ));
        assert_eq!(ErrorKind::of_error(&*again), ErrorKind::Connection);
        assert!(AiError::find(&*again).is_some());
    }
}
