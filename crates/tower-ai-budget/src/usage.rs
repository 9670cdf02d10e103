//! Reading a JSON response's usage without building a JSON value (no allocation).
//!
//! [`scan`] walks the top-level object once, skipping every value but `usage` /
//! `usageMetadata`, and reads their integer fields with the rules of
//! [`Usage::from_value`]. When it cannot decide (no usage found, an unexpected shape), the
//! caller falls back to [`Usage::from_json`], so the result never differs from it on a
//! well-formed body.

use tower_ai_core::Usage;

fn ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
        i += 1;
    }
    i
}

/// `b[i]` is `"`: the index after the closing quote.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        match b.get(j)? {
            b'"' => return Some(j + 1),
            b'\\' => j += 2,
            _ => j += 1,
        }
    }
}

/// The index after the value starting at `b[i]`.
fn skip(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while !matches!(
                b.get(j),
                None | Some(b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t')
            ) {
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// Calls `f(key, value)` for each member of the object starting at `b[i]`; returns the
/// index after it.
fn members<'a>(b: &'a [u8], i: usize, mut f: impl FnMut(&'a [u8], &'a [u8])) -> Option<usize> {
    if b.get(i) != Some(&b'{') {
        return None;
    }
    let mut i = ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return Some(i + 1);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let k_end = string_end(b, i)?;
        let key = &b[i + 1..k_end - 1];
        i = ws(b, k_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = ws(b, i + 1);
        let v_end = skip(b, i)?;
        f(key, &b[i..v_end]);
        i = ws(b, v_end);
        match b.get(i)? {
            b',' => i = ws(b, i + 1),
            b'}' => return Some(i + 1),
            _ => return None,
        }
    }
}

fn int(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// The usage of a JSON response body, or `None` when the scan cannot tell (use
/// [`Usage::from_json`] then).
pub(crate) fn scan(body: &[u8]) -> Option<Usage> {
    let start = ws(body, 0);
    let (mut usage, mut meta) = (None, None);
    let end = members(body, start, |k, v| match k {
        b"usage" => usage = Some(v),
        b"usageMetadata" => meta = Some(v),
        _ => {}
    })?;
    if ws(body, end) != body.len() {
        return None;
    }
    if let Some(u) = usage.filter(|u| u.first() == Some(&b'{')) {
        let mut f = [None::<u64>; 6];
        const NAMES: [&[u8]; 6] = [
            b"prompt_tokens",
            b"completion_tokens",
            b"input_tokens",
            b"cache_creation_input_tokens",
            b"cache_read_input_tokens",
            b"output_tokens",
        ];
        members(u, 0, |k, v| {
            if let Some(i) = NAMES.iter().position(|n| *n == k) {
                f[i] = int(v);
            }
        })?;
        if let Some(p) = f[0] {
            return Some(Usage {
                input_tokens: p,
                output_tokens: f[1].unwrap_or(0),
            });
        }
        let input = f[2..5]
            .iter()
            .flatten()
            .fold(0u64, |a, b| a.saturating_add(*b));
        return (input > 0 || f[5].is_some()).then_some(Usage {
            input_tokens: input,
            output_tokens: f[5].unwrap_or(0),
        });
    }
    if usage.is_some() {
        return None; // `"usage": null` and the like: let serde decide.
    }
    let m = meta?;
    let mut f = [None::<u64>; 3];
    const NAMES: [&[u8]; 3] = [
        b"promptTokenCount",
        b"candidatesTokenCount",
        b"thoughtsTokenCount",
    ];
    members(m, 0, |k, v| {
        if let Some(i) = NAMES.iter().position(|n| *n == k) {
            f[i] = int(v);
        }
    })?;
    Some(Usage {
        input_tokens: f[0].unwrap_or(0),
        output_tokens: f[1].unwrap_or(0).saturating_add(f[2].unwrap_or(0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_core_on_every_dialect() {
        let cases: [&[u8]; 12] = [
            br#"{"id":"c","choices":[{"message":{"content":"a \"usage\": {}"}}],"usage":{"prompt_tokens":14,"completion_tokens":30,"total_tokens":44}}"#,
            br#"{"type":"message","content":[{"type":"text","text":"}{"}],"usage":{"input_tokens":25,"cache_read_input_tokens":100,"output_tokens":15}}"#,
            br#"{"usage":{"input_tokens":5,"output_tokens":7,"total_tokens":12,"output_tokens_details":{"reasoning_tokens":3}}}"#,
            br#" {"candidates":[{"content":{"parts":[{"text":"x"}]}}],"usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":49,"thoughtsTokenCount":3,"totalTokenCount":62}} "#,
            br#"{"usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":4},"usage":{"prompt_tokens":1}}"#,
            br#"{"usage":{"prompt_tokens":"many"}}"#,
            br#"{"usage":{"prompt_tokens":1.5,"completion_tokens":2}}"#,
            br#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":99999999999999999999}}"#,
            br#"{"usage":{}}"#,
            br#"{"choices":[]}"#,
            br#"{"usage":{"prompt_tokens":3}"#,
            b"{}",
        ];
        for body in cases {
            let core = Usage::from_json(body);
            let scanned = scan(body).or_else(|| Usage::from_json(body));
            assert_eq!(scanned, core, "{}", String::from_utf8_lossy(body));
        }
        assert!(scan(cases[0]).is_some() && scan(cases[3]).is_some());
        assert_eq!(scan(b"[1]"), None);
        assert_eq!(scan(b"{\"usage\":{\"prompt_tokens\":3}} trailing"), None);
    }
}
