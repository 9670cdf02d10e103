//! What a streamed answer says, event by event, in each provider's dialect.
//!
//! [`StreamScanner`] sits on top of the [`SseParser`](crate::sse::SseParser) and turns
//! events into facts: was that content or only a sign of life, did the provider send an
//! error inside the 200 stream, did the stream end with its terminal marker, why did the
//! model stop, how many tokens were used. StallDetector and TokenBudget both read streams
//! through it, so the dialect rules live in one place.

use http::StatusCode;
use memchr::memmem;
use serde_json::Value;

use crate::classify::{classify_at, Classification, ClassifyConfig};
use crate::meta::Usage;
use crate::provider::Provider;
use crate::sse::{SseItem, SseParser};

/// Whether a response is a Server-Sent Events stream: its `content-type` is
/// `text/event-stream` (any case, parameters and surrounding spaces allowed).
pub fn is_event_stream(headers: &http::HeaderMap) -> bool {
    const SSE: &[u8] = b"text/event-stream";
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes().trim_ascii_start();
        v.len() >= SSE.len()
            && v[..SSE.len()].eq_ignore_ascii_case(SSE)
            && matches!(v.get(SSE.len()), None | Some(b';' | b' ' | b'\t'))
    })
}

/// The streaming dialect of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StreamDialect {
    /// OpenAI Chat Completions (and Azure, and OpenAI-compatible servers): `data:` only,
    /// ends with `data: [DONE]`.
    OpenAiChat,
    /// OpenAI Responses: named events, ends with `response.completed`, `.incomplete` or
    /// `.failed`.
    OpenAiResponses,
    /// Anthropic Messages: named events, ends with `message_stop`.
    Anthropic,
    /// Gemini `streamGenerateContent?alt=sse`: whole response objects, ends at EOF.
    Gemini,
}

impl StreamDialect {
    /// The dialect of a request to `provider` at `path`.
    ///
    /// The path decides first, since providers serve each other's dialects
    /// (Anthropic's and Gemini's OpenAI-compatible `/chat/completions` stream OpenAI
    /// chunks); the provider decides for paths it does not know.
    pub fn of(provider: Provider, path: &str) -> StreamDialect {
        if path.ends_with("/chat/completions") || path.ends_with("/completions") {
            return StreamDialect::OpenAiChat;
        }
        if path.ends_with("/responses") {
            return StreamDialect::OpenAiResponses;
        }
        if path.ends_with("/messages") {
            return StreamDialect::Anthropic;
        }
        if path.contains(":streamGenerateContent") || path.contains(":generateContent") {
            return StreamDialect::Gemini;
        }
        match provider {
            Provider::Anthropic => StreamDialect::Anthropic,
            Provider::Gemini => StreamDialect::Gemini,
            _ => StreamDialect::OpenAiChat,
        }
    }

    /// Whether a complete stream ends with a marker of its own (all but Gemini's).
    pub fn has_terminal_marker(self) -> bool {
        !matches!(self, StreamDialect::Gemini)
    }

    fn provider(self) -> Provider {
        match self {
            StreamDialect::OpenAiChat | StreamDialect::OpenAiResponses => Provider::OpenAi,
            StreamDialect::Anthropic => Provider::Anthropic,
            StreamDialect::Gemini => Provider::Gemini,
        }
    }
}

/// Why the model stopped, normalised across dialects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FinishReason {
    /// A natural end (`stop`, `end_turn`, `stop_sequence`, `STOP`).
    Stop,
    /// Cut by the output-token limit (`length`, `max_tokens`, `MAX_TOKENS`,
    /// `max_output_tokens`): the answer is incomplete, and JSON in it may not parse.
    Length,
    /// Cut by a content filter (`content_filter`, `SAFETY`, `refusal`, …).
    ContentFilter,
    /// The model called a tool (`tool_calls`, `tool_use`).
    ToolUse,
    /// Anything else (`pause_turn`, `model_context_window_exceeded`, `OTHER`, …).
    Other,
}

impl FinishReason {
    /// Reads a provider's finish/stop reason string.
    pub fn parse(s: &str) -> FinishReason {
        match s {
            "stop" | "end_turn" | "stop_sequence" | "STOP" => FinishReason::Stop,
            "length" | "max_tokens" | "MAX_TOKENS" | "max_output_tokens" => FinishReason::Length,
            "content_filter" | "refusal" | "SAFETY" | "RECITATION" | "BLOCKLIST"
            | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => FinishReason::ContentFilter,
            "tool_calls" | "tool_use" | "function_call" => FinishReason::ToolUse,
            _ => FinishReason::Other,
        }
    }

    /// Whether the answer was cut short by a limit.
    pub fn is_truncation(self) -> bool {
        self == FinishReason::Length
    }
}

/// What one chunk of a stream showed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkFacts {
    /// It completed at least one event with content (text, tool call deltas).
    pub content: bool,
    /// It completed some event or comment with no content (a `ping`, `: keepalive`, a
    /// `message_start`).
    pub liveness: bool,
    /// The provider's terminal marker arrived.
    pub terminal: bool,
    /// The provider sent an error inside the stream: classified, with status 200.
    pub error: Option<Classification>,
}

/// Reads a streamed answer chunk by chunk: see the module docs.
#[derive(Debug, Clone)]
pub struct StreamScanner {
    dialect: StreamDialect,
    parser: SseParser,
    content_seen: bool,
    terminal_seen: bool,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
}

impl StreamScanner {
    /// A scanner for `dialect`.
    pub fn new(dialect: StreamDialect) -> Self {
        StreamScanner {
            dialect,
            parser: SseParser::new(),
            content_seen: false,
            terminal_seen: false,
            finish: None,
            usage: None,
        }
    }

    /// The dialect read.
    pub fn dialect(&self) -> StreamDialect {
        self.dialect
    }

    /// Reads one chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) -> ChunkFacts {
        let mut facts = ChunkFacts::default();
        let mut parser = std::mem::take(&mut self.parser);
        parser.feed(chunk, |item| self.item(item, &mut facts));
        self.parser = parser;
        facts
    }

    /// Ends the stream (EOF), completing a last event that lacked its blank line.
    pub fn finish(&mut self) -> ChunkFacts {
        let mut facts = ChunkFacts::default();
        let mut parser = std::mem::take(&mut self.parser);
        parser.finish(|item| self.item(item, &mut facts));
        self.parser = parser;
        facts
    }

    /// Whether any content arrived.
    pub fn content_seen(&self) -> bool {
        self.content_seen
    }
    /// Whether the terminal marker arrived.
    pub fn terminal_seen(&self) -> bool {
        self.terminal_seen
    }
    /// Why the model stopped, once it said.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }
    /// The usage reported so far, merged by the dialect's rules (Anthropic's
    /// `message_delta` usage is cumulative; Gemini repeats `usageMetadata`, the last wins;
    /// OpenAI sends one usage chunk at the end, only with `include_usage`).
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    fn item(&mut self, item: SseItem<'_>, facts: &mut ChunkFacts) {
        match item {
            SseItem::Comment(_) => facts.liveness = true,
            SseItem::Oversized => facts.liveness = true,
            SseItem::OtherField { name, value } => {
                if name == b"error" {
                    facts.error = Some(stream_error(self.dialect.provider(), value));
                    self.terminal_seen = true;
                }
            }
            SseItem::Event { event, data } => self.event(event, data, facts),
        }
    }

    fn event(&mut self, event: &str, data: &[u8], facts: &mut ChunkFacts) {
        let has = |needle: &[u8]| memmem::find(data, needle).is_some();
        let mut content = false;
        match self.dialect {
            StreamDialect::OpenAiChat => {
                if data.starts_with(b"[DONE]") {
                    self.terminal_seen = true;
                    facts.terminal = true;
                    return;
                }
                if has(b"\"error\"") {
                    if let Some(err) = error_object(data) {
                        facts.error = Some(stream_error(Provider::OpenAi, &err));
                        return;
                    }
                }
                content = string_value_nonempty(data, b"\"content\"")
                    || string_value_nonempty(data, b"\"refusal\"")
                    || has(b"\"tool_calls\"")
                    || has(b"\"function_call\"");
                // Every chunk carries `"finish_reason":null` (and `"usage":null` with
                // include_usage): read the values in place, and only when they are set,
                // instead of parsing each chunk into a JSON tree.
                if let Some(r) = str_after(data, b"\"finish_reason\"") {
                    self.finish = Some(FinishReason::parse(r));
                }
                if object_after(data, b"\"usage\"") {
                    if let Some(input) = u64_after(data, b"\"prompt_tokens\"") {
                        self.usage = Some(Usage {
                            input_tokens: input,
                            output_tokens: u64_after(data, b"\"completion_tokens\"").unwrap_or(0),
                        });
                    }
                }
            }
            StreamDialect::OpenAiResponses => match event {
                "error" => {
                    facts.error = Some(stream_error(Provider::OpenAi, data));
                }
                "response.completed" | "response.incomplete" | "response.failed" => {
                    self.terminal_seen = true;
                    facts.terminal = true;
                    if let Ok(v) = serde_json::from_slice::<Value>(data) {
                        let resp = v.get("response").unwrap_or(&Value::Null);
                        if let Some(u) = Usage::from_value(resp) {
                            self.usage = Some(u);
                        }
                        if let Some(r) = resp
                            .get("incomplete_details")
                            .and_then(|d| d.get("reason"))
                            .and_then(Value::as_str)
                        {
                            self.finish = Some(FinishReason::parse(r));
                        } else if event == "response.completed" {
                            self.finish = Some(FinishReason::Stop);
                        }
                        if event == "response.failed" {
                            let err = resp.get("error").map(|e| e.to_string()).unwrap_or_default();
                            facts.error = Some(stream_error(Provider::OpenAi, err.as_bytes()));
                        }
                    }
                }
                e => content = e.ends_with(".delta"),
            },
            StreamDialect::Anthropic => match event {
                "error" => facts.error = Some(stream_error(Provider::Anthropic, data)),
                "message_stop" => {
                    self.terminal_seen = true;
                    facts.terminal = true;
                }
                "content_block_delta" => content = true,
                "message_start" | "message_delta" => {
                    if let Ok(v) = serde_json::from_slice::<Value>(data) {
                        let (usage_at, delta) = if event == "message_start" {
                            (v.get("message").and_then(|m| m.get("usage")), None)
                        } else {
                            (v.get("usage"), v.get("delta"))
                        };
                        if let Some(u) = usage_at {
                            if let Some(new) = Usage::from_usage_object(u) {
                                let old = self.usage.unwrap_or_default();
                                self.usage = Some(Usage {
                                    // message_delta's input fields are optional: keep the
                                    // message_start count unless it sends one.
                                    input_tokens: if new.input_tokens > 0 {
                                        new.input_tokens
                                    } else {
                                        old.input_tokens
                                    },
                                    output_tokens: new.output_tokens,
                                });
                            }
                        }
                        if let Some(r) = delta
                            .and_then(|d| d.get("stop_reason"))
                            .and_then(Value::as_str)
                        {
                            self.finish = Some(FinishReason::parse(r));
                        }
                    }
                }
                _ => {}
            },
            StreamDialect::Gemini => {
                if data.trim_ascii_start().starts_with(b"{\"error\"")
                    || has(b"\"error\":") && !has(b"\"candidates\"")
                {
                    if let Some(err) = error_object(data) {
                        facts.error = Some(stream_error(Provider::Gemini, &err));
                        return;
                    }
                }
                content = has(b"\"text\"") || has(b"\"functionCall\"");
                // Gemini repeats `usageMetadata` on every chunk: read its counts in place.
                if let Some(r) = str_after(data, b"\"finishReason\"") {
                    self.finish = Some(FinishReason::parse(r));
                }
                if object_after(data, b"\"usageMetadata\"") {
                    let n = |k: &[u8]| u64_after(data, k).unwrap_or(0);
                    self.usage = Some(Usage {
                        input_tokens: n(b"\"promptTokenCount\""),
                        output_tokens: n(b"\"candidatesTokenCount\"")
                            .saturating_add(n(b"\"thoughtsTokenCount\"")),
                    });
                }
            }
        }
        if content {
            self.content_seen = true;
            facts.content = true;
        } else {
            facts.liveness = true;
        }
    }
}

/// Re-serialises a data payload's truthy `error` member as `{"error": …}`, or `None` when
/// it has none (a `"error": null` field in an ordinary chunk).
fn error_object(data: &[u8]) -> Option<Vec<u8>> {
    let v: Value = serde_json::from_slice(data).ok()?;
    let e = v.get("error")?;
    let truthy = match e {
        Value::Null | Value::Bool(false) => false,
        Value::String(s) => !s.is_empty(),
        _ => true,
    };
    truthy.then(|| data.to_vec())
}

/// The position just after `key` and its colon (whitespace skipped), for each place the
/// key appears.
fn values_after<'a>(data: &'a [u8], key: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    memmem::find_iter(data, key).filter_map(move |i| {
        let mut j = i + key.len();
        while matches!(data.get(j), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            j += 1;
        }
        if data.get(j) != Some(&b':') {
            return None;
        }
        j += 1;
        while matches!(data.get(j), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            j += 1;
        }
        Some(j)
    })
}

/// The first string value of `key` (an unescaped short string: a finish reason).
fn str_after<'a>(data: &'a [u8], key: &'a [u8]) -> Option<&'a str> {
    values_after(data, key).find_map(|j| {
        let rest = data.get(j..)?.strip_prefix(b"\"")?;
        let end = memchr::memchr2(b'"', b'\\', rest)?;
        (rest[end] == b'"')
            .then(|| std::str::from_utf8(&rest[..end]).ok())
            .flatten()
    })
}

/// The first non-negative integer value of `key`.
fn u64_after(data: &[u8], key: &[u8]) -> Option<u64> {
    values_after(data, key).find_map(|j| {
        let digits = data
            .get(j..)?
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        std::str::from_utf8(&data[j..j + digits]).ok()?.parse().ok()
    })
}

/// Whether some value of `key` is an object (not `null`).
fn object_after(data: &[u8], key: &[u8]) -> bool {
    values_after(data, key).any(|j| data.get(j) == Some(&b'{'))
}

/// Whether `"key": "<non-empty string>"` appears in `data`.
fn string_value_nonempty(data: &[u8], key: &[u8]) -> bool {
    values_after(data, key)
        .any(|j| data.get(j) == Some(&b'"') && data.get(j + 1).is_some_and(|&b| b != b'"'))
}

/// Classifies an error that arrived inside a 200 stream, by what the error object says
/// rather than by the (successful) HTTP status. The result keeps status 200.
pub fn stream_error(provider: Provider, json: &[u8]) -> Classification {
    let status = effective_status(json);
    let mut c = classify_at(
        provider,
        status,
        &http::HeaderMap::new(),
        json,
        &ClassifyConfig::default(),
        std::time::SystemTime::UNIX_EPOCH,
    );
    c.status = StatusCode::OK;
    c
}

/// The HTTP status an in-stream error would have had: its numeric `code` (Gemini, vLLM,
/// llama.cpp), else what its `type` or `code` name means.
fn effective_status(json: &[u8]) -> StatusCode {
    let Ok(v) = serde_json::from_slice::<Value>(json) else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    let e = match v.get("error") {
        Some(e @ Value::Object(_)) => e,
        _ => &v,
    };
    if let Some(code) = e.get("code").and_then(Value::as_u64) {
        if let Ok(s) = StatusCode::from_u16(code as u16) {
            if (400..600).contains(&code) {
                return s;
            }
        }
    }
    let name = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("");
    let status = match (name("type"), name("code")) {
        ("overloaded_error", _)
        | (_, "server_is_overloaded")
        | ("service_unavailable_error", _) => 529,
        (_, "rate_limit_exceeded") | ("rate_limit_error", _) | ("tokens", _) | ("requests", _) => {
            429
        }
        ("insufficient_quota", _) => 429,
        ("invalid_request_error", _) | (_, "invalid_prompt") | (_, "context_length_exceeded") => {
            400
        }
        ("authentication_error", _) => 401,
        ("permission_error", _) => 403,
        ("not_found_error", _) => 404,
        ("request_too_large", _) => 413,
        ("timeout_error", _) => 504,
        ("billing_error", _) => 402,
        _ => 500,
    };
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_stream_content_types() {
        let h = |v: &'static str| {
            let mut m = http::HeaderMap::new();
            m.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(v),
            );
            m
        };
        for yes in [
            "text/event-stream",
            "Text/Event-Stream; charset=utf-8",
            "  text/event-stream",
        ] {
            assert!(is_event_stream(&h(yes)), "{yes}");
        }
        for no in ["application/json", "text/event-streams", "text/event"] {
            assert!(!is_event_stream(&h(no)), "{no}");
        }
        assert!(!is_event_stream(&http::HeaderMap::new()));
    }
}
