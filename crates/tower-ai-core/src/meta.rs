//! What a request asks for ([`RequestMeta`]) and what a response used ([`Usage`]).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::body::ReplayBody;
use crate::facts::Facts;
use crate::swar::{self, splat, zero_bytes, TOPS};

/// What a request asks for, read once from its JSON body (and, for Gemini and Azure, its
/// path) and kept in the request's extensions, so every layer reads it without parsing.
/// Read it with [`RequestMeta::stored`] (or [`RequestMeta::of`]): on a request that already
/// carries the stack's per-call facts (its [`Deadline`](crate::Deadline), from
/// `DeadlineLayer`), [`RequestMeta::get_or_insert`] keeps it in their slot, not as a
/// `RequestMeta` value of its own (one allocation fewer per call).
///
/// The input-token estimate is deliberately simple and provider-neutral: the UTF-8 bytes
/// of all text in the prompt fields (`messages`, `contents`, `system`,
/// `systemInstruction`, `input`, `instructions`, `prompt`, `tools`), divided by four and
/// rounded up. It errs high for code and non-English text less than a real tokenizer
/// would, and TokenBudget corrects it with the provider's own count after the call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestMeta {
    /// The model: the body's `model`, Gemini's `models/{model}:…` path segment, or Azure's
    /// deployment name.
    pub model: Option<Arc<str>>,
    /// Whether the answer is streamed (`"stream": true`, or Gemini's
    /// `:streamGenerateContent`).
    pub stream: bool,
    /// `max_tokens`, `max_completion_tokens`, `max_output_tokens` or
    /// `generationConfig.maxOutputTokens`.
    pub max_output_tokens: Option<u64>,
    /// Estimated input tokens (see above); at least 1.
    pub input_tokens_estimate: u64,
    /// Whether the body was JSON at all. A body that is not gives a meta from the path only,
    /// with an estimate of its byte length / 4.
    pub json: bool,
}

impl RequestMeta {
    /// The request's meta: from its extensions when a layer already read it, else parsed
    /// now (not stored: use [`RequestMeta::get_or_insert`] for that).
    pub fn of<B: ReplayBody>(req: &http::Request<B>) -> Cow<'_, RequestMeta> {
        match RequestMeta::stored(req) {
            Some(m) => Cow::Borrowed(m),
            None => Cow::Owned(RequestMeta::parse(
                req.uri().path(),
                req.body().bytes().unwrap_or(&[]),
            )),
        }
    }

    /// The request's meta, parsed and stored in its extensions the first time (in the
    /// stack's per-call slot when the request has one: see the type's docs).
    pub fn get_or_insert<B: ReplayBody>(req: &mut http::Request<B>) -> &RequestMeta {
        if RequestMeta::stored(req).is_none() {
            let meta = RequestMeta::parse(req.uri().path(), req.body().bytes().unwrap_or(&[]));
            let ext = req.extensions_mut();
            match ext.get_mut::<Facts>() {
                Some(facts) => facts.meta = Some(meta),
                None => {
                    ext.insert(meta);
                }
            }
        }
        RequestMeta::stored(req).expect("inserted above")
    }

    /// The meta a layer stored on `req` ([`get_or_insert`](RequestMeta::get_or_insert)),
    /// or a `RequestMeta` the caller put into its extensions (that one first), if any.
    /// Never parses.
    #[inline]
    pub fn stored<B>(req: &http::Request<B>) -> Option<&RequestMeta> {
        let ext = req.extensions();
        if let Some(facts) = Facts::alone(ext) {
            return facts.meta.as_ref();
        }
        match ext.get::<RequestMeta>() {
            Some(m) => Some(m),
            None => Facts::of(ext)?.meta.as_ref(),
        }
    }

    /// [`stored`](RequestMeta::stored), to change in place (a layer that rewrites the
    /// request's model updates it).
    pub fn stored_mut<B>(req: &mut http::Request<B>) -> Option<&mut RequestMeta> {
        let ext = req.extensions_mut();
        if ext.get::<RequestMeta>().is_some() {
            return ext.get_mut::<RequestMeta>();
        }
        ext.get_mut::<Facts>()?.meta.as_mut()
    }

    /// Takes the stored meta off `req` (every copy of it: a `RequestMeta` in the
    /// extensions and the one in the per-call slot), for a layer that changed the request
    /// so that it no longer holds. Returns the one [`stored`](RequestMeta::stored) read.
    pub fn remove<B>(req: &mut http::Request<B>) -> Option<RequestMeta> {
        let ext = req.extensions_mut();
        let own = ext.remove::<RequestMeta>();
        let kept = ext.get_mut::<Facts>().and_then(|f| f.meta.take());
        own.or(kept)
    }

    /// Parses a request body, with the request path for Gemini's and Azure's model. Never
    /// fails: see the type's docs for what a non-JSON body gives.
    pub fn parse(path: &str, body: &[u8]) -> RequestMeta {
        // Only Gemini's paths have a `:`, looked for eight bytes a step: a call to a
        // searcher costs more than a whole path.
        let path_stream = swar::contains2(path.as_bytes(), b':', b':')
            && memchr::memmem::find(path.as_bytes(), b":streamGenerateContent").is_some();
        RequestMeta::parse_scan(path, path_stream, body)
            .unwrap_or_else(|| RequestMeta::parse_tree(model_from_path(path), path_stream, body))
    }

    /// [`parse`](RequestMeta::parse) by [`scan_body`]: `None` when the scan leaves the
    /// body to serde.
    #[inline]
    fn parse_scan(path: &str, path_stream: bool, body: &[u8]) -> Option<RequestMeta> {
        let s = scan_body(body)?;
        // The path is read for a model only when the body names none.
        let model = match s.model {
            Some(m) => Some(shared_model(m)?),
            None => model_from_path(path).and_then(|m| shared_model(m.as_bytes())),
        };
        Some(RequestMeta {
            model,
            stream: path_stream || s.stream,
            max_output_tokens: s.max_output_tokens,
            input_tokens_estimate: estimate(s.text),
            json: true,
        })
    }

    /// [`parse`](RequestMeta::parse) by serde: every body the scan leaves undecided (kept
    /// out of line, so the scan's path does not carry its frame).
    #[inline(never)]
    fn parse_tree(path_model: Option<&str>, path_stream: bool, body: &[u8]) -> RequestMeta {
        let Ok(p) = serde_json::from_slice::<Peek<'_>>(body) else {
            return RequestMeta {
                model: path_model.map(Arc::from),
                stream: path_stream,
                max_output_tokens: None,
                input_tokens_estimate: estimate(body.len() as u64),
                json: false,
            };
        };
        let text = [
            &p.messages,
            &p.contents,
            &p.system,
            &p.system_instruction,
            &p.input,
            &p.instructions,
            &p.prompt,
            &p.tools,
        ]
        .iter()
        .map(|t| t.as_ref().map_or(0, |t| t.0))
        .fold(0u64, u64::saturating_add);
        let max_output_tokens = [
            &p.max_tokens,
            &p.max_completion_tokens,
            &p.max_output_tokens,
        ]
        .into_iter()
        .find_map(|v| v.as_ref().and_then(Value::as_u64))
        .or_else(|| {
            p.generation_config
                .as_ref()?
                .get("maxOutputTokens")?
                .as_u64()
        });
        RequestMeta {
            model: p
                .model
                .as_deref()
                .map(Arc::from)
                .or_else(|| path_model.map(Arc::from)),
            stream: path_stream || p.stream.as_ref().and_then(Value::as_bool).unwrap_or(false),
            max_output_tokens,
            input_tokens_estimate: estimate(text),
            json: true,
        }
    }

    /// The model name, if known.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Tokens to reserve before the call: the input estimate plus the maximum output
    /// (saturating; a request with no `max_tokens` reserves `default_output` for output).
    pub fn reserve_tokens(&self, default_output: u64) -> u64 {
        self.input_tokens_estimate
            .saturating_add(self.max_output_tokens.unwrap_or(default_output))
    }
}

/// What [`scan_body`] reads of a request body: the model as the bytes of its string, which
/// the scan checked are UTF-8.
#[derive(Debug, Default, PartialEq, Eq)]
struct Scanned<M> {
    model: Option<M>,
    stream: bool,
    max_output_tokens: Option<u64>,
    /// The summed length of every string value in the prompt fields.
    text: u64,
}

/// The top-level keys [`Peek`] reads, in its order (a bit each, to refuse a repeat as
/// serde does). `generationConfig` is left to serde.
#[cfg_attr(not(test), allow(dead_code))]
const PEEK_KEYS: [&[u8]; 14] = [
    b"model",
    b"stream",
    b"max_tokens",
    b"max_completion_tokens",
    b"max_output_tokens",
    b"generationConfig",
    b"messages",
    b"contents",
    b"system",
    b"systemInstruction",
    b"input",
    b"instructions",
    b"prompt",
    b"tools",
];

/// The index of `key` in [`PEEK_KEYS`]: by its length first, then compared as a whole (a
/// word or two each; a `match` on the bytes would compare them one at a time). A key of
/// eight bytes or more is compared by its first and last eight bytes as two words, and
/// then, only when longer than sixteen, byte by byte.
#[inline]
fn peek_key(k: &[u8]) -> Option<usize> {
    /// The first and last eight bytes of `lit` (at least eight long) as words.
    const fn words(lit: &[u8]) -> (u64, u64) {
        let mut head = [0u8; 8];
        let mut tail = [0u8; 8];
        let mut i = 0;
        while i < 8 {
            head[i] = lit[i];
            tail[i] = lit[lit.len() - 8 + i];
            i += 1;
        }
        (u64::from_le_bytes(head), u64::from_le_bytes(tail))
    }
    let (Some(head), Some(tail)) = (k.first_chunk::<8>(), k.last_chunk::<8>()) else {
        return Some(match k.len() {
            5 if k == b"model" => 0,
            5 if k == b"input" => 10,
            5 if k == b"tools" => 13,
            6 if k == b"stream" => 1,
            6 if k == b"system" => 8,
            6 if k == b"prompt" => 12,
            _ => return None,
        });
    };
    let w = (u64::from_le_bytes(*head), u64::from_le_bytes(*tail));
    Some(match k.len() {
        8 if w == const { words(b"messages") } => 6,
        8 if w == const { words(b"contents") } => 7,
        10 if w == const { words(b"max_tokens") } => 2,
        12 if w == const { words(b"instructions") } => 11,
        16 if w == const { words(b"generationConfig") } => 5,
        17 if k == b"max_output_tokens" => 4,
        17 if k == b"systemInstruction" => 9,
        21 if k == b"max_completion_tokens" => 3,
        _ => return None,
    })
}

/// A model name as the [`RequestMeta`] of many requests shares it: the calling thread keeps
/// the last few names it saw (each at most [`MAX_MODEL_LEN`](crate::keys::MAX_MODEL_LEN)
/// bytes), so a request for one of them costs a comparison and a reference count instead
/// of an allocation. The count is the thread's own copy's: two threads never write one.
/// The name comes as bytes (the scan's, checked already) and is made a `str` only when it
/// is not kept; `None` if it is not UTF-8.
fn shared_model(model: &[u8]) -> Option<Arc<str>> {
    use std::cell::RefCell;
    const KEPT: usize = 4;
    thread_local! {
        static MODELS: RefCell<([Option<Arc<str>>; KEPT], usize)> =
            const { RefCell::new(([const { None }; KEPT], 0)) };
    }
    if model.len() > crate::keys::MAX_MODEL_LEN {
        return std::str::from_utf8(model).ok().map(Arc::from);
    }
    MODELS
        .try_with(|m| {
            let mut m = m.try_borrow_mut().ok()?;
            let (kept, next) = &mut *m;
            if let Some(hit) = kept
                .iter()
                .flatten()
                .find(|k| same_bytes(k.as_bytes(), model))
            {
                return Some(Some(hit.clone()));
            }
            let Ok(model) = std::str::from_utf8(model) else {
                return Some(None);
            };
            let fresh: Arc<str> = Arc::from(model);
            kept[*next % KEPT] = Some(fresh.clone());
            *next = next.wrapping_add(1);
            Some(Some(fresh))
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| std::str::from_utf8(model).ok().map(Arc::from))
}

/// `a == b`, comparing a short name (4 to 16 bytes, as most model names are) as two
/// overlapping words without a call to `memcmp`.
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    match (a.first_chunk::<8>(), b.first_chunk::<8>()) {
        (Some(ah), Some(bh)) if a.len() <= 16 => {
            ah == bh && a.last_chunk::<8>() == b.last_chunk::<8>()
        }
        (None, None) if a.len() >= 4 => {
            a.first_chunk::<4>() == b.first_chunk::<4>()
                && a.last_chunk::<4>() == b.last_chunk::<4>()
        }
        _ => a == b,
    }
}

/// [`RequestMeta::parse`]'s reading of a JSON body by one forward scan, without building a
/// value and without allocating. It answers only for a body in a strict subset of JSON
/// that serde reads the same way: valid UTF-8, no backslash anywhere (so every string's
/// bytes are its text), no control character in a string, numbers without an exponent
/// and of at most 18 digits on each side of the point, at most 64 levels deep, no repeated
/// key that [`Peek`] reads, no `generationConfig`, a non-negative integer or anything but a
/// number for the maximum output. Anything else (including every body serde refuses)
/// is `None`, and serde decides.
fn scan_body(body: &[u8]) -> Option<Scanned<&[u8]>> {
    let b = body;
    let mut out = Scanned::default();
    let mut max: [Option<u64>; 3] = [None; 3];
    let mut seen = 0u32;
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        'members: loop {
            let key_end = match *b.get(i)? {
                b'"' => string_end(b, i + 1)?,
                b' ' | b'\n' | b'\r' | b'\t' => {
                    i += 1;
                    continue;
                }
                _ => return None,
            };
            let field = peek_key(&b[i + 1..key_end]);
            i = skip_ws(b, colon(b, key_end + 1)?);
            if let Some(f) = field {
                let bit = 1u32 << f;
                if seen & bit != 0 {
                    return None;
                }
                seen |= bit;
            }
            match field {
                Some(0) => match b.get(i)? {
                    b'"' => {
                        let end = string_end(b, i + 1)?;
                        out.model = Some(&b[i + 1..end]);
                        i = end + 1;
                    }
                    b'n' => i = literal(b, i, b"null")?,
                    _ => return None,
                },
                Some(f @ 2..=4) if b.get(i)?.is_ascii_digit() => {
                    // An integer when it has no point.
                    (i, max[f - 2]) = number(b, i)?;
                }
                Some(2..=4) if b.get(i)? == &b'-' => return None,
                Some(5) => return None,
                _ => {
                    // Every other value, by one call.
                    let (start, mut text) = (i, 0);
                    i = scan_value(b, i, &mut text)?;
                    match field {
                        Some(1) => out.stream = &b[start..i] == b"true",
                        Some(6..) => out.text = out.text.saturating_add(text),
                        _ => {}
                    }
                }
            }
            loop {
                match *b.get(i)? {
                    b',' => {
                        i += 1;
                        continue 'members;
                    }
                    b'}' => {
                        i += 1;
                        break 'members;
                    }
                    b' ' | b'\n' | b'\r' | b'\t' => i += 1,
                    _ => return None,
                }
            }
        }
    }
    if skip_ws(b, i) != b.len() {
        return None;
    }
    out.max_output_tokens = max.into_iter().flatten().next();
    Some(out)
}

/// [`scan_body`] with the model as a `str`, for the tests.
#[cfg(test)]
fn scan_request(body: &[u8]) -> Option<Scanned<&str>> {
    let s = scan_body(body)?;
    let model = match s.model {
        Some(m) => Some(std::str::from_utf8(m).ok()?),
        None => None,
    };
    Some(Scanned {
        model,
        stream: s.stream,
        max_output_tokens: s.max_output_tokens,
        text: s.text,
    })
}

/// Skips the value at `b[i]` (of [`scan_body`]'s grammar), adding the length of every
/// string in it (keys not counted) to `text`; the index after it. Arrays and objects are
/// walked by a loop, not by recursion: the open ones are a bit each in a `u64` shifted
/// as they open and close (set for an object; the limit of 64 levels lets them fit). A
/// member's key is read by the same step as a string value, and white space is skipped
/// where it is met, so that a body without any costs one look at each byte between
/// tokens.
fn scan_value(b: &[u8], mut i: usize, text: &mut u64) -> Option<usize> {
    let mut objects = 0u64;
    let mut depth = 0u32;
    let mut strings = 0u64;
    // Whether the string at `b[i]` is a member's key (the next step wants one).
    let mut key = false;
    loop {
        match *b.get(i)? {
            b'"' => {
                let end = string_end(b, i + 1)?;
                if key {
                    i = colon(b, end + 1)?;
                    key = false;
                    continue;
                }
                // At most the body's length: no overflow.
                strings += (end - i - 1) as u64;
                i = end + 1;
            }
            b' ' | b'\n' | b'\r' | b'\t' => {
                i += 1;
                continue;
            }
            _ if key => return None,
            c @ (b'{' | b'[') => {
                if depth >= 64 {
                    return None;
                }
                i = skip_ws(b, i + 1);
                // `}` and `]` are each two past their opening bracket in ASCII.
                if b.get(i) == Some(&(c + 2)) {
                    i += 1;
                } else {
                    depth += 1;
                    key = c == b'{';
                    objects = objects << 1 | u64::from(key);
                    continue;
                }
            }
            b't' => i = literal(b, i, b"true")?,
            b'f' => i = literal(b, i, b"false")?,
            b'n' => i = literal(b, i, b"null")?,
            b'-' | b'0'..=b'9' => i = number(b, i)?.0,
            _ => return None,
        }
        // After a value: close every container it ends, or go on to the next element.
        loop {
            if depth == 0 {
                *text = text.saturating_add(strings);
                return Some(i);
            }
            let object = objects & 1 != 0;
            match *b.get(i)? {
                b',' => {
                    i += 1;
                    key = object;
                    break;
                }
                b'}' if object => {}
                b']' if !object => {}
                b' ' | b'\n' | b'\r' | b'\t' => {
                    i += 1;
                    continue;
                }
                _ => return None,
            }
            depth -= 1;
            objects >>= 1;
            i += 1;
        }
    }
}

/// The colon after a member's key, at `b[i]` or after white space: the index after it.
#[inline(always)]
fn colon(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) == Some(&b':') {
        return Some(i + 1);
    }
    let i = skip_ws(b, i);
    (b.get(i) == Some(&b':')).then_some(i + 1)
}

/// `lit` at `b[i]`: the index after it.
#[inline]
fn literal<const N: usize>(b: &[u8], i: usize, lit: &[u8; N]) -> Option<usize> {
    (b.get(i..)?.first_chunk::<N>()? == lit).then_some(i + N)
}

/// `-?(0|[1-9][0-9]*)(.[0-9]+)?` at `b[i]`, at most 18 digits each side (so an integer
/// fits a `u64` unchecked); no exponent. The index after it, and its value when it is a
/// non-negative integer.
#[inline(always)]
fn number(b: &[u8], mut i: usize) -> Option<(usize, Option<u64>)> {
    let negative = b.get(i) == Some(&b'-');
    if negative {
        i += 1;
    }
    let start = i;
    let mut n = 0u64;
    while let Some(&c @ b'0'..=b'9') = b.get(i) {
        n = n.wrapping_mul(10).wrapping_add(u64::from(c - b'0'));
        i += 1;
    }
    let digits = i - start;
    if digits == 0 || digits > 18 || (digits > 1 && b.get(start) == Some(&b'0')) {
        return None;
    }
    let mut int = (!negative).then_some(n);
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while let Some(b'0'..=b'9') = b.get(i) {
            i += 1;
        }
        if i == start || i - start > 18 {
            return None;
        }
        int = None;
    }
    match b.get(i) {
        Some(b'e' | b'E') => None,
        _ => Some((i, int)),
    }
}

/// The bytes of `w` (eight of a body, the first in the low byte) that stop [`string_end`],
/// as their top bit: a quote, a backslash, a control character (below 0x20), or a byte of
/// 0x80 or more (UTF-8 to check). Flipping bit 1 of every byte turns a quote (0x22) into
/// 0x20 and keeps a control character below 0x20, so one "below 0x21" test finds both. A
/// byte's top bit is set by `x - 0x21 & !x` when it is below 0x21, or when a borrow from a
/// lower byte that was below it comes in: so the lowest flagged byte is always a true one,
/// and only the lowest is read.
#[inline(always)]
fn string_stops(w: u64) -> u64 {
    let q = w ^ splat(0x02);
    (q.wrapping_sub(splat(0x21)) & !q | zero_bytes(w ^ splat(b'\\')) | w) & TOPS
}

/// The end of a string whose contents start at `b[start]`: the index of its closing quote,
/// or `None` for a string [`scan_body`] leaves to serde (a backslash or a control
/// character in it, invalid UTF-8, no closing quote). Reads eight bytes a step (see
/// [`string_stops`]); only a string with a byte of 0x80 or more in it is checked for UTF-8,
/// so an ASCII body is never checked as a whole.
#[inline(always)]
fn string_end(b: &[u8], start: usize) -> Option<usize> {
    let mut rest = b.get(start..)?;
    let mut words = 0;
    let (w, rest) = loop {
        let Some((w, tail)) = rest.split_first_chunk::<8>() else {
            break (last_word(b, rest.len()), rest);
        };
        let w = u64::from_le_bytes(*w);
        if string_stops(w) != 0 {
            break (w, rest);
        }
        rest = tail;
        words += 1;
        if words == LONG_STRING_WORDS {
            return long_string_end(b, start, b.len() - rest.len());
        }
    };
    // The stopping byte, read from the word: its place is its flag's byte.
    let at = string_stops(w).trailing_zeros() & !7;
    let j = b.len() - rest.len() + (at / 8) as usize;
    match (w >> at) as u8 {
        b'"' => Some(j),
        // Non-ASCII text: the rest is read as a long text's, whose pass checks UTF-8.
        0x80.. => long_string_end(b, start, j),
        _ => None,
    }
}

/// The words [`string_end`] reads before it takes a string for a long text (a prompt),
/// which [`long_string_end`] reads by vector searches.
const LONG_STRING_WORDS: usize = 8;

/// [`string_end`] for a string that goes on past `b[j]` (a long text, or one with a byte
/// of 0x80 or more at `b[j]`), found by memchr (a vectorised search for its closing quote,
/// or a backslash), then checked by one vectorised pass: the largest of its bytes less
/// 0x20 (wrapping) is 0x60 or more only when a byte is a control character or of 0x80 or
/// more, and only then is it looked at again (for a control character, and UTF-8).
#[inline(never)]
fn long_string_end(b: &[u8], start: usize, j: usize) -> Option<usize> {
    let end = j + memchr::memchr2(b'"', b'\\', b.get(j..)?)?;
    if b[end] != b'"' {
        return None;
    }
    let text = &b[start..end];
    if text.iter().fold(0u8, |m, &c| m.max(c.wrapping_sub(0x20))) >= 0x60 {
        // A fold, not `any`: it runs over the whole text, vectorised, without a branch a byte.
        if text.iter().fold(false, |bad, &c| bad | (c < 0x20)) {
            return None;
        }
        std::str::from_utf8(text).ok()?;
    }
    Some(end)
}

/// The last `n` bytes of `b` (fewer than eight) as a word, padded with zero bytes: a
/// padding byte reads as a control character past the end, so a string left open is
/// refused. Most bodies reach it once, at their last string; it is marked cold all the
/// same, which keeps the word loop's registers for the loop (18 instructions fewer a call
/// for the bench body).
#[cold]
#[inline(never)]
fn last_word(b: &[u8], n: usize) -> u64 {
    match b.last_chunk::<8>() {
        // The body's last eight bytes, shifted down past the ones before the `n`.
        Some(last) => u64::from_le_bytes(*last)
            .checked_shr(8 * (8 - n as u32))
            .unwrap_or(0),
        None => b
            .iter()
            .rev()
            .take(n)
            .fold(0u64, |w, &c| w << 8 | u64::from(c)),
    }
}

fn estimate(bytes: u64) -> u64 {
    bytes.div_ceil(4).max(1)
}

/// Gemini: `/v1beta/models/{model}:generateContent`; Azure: `/openai/deployments/{name}/…`.
fn model_from_path(path: &str) -> Option<&str> {
    model_path_span(path).map(|r| &path[r])
}

/// Where a request path names its model, as a byte range of `path`: Gemini's
/// `…/models/{model}:generateContent` (or `:streamGenerateContent`, any `:` method), or
/// Azure OpenAI's deployment in `/openai/deployments/{name}/…`. `None` when the path
/// names no model (the model is then in the body).
///
/// ```
/// use tower_ai_core::model_path_span;
/// let gemini = "/v1beta/models/gemini-2.5-flash:streamGenerateContent";
/// assert_eq!(model_path_span(gemini).map(|r| &gemini[r]), Some("gemini-2.5-flash"));
/// let azure = "/openai/deployments/prod-4o/chat/completions";
/// assert_eq!(model_path_span(azure).map(|r| &azure[r]), Some("prod-4o"));
/// assert_eq!(model_path_span("/v1/chat/completions"), None);
/// ```
pub fn model_path_span(path: &str) -> Option<std::ops::Range<usize>> {
    // memchr's searcher: `str::find` builds a two-way searcher on every call (~340
    // instructions for a short path).
    if let Some(i) = memchr::memmem::find(path.as_bytes(), b"/models/") {
        let start = i + "/models/".len();
        let rest = &path[start..];
        let end = rest.find(':').unwrap_or(rest.len());
        return (end > 0 && !rest[..end].contains('/')).then_some(start..start + end);
    }
    let rest = path.strip_prefix("/openai/deployments/")?;
    let start = path.len() - rest.len();
    let end = rest.find('/').unwrap_or(rest.len());
    (end > 0).then_some(start..start + end)
}

/// The request's model, as cheaply as it can be had: [`RequestMeta`] from the extensions
/// if a layer stored it, else a scan of the body for its top-level `"model"` key that
/// stops as soon as it is found (usually the first key), else the path. Borrows; allocates
/// only for a model name with JSON escapes in it.
pub fn model_of<B: ReplayBody>(req: &http::Request<B>) -> Option<Cow<'_, str>> {
    if let Some(m) = RequestMeta::stored(req) {
        return m.model().map(Cow::Borrowed);
    }
    if let Some(m) = req
        .body()
        .bytes()
        .and_then(|b| top_level_string(b, b"model"))
    {
        return Some(m);
    }
    model_from_path(req.uri().path()).map(Cow::Borrowed)
}

/// Refuses a request whose model name (as [`model_of`] reads it) is longer than
/// [`MAX_MODEL_LEN`](crate::keys::MAX_MODEL_LEN) bytes, with
/// [`AiError::ModelTooLong`](crate::AiError::ModelTooLong). No provider serves such a
/// model; refusing it before any per-key layer keeps caller-sized names out of every map,
/// label and error. AiRetry calls it first thing (so [`AiStack`]'s layers below never see
/// such a request); call it yourself in a stack without AiRetry.
///
/// [`AiStack`]: https://docs.rs/tower-ai/latest/tower_ai/struct.AiStack.html
///
/// ```
/// use http::Request;
/// use tower_ai_core::{check_model, AiError};
/// let ok = Request::post("/v1/chat/completions").body(r#"{"model":"gpt-4o"}"#).unwrap();
/// assert!(check_model(&ok).is_ok());
/// let body: &'static str = Box::leak(format!(r#"{{"model":"{}"}}"#, "x".repeat(300)).into_boxed_str());
/// let absurd = Request::post("/v1/chat/completions").body(body).unwrap();
/// assert!(matches!(check_model(&absurd), Err(AiError::ModelTooLong { len: 300, .. })));
/// ```
// The error is an `AiError` like every refusal of the crate; the refusal path is rare.
#[allow(clippy::result_large_err)]
pub fn check_model<B: ReplayBody>(req: &http::Request<B>) -> Result<(), crate::AiError> {
    let max = crate::keys::MAX_MODEL_LEN;
    // A body no longer than the maximum cannot hold a longer name: skip the scan.
    let body_len = req.body().bytes().map_or(0, <[u8]>::len);
    if body_len <= max && req.uri().path().len() <= max && RequestMeta::stored(req).is_none() {
        return Ok(());
    }
    match model_of(req) {
        Some(m) if m.len() > max => Err(crate::AiError::ModelTooLong { len: m.len(), max }),
        _ => Ok(()),
    }
}

/// The string value of a top-level key of a JSON object, found by a single forward scan
/// that skips nested values and string contents and stops at the key. `None` if the body
/// is not an object, the key is missing or its value is not a string.
pub fn top_level_string<'a>(json: &'a [u8], key: &[u8]) -> Option<Cow<'a, str>> {
    let span = top_level_value_span(json, key)?;
    let quoted = &json[span.clone()];
    let raw = &quoted[1..quoted.len() - 1];
    if raw.contains(&b'\\') {
        serde_json::from_slice::<String>(quoted)
            .ok()
            .map(Cow::Owned)
    } else {
        std::str::from_utf8(raw).ok().map(Cow::Borrowed)
    }
}

/// The byte span of the top-level string value of `key` in a JSON object, quotes
/// included: the walk of [`top_level_string`], for callers that splice a new value in
/// (ModelFallback rewrites the `model` this way, keeping every other byte).
///
/// `None` if the body is not a JSON object, the key is missing, or its value is not a
/// string. The first occurrence wins; keys are compared as raw bytes.
///
/// ```
/// let body = br#"{"messages":[{"model":"inner"}], "model" : "gpt-4o"}"#;
/// let span = tower_ai_core::top_level_value_span(body, b"model").unwrap();
/// assert_eq!(&body[span], br#""gpt-4o""#);
/// ```
pub fn top_level_value_span(json: &[u8], key: &[u8]) -> Option<std::ops::Range<usize>> {
    let i = top_level_value_at(json, key)?;
    if json.get(i) != Some(&b'"') {
        return None;
    }
    let (_, v_end) = string_span(json, i)?;
    Some(i..v_end + 1)
}

/// The boolean value of a top-level key of a JSON object (`"stream": true`), found by the
/// walk of [`top_level_string`]: no tree is built, nested values are skipped. `None` if
/// the body is not an object, the key is missing or its value is not `true` or `false`.
///
/// ```
/// let body = br#"{"messages":[{"stream":false}],"stream":true}"#;
/// assert_eq!(tower_ai_core::top_level_bool(body, b"stream"), Some(true));
/// assert_eq!(tower_ai_core::top_level_bool(br#"{"stream":"yes"}"#, b"stream"), None);
/// ```
pub fn top_level_bool(json: &[u8], key: &[u8]) -> Option<bool> {
    // A key that appears nowhere in the text is not at the top level: a vectorised search
    // answers for most bodies (a non-streamed request rarely names `stream`) without walking
    // their messages. The searcher for `stream`, the key asked for on every call, is built once.
    static STREAM: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"stream"));
    if key == b"stream" {
        STREAM.find(json)?;
    } else {
        memchr::memmem::find(json, key)?;
    }
    let v = json.get(top_level_value_at(json, key)?..)?;
    let end = |n: usize| {
        matches!(
            v.get(n),
            None | Some(b',' | b'}' | b' ' | b'\n' | b'\r' | b'\t')
        )
    };
    if v.starts_with(b"true") && end(4) {
        Some(true)
    } else if v.starts_with(b"false") && end(5) {
        Some(false)
    } else {
        None
    }
}

/// The index where the value of the top-level `key` starts (the first occurrence).
fn top_level_value_at(json: &[u8], key: &[u8]) -> Option<usize> {
    let mut i = skip_ws(json, 0);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(json, i);
        match json.get(i)? {
            b'}' => return None,
            b',' => {
                i += 1;
                continue;
            }
            b'"' => {}
            _ => return None,
        }
        let (k_start, k_end) = string_span(json, i)?;
        i = skip_ws(json, k_end + 1);
        if json.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(json, i + 1);
        if &json[k_start..k_end] == key {
            return Some(i);
        }
        i = skip_value(json, i)?;
    }
}

#[inline]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
        i += 1;
    }
    i
}

/// For a string starting at `b[i] == '"'`: the span of its contents and the index of its
/// closing quote (the returned end).
fn string_span(b: &[u8], i: usize) -> Option<(usize, usize)> {
    let start = i + 1;
    let mut j = start;
    loop {
        let k = memchr::memchr2(b'"', b'\\', b.get(j..)?)? + j;
        if b[k] == b'\\' {
            j = k + 2;
        } else {
            return Some((start, k));
        }
    }
}

/// Skips one JSON value starting at `b[i]`; returns the index after it.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => Some(string_span(b, i)?.1 + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => j = string_span(b, j)?.1,
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
            while !matches!(b.get(j), None | Some(b',' | b'}' | b']')) {
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<Value>,
    #[serde(default)]
    max_tokens: Option<Value>,
    #[serde(default)]
    max_completion_tokens: Option<Value>,
    #[serde(default)]
    max_output_tokens: Option<Value>,
    #[serde(default, rename = "generationConfig")]
    generation_config: Option<Value>,
    #[serde(default)]
    messages: Option<TextLen>,
    #[serde(default)]
    contents: Option<TextLen>,
    #[serde(default)]
    system: Option<TextLen>,
    #[serde(default, rename = "systemInstruction")]
    system_instruction: Option<TextLen>,
    #[serde(default)]
    input: Option<TextLen>,
    #[serde(default)]
    instructions: Option<TextLen>,
    #[serde(default)]
    prompt: Option<TextLen>,
    #[serde(default)]
    tools: Option<TextLen>,
}

/// The summed byte length of every string *value* inside a JSON value (keys not counted),
/// read without building the value.
struct TextLen(u64);

impl<'de> Deserialize<'de> for TextLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TextLen;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<TextLen, E> {
                Ok(TextLen(s.len() as u64))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_unit<E: de::Error>(self) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_none<E: de::Error>(self) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TextLen, A::Error> {
                let mut n = 0u64;
                while let Some(TextLen(x)) = seq.next_element()? {
                    n = n.saturating_add(x);
                }
                Ok(TextLen(n))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TextLen, A::Error> {
                let mut n = 0u64;
                while let Some((IgnoredAny, TextLen(x))) = map.next_entry()? {
                    n = n.saturating_add(x);
                }
                Ok(TextLen(n))
            }
        }
        d.deserialize_any(V)
    }
}

/// Tokens a call used, as the provider reported them.
///
/// Input counts every input token the provider bills (Anthropic: `input_tokens` plus cache
/// creation and cache reads); output counts every generated token (Gemini:
/// `candidatesTokenCount` plus `thoughtsTokenCount`, which it reports apart).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Usage {
    /// Input (prompt) tokens.
    pub input_tokens: u64,
    /// Output (completion) tokens, reasoning included.
    pub output_tokens: u64,
}

impl Usage {
    /// Input plus output.
    pub fn total(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// The usage in a non-streamed JSON response of any dialect (OpenAI Chat and
    /// Responses `usage`, Anthropic `usage`, Gemini `usageMetadata`).
    ///
    /// The known shapes are read by one forward scan that skips every other value and
    /// allocates nothing (a response body can be large: the answer is in it); anything the
    /// scan cannot decide is parsed into a JSON value and read by
    /// [`from_value`](Usage::from_value), so the two always agree.
    pub fn from_json(body: &[u8]) -> Option<Usage> {
        scan_usage(body).or_else(|| {
            let v: Value = serde_json::from_slice(body).ok()?;
            Usage::from_value(&v)
        })
    }

    /// The usage in a parsed JSON object: a whole response or a stream event.
    pub fn from_value(v: &Value) -> Option<Usage> {
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            return Usage::from_usage_object(u);
        }
        let m = v.get("usageMetadata")?;
        Some(usage_metadata(|k| m.get(k).and_then(Value::as_u64)))
    }

    /// The usage in a `usage` object itself (OpenAI's, or Anthropic's, which also comes
    /// inside `message_start.message` and `message_delta`).
    pub(crate) fn from_usage_object(u: &Value) -> Option<Usage> {
        usage_object(|k| u.get(k).and_then(Value::as_u64))
    }
}

/// The rules for a `usage` object, whatever reads its fields: OpenAI Chat
/// (`prompt_tokens`, `completion_tokens`), else OpenAI Responses and Anthropic
/// (`input_tokens` plus Anthropic's cache creation and cache reads, `output_tokens`).
fn usage_object(get: impl Fn(&str) -> Option<u64>) -> Option<Usage> {
    if let Some(p) = get("prompt_tokens") {
        return Some(Usage {
            input_tokens: p,
            output_tokens: get("completion_tokens").unwrap_or(0),
        });
    }
    let input = [
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ]
    .into_iter()
    .filter_map(&get)
    .fold(0u64, u64::saturating_add);
    let output = get("output_tokens");
    (input > 0 || output.is_some()).then(|| Usage {
        input_tokens: input,
        output_tokens: output.unwrap_or(0),
    })
}

/// The rules for Gemini's `usageMetadata`: thought tokens are output, reported apart.
fn usage_metadata(get: impl Fn(&str) -> Option<u64>) -> Usage {
    Usage {
        input_tokens: get("promptTokenCount").unwrap_or(0),
        output_tokens: get("candidatesTokenCount")
            .unwrap_or(0)
            .saturating_add(get("thoughtsTokenCount").unwrap_or(0)),
    }
}

/// The integer members of the JSON object `obj`, by raw key, without building a value;
/// `None` if `obj` is not an object or has more integer members than fit (then the full
/// parse decides). A repeated key reads its last value, as serde_json does.
fn integer_members<'a>(obj: &'a [u8]) -> Option<impl Fn(&str) -> Option<u64> + 'a> {
    let mut found: [(&'a [u8], u64); 12] = [(&[], 0); 12];
    let (mut n, mut overflow) = (0, false);
    members(obj, 0, |k, v| {
        if let Some(x) = json_u64(v) {
            match found.get_mut(n) {
                Some(slot) => *slot = (k, x),
                None => overflow = true,
            }
            n += 1;
        }
    })?;
    (!overflow).then_some(move |k: &str| {
        found[..n]
            .iter()
            .rev()
            .find(|(key, _)| *key == k.as_bytes())
            .map(|(_, v)| *v)
    })
}

/// Calls `f(key, value)` for each member of the JSON object starting at `b[i]` (key
/// without quotes, value as raw bytes); returns the index after the object.
fn members<'a>(b: &'a [u8], i: usize, mut f: impl FnMut(&'a [u8], &'a [u8])) -> Option<usize> {
    if b.get(i) != Some(&b'{') {
        return None;
    }
    let mut i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return Some(i + 1);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let (k_start, k_end) = string_span(b, i)?;
        i = skip_ws(b, k_end + 1);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let v_end = skip_value(b, i)?;
        f(&b[k_start..k_end], &b[i..v_end]);
        i = skip_ws(b, v_end);
        match b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b'}' => return Some(i + 1),
            _ => return None,
        }
    }
}

/// A JSON integer that fits a `u64` (no sign, fraction or exponent).
fn json_u64(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// The usage of a whole JSON response, read without building a JSON value; `None` when
/// the scan cannot tell (no usage, an unexpected shape), for [`Usage::from_json`] to decide.
fn scan_usage(body: &[u8]) -> Option<Usage> {
    let start = skip_ws(body, 0);
    let (mut usage, mut meta) = (None, None);
    let end = members(body, start, |k, v| match k {
        b"usage" => usage = Some(v),
        b"usageMetadata" => meta = Some(v),
        _ => {}
    })?;
    if skip_ws(body, end) != body.len() {
        return None;
    }
    match (usage, meta) {
        (Some(u), _) if u.first() == Some(&b'{') => usage_object(integer_members(u)?),
        // `"usage": null` and the like: let the full parse decide.
        (Some(_), _) => None,
        (None, Some(m)) => Some(usage_metadata(integer_members(m)?)),
        (None, None) => None,
    }
}

/// The scan as it was before it read eight bytes a step and walked nested values by a loop
/// (a recursive descent over a byte cursor), kept as the reference the tests compare the
/// scan with.
#[cfg(test)]
mod reference {
    use super::{peek_key, skip_ws, Scanned};

    pub(super) fn scan_request(body: &[u8]) -> Option<Scanned<&str>> {
        if memchr::memchr(b'\\', body).is_some() {
            return None;
        }
        let text = std::str::from_utf8(body).ok()?;
        let mut p = Scan { b: body, i: 0 };
        let mut out = Scanned::default();
        let mut max: [Option<u64>; 3] = [None; 3];
        let mut seen = 0u16;
        p.ws();
        p.eat(b'{')?;
        p.ws();
        if p.peek() == Some(b'}') {
            p.i += 1;
        } else {
            loop {
                p.ws();
                let key = p.string()?;
                p.ws();
                p.eat(b':')?;
                p.ws();
                let field = peek_key(&body[key.clone()]);
                if let Some(f) = field {
                    if seen & (1 << f) != 0 {
                        return None;
                    }
                    seen |= 1 << f;
                }
                let start = p.i;
                match field {
                    Some(0) => match p.peek()? {
                        b'"' => out.model = Some(&text[p.string()?]),
                        b'n' => p.literal(b"null")?,
                        _ => return None,
                    },
                    Some(1) => {
                        p.value(0, &mut 0)?;
                        out.stream = &body[start..p.i] == b"true";
                    }
                    Some(f @ 2..=4) => {
                        if p.peek()? == b'-' {
                            return None;
                        }
                        p.value(0, &mut 0)?;
                        let v = &body[start..p.i];
                        if v.first().is_some_and(u8::is_ascii_digit) {
                            // A number of the scan's grammar: an integer when it has no point.
                            max[f - 2] = match v.iter().all(u8::is_ascii_digit) {
                                true => {
                                    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
                                }
                                false => None,
                            };
                        }
                    }
                    Some(5) => return None,
                    Some(_) => {
                        let mut n = 0u64;
                        p.value(0, &mut n)?;
                        out.text = out.text.saturating_add(n);
                    }
                    None => p.value(0, &mut 0)?,
                }
                p.ws();
                match p.next()? {
                    b',' => continue,
                    b'}' => break,
                    _ => return None,
                }
            }
        }
        p.ws();
        if p.i != body.len() {
            return None;
        }
        out.max_output_tokens = max.into_iter().flatten().next();
        Some(out)
    }

    /// The cursor of [`scan_request`].
    struct Scan<'a> {
        b: &'a [u8],
        i: usize,
    }

    impl Scan<'_> {
        fn peek(&self) -> Option<u8> {
            self.b.get(self.i).copied()
        }

        fn next(&mut self) -> Option<u8> {
            let c = self.peek()?;
            self.i += 1;
            Some(c)
        }

        fn eat(&mut self, c: u8) -> Option<()> {
            (self.next()? == c).then_some(())
        }

        #[inline]
        fn ws(&mut self) {
            self.i = skip_ws(self.b, self.i);
        }

        fn literal(&mut self, lit: &[u8]) -> Option<()> {
            let end = self.i.checked_add(lit.len())?;
            (self.b.get(self.i..end)? == lit).then(|| self.i = end)
        }

        /// A string at the cursor (the body has no backslash): the span of its contents.
        #[inline]
        fn string(&mut self) -> Option<std::ops::Range<usize>> {
            if self.peek()? != b'"' {
                return None;
            }
            let start = self.i + 1;
            // Keys and short values end within a few bytes: a loop; a long text (a prompt)
            // is searched by memchr and checked for control characters in one vectorised pass.
            let mut end = start;
            let short = self.b.len().min(start + 24);
            loop {
                if end == short {
                    let rest = self.b.get(end..)?;
                    let n = memchr::memchr(b'"', rest)?;
                    if rest[..n].iter().fold(false, |bad, &c| bad | (c < 0x20)) {
                        return None;
                    }
                    end += n;
                    break;
                }
                match self.b[end] {
                    b'"' => break,
                    c if c < 0x20 => return None,
                    _ => end += 1,
                }
            }
            self.i = end + 1;
            Some(start..end)
        }

        /// `-?(0|[1-9][0-9]*)(.[0-9]+)?`, at most 18 digits each side; no exponent.
        fn number(&mut self) -> Option<()> {
            if self.peek() == Some(b'-') {
                self.i += 1;
            }
            let digits = |s: &mut Self| {
                let start = s.i;
                while s.peek().is_some_and(|c| c.is_ascii_digit()) {
                    s.i += 1;
                }
                s.i - start
            };
            let first = self.peek()?;
            let n = digits(self);
            if n == 0 || n > 18 || (first == b'0' && n > 1) {
                return None;
            }
            if self.peek() == Some(b'.') {
                self.i += 1;
                let n = digits(self);
                if n == 0 || n > 18 {
                    return None;
                }
            }
            match self.peek() {
                Some(b'e' | b'E') => None,
                _ => Some(()),
            }
        }

        /// Skips a value, adding the length of every string in it (keys not counted) to `text`.
        fn value(&mut self, depth: u32, text: &mut u64) -> Option<()> {
            match self.peek()? {
                b'"' => {
                    let r = self.string()?;
                    *text = text.saturating_add(r.len() as u64);
                    Some(())
                }
                open @ (b'{' | b'[') => {
                    if depth >= 64 {
                        return None;
                    }
                    let close = if open == b'{' { b'}' } else { b']' };
                    self.i += 1;
                    self.ws();
                    if self.peek() == Some(close) {
                        self.i += 1;
                        return Some(());
                    }
                    loop {
                        self.ws();
                        if open == b'{' {
                            self.string()?;
                            self.ws();
                            self.eat(b':')?;
                            self.ws();
                        }
                        self.value(depth + 1, text)?;
                        self.ws();
                        match self.next()? {
                            b',' => {}
                            c if c == close => return Some(()),
                            _ => return None,
                        }
                    }
                }
                b't' => self.literal(b"true"),
                b'f' => self.literal(b"false"),
                b'n' => self.literal(b"null"),
                b'-' | b'0'..=b'9' => self.number(),
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_keys_are_matched_in_their_order() {
        for (i, k) in PEEK_KEYS.iter().enumerate() {
            assert_eq!(peek_key(k), Some(i));
        }
        assert_eq!(peek_key(b"models"), None);
        assert_eq!(peek_key(b""), None);
    }

    #[test]
    fn same_bytes_is_equality() {
        for n in 0..40usize {
            let a: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
            assert!(same_bytes(&a, &a.clone()));
            if n > 0 {
                assert!(!same_bytes(&a, &a[..n - 1]));
            }
            for at in 0..n {
                let mut b = a.clone();
                b[at] ^= 0x20;
                assert!(!same_bytes(&a, &b), "{n} bytes, differing at {at}");
            }
        }
    }

    #[test]
    fn a_model_name_is_shared_by_the_requests_of_a_thread() {
        let a = RequestMeta::parse("/v1/chat/completions", br#"{"model":"shared-model-test"}"#);
        let b = RequestMeta::parse("/v1/chat/completions", br#"{"model":"shared-model-test"}"#);
        assert!(Arc::ptr_eq(
            a.model.as_ref().unwrap(),
            b.model.as_ref().unwrap()
        ));
        let long = "m".repeat(crate::keys::MAX_MODEL_LEN + 1);
        let body = format!(r#"{{"model":"{long}"}}"#);
        let c = RequestMeta::parse("/x", body.as_bytes());
        assert_eq!(c.model.as_deref(), Some(&*long));
    }

    #[test]
    fn usage_scan_agrees_with_the_full_parse() {
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
            let full = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| Usage::from_value(&v));
            assert_eq!(
                Usage::from_json(body),
                full,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(
            scan_usage(cases[0]).is_some() && scan_usage(cases[3]).is_some(),
            "the common shapes need no parse"
        );
        let many = br#"{"usage":{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6,"g":7,"h":8,"i":9,"j":10,"k":11,"l":12,"prompt_tokens":3,"completion_tokens":4}}"#;
        assert_eq!(
            scan_usage(many),
            None,
            "more integer fields than fit: defer to the full parse"
        );
        assert_eq!(
            Usage::from_json(many),
            Some(Usage {
                input_tokens: 3,
                output_tokens: 4
            })
        );
        let twice = br#"{"usage":{"prompt_tokens":1,"prompt_tokens":9}}"#;
        assert_eq!(scan_usage(twice), Usage::from_json(twice));
        assert_eq!(
            scan_usage(twice).map(|u| u.input_tokens),
            Some(9),
            "the last value, as serde_json"
        );
        assert_eq!(scan_usage(b"[1]"), None);
        assert_eq!(
            scan_usage(b"{\"usage\":{\"prompt_tokens\":3}} trailing"),
            None
        );
    }

    /// JSON-like text: valid documents of every shape the scan reads, with the edges
    /// where serde refuses or reads otherwise (escapes, control characters, exponents,
    /// leading zeros, repeated keys, trailing commas, cut literals).
    fn json_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let leaf = proptest::sample::select(vec![
            r#""gpt-4o""#,
            r#""""#,
            "\"h\u{e9}llo w\u{f6}rld\"",
            r#""a\nb""#,
            "\"a\u{1}b\"",
            "0",
            "64",
            "-1",
            "-0",
            "1.5",
            "64.0",
            "1e3",
            "01",
            "18446744073709551616",
            "123456789012345678",
            "true",
            "false",
            "null",
            "tru",
        ])
        .prop_map(str::to_owned);
        let key = proptest::sample::select(vec![
            "model",
            "stream",
            "max_tokens",
            "max_completion_tokens",
            "max_output_tokens",
            "generationConfig",
            "maxOutputTokens",
            "messages",
            "contents",
            "system",
            "systemInstruction",
            "input",
            "instructions",
            "prompt",
            "tools",
            "role",
            "content",
        ]);
        let ws = proptest::sample::select(vec!["", "", " ", "\n\t", "\u{c}"]);
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                (
                    proptest::collection::vec(inner.clone(), 0..5),
                    ws.clone(),
                    any::<bool>()
                )
                    .prop_map(|(v, w, trailing)| {
                        let comma = if trailing && !v.is_empty() { "," } else { "" };
                        format!("[{w}{}{comma}]", v.join(&format!(",{w}")))
                    }),
                (
                    proptest::collection::vec((key.clone(), inner), 0..6),
                    ws.clone(),
                    any::<bool>()
                )
                    .prop_map(|(v, w, trailing)| {
                        let comma = if trailing && !v.is_empty() { "," } else { "" };
                        let members: Vec<String> = v
                            .iter()
                            .map(|(k, x)| format!("\"{k}\"{w}:{w}{x}"))
                            .collect();
                        format!("{w}{{{}{comma}}}{w}", members.join(","))
                    }),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn the_scan_reads_requests_as_serde_does(
            doc in json_text(),
            cut in proptest::option::weighted(0.1, 0usize..400),
            path in proptest::sample::select(vec![
                "/v1/chat/completions",
                "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            ]),
        ) {
            let mut body = doc.into_bytes();
            if let Some(c) = cut {
                body.truncate(c);
            }
            let tree = RequestMeta::parse_tree(
                model_from_path(path),
                path.contains(":streamGenerateContent"),
                &body,
            );
            proptest::prop_assert_eq!(RequestMeta::parse(path, &body), tree);
        }
    }

    /// Bodies on the edges of the word-at-a-time scan: the JSON-like text of [`json_text`],
    /// strings of every length around a word with one odd byte in them (a quote, a
    /// backslash, a control character, UTF-8 of each length, bytes that are not UTF-8),
    /// nesting around the 64-level limit, numbers around the 18-digit limits; then
    /// perhaps one byte changed and perhaps cut short.
    fn scan_inputs() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        use proptest::sample::select;
        let odd: Vec<&'static [u8]> = vec![
            b"\"",
            b"\\",
            b"\\n",
            b"\0",
            b"\x1f",
            b"\x7f",
            b" ",
            b"\t",
            "\u{e9}".as_bytes(),
            "\u{20ac}".as_bytes(),
            "\u{1f600}".as_bytes(),
            b"\xc3",
            b"\x80",
            b"\xe2\x82",
            b"\xff",
            b"\xed\xa0\x80",
            b"}",
            b"",
        ];
        let numbers = select(vec![
            "0",
            "7",
            "64",
            "-0",
            "-7",
            "00",
            "-01",
            "1.",
            ".5",
            "-",
            "1e5",
            "1E-5",
            "1.5e3",
            "123456789012345678",
            "999999999999999999",
            "1234567890123456789",
            "-123456789012345678",
            "-1234567890123456789",
            "0.123456789012345678",
            "0.1234567890123456789",
            "123456789012345678.123456789012345678",
            "12345678901234567890123",
        ]);
        let keys = select(vec![
            "model",
            "stream",
            "max_tokens",
            "max_completion_tokens",
            "max_output_tokens",
            "messages",
            "prompt",
            "tools",
            "other",
        ]);
        let leaves = select(vec![r#""x""#, "1", "true", "null", "[]", "{}"]);
        let shaped = prop_oneof![
            json_text().prop_map(String::into_bytes),
            (
                keys.clone(),
                0usize..40,
                select(odd),
                0usize..40,
                any::<bool>()
            )
                .prop_map(|(key, before, odd, after, close)| {
                    let mut b = format!(r#"{{"{key}":"{}"#, "a".repeat(before)).into_bytes();
                    b.extend_from_slice(odd);
                    b.extend_from_slice("b".repeat(after).as_bytes());
                    if close {
                        b.extend_from_slice(br#"","max_tokens":64}"#);
                    }
                    b
                }),
            (keys.clone(), 0usize..70, any::<bool>(), leaves).prop_map(|(key, n, obj, leaf)| {
                let (open, close) = if obj { (r#"{"k":"#, "}") } else { ("[", "]") };
                format!(r#"{{"{key}":{}{leaf}{}}}"#, open.repeat(n), close.repeat(n)).into_bytes()
            }),
            (keys, numbers.clone(), numbers).prop_map(|(key, a, b)| {
                format!(r#"{{"{key}":{a},"messages":[{b},"x"]}}"#).into_bytes()
            }),
        ];
        (
            shaped,
            proptest::option::weighted(0.3, (any::<prop::sample::Index>(), any::<u8>())),
            proptest::option::weighted(0.2, any::<prop::sample::Index>()),
        )
            .prop_map(|(mut b, put, cut)| {
                if let (Some((at, byte)), false) = (put, b.is_empty()) {
                    let at = at.index(b.len());
                    b[at] = byte;
                }
                if let Some(cut) = cut {
                    b.truncate(cut.index(b.len() + 1));
                }
                b
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]
        #[test]
        fn the_scan_reads_bodies_as_the_reference_scan_does(body in scan_inputs()) {
            proptest::prop_assert_eq!(scan_request(&body), reference::scan_request(&body));
            let tree = RequestMeta::parse_tree(None, false, &body);
            proptest::prop_assert_eq!(RequestMeta::parse("/v1/chat/completions", &body), tree);
        }
    }

    #[test]
    fn the_scan_agrees_with_the_reference_on_its_edges() {
        let mut bodies: Vec<Vec<u8>> = Vec::new();
        // Every length of a string around the words (and past the words read before a
        // string is taken for a long text), with its end at every offset of the body's last
        // word, and with each odd byte at every place.
        for n in 0..100 {
            let text = "x".repeat(n);
            bodies.push(format!(r#"{{"model":"{text}"}}"#).into_bytes());
            bodies.push(format!(r#"{{"prompt":"{text}"}}"#).into_bytes());
            bodies.push(format!(r#"{{"prompt":"{text}"#).into_bytes());
            bodies.push(format!(r#"{{"messages":["{text}",{{"{text}":"{text}"}}]}}"#).into_bytes());
            for odd in [
                "\"",
                "\\",
                "\n",
                "\u{1}",
                "\u{1f}",
                "\u{7f}",
                "\u{e9}",
                "\u{1f600}",
            ] {
                bodies.push(format!(r#"{{"prompt":"{text}{odd}y"}}"#).into_bytes());
            }
            let mut bad = format!(r#"{{"prompt":"{text}"#).into_bytes();
            bad.extend_from_slice(b"\xff\"}");
            bodies.push(bad);
        }
        for depth in 60..68 {
            let deep = format!(
                r#"{{"messages":{}1{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            );
            bodies.push(deep.into_bytes());
        }
        for b in &bodies {
            assert_eq!(
                scan_request(b),
                reference::scan_request(b),
                "{}",
                String::from_utf8_lossy(b)
            );
        }
        // The scan answers for the deepest nesting it allows, and not one level deeper.
        let at = |n: usize| format!(r#"{{"messages":{}"x"{}}}"#, "[".repeat(n), "]".repeat(n));
        assert_eq!(scan_request(at(64).as_bytes()).map(|s| s.text), Some(1));
        assert_eq!(scan_request(at(65).as_bytes()), None);
        // A body of non-ASCII text is read, and its length counted in bytes.
        let s = scan_request("{\"prompt\":\"h\u{e9}llo \u{1f600}\"}".as_bytes()).unwrap();
        assert_eq!(s.text, 11);
    }

    #[test]
    fn the_scan_answers_for_the_usual_requests() {
        for body in [
            &br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":64}"#[..],
            br#"{"model":"claude-sonnet-4","stream":true,"max_tokens":1000,"system":[{"type":"text","text":"Be brief."}],"messages":[{"role":"user","content":"Hi"}],"temperature":0.7}"#,
            br#"{ "model": "gpt-4o-mini", "input": "Hi", "tools": [], "max_output_tokens": 12 }"#,
        ] {
            let s = scan_request(body).expect("read by the scan");
            assert_eq!(
                RequestMeta::parse("/v1/x", body),
                RequestMeta::parse_tree(None, false, body)
            );
            assert!(s.model.is_some() && s.max_output_tokens.is_some() && s.text > 0);
        }
        let s = scan_request(br#"{"model":"m","max_tokens":7.0,"max_completion_tokens":5,"messages":["ab",{"x":"cde"}],"stream":false}"#).unwrap();
        assert_eq!(
            s,
            Scanned {
                model: Some("m"),
                stream: false,
                max_output_tokens: Some(5),
                text: 5
            }
        );
        // Left to serde: an escape, a repeated key, Gemini's generationConfig.
        assert_eq!(scan_request(br#"{"model":"a\"b"}"#), None);
        assert_eq!(scan_request(br#"{"model":"a","model":"b"}"#), None);
        assert_eq!(
            scan_request(br#"{"generationConfig":{"maxOutputTokens":5}}"#),
            None
        );
    }

    #[test]
    fn openai_chat_request() {
        let body = br#"{"model":"gpt-4o","stream":true,"max_completion_tokens":256,
            "messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Hello there, how are you?"}]}"#;
        let m = RequestMeta::parse("/v1/chat/completions", body);
        assert_eq!(m.model(), Some("gpt-4o"));
        assert!(m.stream && m.json);
        assert_eq!(m.max_output_tokens, Some(256));
        // "system"+"You are terse."+"user"+"Hello there, how are you?" = 6+14+4+25 = 49 bytes
        assert_eq!(m.input_tokens_estimate, 13);
        assert_eq!(m.reserve_tokens(1000), 269);
    }

    #[test]
    fn anthropic_and_gemini_requests() {
        let body = br#"{"model":"claude-sonnet-4-5","max_tokens":1024,"system":"abcd","messages":[{"role":"user","content":[{"type":"text","text":"abcdefgh"}]}]}"#;
        let m = RequestMeta::parse("/v1/messages", body);
        assert_eq!(
            (m.model(), m.max_output_tokens, m.stream),
            (Some("claude-sonnet-4-5"), Some(1024), false)
        );
        let body = br#"{"contents":[{"role":"user","parts":[{"text":"12345678"}]}],"generationConfig":{"maxOutputTokens":77}}"#;
        let m = RequestMeta::parse(
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            body,
        );
        assert_eq!(m.model(), Some("gemini-2.5-flash"));
        assert!(m.stream);
        assert_eq!(m.max_output_tokens, Some(77));
        let m = RequestMeta::parse("/openai/deployments/prod-4o/chat/completions", b"{}");
        assert_eq!(m.model(), Some("prod-4o"));
    }

    #[test]
    fn bad_bodies_never_fail() {
        let m = RequestMeta::parse("/v1/chat/completions", b"not json at all");
        assert!(!m.json && m.model.is_none());
        assert_eq!(m.input_tokens_estimate, 4);
        let m = RequestMeta::parse("/x", b"");
        assert_eq!(m.input_tokens_estimate, 1);
        let m = RequestMeta::parse("/x", br#"{"model":"m","max_tokens":"lots","stream":"yes"}"#);
        assert_eq!(
            (m.model(), m.max_output_tokens, m.stream),
            (Some("m"), None, false)
        );
        let m = RequestMeta::parse("/x", br#"{"model":"m","max_tokens":18446744073709551615}"#);
        assert_eq!(m.reserve_tokens(0), u64::MAX, "saturates");
        let m = RequestMeta::parse("/x", br#"{"model":"m","max_tokens":-5}"#);
        assert_eq!(m.max_output_tokens, None);
    }

    #[test]
    fn model_scan() {
        assert_eq!(
            top_level_string(br#"{"model":"gpt-4o","messages":[]}"#, b"model").as_deref(),
            Some("gpt-4o")
        );
        assert_eq!(
            top_level_string(br#" { "messages" : [{"model":"inner","x":"\"model\":"}], "n":1, "model" : "outer" }"#, b"model").as_deref(),
            Some("outer")
        );
        assert_eq!(
            top_level_string(br#"{"model":"a\"b"}"#, b"model").as_deref(),
            Some("a\"b")
        );
        assert_eq!(
            top_level_string(br#"{"tools":{"model":"x"}}"#, b"model"),
            None
        );
        assert_eq!(top_level_string(br#"{"model":5}"#, b"model"), None);
        assert_eq!(
            top_level_string(br#"{"model":"unterminated"#, b"model"),
            None
        );
        assert_eq!(top_level_string(b"[1,2]", b"model"), None);
        assert_eq!(
            top_level_string(br#"{"a":[1,{"b":"]"}],"model":"m"}"#, b"model").as_deref(),
            Some("m")
        );

        let req = http::Request::post("/v1beta/models/gemini-pro:generateContent")
            .body(String::from("{}"))
            .unwrap();
        assert_eq!(model_of(&req).as_deref(), Some("gemini-pro"));
        let req = http::Request::post("/v1/chat/completions")
            .body(String::from(r#"{"model":"x"}"#))
            .unwrap();
        assert!(matches!(model_of(&req), Some(Cow::Borrowed("x"))));
    }

    #[test]
    fn usage_of_each_dialect() {
        let openai = br#"{"choices":[],"usage":{"prompt_tokens":14,"completion_tokens":30,"total_tokens":44}}"#;
        assert_eq!(
            Usage::from_json(openai),
            Some(Usage {
                input_tokens: 14,
                output_tokens: 30
            })
        );
        let anthropic = br#"{"type":"message","usage":{"input_tokens":25,"cache_read_input_tokens":100,"output_tokens":15}}"#;
        assert_eq!(
            Usage::from_json(anthropic),
            Some(Usage {
                input_tokens: 125,
                output_tokens: 15
            })
        );
        let responses = br#"{"usage":{"input_tokens":5,"output_tokens":7,"total_tokens":12}}"#;
        assert_eq!(Usage::from_json(responses).unwrap().total(), 12);
        let gemini = br#"{"usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":49,"thoughtsTokenCount":3,"totalTokenCount":62}}"#;
        assert_eq!(
            Usage::from_json(gemini),
            Some(Usage {
                input_tokens: 10,
                output_tokens: 52
            })
        );
        assert_eq!(Usage::from_json(br#"{"usage":null}"#), None);
        assert_eq!(Usage::from_json(b"garbage"), None);
    }
}
