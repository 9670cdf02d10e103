//! The wait a provider asks for, and the rate-limit state its headers describe.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

use crate::duration;

/// Where a [`RequestedWait`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WaitSource {
    /// `retry-after-ms` (milliseconds; OpenAI SDKs, Azure).
    RetryAfterMs,
    /// `Retry-After` as a number of seconds (integer or, tolerated, fractional).
    RetryAfter,
    /// `Retry-After` as an HTTP-date, measured from the response's `Date`.
    RetryAfterDate,
    /// `x-ms-retry-after-ms` (Azure).
    MsRetryAfterMs,
    /// `x-amz-retry-after` (milliseconds; Bedrock).
    AmzRetryAfter,
    /// Gemini's `google.rpc.RetryInfo.retryDelay` in the error body.
    RetryInfo,
    /// The error message itself ("Please try again in 6.596s", "… retry in 38.8s").
    Message,
    /// An IETF `RateLimit` field with no quota remaining (`r=0;t=30`).
    RateLimitField,
}

impl WaitSource {
    /// A short snake_case name, for trace fields.
    pub const fn as_str(self) -> &'static str {
        match self {
            WaitSource::RetryAfterMs => "retry-after-ms",
            WaitSource::RetryAfter => "retry-after",
            WaitSource::RetryAfterDate => "retry-after-date",
            WaitSource::MsRetryAfterMs => "x-ms-retry-after-ms",
            WaitSource::AmzRetryAfter => "x-amz-retry-after",
            WaitSource::RetryInfo => "retry-info",
            WaitSource::Message => "message",
            WaitSource::RateLimitField => "ratelimit",
        }
    }
}

/// A wait the provider asked for before the next attempt, validated and clamped.
///
/// `delay` is always safe to sleep: it never exceeds the configured maximum. When the
/// provider asked for longer, `requested` keeps what it asked (itself clamped to
/// [`duration::CEILING`]) and [`exceeds_max`](RequestedWait::exceeds_max) is true, so a
/// layer can fail fast with the wait attached instead of sleeping for a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestedWait {
    /// What to wait: `min(requested, max)`.
    pub delay: Duration,
    /// What the provider asked for.
    pub requested: Duration,
    /// Which header or field said so.
    pub source: WaitSource,
}

impl RequestedWait {
    /// A wait of `requested` from `source`, clamped to `max`. Zero waits give `None`: a
    /// provider that says "0" has not asked for a wait, and the caller's own backoff
    /// applies (as in the official SDKs).
    pub fn new(requested: Duration, source: WaitSource, max: Duration) -> Option<Self> {
        if requested.is_zero() {
            return None;
        }
        let requested = requested.min(duration::CEILING);
        Some(RequestedWait {
            delay: requested.min(max),
            requested,
            source,
        })
    }

    /// Whether the provider asked for longer than the configured maximum.
    pub fn exceeds_max(&self) -> bool {
        self.requested > self.delay
    }

    /// The wait asked for by the response headers, in the order the official SDKs read
    /// them: `retry-after-ms`, `Retry-After` (seconds, then HTTP-date measured from the
    /// response's `Date` header or, without one, from `now`), `x-ms-retry-after-ms`,
    /// `x-amz-retry-after`, then an IETF `RateLimit` field with nothing remaining.
    /// Unparseable values are skipped, so a garbage `retry-after-ms` falls through to a
    /// good `Retry-After`.
    pub fn from_headers(headers: &HeaderMap, max: Duration, now: SystemTime) -> Option<Self> {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let found = get("retry-after-ms")
            .and_then(|v| duration::number(v, 1e-3))
            .map(|d| (d, WaitSource::RetryAfterMs))
            .or_else(|| {
                let v = get("retry-after")?;
                if let Some(d) = duration::number(v, 1.0) {
                    return Some((d, WaitSource::RetryAfter));
                }
                let at = duration::http_date(v)?;
                let d = duration::until(at, response_clock(headers, now)).unwrap_or_default();
                Some((d, WaitSource::RetryAfterDate))
            })
            .or_else(|| {
                get("x-ms-retry-after-ms")
                    .and_then(|v| duration::number(v, 1e-3))
                    .map(|d| (d, WaitSource::MsRetryAfterMs))
            })
            .or_else(|| {
                get("x-amz-retry-after")
                    .and_then(|v| duration::number(v, 1e-3))
                    .map(|d| (d, WaitSource::AmzRetryAfter))
            })
            .or_else(|| {
                let rl = IetfRateLimit::parse(get("ratelimit")?)?;
                (rl.remaining == 0).then_some((rl.reset?, WaitSource::RateLimitField))
            });
        let (d, source) = found?;
        RequestedWait::new(d, source, max)
    }
}

/// The clock to measure a response's absolute times against: its own `Date` header when
/// it has a valid one (so provider-side timestamps compare with the provider's clock, not
/// a skewed local one), else `now`.
pub fn response_clock(headers: &HeaderMap, now: SystemTime) -> SystemTime {
    response_clock_with(headers, || now)
}

/// [`response_clock`], reading `now` only without a valid `Date` header.
fn response_clock_with(headers: &HeaderMap, now: impl FnOnce() -> SystemTime) -> SystemTime {
    headers
        .get(http::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(duration::http_date)
        .unwrap_or_else(now)
}

/// One rate-limit bucket as a provider's headers describe it. Every field is optional:
/// providers send some, none, or (Azure) `-1` for "unknown", which reads as `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Bucket {
    /// The bucket's size.
    pub limit: Option<u64>,
    /// What is left in it.
    pub remaining: Option<u64>,
    /// Time until it is full again (not the wait before the next request: a bucket with
    /// something remaining admits a request now).
    pub reset: Option<Duration>,
}

impl Bucket {
    /// Whether the headers say this bucket is empty.
    pub fn is_exhausted(&self) -> bool {
        self.remaining == Some(0)
    }

    fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.reset.is_none()
    }
}

/// Rate-limit state from a response's headers: OpenAI and Azure `x-ratelimit-*`,
/// Anthropic `anthropic-ratelimit-*`, and the IETF `RateLimit` / `RateLimit-Policy` fields.
///
/// Reading it is cheap and allocates nothing, so layers that need it on success responses
/// call [`RateLimitInfo::from_headers`] themselves; on error responses the
/// [`Classification`](crate::Classification) carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct RateLimitInfo {
    /// Requests (`x-ratelimit-*-requests`, `anthropic-ratelimit-requests-*`).
    pub requests: Bucket,
    /// Tokens (`x-ratelimit-*-tokens`, `anthropic-ratelimit-tokens-*`: the most restrictive
    /// token limit in effect).
    pub tokens: Bucket,
    /// Anthropic input tokens (`anthropic-ratelimit-input-tokens-*`).
    pub input_tokens: Bucket,
    /// Anthropic output tokens (`anthropic-ratelimit-output-tokens-*`).
    pub output_tokens: Bucket,
    /// The IETF `RateLimit` field's first policy (`r` remaining, `t` reset, and `q` from a
    /// matching `RateLimit-Policy` as the limit).
    pub policy: Bucket,
}

impl RateLimitInfo {
    /// Reads every rate-limit header it knows. Resets given as timestamps (Anthropic) are
    /// measured from the response's `Date` header, or from `now` without one.
    ///
    /// One pass over the headers with a prefix test per name, and no allocation: cheap
    /// enough to call on every success response (a response with no rate-limit header
    /// costs one short loop).
    pub fn from_headers(headers: &HeaderMap, now: SystemTime) -> Self {
        RateLimitInfo::from_headers_with(headers, || now)
    }

    /// [`from_headers`](Self::from_headers), reading the clock (`now`) only when a reset
    /// given as a timestamp is measured and the response has no valid `Date` header: most
    /// responses need no clock, and a layer that reads every success saves the read.
    pub fn from_headers_with(headers: &HeaderMap, now: impl FnOnce() -> SystemTime) -> Self {
        // OpenAI/Azure buckets, Anthropic buckets (requests, tokens, input, output), with
        // Anthropic resets kept as text until the clock is known.
        let mut openai = [Bucket::default(); 2];
        let mut anthropic = [Bucket::default(); 4];
        let mut anthropic_reset: [Option<&str>; 4] = [None; 4];
        let mut ietf = None;
        let mut ietf_policy = None;
        // Whether any header of the four families was read: most responses of most
        // providers carry none, and then the answer is the empty one, built at once.
        let mut seen = false;
        for (name, value) in headers {
            let name = name.as_str();
            let first = name.as_bytes().first().copied();
            if first != Some(b'x') && first != Some(b'a') && first != Some(b'r') {
                continue;
            }
            let Ok(v) = value.to_str() else { continue };
            if let Some(rest) = name.strip_prefix("x-ratelimit-") {
                seen = true;
                let (field, which) = match rest.rsplit_once('-') {
                    Some((f, "requests")) => (f, 0),
                    Some((f, "tokens")) => (f, 1),
                    _ => continue,
                };
                let b = &mut openai[which];
                match field {
                    "limit" => b.limit = parse_count(v),
                    "remaining" => b.remaining = parse_count(v),
                    "reset" => b.reset = duration::go_duration(v),
                    _ => {}
                }
            } else if let Some(rest) = name.strip_prefix("anthropic-ratelimit-") {
                seen = true;
                let Some((what, field)) = rest.rsplit_once('-') else {
                    continue;
                };
                let which = match what {
                    "requests" => 0,
                    "tokens" => 1,
                    "input-tokens" => 2,
                    "output-tokens" => 3,
                    _ => continue,
                };
                match field {
                    "limit" => anthropic[which].limit = parse_count(v),
                    "remaining" => anthropic[which].remaining = parse_count(v),
                    "reset" => anthropic_reset[which] = Some(v),
                    _ => {}
                }
            } else if name == "ratelimit" {
                seen = true;
                ietf = Some(v);
            } else if name == "ratelimit-policy" {
                seen = true;
                ietf_policy = Some(v);
            }
        }
        if !seen {
            return RateLimitInfo::default();
        }
        if anthropic_reset.iter().any(Option::is_some) {
            let clock = response_clock_with(headers, now);
            for (b, r) in anthropic.iter_mut().zip(anthropic_reset) {
                b.reset = r
                    .and_then(duration::rfc3339)
                    .map(|t| duration::until(t, clock).unwrap_or(Duration::ZERO));
            }
        }
        let pick = |o: Bucket, a: Bucket| if o.is_empty() { a } else { o };
        let mut info = RateLimitInfo {
            requests: pick(openai[0], anthropic[0]),
            tokens: pick(openai[1], anthropic[1]),
            input_tokens: anthropic[2],
            output_tokens: anthropic[3],
            policy: Bucket::default(),
        };
        if let Some(rl) = ietf.and_then(IetfRateLimit::parse) {
            info.policy = Bucket {
                limit: ietf_policy.and_then(|p| policy_quota(p, rl.name)),
                remaining: Some(rl.remaining),
                reset: rl.reset,
            };
        }
        info
    }

    /// Whether no rate-limit header was found.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
            && self.tokens.is_empty()
            && self.input_tokens.is_empty()
            && self.output_tokens.is_empty()
            && self.policy.is_empty()
    }

    /// If some bucket is empty, the longest reset among the empty buckets: the time until
    /// every exhausted limit has room again. `None` when nothing is exhausted, or when an
    /// exhausted bucket gives no reset.
    pub fn exhausted_for(&self) -> Option<Duration> {
        [
            self.requests,
            self.tokens,
            self.input_tokens,
            self.output_tokens,
            self.policy,
        ]
        .iter()
        .filter(|b| b.is_exhausted())
        .filter_map(|b| b.reset)
        .max()
    }
}

/// A header count: a non-negative integer (Azure's `-1` and anything else give `None`).
fn parse_count(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.len() > 20 {
        return None;
    }
    s.parse().ok()
}

/// The first item of an IETF `RateLimit` field: `"default";r=50;t=30`.
struct IetfRateLimit<'a> {
    name: &'a str,
    remaining: u64,
    reset: Option<Duration>,
}

impl<'a> IetfRateLimit<'a> {
    /// Parses the Structured-Field list leniently but safely: the item with the fewest
    /// remaining units wins (the most restrictive policy). A field that does not parse is
    /// ignored whole, as RFC 9651 asks.
    fn parse(field: &'a str) -> Option<Self> {
        if field.len() > 4096 {
            return None;
        }
        let mut best: Option<IetfRateLimit<'a>> = None;
        for item in field.split(',') {
            let mut parts = item.trim().split(';');
            let name = parts.next()?.trim();
            let name = name.strip_prefix('"')?.strip_suffix('"')?;
            let mut remaining = None;
            let mut reset = None;
            for p in parts {
                let (k, v) = p.trim().split_once('=')?;
                match k {
                    "r" => remaining = Some(parse_sf_integer(v)?),
                    "t" => {
                        reset =
                            Some(Duration::from_secs(parse_sf_integer(v)?).min(duration::CEILING))
                    }
                    _ => {}
                }
            }
            let cand = IetfRateLimit {
                name,
                remaining: remaining?,
                reset,
            };
            if best.as_ref().is_none_or(|b| cand.remaining < b.remaining) {
                best = Some(cand);
            }
        }
        best
    }
}

fn parse_sf_integer(v: &str) -> Option<u64> {
    // RFC 9651 Integers have at most 15 digits.
    if v.is_empty() || v.len() > 15 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

fn policy_quota(field: &str, name: &str) -> Option<u64> {
    if field.len() > 4096 {
        return None;
    }
    field.split(',').find_map(|item| {
        let mut parts = item.trim().split(';');
        let n = parts.next()?.trim().strip_prefix('"')?.strip_suffix('"')?;
        if n != name {
            return None;
        }
        parts.find_map(|p| {
            let (k, v) = p.trim().split_once('=')?;
            (k == "q").then(|| parse_sf_integer(v)).flatten()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }
    const MAX: Duration = Duration::from_secs(120);

    fn wait(pairs: &[(&str, &str)]) -> Option<RequestedWait> {
        RequestedWait::from_headers(&headers(pairs), MAX, SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn retry_after_forms() {
        let w = wait(&[("retry-after", "56")]).unwrap();
        assert_eq!(
            (w.delay, w.source),
            (Duration::from_secs(56), WaitSource::RetryAfter)
        );
        let w = wait(&[("retry-after-ms", "2000"), ("retry-after", "9")]).unwrap();
        assert_eq!(
            (w.delay, w.source),
            (Duration::from_secs(2), WaitSource::RetryAfterMs)
        );
        let w = wait(&[("retry-after-ms", "soon"), ("retry-after", "9")]).unwrap();
        assert_eq!(w.delay, Duration::from_secs(9), "garbage falls through");
        let w = wait(&[("retry-after", "1.5")]).unwrap();
        assert_eq!(w.delay, Duration::from_millis(1500));
        let w = wait(&[
            ("retry-after", "Tue, 26 Mar 2024 20:00:30 GMT"),
            ("date", "Tue, 26 Mar 2024 20:00:00 GMT"),
        ])
        .unwrap();
        assert_eq!(
            (w.delay, w.source),
            (Duration::from_secs(30), WaitSource::RetryAfterDate)
        );
        assert!(
            wait(&[
                ("retry-after", "Tue, 26 Mar 2024 19:00:00 GMT"),
                ("date", "Tue, 26 Mar 2024 20:00:00 GMT"),
            ])
            .is_none(),
            "a past date asks for no wait"
        );
        let w = wait(&[("x-ms-retry-after-ms", "250")]).unwrap();
        assert_eq!(w.source, WaitSource::MsRetryAfterMs);
        let w = wait(&[("x-amz-retry-after", "1500")]).unwrap();
        assert_eq!(w.delay, Duration::from_millis(1500));
        let w = wait(&[("ratelimit", "\"default\";r=0;t=30")]).unwrap();
        assert_eq!(
            (w.delay, w.source),
            (Duration::from_secs(30), WaitSource::RateLimitField)
        );
        assert!(wait(&[("ratelimit", "\"default\";r=5;t=30")]).is_none());
    }

    #[test]
    fn hostile_values_are_clamped_or_ignored() {
        for v in ["0", "-10", "NaN", "", "abc", "1;drop table", "--1"] {
            assert!(wait(&[("retry-after", v)]).is_none(), "{v:?}");
        }
        for v in ["inf", "1e300", "99999999999999999999", "86400"] {
            let w = wait(&[("retry-after", v)]).unwrap();
            assert_eq!(w.delay, MAX, "{v:?}");
            assert!(w.exceeds_max(), "{v:?}");
        }
        let w = wait(&[("retry-after", "120")]).unwrap();
        assert!(!w.exceeds_max());
    }

    #[test]
    fn openai_headers() {
        let h = headers(&[
            ("x-ratelimit-limit-requests", "5000"),
            ("x-ratelimit-limit-tokens", "160000"),
            ("x-ratelimit-remaining-requests", "4999"),
            ("x-ratelimit-remaining-tokens", "159976"),
            ("x-ratelimit-reset-requests", "12ms"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        let info = RateLimitInfo::from_headers(&h, SystemTime::UNIX_EPOCH);
        assert_eq!(
            info.requests,
            Bucket {
                limit: Some(5000),
                remaining: Some(4999),
                reset: Some(Duration::from_millis(12))
            }
        );
        assert_eq!(info.tokens.reset, Some(Duration::from_secs(360)));
        assert_eq!(info.exhausted_for(), None);
        let h = headers(&[
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "2m59.56s"),
        ]);
        let info = RateLimitInfo::from_headers(&h, SystemTime::UNIX_EPOCH);
        assert_eq!(info.exhausted_for(), Some(Duration::from_millis(179_560)));
    }

    #[test]
    fn headers_of_no_family_read_as_nothing() {
        for h in [
            headers(&[]),
            headers(&[
                ("x-request-id", "req_1"),
                ("anthropic-organization-id", "org"),
                ("retry-after", "3"),
                ("ratelimitx", "r=0;t=3"),
            ]),
        ] {
            let info = RateLimitInfo::from_headers(&h, SystemTime::UNIX_EPOCH);
            assert_eq!(info, RateLimitInfo::default());
            assert!(info.is_empty());
        }
        // A policy alone names no bucket either.
        let h = headers(&[("ratelimit-policy", "\"default\";q=100;w=60")]);
        assert_eq!(
            RateLimitInfo::from_headers(&h, SystemTime::UNIX_EPOCH),
            RateLimitInfo::default()
        );
    }

    #[test]
    fn azure_unknowns() {
        let h = headers(&[
            ("x-ratelimit-limit-tokens", "-1"),
            ("x-ratelimit-remaining-tokens", "-1"),
            ("x-ratelimit-reset-tokens", "0"),
            ("x-ratelimit-reset-requests", "10"),
        ]);
        let info = RateLimitInfo::from_headers(&h, SystemTime::UNIX_EPOCH);
        assert_eq!(info.tokens.limit, None);
        assert_eq!(info.tokens.remaining, None);
        assert_eq!(info.requests.reset, Some(Duration::from_secs(10)));
    }

    #[test]
    fn anthropic_headers_measured_from_date() {
        let h = headers(&[
            ("anthropic-ratelimit-requests-limit", "5"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2024-03-26T20:00:00Z"),
            ("anthropic-ratelimit-tokens-limit", "25000"),
            ("anthropic-ratelimit-tokens-remaining", "16000"),
            ("anthropic-ratelimit-tokens-reset", "2024-03-26T20:00:00Z"),
            ("date", "Tue, 26 Mar 2024 19:59:59 GMT"),
            ("x-should-retry", "true"),
        ]);
        let info = RateLimitInfo::from_headers(&h, SystemTime::UNIX_EPOCH);
        assert_eq!(info.requests.remaining, Some(0));
        assert_eq!(info.requests.reset, Some(Duration::from_secs(1)));
        assert_eq!(info.tokens.limit, Some(25000));
        assert_eq!(info.exhausted_for(), Some(Duration::from_secs(1)));
        assert!(!info.is_empty());
        assert!(RateLimitInfo::from_headers(&HeaderMap::new(), SystemTime::UNIX_EPOCH).is_empty());
    }

    #[test]
    fn the_clock_is_read_only_for_a_timestamp_without_a_date() {
        let reads = std::cell::Cell::new(0);
        let clock = || {
            reads.set(reads.get() + 1);
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_711_483_199)
        };
        let openai = headers(&[("x-ratelimit-remaining-tokens", "0")]);
        let dated = headers(&[
            ("anthropic-ratelimit-requests-reset", "2024-03-26T20:00:00Z"),
            ("date", "Tue, 26 Mar 2024 19:59:58 GMT"),
        ]);
        let undated = headers(&[("anthropic-ratelimit-requests-reset", "2024-03-26T20:00:00Z")]);
        for (h, n) in [(HeaderMap::new(), 0), (openai, 0), (dated, 0), (undated, 1)] {
            reads.set(0);
            let lazy = RateLimitInfo::from_headers_with(&h, clock);
            assert_eq!(reads.get(), n);
            assert_eq!(lazy, RateLimitInfo::from_headers(&h, clock()));
        }
    }

    #[test]
    fn ietf_fields() {
        let h = headers(&[
            (
                "ratelimit-policy",
                "\"permin\";q=50;w=60,\"perhr\";q=1000;w=3600",
            ),
            ("ratelimit", "\"permin\";r=3;t=20,\"perhr\";r=900;t=3000"),
        ]);
        let info = RateLimitInfo::from_headers(&h, SystemTime::UNIX_EPOCH);
        assert_eq!(
            info.policy,
            Bucket {
                limit: Some(50),
                remaining: Some(3),
                reset: Some(Duration::from_secs(20))
            }
        );
        let h = headers(&[("ratelimit", "\"d\";r=0;t=999999999999999")]);
        assert_eq!(
            RateLimitInfo::from_headers(&h, SystemTime::UNIX_EPOCH).exhausted_for(),
            Some(duration::CEILING)
        );
        let h = headers(&[("ratelimit", "default;r=0;t=30")]);
        assert!(
            RateLimitInfo::from_headers(&h, SystemTime::UNIX_EPOCH)
                .policy
                .is_empty(),
            "unquoted name: ignored whole"
        );
    }
}
