//! The three dialects: routing by path, reading the request, and the shared
//! vocabulary their templates render.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, Uri};
use serde_json::Value;

use crate::scenario::MAX_MODEL_NAME_BYTES;

pub(crate) mod anthropic;
pub(crate) mod gemini;
pub(crate) mod openai;

/// The API dialect a request spoke, chosen from its path as the real APIs do.
///
/// | path | dialect |
/// |---|---|
/// | `POST /v1/chat/completions` | [`OpenAi`](Dialect::OpenAi) |
/// | `POST /openai/deployments/{name}/chat/completions` | [`AzureOpenAi`](Dialect::AzureOpenAi) |
/// | `POST /v1/messages` | [`Anthropic`](Dialect::Anthropic) |
/// | `POST /v1beta/models/{model}:generateContent` (also `/v1/…`, `:streamGenerateContent`) | [`Gemini`](Dialect::Gemini) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Dialect {
    /// OpenAI Chat Completions.
    OpenAi,
    /// Azure OpenAI Chat Completions (OpenAI bodies, Azure's headers).
    AzureOpenAi,
    /// Anthropic Messages.
    Anthropic,
    /// Google Gemini generateContent / streamGenerateContent.
    Gemini,
}

impl Dialect {
    /// A short lowercase name (`openai`, `azure-openai`, `anthropic`, `gemini`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Dialect::OpenAi => "openai",
            Dialect::AzureOpenAi => "azure-openai",
            Dialect::Anthropic => "anthropic",
            Dialect::Gemini => "gemini",
        }
    }
}

impl std::fmt::Display for Dialect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a request is going.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) dialect: Dialect,
    /// The model named by the path (Gemini) or deployment (Azure).
    pub(crate) path_model: Option<String>,
    /// Gemini `:streamGenerateContent`.
    pub(crate) gemini_stream: bool,
    /// Gemini `alt=sse`.
    pub(crate) gemini_sse: bool,
}

/// Why a request did not reach an endpoint.
#[derive(Debug, Clone)]
pub(crate) enum RouteError {
    NotFound(Dialect),
    MethodNotAllowed(Dialect),
}

pub(crate) fn route(method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<Route, RouteError> {
    let path = uri.path();
    let plain = |dialect| Route {
        dialect,
        path_model: None,
        gemini_stream: false,
        gemini_sse: false,
    };
    let found = if path == "/v1/chat/completions" {
        Some(plain(Dialect::OpenAi))
    } else if path == "/v1/messages" {
        Some(plain(Dialect::Anthropic))
    } else if let Some(rest) = path.strip_prefix("/openai/deployments/") {
        rest.strip_suffix("/chat/completions")
            .filter(|name| !name.is_empty() && !name.contains('/'))
            .map(|name| Route {
                path_model: Some(name.to_owned()),
                ..plain(Dialect::AzureOpenAi)
            })
    } else if let Some(rest) = path
        .strip_prefix("/v1beta/models/")
        .or_else(|| path.strip_prefix("/v1/models/"))
    {
        let (model, verb) = rest.rsplit_once(':').unwrap_or((rest, ""));
        let stream = match verb {
            "generateContent" => Some(false),
            "streamGenerateContent" => Some(true),
            _ => None,
        };
        match stream {
            Some(stream) if !model.is_empty() && !model.contains('/') => {
                let sse = uri
                    .query()
                    .is_some_and(|q| q.split('&').any(|kv| kv == "alt=sse"));
                Some(Route {
                    dialect: Dialect::Gemini,
                    path_model: Some(model.to_owned()),
                    gemini_stream: stream,
                    gemini_sse: stream && sse,
                })
            }
            _ => None,
        }
    } else {
        None
    };
    match found {
        Some(route) if method == Method::POST => Ok(route),
        Some(route) => Err(RouteError::MethodNotAllowed(route.dialect)),
        None => Err(RouteError::NotFound(guess_dialect(path, headers))),
    }
}

/// For a path that matches nothing, answer in the dialect the client most likely speaks.
fn guess_dialect(path: &str, headers: &HeaderMap) -> Dialect {
    if path.starts_with("/v1beta") || headers.contains_key("x-goog-api-key") {
        Dialect::Gemini
    } else if headers.contains_key("anthropic-version") || headers.contains_key("x-api-key") {
        Dialect::Anthropic
    } else if path.starts_with("/openai/") || headers.contains_key("api-key") {
        Dialect::AzureOpenAi
    } else {
        Dialect::OpenAi
    }
}

/// What the simulator reads from a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestFacts {
    pub(crate) model: String,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) max_tokens: Option<u64>,
    /// UTF-8 bytes of all text content.
    pub(crate) text_bytes: u64,
}

impl RequestFacts {
    /// `ceil(text_bytes / 4)`, at least 1.
    pub(crate) fn prompt_tokens(&self) -> u64 {
        self.text_bytes.div_ceil(4).max(1)
    }
}

/// Why a body was refused with a 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BadRequest {
    /// Not JSON at all (or empty).
    InvalidJson(String),
    /// JSON, but something is missing or of the wrong type.
    Invalid {
        message: String,
        param: Option<&'static str>,
    },
}

pub(crate) fn parse_request(route: &Route, body: &[u8]) -> Result<RequestFacts, BadRequest> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| BadRequest::InvalidJson(e.to_string()))?;
    let obj = value.as_object().ok_or_else(|| BadRequest::Invalid {
        message: "the request body must be a JSON object".into(),
        param: None,
    })?;
    let invalid = |message: String, param: &'static str| BadRequest::Invalid {
        message,
        param: Some(param),
    };
    let body_model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(invalid("model: expected a string".into(), "model")),
    };
    let model = match (&route.path_model, body_model) {
        (Some(path), _) => path.clone(),
        (None, Some(m)) => m,
        (None, None) => {
            return Err(invalid(
                "you must provide a model parameter".into(),
                "model",
            ))
        }
    };
    if model.is_empty() {
        return Err(invalid("model: must not be empty".into(), "model"));
    }
    if model.len() > MAX_MODEL_NAME_BYTES {
        return Err(invalid(
            format!(
                "model: name is {} bytes long, the limit is {MAX_MODEL_NAME_BYTES}",
                model.len()
            ),
            "model",
        ));
    }
    let stream = if route.dialect == Dialect::Gemini {
        route.gemini_stream
    } else {
        match obj.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("stream: expected a boolean".into(), "stream")),
        }
    };
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut max_tokens = None;
    let gen_config = obj
        .get("generationConfig")
        .or_else(|| obj.get("generation_config"));
    let candidates: [(&'static str, Option<&Value>); 4] = [
        ("max_completion_tokens", obj.get("max_completion_tokens")),
        ("max_tokens", obj.get("max_tokens")),
        (
            "maxOutputTokens",
            gen_config.and_then(|g| g.get("maxOutputTokens")),
        ),
        (
            "max_output_tokens",
            gen_config.and_then(|g| g.get("max_output_tokens")),
        ),
    ];
    for (name, v) in candidates {
        match v {
            None | Some(Value::Null) => {}
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => {
                    max_tokens.get_or_insert(n);
                }
                _ => {
                    return Err(invalid(
                        format!("{name}: expected an integer of at least 1, got {v}"),
                        name,
                    ))
                }
            },
        }
    }
    Ok(RequestFacts {
        model,
        stream,
        include_usage,
        max_tokens,
        text_bytes: text_bytes(obj),
    })
}

/// UTF-8 bytes of the text in `messages[].content` (string or parts' `text`),
/// `system` (string or blocks' `text`), `instructions`, Gemini
/// `contents[].parts[].text` and `systemInstruction.parts[].text`.
fn text_bytes(obj: &serde_json::Map<String, Value>) -> u64 {
    fn text_of(v: &Value) -> u64 {
        match v {
            Value::String(s) => s.len() as u64,
            Value::Array(parts) => parts
                .iter()
                .map(|p| match p {
                    Value::String(s) => s.len() as u64,
                    Value::Object(o) => o
                        .get("text")
                        .and_then(Value::as_str)
                        .map_or(0, |t| t.len() as u64),
                    _ => 0,
                })
                .sum(),
            _ => 0,
        }
    }
    fn parts_of(v: Option<&Value>) -> u64 {
        v.and_then(|c| c.get("parts")).map_or(0, text_of)
    }
    let mut total = 0;
    if let Some(Value::Array(messages)) = obj.get("messages") {
        total += messages
            .iter()
            .map(|m| m.get("content").map_or(0, text_of))
            .sum::<u64>();
    }
    if let Some(Value::Array(contents)) = obj.get("contents") {
        total += contents.iter().map(|c| parts_of(Some(c))).sum::<u64>();
    }
    total += obj.get("system").map_or(0, text_of);
    total += obj.get("instructions").map_or(0, text_of);
    total += parts_of(
        obj.get("systemInstruction")
            .or_else(|| obj.get("system_instruction")),
    );
    total
}

/// Which limit a 429 is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitKind {
    Requests,
    Tokens,
}

/// The errors the templates know how to write.
#[derive(Debug, Clone)]
pub(crate) enum ErrorCase {
    NotFound {
        method: String,
        path: String,
    },
    MethodNotAllowed {
        method: String,
        path: String,
    },
    BadRequest(BadRequest),
    BodyTooLarge {
        limit: usize,
    },
    ModelNotFound,
    QuotaExhausted,
    ContextLength {
        prompt: u64,
        window: u64,
    },
    RateLimited {
        kind: LimitKind,
        limit: u64,
        used: u64,
        requested: u64,
        /// The request alone is larger than the limit (retrying never helps).
        too_large: bool,
    },
    /// A scripted status (or an outage).
    Status(u16),
}

impl ErrorCase {
    pub(crate) fn status(&self) -> u16 {
        match self {
            ErrorCase::NotFound { .. } | ErrorCase::ModelNotFound => 404,
            ErrorCase::MethodNotAllowed { .. } => 405,
            ErrorCase::BadRequest(_) | ErrorCase::ContextLength { .. } => 400,
            ErrorCase::BodyTooLarge { .. } => 413,
            ErrorCase::QuotaExhausted | ErrorCase::RateLimited { .. } => 429,
            ErrorCase::Status(s) => *s,
        }
    }
}

/// Facts every template needs.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub(crate) model: String,
    /// Unique per call: `seq` of the call.
    pub(crate) seq: u64,
    /// The simulated wall-clock time of the request's arrival.
    pub(crate) wall_now: SystemTime,
    /// How long the client should wait, when the case has a wait.
    pub(crate) retry_after: Option<Duration>,
    /// Time until the next "day" (for per-day quotas).
    pub(crate) until_next_day: Duration,
}

impl Ctx {
    pub(crate) fn created(&self) -> u64 {
        self.wall_now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// A successful answer's shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Answer {
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u32,
    /// Cut short by the request's max tokens.
    pub(crate) truncated: bool,
    pub(crate) include_usage: bool,
    /// Gemini only: SSE (`alt=sse`) rather than a streamed JSON array.
    pub(crate) gemini_sse: bool,
}

impl Answer {
    pub(crate) fn total_tokens(&self) -> u64 {
        self.prompt_tokens + u64::from(self.completion_tokens)
    }

    pub(crate) fn text(&self) -> String {
        (0..self.completion_tokens).map(token_text).collect()
    }
}

/// How a stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// All tokens and the finishing events.
    Complete,
    /// Nothing at all after the head.
    StallBeforeFirst,
    /// Preamble and this many tokens, then a stall.
    StallAfter(u32),
    /// Preamble and this many tokens, then an error event, then the end.
    ErrorAfter(u32),
    /// Preamble and this many tokens, then a clean end without the finishing events.
    CutAfter(u32),
    /// Preamble and this many tokens, then a failed body.
    ResetAfter(u32),
}

impl StreamEnd {
    /// How many of `tokens` content events are sent and what follows them;
    /// `None` when nothing at all is sent.
    pub(crate) fn plan(self, tokens: u32) -> Option<(u32, Tail)> {
        match self {
            StreamEnd::StallBeforeFirst => None,
            StreamEnd::Complete => Some((tokens, Tail::Finish)),
            StreamEnd::StallAfter(k) | StreamEnd::CutAfter(k) | StreamEnd::ResetAfter(k) => {
                Some((k.min(tokens), Tail::None))
            }
            StreamEnd::ErrorAfter(k) => Some((k.min(tokens), Tail::Error)),
        }
    }
}

/// What follows the content events of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tail {
    /// Nothing (a stall).
    None,
    /// The mid-stream error event.
    Error,
    /// The finishing events.
    Finish,
}

/// One piece of a stream; token pieces are preceded by a token interval.
#[derive(Debug, Clone)]
pub(crate) struct Piece {
    pub(crate) bytes: Bytes,
    pub(crate) is_token: bool,
}

impl Piece {
    pub(crate) fn meta(bytes: String) -> Self {
        Piece {
            bytes: Bytes::from(bytes),
            is_token: false,
        }
    }

    pub(crate) fn token(bytes: String) -> Self {
        Piece {
            bytes: Bytes::from(bytes),
            is_token: true,
        }
    }
}

const WORDS: [&str; 12] = [
    "Hello",
    " from",
    " the",
    " simulated",
    " provider",
    ":",
    " one",
    " token",
    " per",
    " event",
    ",",
    " again.",
];

/// The text of completion token `i` (deterministic).
pub(crate) fn token_text(i: u32) -> &'static str {
    WORDS[i as usize % WORDS.len()]
}

/// A Go `time.Duration.String()`-style duration, as OpenAI's
/// `x-ratelimit-reset-*` headers use: `0s`, `12ms`, `1.5s`, `6m0s`, `1h2m3s`.
pub(crate) fn go_duration(d: Duration) -> String {
    fn frac(value: u128, unit: u128, width: usize) -> String {
        let int = value / unit;
        let rem = value % unit;
        if rem == 0 {
            int.to_string()
        } else {
            let digits = format!("{rem:0width$}");
            format!("{int}.{}", digits.trim_end_matches('0'))
        }
    }
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}µs", frac(nanos, 1_000, 3));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", frac(nanos, 1_000_000, 6));
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let s = frac(
        u128::from(s) * 1_000_000_000 + u128::from(d.subsec_nanos()),
        1_000_000_000,
        9,
    );
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// Whole seconds, rounded up (a wait must never be under-stated).
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Milliseconds, rounded up.
pub(crate) fn ceil_millis(d: Duration) -> u128 {
    d.as_nanos().div_ceil(1_000_000)
}

/// Civil date (year, month, day) of a day count since 1970-01-01.
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `YYYY-MM-DDTHH:MM:SSZ`, rounded up to the whole second.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = ceil_secs(d) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, mo, da) = civil_from_days(days);
    format!(
        "{y:04}-{mo:02}-{da:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// The first day of the month after `t`, as `YYYY-MM-DD`.
pub(crate) fn first_of_next_month(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (y, m, _) = civil_from_days((d.as_secs() / 86_400) as i64);
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    format!("{y:04}-{m:02}-01")
}

/// `Ns` or `N.NNNs`: protobuf JSON `Duration`, as Gemini's `retryDelay`.
/// Whole seconds, rounded up, as the live API mostly sends (`"26s"`).
pub(crate) fn proto_duration(d: Duration) -> String {
    format!("{}s", ceil_secs(d))
}

/// `data: <json>` SSE frame with LF framing.
pub(crate) fn sse_data(json: &Value) -> String {
    format!("data: {json}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_look_like_go() {
        let ms = Duration::from_millis;
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(ms(12)), "12ms");
        assert_eq!(go_duration(Duration::from_micros(1500)), "1.5ms");
        assert_eq!(go_duration(ms(1000)), "1s");
        assert_eq!(go_duration(ms(7660)), "7.66s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(go_duration(ms(179_560)), "2m59.56s");
        assert_eq!(go_duration(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(go_duration(Duration::from_nanos(5)), "5ns");
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        // 2024-03-26T20:00:00Z
        let t = UNIX_EPOCH + Duration::from_secs(1_711_483_200);
        assert_eq!(rfc3339(t), "2024-03-26T20:00:00Z");
        assert_eq!(
            rfc3339(t + Duration::from_millis(1)),
            "2024-03-26T20:00:01Z"
        );
        assert_eq!(first_of_next_month(t), "2024-04-01");
        let dec = UNIX_EPOCH + Duration::from_secs(1_703_980_800); // 2023-12-31
        assert_eq!(first_of_next_month(dec), "2024-01-01");
        assert_eq!(rfc3339(dec), "2023-12-31T00:00:00Z");
    }

    #[test]
    fn routes() {
        let h = HeaderMap::new();
        let r = |p: &str| route(&Method::POST, &p.parse().unwrap(), &h);
        assert_eq!(r("/v1/chat/completions").unwrap().dialect, Dialect::OpenAi);
        assert_eq!(r("/v1/messages").unwrap().dialect, Dialect::Anthropic);
        let az = r("/openai/deployments/gpt4/chat/completions?api-version=2024-10-21").unwrap();
        assert_eq!(
            (az.dialect, az.path_model.as_deref()),
            (Dialect::AzureOpenAi, Some("gpt4"))
        );
        let g = r("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse").unwrap();
        assert!(g.gemini_stream && g.gemini_sse);
        assert_eq!(g.path_model.as_deref(), Some("gemini-2.0-flash"));
        let g = r("/v1beta/models/gemini-2.0-flash:streamGenerateContent").unwrap();
        assert!(g.gemini_stream && !g.gemini_sse);
        assert!(!r("/v1beta/models/x:generateContent").unwrap().gemini_stream);
        assert!(matches!(
            r("/v1beta/models/x:countTokens"),
            Err(RouteError::NotFound(Dialect::Gemini))
        ));
        assert!(matches!(
            r("/v2/foo"),
            Err(RouteError::NotFound(Dialect::OpenAi))
        ));
        assert!(matches!(
            route(&Method::GET, &"/v1/messages".parse().unwrap(), &h),
            Err(RouteError::MethodNotAllowed(Dialect::Anthropic))
        ));
    }

    #[test]
    fn prompt_estimate() {
        let openai = Route {
            dialect: Dialect::OpenAi,
            path_model: None,
            gemini_stream: false,
            gemini_sse: false,
        };
        let f = parse_request(
            &openai,
            r#"{"model":"m","messages":[{"role":"user","content":"abcdefgh"},
                {"role":"user","content":[{"type":"text","text":"é"}]}],"instructions":"x"}"#
                .as_bytes(),
        )
        .unwrap();
        // 8 + 2 (é is two bytes) + 1 = 11 bytes -> 3 tokens
        assert_eq!(f.text_bytes, 11);
        assert_eq!(f.prompt_tokens(), 3);
        let f = parse_request(&openai, br#"{"model":"m","messages":[]}"#).unwrap();
        assert_eq!(f.prompt_tokens(), 1);
        let gem = Route {
            dialect: Dialect::Gemini,
            path_model: Some("g".into()),
            gemini_stream: true,
            gemini_sse: true,
        };
        let f = parse_request(
            &gem,
            br#"{"contents":[{"role":"user","parts":[{"text":"abcd"},{"text":"efgh"}]}],
                "systemInstruction":{"parts":[{"text":"sys!"}]},
                "generationConfig":{"maxOutputTokens":5}}"#,
        )
        .unwrap();
        assert_eq!((f.text_bytes, f.max_tokens, f.stream), (12, Some(5), true));
        assert_eq!(f.model, "g");
    }

    #[test]
    fn bad_bodies() {
        let openai = Route {
            dialect: Dialect::OpenAi,
            path_model: None,
            gemini_stream: false,
            gemini_sse: false,
        };
        for body in [
            &b""[..],
            b"not json",
            b"[1,2]",
            b"{}",
            br#"{"model":5}"#,
            br#"{"model":"m","stream":"yes"}"#,
            br#"{"model":"m","max_tokens":-1}"#,
            br#"{"model":"m","max_tokens":0}"#,
        ] {
            assert!(parse_request(&openai, body).is_err(), "{body:?}");
        }
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(10_000));
        assert!(parse_request(&openai, long.as_bytes()).is_err());
    }
}
