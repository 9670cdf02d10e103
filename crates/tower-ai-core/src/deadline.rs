//! [`Deadline`]: the instant a request must be answered by, and [`DeadlineLayer`], which
//! sets it.

use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HeaderName;
use http::{HeaderMap, Request};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::facts::Facts;

/// The instant a request must be answered by, kept in the request's
/// [`http::Extensions`]: read it with [`Deadline::of`].
///
/// [`DeadlineLayer`] keeps the deadline it sets in a slot the stack's layers share for
/// their per-call facts (one allocation for all of them), not as a `Deadline` value of its
/// own; [`Deadline::of`] reads either, and a `Deadline` the caller put into the extensions
/// takes precedence (the layer only shortens it).
///
/// Set it yourself ([`Deadline::set`]), or let a [`DeadlineLayer`] set it from its own
/// duration and from what the caller sent (`grpc-timeout`, the OpenAI SDKs' timeout
/// headers). The layers below read it and never wait past it: StallDetector's total
/// deadline is the earlier of its own and this one, and it does not send a request whose
/// deadline has passed (both fail with [`AiError::DeadlineExceeded`](crate::AiError::DeadlineExceeded),
/// which a circuit breaker does not count); AiRetry starts no wait or attempt that would
/// end after it.
///
/// A request carries at most one deadline; [`Deadline::set`] keeps the earlier of the
/// one already there and the new one, so a layer can only shorten a caller's deadline.
///
/// ```
/// use std::time::Duration;
/// use http::Request;
/// use tower_ai_core::Deadline;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let mut req = Request::new(());
/// assert_eq!(Deadline::of(&req), None);
///
/// let soon = Deadline::after(Duration::from_secs(30));
/// Deadline::set(&mut req, soon);
/// // A later deadline does not replace an earlier one.
/// Deadline::set(&mut req, Deadline::after(Duration::from_secs(600)));
/// assert_eq!(Deadline::of(&req), Some(soon));
/// assert_eq!(soon.remaining(), Duration::from_secs(30));
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(Instant);

/// The longest wait a header may ask for: longer values are clamped to it (a day; no
/// model call is expected to take longer).
pub const MAX_HEADER_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

impl Deadline {
    /// The deadline `at`.
    pub const fn at(at: Instant) -> Self {
        Deadline(at)
    }

    /// The deadline `timeout` from now (saturating: an absurd `timeout` gives a deadline
    /// far in the future, never a panic).
    pub fn after(timeout: Duration) -> Self {
        Deadline::after_from(Instant::now(), timeout)
    }

    fn after_from(now: Instant, timeout: Duration) -> Self {
        // About 30 years: far beyond any call, and safe to add to any instant.
        const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
        Deadline(
            now.checked_add(timeout)
                .unwrap_or_else(|| now + FAR.min(timeout)),
        )
    }

    /// The instant.
    pub const fn instant(self) -> Instant {
        self.0
    }

    /// The time left until the deadline (zero once it passed).
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Whether a wait of `wait` starting at `now` would end after the deadline.
    pub fn would_pass(self, now: Instant, wait: Duration) -> bool {
        now.checked_add(wait).is_none_or(|end| end > self.0)
    }

    /// The deadline `req` carries, if any: a `Deadline` in its extensions, else the one
    /// [`DeadlineLayer`] set (see the type's docs).
    #[inline]
    pub fn of<B>(req: &Request<B>) -> Option<Deadline> {
        Deadline::in_extensions(req.extensions())
    }

    /// [`of`](Deadline::of), from a request's extensions.
    #[inline]
    pub(crate) fn in_extensions(ext: &http::Extensions) -> Option<Deadline> {
        if let Some(facts) = Facts::alone(ext) {
            return facts.deadline;
        }
        match ext.get::<Deadline>() {
            Some(d) => Some(*d),
            None => Facts::of(ext)?.deadline,
        }
    }

    /// Puts `deadline` on `req`, keeping the earlier of it and the deadline `req` already
    /// carries (where it is: a `Deadline` in the extensions, or the one [`DeadlineLayer`]
    /// set; a request with neither gets a `Deadline` in its extensions). Returns the
    /// deadline `req` carries now.
    pub fn set<B>(req: &mut Request<B>, deadline: Deadline) -> Deadline {
        let ext = req.extensions_mut();
        if let Some(old) = ext.get_mut::<Deadline>() {
            return earlier_of(old, deadline);
        }
        if let Some(facts) = ext.get_mut::<Facts>() {
            return earlier(&mut facts.deadline, deadline);
        }
        ext.insert(deadline);
        deadline
    }

    /// [`Deadline::set`] as [`DeadlineLayer`] does it: a request without a deadline gets
    /// it in the stack's per-call slot (see the type's docs).
    fn set_for_call<B>(req: &mut Request<B>, deadline: Deadline) -> Deadline {
        let ext = req.extensions_mut();
        if let Some(old) = ext.get_mut::<Deadline>() {
            return earlier_of(old, deadline);
        }
        earlier(&mut Facts::get_or_insert(ext).deadline, deadline)
    }

    /// The earliest timeout `headers` ask for, from now: `grpc-timeout` (see
    /// [`parse_grpc_timeout`]), `x-stainless-timeout` (the official OpenAI Node SDK's
    /// timeout, whole seconds) and `x-stainless-read-timeout` (the official OpenAI
    /// Python SDK's read timeout, seconds as a decimal). Values that do not parse are
    /// ignored; values over [`MAX_HEADER_TIMEOUT`] are clamped to it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use http::HeaderMap;
    /// use tower_ai_core::Deadline;
    ///
    /// let mut h = HeaderMap::new();
    /// h.insert("grpc-timeout", "30S".parse().unwrap());
    /// h.insert("x-stainless-timeout", "600".parse().unwrap());
    /// assert_eq!(Deadline::header_timeout(&h), Some(Duration::from_secs(30)));
    /// h.insert("grpc-timeout", "soon".parse().unwrap());
    /// assert_eq!(Deadline::header_timeout(&h), Some(Duration::from_secs(600)));
    /// ```
    pub fn header_timeout(headers: &HeaderMap) -> Option<Duration> {
        if headers.is_empty() {
            return None;
        }
        // Each header's first value, as `get` gives it. A small map is read in one pass
        // over its names (each once, without the walk over extra values that iterating
        // its values takes), and only a name found is looked up: three hashed lookups
        // cost more than a few name comparisons (~500 instructions a call for a request
        // with two headers).
        let (grpc, node, python) = if headers.keys_len() <= 8 {
            let (mut grpc, mut node, mut python) = (false, false, false);
            for name in headers.keys() {
                if name == GRPC_TIMEOUT {
                    grpc = true;
                } else if name == STAINLESS_TIMEOUT {
                    node = true;
                } else if name == STAINLESS_READ_TIMEOUT {
                    python = true;
                }
            }
            if !(grpc || node || python) {
                return None;
            }
            (
                grpc.then(|| headers.get(&GRPC_TIMEOUT)).flatten(),
                node.then(|| headers.get(&STAINLESS_TIMEOUT)).flatten(),
                python
                    .then(|| headers.get(&STAINLESS_READ_TIMEOUT))
                    .flatten(),
            )
        } else {
            (
                headers.get(&GRPC_TIMEOUT),
                headers.get(&STAINLESS_TIMEOUT),
                headers.get(&STAINLESS_READ_TIMEOUT),
            )
        };
        let grpc = grpc.and_then(|v| parse_grpc_timeout(v.as_bytes()));
        let node = node.and_then(|v| parse_seconds(v.as_bytes()));
        let python = python.and_then(|v| parse_seconds(v.as_bytes()));
        [grpc, node, python]
            .into_iter()
            .flatten()
            .min()
            .map(|d| d.min(MAX_HEADER_TIMEOUT))
    }
}

/// Keeps the earlier of `slot` and `deadline` in `slot`, and returns it.
fn earlier(slot: &mut Option<Deadline>, deadline: Deadline) -> Deadline {
    match slot {
        Some(old) => earlier_of(old, deadline),
        None => *slot.insert(deadline),
    }
}

/// Keeps the earlier of `old` and `deadline` in `old`, and returns it.
fn earlier_of(old: &mut Deadline, deadline: Deadline) -> Deadline {
    if deadline < *old {
        *old = deadline;
    }
    *old
}

static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
static STAINLESS_TIMEOUT: HeaderName = HeaderName::from_static("x-stainless-timeout");
static STAINLESS_READ_TIMEOUT: HeaderName = HeaderName::from_static("x-stainless-read-timeout");

/// Parses a `grpc-timeout` value as gRPC over HTTP/2 defines it
/// (<https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md>): 1 to 8 ASCII
/// digits and a unit, `H` hours, `M` minutes, `S` seconds, `m` milliseconds,
/// `u` microseconds, `n` nanoseconds. Anything else is `None`.
///
/// ```
/// use std::time::Duration;
/// use tower_ai_core::parse_grpc_timeout;
/// assert_eq!(parse_grpc_timeout(b"250m"), Some(Duration::from_millis(250)));
/// assert_eq!(parse_grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
/// assert_eq!(parse_grpc_timeout(b"123456789S"), None); // 9 digits
/// assert_eq!(parse_grpc_timeout(b"-1S"), None);
/// ```
pub fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 8 digits: fits a u64 with room for any unit's factor.
    let n = digits
        .iter()
        .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A non-negative, finite number of seconds (`600`, `600.0`, `0.5`); `None` otherwise.
fn parse_seconds(v: &[u8]) -> Option<Duration> {
    // Bounded before parsing: a header is the caller's, any length.
    if v.is_empty() || v.len() > 32 {
        return None;
    }
    let s = std::str::from_utf8(v).ok()?.trim();
    if !s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let secs: f64 = s.parse().ok()?;
    Duration::try_from_secs_f64(secs.min(MAX_HEADER_TIMEOUT.as_secs_f64())).ok()
}

/// Sets a [`Deadline`] on every request: `timeout` from when the request arrives, or
/// earlier when the caller asked for less (a `Deadline` already in its extensions, or
/// a timeout header: see [`Deadline::header_timeout`]). Put it outermost, so that the
/// deadline counts from the caller's call.
///
/// ```
/// use std::time::Duration;
/// use http::Request;
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_ai_core::{BoxError, Deadline, DeadlineLayer};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), BoxError> {
/// let svc = ServiceBuilder::new()
///     .layer(DeadlineLayer::new(Duration::from_secs(600)))
///     .service(service_fn(|req: Request<()>| async move {
///         Ok::<_, BoxError>(Deadline::of(&req).map(Deadline::remaining))
///     }));
/// let req = Request::builder().header("grpc-timeout", "20S").body(())?;
/// assert_eq!(svc.oneshot(req).await?, Some(Duration::from_secs(20)));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    timeout: Duration,
}

impl DeadlineLayer {
    /// A layer giving every request at most `timeout` (see the type's docs).
    pub const fn new(timeout: Duration) -> Self {
        DeadlineLayer { timeout }
    }

    /// The layer's own timeout.
    pub const fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = SetDeadline<S>;

    fn layer(&self, inner: S) -> SetDeadline<S> {
        SetDeadline {
            inner,
            timeout: Some(self.timeout),
        }
    }
}

/// The service of [`DeadlineLayer`]: see its docs.
#[derive(Clone)]
pub struct SetDeadline<S> {
    inner: S,
    // `None`: off (requests pass through untouched, no clock read).
    timeout: Option<Duration>,
}

impl<S> SetDeadline<S> {
    /// Wraps `inner`, giving every request at most `timeout`.
    pub const fn new(inner: S, timeout: Duration) -> Self {
        SetDeadline {
            inner,
            timeout: Some(timeout),
        }
    }

    /// Wraps `inner` without setting any deadline: requests pass through untouched.
    pub const fn off(inner: S) -> Self {
        SetDeadline {
            inner,
            timeout: None,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for SetDeadline<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SetDeadline")
            .field("inner", &self.inner)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl<S, B> Service<Request<B>> for SetDeadline<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        let Some(own) = self.timeout else {
            return self.inner.call(req);
        };
        let timeout = match Deadline::header_timeout(req.headers()) {
            Some(t) => t.min(own),
            None => own,
        };
        Deadline::set_for_call(&mut req, Deadline::after_from(Instant::now(), timeout));
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_says() {
        let p = |s: &str| parse_grpc_timeout(s.as_bytes());
        assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(p("3M"), Some(Duration::from_secs(180)));
        assert_eq!(p("10S"), Some(Duration::from_secs(10)));
        assert_eq!(p("100m"), Some(Duration::from_millis(100)));
        assert_eq!(p("7u"), Some(Duration::from_micros(7)));
        assert_eq!(p("99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(p("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
        for bad in [
            "",
            "S",
            "10",
            "10s",
            "1.5S",
            "-1S",
            "+1S",
            " 1S",
            "1S ",
            "123456789S",
            "1h",
            "1x",
            "١S",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn sdk_seconds_parse_and_garbage_is_ignored() {
        let p = |s: &str| parse_seconds(s.as_bytes());
        assert_eq!(p("600"), Some(Duration::from_secs(600)));
        assert_eq!(p("600.0"), Some(Duration::from_secs(600)));
        assert_eq!(p("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(p("1e308"), None);
        assert_eq!(p("9".repeat(30).as_str()), Some(MAX_HEADER_TIMEOUT));
        for bad in [
            "",
            "-1",
            "inf",
            "NaN",
            "1e3",
            "ten",
            ".",
            "1.2.3",
            &"9".repeat(40),
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn header_timeouts_take_the_earliest_and_clamp() {
        let mut h = HeaderMap::new();
        assert_eq!(Deadline::header_timeout(&h), None);
        h.insert("x-stainless-read-timeout", "600.0".parse().unwrap());
        assert_eq!(Deadline::header_timeout(&h), Some(Duration::from_secs(600)));
        h.insert("x-stainless-timeout", "60".parse().unwrap());
        assert_eq!(Deadline::header_timeout(&h), Some(Duration::from_secs(60)));
        h.insert("grpc-timeout", "500m".parse().unwrap());
        assert_eq!(
            Deadline::header_timeout(&h),
            Some(Duration::from_millis(500))
        );
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", "99999999H".parse().unwrap());
        assert_eq!(Deadline::header_timeout(&h), Some(MAX_HEADER_TIMEOUT));
        h.insert(
            "x-stainless-timeout",
            http::HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
        );
        assert_eq!(Deadline::header_timeout(&h), Some(MAX_HEADER_TIMEOUT));
    }

    #[test]
    fn small_and_large_maps_read_the_first_value_alike() {
        for fill in [0, 2, 8, 20] {
            let mut h = HeaderMap::new();
            for i in 0..fill {
                h.insert(
                    HeaderName::from_bytes(format!("x-filler-{i}").as_bytes()).unwrap(),
                    "1".parse().unwrap(),
                );
            }
            h.append("x-stainless-timeout", "junk".parse().unwrap());
            h.append("x-stainless-timeout", "5".parse().unwrap());
            h.append("grpc-timeout", "7S".parse().unwrap());
            h.append("grpc-timeout", "1S".parse().unwrap());
            // The first value of each name counts, as `HeaderMap::get` reads it.
            assert_eq!(
                Deadline::header_timeout(&h),
                Some(Duration::from_secs(7)),
                "{fill} other headers"
            );
            h.insert("x-stainless-read-timeout", "2.5".parse().unwrap());
            assert_eq!(
                Deadline::header_timeout(&h),
                Some(Duration::from_millis(2500)),
                "{fill} other headers"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn absurd_timeouts_saturate() {
        let d = Deadline::after(Duration::MAX);
        assert!(d.instant() > Instant::now() + Duration::from_secs(86_400 * 365));
        assert!(!d.would_pass(Instant::now(), Duration::from_secs(3600)));
        assert!(d.would_pass(Instant::now(), Duration::MAX));
    }
}
