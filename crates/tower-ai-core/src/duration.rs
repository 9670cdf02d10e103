//! Parsers for the duration and time formats providers put in headers and bodies.
//!
//! Every function takes untrusted text, never panics, and returns `None` for anything it
//! does not understand. Durations saturate at [`CEILING`], so a value of `1e300` seconds
//! comes back as "very long" (which callers compare against their own maximum) instead of
//! overflowing an `Instant`.

use std::time::{Duration, SystemTime};

/// The largest duration any parser here returns: 366 days. Longer values are clamped to it.
pub const CEILING: Duration = Duration::from_secs(366 * 24 * 3600);

/// Seconds (or any unit, given `scale` = seconds per unit) as a decimal number, integer or
/// fractional (`"56"`, `"6.596"`, `"1e3"`). Negative and NaN values give `None`; infinite
/// and huge values give [`CEILING`].
pub fn number(s: &str, seconds_per_unit: f64) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() || s.len() > 64 {
        // 64 characters is far past any real value; refuse to spend time on more.
        return None;
    }
    let v: f64 = s.parse().ok()?;
    secs_f64(v * seconds_per_unit)
}

/// A non-negative number of seconds as a `Duration`, clamped to [`CEILING`].
pub fn secs_f64(v: f64) -> Option<Duration> {
    if v.is_nan() || v < 0.0 {
        return None;
    }
    if v >= CEILING.as_secs_f64() {
        return Some(CEILING);
    }
    Duration::try_from_secs_f64(v).ok()
}

/// A Go `time.Duration` string as OpenAI sends in `x-ratelimit-reset-*`: a sequence of
/// `<decimal><unit>` with units `h`, `m`, `s`, `ms`, `us`/`µs`/`μs`, `ns` (`"1s"`, `"6m0s"`,
/// `"12ms"`, `"2m59.56s"`). A plain number (Azure sends `"10"`) is read as seconds.
pub fn go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() || s.len() > 64 {
        return None;
    }
    if let Some(d) = number(s, 1.0) {
        return Some(d);
    }
    let b = s.as_bytes();
    let mut i = 0;
    let mut total = 0f64;
    while i < b.len() {
        let start = i;
        while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
            i += 1;
        }
        if start == i {
            return None;
        }
        let n: f64 = s[start..i].parse().ok()?;
        let ustart = i;
        while i < b.len() && !(b[i].is_ascii_digit() || b[i] == b'.') {
            i += 1;
        }
        let scale = match &s[ustart..i] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * scale;
    }
    secs_f64(total)
}

/// A protobuf `Duration` in its JSON form, as in Gemini's `RetryInfo.retryDelay`: decimal
/// seconds followed by `s` (`"26s"`, `"38.601s"`, `"45.837906927s"`).
pub fn protobuf_duration(s: &str) -> Option<Duration> {
    number(s.trim().strip_suffix('s')?, 1.0)
}

/// An HTTP-date (IMF-fixdate, RFC 850 or asctime), as in `Retry-After`.
pub fn http_date(s: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(s.trim()).ok()
}

/// An RFC 3339 timestamp, as in `anthropic-ratelimit-*-reset` (`"2024-03-26T20:00:00Z"`).
/// Numeric offsets (`+01:00`) are accepted besides `Z`.
pub fn rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if s.len() < 20 || s.len() > 40 || !s.is_ascii() {
        return None;
    }
    // humantime reads UTC (`Z`) timestamps; apply a numeric offset ourselves.
    let (base, offset_secs): (&str, i64) = if s.ends_with('Z') || s.ends_with('z') {
        (s, 0)
    } else {
        let (head, tail) = s.split_at(s.len() - 6);
        let sign = match tail.as_bytes()[0] {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let hh: i64 = tail.get(1..3)?.parse().ok()?;
        let mm: i64 = tail.get(4..6)?.parse().ok()?;
        if tail.as_bytes()[3] != b':' || hh > 23 || mm > 59 {
            return None;
        }
        // Re-join as a UTC timestamp string without allocating: humantime needs the `Z`.
        return humantime_utc(head).and_then(|t| shift(t, -sign * (hh * 3600 + mm * 60)));
    };
    let t = humantime::parse_rfc3339_weak(base).ok()?;
    shift(t, offset_secs)
}

fn humantime_utc(head: &str) -> Option<SystemTime> {
    let mut buf = [0u8; 40];
    let n = head.len();
    buf.get_mut(..n)?.copy_from_slice(head.as_bytes());
    *buf.get_mut(n)? = b'Z';
    let s = std::str::from_utf8(&buf[..=n]).ok()?;
    humantime::parse_rfc3339_weak(s).ok()
}

fn shift(t: SystemTime, secs: i64) -> Option<SystemTime> {
    if secs >= 0 {
        t.checked_add(Duration::from_secs(secs as u64))
    } else {
        t.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    }
}

/// How long from `now` until `t`: `None` if `t` is not after `now`.
pub fn until(t: SystemTime, now: SystemTime) -> Option<Duration> {
    match t.duration_since(now) {
        Ok(d) if !d.is_zero() => Some(d.min(CEILING)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(go_duration("12ms"), Some(Duration::from_millis(12)));
        assert_eq!(go_duration("9ms"), Some(Duration::from_millis(9)));
        assert_eq!(
            go_duration("2m59.56s"),
            Some(Duration::from_millis(179_560))
        );
        assert_eq!(go_duration("7.66s"), Some(Duration::from_millis(7660)));
        assert_eq!(go_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(go_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(
            go_duration("10"),
            Some(Duration::from_secs(10)),
            "Azure's plain seconds"
        );
        assert_eq!(go_duration("0"), Some(Duration::ZERO));
        assert_eq!(go_duration("-1"), None);
        assert_eq!(go_duration("-1s"), None);
        assert_eq!(go_duration("5x"), None);
        assert_eq!(go_duration("s"), None);
        assert_eq!(go_duration(""), None);
        assert_eq!(go_duration("99999999999h"), Some(CEILING));
    }

    #[test]
    fn numbers() {
        assert_eq!(number("56", 1.0), Some(Duration::from_secs(56)));
        assert_eq!(number("2000", 1e-3), Some(Duration::from_secs(2)));
        assert_eq!(number("6.596", 1.0), Some(Duration::from_millis(6596)));
        assert_eq!(number("NaN", 1.0), None);
        assert_eq!(number("-10", 1.0), None);
        assert_eq!(number("inf", 1.0), Some(CEILING));
        assert_eq!(number("1e400", 1.0), Some(CEILING));
        assert_eq!(number("abc", 1.0), None);
    }

    #[test]
    fn protobuf() {
        assert_eq!(protobuf_duration("26s"), Some(Duration::from_secs(26)));
        assert_eq!(
            protobuf_duration("38.601s"),
            Some(Duration::from_millis(38_601))
        );
        assert_eq!(
            protobuf_duration("45.837906927s"),
            Some(Duration::new(45, 837_906_927))
        );
        assert_eq!(protobuf_duration("26"), None);
    }

    #[test]
    fn dates() {
        let t = rfc3339("2024-03-26T20:00:00Z").unwrap();
        let d = http_date("Tue, 26 Mar 2024 19:59:59 GMT").unwrap();
        assert_eq!(until(t, d), Some(Duration::from_secs(1)));
        assert_eq!(until(d, t), None);
        let plus = rfc3339("2024-03-26T21:00:00+01:00").unwrap();
        assert_eq!(plus, t);
        let frac = rfc3339("2024-03-26T20:00:00.500Z").unwrap();
        assert_eq!(frac.duration_since(t).unwrap(), Duration::from_millis(500));
        assert!(rfc3339("2026").is_none());
        assert!(rfc3339("2024-13-40T99:00:00Z").is_none());
        assert!(rfc3339("2024-03-26T20:00:00+0x:00").is_none());
        assert!(
            http_date("Sunday, 06-Nov-94 08:49:37 GMT").is_some(),
            "RFC 850"
        );
        assert!(http_date("Sun Nov  6 08:49:37 1994").is_some(), "asctime");
        assert!(http_date("soon").is_none());
    }
}
