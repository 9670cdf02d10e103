//! What kind of failure a response or an error is.

use std::error::Error as StdError;
use std::fmt;

/// What kind of failure a response or an error is, independent of the provider.
///
/// Every layer decides from the kind: AiRetry retries [retryable](ErrorKind::is_retryable)
/// kinds, the CircuitBreaker counts [breaker failures](ErrorKind::is_breaker_failure), and
/// ModelFallback moves on when [another model can help](ErrorKind::is_fallback_trigger).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A transient rate limit (requests or tokens per minute): retry after the requested wait.
    RateLimited,
    /// Billing, credits, a spend cap or a per-day quota: retrying cannot succeed until a
    /// person acts or the period ends.
    QuotaExhausted,
    /// The provider (or model) is overloaded: Anthropic 529, OpenAI 503, Gemini 503.
    Overloaded,
    /// A 5xx that is not overload: 500, 502, and other server errors.
    ServerError,
    /// The call took too long: 408, 504, or a client-side timeout.
    Timeout,
    /// The connection could not be made or broke (refused, reset, closed early).
    Connection,
    /// A streamed answer stopped making progress (see StallDetector).
    Stalled,
    /// The prompt does not fit the model's context window.
    ContextLengthExceeded,
    /// A content policy refused the request or the answer.
    ContentFiltered,
    /// The request is larger than a limit allows (413, or a single request over the
    /// tokens-per-minute limit): sending it again never fits.
    RequestTooLarge,
    /// The credentials were rejected (401, or Gemini's `API_KEY_INVALID`).
    Unauthorized,
    /// The credentials lack permission, or the region is not served (403).
    Forbidden,
    /// The model or resource does not exist (404).
    NotFound,
    /// Any other client error (400, 422, …).
    BadRequest,
    /// The caller's end-to-end [`Deadline`](crate::Deadline) passed: the request was not
    /// sent, or its call was cut at that instant (see
    /// [`AiError::DeadlineExceeded`](crate::AiError::DeadlineExceeded)). The caller has
    /// given up, so nothing is retried or sent to another route; and it says nothing about
    /// the provider (the time may have gone in waits above it), so it does not count
    /// against a circuit breaker.
    DeadlineExceeded,
    /// Nothing more precise is known.
    Unknown,
}

impl ErrorKind {
    /// Whether sending the same request again may succeed.
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::RateLimited
                | ErrorKind::Overloaded
                | ErrorKind::ServerError
                | ErrorKind::Timeout
                | ErrorKind::Connection
                | ErrorKind::Stalled
        )
    }

    /// Whether this failure says something about the provider's health, and so counts
    /// against a circuit breaker. Rate limits and client errors describe the caller, not
    /// the provider, and do not.
    pub const fn is_breaker_failure(self) -> bool {
        matches!(
            self,
            ErrorKind::Overloaded
                | ErrorKind::ServerError
                | ErrorKind::Timeout
                | ErrorKind::Connection
                | ErrorKind::Stalled
        )
    }

    /// Whether another model or provider may serve what this one could not.
    ///
    /// True for quota exhaustion (another account or provider), a context window too small
    /// (a larger model), a content filter (a route with another policy), a model that does
    /// not exist here (404), a single request over this model's token limit, and every
    /// retryable kind (once retries on this route are exhausted). False for credentials and
    /// malformed requests, which fail the same way everywhere.
    pub const fn is_fallback_trigger(self) -> bool {
        self.is_retryable()
            || matches!(
                self,
                ErrorKind::QuotaExhausted
                    | ErrorKind::ContextLengthExceeded
                    | ErrorKind::ContentFiltered
                    | ErrorKind::NotFound
                    | ErrorKind::RequestTooLarge
            )
    }

    /// A short snake_case name, as used in trace fields (`error.type`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::QuotaExhausted => "quota_exhausted",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::ServerError => "server_error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connection => "connection",
            ErrorKind::Stalled => "stalled",
            ErrorKind::ContextLengthExceeded => "context_length_exceeded",
            ErrorKind::ContentFiltered => "content_filtered",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Unknown => "unknown",
        }
    }

    /// The kind of a transport-level error (what a client service returns instead of a
    /// response), found by walking its `source()` chain.
    ///
    /// An [`AiError`](crate::AiError) anywhere in the chain gives its own kind; a
    /// `tokio::time::error::Elapsed` or an `std::io::Error` of kind `TimedOut` gives
    /// [`Timeout`](ErrorKind::Timeout); any other `std::io::Error`, and errors whose message
    /// says the connection failed (hyper and hyper-util describe theirs so), give
    /// [`Connection`](ErrorKind::Connection). Anything else is
    /// [`Unknown`](ErrorKind::Unknown).
    pub fn of_error(err: &(dyn StdError + 'static)) -> ErrorKind {
        let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
        let mut connection_hint = false;
        while let Some(e) = cur {
            if let Some(ai) = e.downcast_ref::<crate::AiError>() {
                return ai.kind();
            }
            if e.is::<tokio::time::error::Elapsed>() {
                return ErrorKind::Timeout;
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return match io.kind() {
                    std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
                    _ => ErrorKind::Connection,
                };
            }
            if !connection_hint {
                connection_hint = looks_like_connection_error(e);
            }
            cur = e.source();
        }
        if connection_hint {
            ErrorKind::Connection
        } else {
            ErrorKind::Unknown
        }
    }
}

/// hyper and hyper-util errors are opaque types; their messages are stable enough to
/// recognise a broken or refused connection ("client error (Connect)", "connection
/// closed before message completed", "connection reset", "timed out").
fn looks_like_connection_error(e: &dyn StdError) -> bool {
    use std::fmt::Write;
    struct Probe {
        buf: [u8; 160],
        len: usize,
    }
    impl Write for Probe {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            let n = s.len().min(self.buf.len() - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
            self.len += n;
            Ok(())
        }
    }
    let mut p = Probe {
        buf: [0; 160],
        len: 0,
    };
    let _ = write!(p, "{e}");
    let msg = &mut p.buf[..p.len];
    msg.make_ascii_lowercase();
    const NEEDLES: [&[u8]; 6] = [
        b"connect",
        b"connection",
        b"broken pipe",
        b"reset",
        b"incomplete message",
        b"channel closed",
    ];
    NEEDLES
        .iter()
        .any(|n| msg.windows(n.len()).any(|w| w == *n))
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_follow_the_design_table() {
        use ErrorKind::*;
        for k in [
            RateLimited,
            Overloaded,
            ServerError,
            Timeout,
            Connection,
            Stalled,
        ] {
            assert!(k.is_retryable(), "{k}");
            assert!(k.is_fallback_trigger(), "{k}");
        }
        for k in [
            RateLimited,
            QuotaExhausted,
            ContextLengthExceeded,
            BadRequest,
            Unauthorized,
            NotFound,
            DeadlineExceeded,
        ] {
            assert!(!k.is_breaker_failure(), "{k}");
        }
        // The caller gave up: nothing to retry, no other route to try.
        assert!(!DeadlineExceeded.is_retryable() && !DeadlineExceeded.is_fallback_trigger());
        for k in [Overloaded, ServerError, Timeout, Connection, Stalled] {
            assert!(k.is_breaker_failure(), "{k}");
        }
        for k in [
            QuotaExhausted,
            ContextLengthExceeded,
            ContentFiltered,
            RequestTooLarge,
            Unauthorized,
            Forbidden,
            BadRequest,
        ] {
            assert!(!k.is_retryable(), "{k}");
        }
        for k in [Unauthorized, Forbidden, BadRequest, Unknown] {
            assert!(!k.is_fallback_trigger(), "{k}");
        }
        assert!(
            QuotaExhausted.is_fallback_trigger() && ContextLengthExceeded.is_fallback_trigger()
        );
    }

    #[test]
    fn transport_errors() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        assert_eq!(ErrorKind::of_error(&io), ErrorKind::Connection);
        let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "slow");
        assert_eq!(ErrorKind::of_error(&io), ErrorKind::Timeout);

        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl fmt::Display for Wrapper {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("client error")
            }
        }
        impl StdError for Wrapper {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let w = Wrapper(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(ErrorKind::of_error(&w), ErrorKind::Connection);

        let opaque: Box<dyn StdError + Send + Sync> = "client error (Connect)".into();
        assert_eq!(ErrorKind::of_error(&*opaque), ErrorKind::Connection);
        let other: Box<dyn StdError + Send + Sync> = "something odd".into();
        assert_eq!(ErrorKind::of_error(&*other), ErrorKind::Unknown);
    }
}
