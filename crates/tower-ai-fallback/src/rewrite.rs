//! Rewriting a JSON request body's top-level `model` value, every other byte kept.

use bytes::{BufMut, Bytes, BytesMut};

use tower_ai_core::top_level_value_span;

/// `model` as a JSON string literal (quotes and escapes), ready to splice into a body.
pub(crate) fn json_string(model: &str) -> Bytes {
    // Serialising a &str to JSON cannot fail.
    Bytes::from(serde_json::to_vec(model).unwrap_or_default())
}

/// `body` with its top-level `"model"` value replaced by `quoted` (a JSON string literal,
/// see [`json_string`]): prefix + `quoted` + suffix, one allocation. `None` when the body
/// has no top-level `model` string.
pub(crate) fn replace_model(body: &[u8], quoted: &[u8]) -> Option<Bytes> {
    let span = top_level_value_span(body, b"model")?;
    let mut out = BytesMut::with_capacity(body.len() - span.len() + quoted.len());
    out.put_slice(&body[..span.start]);
    out.put_slice(quoted);
    out.put_slice(&body[span.end..]);
    Some(out.freeze())
}

/// Rewrites the top-level `"model"` value of a JSON body to `model`; every other byte is
/// kept as it was (whitespace, key order, number formats, unknown fields). `None` when the
/// body has no top-level `model` string.
///
/// ```
/// use tower_ai_fallback::rewrite_model;
/// let body = br#"{"model":"gpt-4o", "messages":[{"role":"user","content":"model"}]}"#;
/// let out = rewrite_model(body, "gpt-4o-mini").unwrap();
/// assert_eq!(&out[..], &br#"{"model":"gpt-4o-mini", "messages":[{"role":"user","content":"model"}]}"#[..]);
/// ```
pub fn rewrite_model(body: &[u8], model: &str) -> Option<Bytes> {
    replace_model(body, &json_string(model))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(body: &str, model: &str) -> Option<String> {
        rewrite_model(body.as_bytes(), model).map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn only_the_top_level_model_value_changes() {
        let body = r#"{ "messages": [{"role":"user","content":"{\"model\":\"x\"}"}],
            "meta": {"model": "nested"}, "model" :  "gpt-4o" , "temperature": 0.70}"#;
        let out = rw(body, "gpt-4o-mini").unwrap();
        assert_eq!(out, body.replace(r#""gpt-4o""#, r#""gpt-4o-mini""#));
        // Reparse: same value except the model.
        let a: serde_json::Value = serde_json::from_str(body).unwrap();
        let mut b: serde_json::Value = serde_json::from_str(&out).unwrap();
        b["model"] = a["model"].clone();
        assert_eq!(a, b);
    }

    #[test]
    fn escapes_in_both_directions() {
        assert_eq!(
            rw(r#"{"model":"a\"b","x":1}"#, r#"new"quoted\"#).unwrap(),
            r#"{"model":"new\"quoted\\","x":1}"#
        );
    }

    #[test]
    fn missing_or_odd_model() {
        assert_eq!(rw(r#"{"messages":[]}"#, "m"), None);
        assert_eq!(rw(r#"{"model":42}"#, "m"), None);
        assert_eq!(rw(r#"["model","x"]"#, "m"), None);
        assert_eq!(rw("not json", "m"), None);
        assert_eq!(rw(r#"{"model":"unterminated"#, "m"), None);
        assert_eq!(rw(r#"{"a":{"b":]]]}, "model":"x"}"#, "m"), None);
        assert_eq!(rw("", "m"), None);
        // The first top-level occurrence wins, as in core's `top_level_string`.
        assert_eq!(
            rw(r#"{"model":"a","model":"b"}"#, "m").unwrap(),
            r#"{"model":"m","model":"b"}"#
        );
    }

    #[test]
    fn never_panics_on_garbage() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..200 {
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let alphabet = b"{}[]\":,\\ model\"xa1";
                v.push(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            let _ = rewrite_model(&v, "m");
        }
    }
}
