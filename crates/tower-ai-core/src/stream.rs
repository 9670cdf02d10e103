//! What a streamed answer says, event by event, in each provider's dialect.
//!
//! [`StreamScanner`] sits on top of the [`SseParser`] and turns
//! events into facts: was that content or only a sign of life, did the provider send an
//! error inside the 200 stream, did the stream end with its terminal marker, why did the
//! model stop, how many tokens were used. StallDetector and TokenBudget both read streams
//! through it, so the dialect rules live in one place.

use http::StatusCode;
use serde_json::Value;

use crate::classify::{classify_at, Classification, ClassifyConfig};
use crate::meta::Usage;
use crate::provider::Provider;
use crate::sse::{SseItem, SseParser};

/// Whether a response is a Server-Sent Events stream: its `content-type` is
/// `text/event-stream` (any case, parameters and surrounding spaces allowed).
pub fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| is_media_type(v.as_bytes(), b"text/event-stream"))
}

/// Whether a `content-type` value names the media type `media` (given in lower case):
/// in any case, after leading spaces, and followed by nothing, parameters or spaces.
///
/// ```
/// use tower_ai_core::stream::is_media_type;
///
/// assert!(is_media_type(b" Application/JSON; charset=utf-8", b"application/json"));
/// assert!(!is_media_type(b"application/jsonl", b"application/json"));
/// ```
pub fn is_media_type(content_type: &[u8], media: &[u8]) -> bool {
    let v = content_type.trim_ascii_start();
    v.len() >= media.len()
        && v[..media.len()].eq_ignore_ascii_case(media)
        && matches!(v.get(media.len()), None | Some(b';' | b' ' | b'\t'))
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
    /// Gemini `streamGenerateContent?alt=sse`: whole response objects; the last
    /// candidate chunk carries a `finishReason`, which is the stream's terminal marker
    /// (a stream that ends without one was cut).
    Gemini,
}

impl StreamDialect {
    /// The dialect of a request to `provider` at `path`.
    ///
    /// The path decides first ([`of_path`](StreamDialect::of_path)), since providers serve
    /// each other's dialects (Anthropic's and Gemini's OpenAI-compatible
    /// `/chat/completions` stream OpenAI chunks); the provider decides for paths it does
    /// not know.
    pub fn of(provider: Provider, path: &str) -> StreamDialect {
        StreamDialect::of_path(path).unwrap_or(match provider {
            Provider::Anthropic => StreamDialect::Anthropic,
            Provider::Gemini => StreamDialect::Gemini,
            _ => StreamDialect::OpenAiChat,
        })
    }

    /// The dialect the endpoint at `path` streams, if the path names a known endpoint
    /// (`…/chat/completions`, `…/completions`, `…/responses`, `…/messages`,
    /// `:streamGenerateContent`, `:generateContent`), whoever serves it.
    ///
    /// ```
    /// use tower_ai_core::stream::StreamDialect;
    /// assert_eq!(StreamDialect::of_path("/v1/messages"), Some(StreamDialect::Anthropic));
    /// assert_eq!(StreamDialect::of_path("/v1/complete"), None);
    /// ```
    pub fn of_path(path: &str) -> Option<StreamDialect> {
        // `/chat/completions` and the legacy `/completions`.
        if path.ends_with("/completions") {
            return Some(StreamDialect::OpenAiChat);
        }
        if path.ends_with("/responses") {
            return Some(StreamDialect::OpenAiResponses);
        }
        if path.ends_with("/messages") {
            return Some(StreamDialect::Anthropic);
        }
        if path.contains(":streamGenerateContent") || path.contains(":generateContent") {
            return Some(StreamDialect::Gemini);
        }
        None
    }

    /// Whether a complete stream ends with a marker of its own: all four do (`[DONE]`,
    /// `response.completed`/`.incomplete`/`.failed`, `message_stop`, and Gemini's
    /// `finishReason` on its last candidate chunk, see the `FinishReason` enum of the
    /// Gemini API reference).
    pub fn has_terminal_marker(self) -> bool {
        true
    }

    /// The provider whose dialect this is (OpenAI for both of OpenAI's).
    pub fn provider(self) -> Provider {
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

    /// A short lowercase name, the same for every dialect: `stop`, `length`,
    /// `content_filter`, `tool_call` (the names of the OpenTelemetry GenAI output
    /// messages' finish reasons) or `other`.
    pub const fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::ToolUse => "tool_call",
            FinishReason::Other => "other",
        }
    }

    /// Whether the answer was cut short by a limit.
    pub fn is_truncation(self) -> bool {
        self == FinishReason::Length
    }

    /// Why the model stopped, read from a whole non-streamed JSON answer of any dialect:
    /// OpenAI Chat's `finish_reason` (any choice cut by the limit makes it
    /// [`Length`](FinishReason::Length)), Anthropic's `stop_reason`, Gemini's
    /// `finishReason` (any candidate), OpenAI Responses' `incomplete_details.reason`
    /// (`status: "completed"` is [`Stop`](FinishReason::Stop)).
    ///
    /// One pass over the body's colons, as the stream scanner reads events: no tree is
    /// built, and keys inside strings (an answer quoting JSON) are never taken for keys.
    ///
    /// ```
    /// use tower_ai_core::stream::FinishReason;
    /// let body = br#"{"choices":[{"message":{"content":""finish_reason":"stop""},"finish_reason":"length"}]}"#;
    /// assert_eq!(FinishReason::of_answer(body), Some(FinishReason::Length));
    /// let body = br#"{"object":"response","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"}}"#;
    /// assert_eq!(FinishReason::of_answer(body), Some(FinishReason::Length));
    /// ```
    pub fn of_answer(json: &[u8]) -> Option<FinishReason> {
        let mut found: Option<FinishReason> = None;
        let mut note = |r: Option<&str>| {
            if let Some(r) = r.map(FinishReason::parse) {
                if found.is_none() || r == FinishReason::Length {
                    found = Some(r);
                }
            }
        };
        let mut incomplete = false;
        let mut completed = false;
        each_key(json, |k| match k.last() {
            b'n' if k.is(b"finish_reason") || k.is(b"stop_reason") || k.is(b"finishReason") => {
                note(string_at(json, k.value()))
            }
            b's' if k.is(b"incomplete_details") => incomplete |= json.get(k.value()) == Some(&b'{'),
            b'n' if incomplete && k.is(b"reason") => note(string_at(json, k.value())),
            b's' if k.is(b"status") => completed |= string_at(json, k.value()) == Some("completed"),
            _ => {}
        });
        found.or(completed.then_some(FinishReason::Stop))
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
///
/// Each event is read once where it lies (in the chunk, or in the parser's buffer when it
/// spanned chunks): named events are told apart by their name, and a JSON payload by one
/// `memchr` pass over its colons that looks only at the keys the dialect puts its facts
/// under. Nothing is allocated per event; an in-stream error, Anthropic's usage events and
/// OpenAI Responses' terminal event are parsed in full (once per stream).
#[derive(Debug, Clone)]
pub struct StreamScanner {
    parser: SseParser,
    state: ScanState,
}

/// What the scanner learnt so far (apart from the parser, so that the parser's callback
/// can update it).
#[derive(Debug, Clone)]
struct ScanState {
    dialect: StreamDialect,
    content_seen: bool,
    terminal_seen: bool,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    /// An event over the bound was seen.
    oversized: bool,
    /// The last event over the bound held no usage that its tail showed: the usage it
    /// may have had is not known.
    oversized_unread: bool,
    /// The error found in the chunk being read (kept here rather than in the chunk's
    /// facts, which are then built in place: a classification is large).
    error: Option<Classification>,
}

/// What the chunk being read showed, but an error.
#[derive(Default)]
struct Seen {
    content: bool,
    liveness: bool,
    terminal: bool,
}

impl StreamScanner {
    /// A scanner for `dialect`, with the parser's default event bound
    /// ([`DEFAULT_MAX_EVENT`](crate::sse::DEFAULT_MAX_EVENT)).
    pub fn new(dialect: StreamDialect) -> Self {
        StreamScanner::with_max_event(dialect, crate::sse::DEFAULT_MAX_EVENT)
    }

    /// A scanner for `dialect` whose parser holds at most `max_event` bytes of one event
    /// ([`SseParser::with_max_event`]). A larger event is not read whole, but its name and
    /// the start of its data still tell a terminal event or an error, and the end of its
    /// data a Gemini `finishReason` and a usage object (see [`SseItem::Oversized`] and
    /// [`oversized_unread`](StreamScanner::oversized_unread)).
    pub fn with_max_event(dialect: StreamDialect, max_event: usize) -> Self {
        StreamScanner {
            parser: SseParser::with_max_event(max_event),
            state: ScanState {
                dialect,
                content_seen: false,
                terminal_seen: false,
                finish: None,
                usage: None,
                oversized: false,
                oversized_unread: false,
                error: None,
            },
        }
    }

    /// The dialect read.
    pub fn dialect(&self) -> StreamDialect {
        self.state.dialect
    }

    /// Reads one chunk of the body.
    #[inline]
    pub fn feed(&mut self, chunk: &[u8]) -> ChunkFacts {
        let mut seen = Seen::default();
        let state = &mut self.state;
        self.parser.feed(chunk, |item| state.item(item, &mut seen));
        self.state.facts(seen)
    }

    /// [`feed`](StreamScanner::feed), with `inspect` called first with each complete
    /// event (its name and data, as [`SseItem::Event`] gives them): for a reader that
    /// wants more of an event than the scanner keeps (the response id and model, say),
    /// without parsing the stream twice. `feed` itself inspects nothing.
    ///
    /// ```
    /// use tower_ai_core::stream::{StreamDialect, StreamScanner};
    /// let mut scanner = StreamScanner::new(StreamDialect::Anthropic);
    /// let mut names = Vec::new();
    /// scanner.feed_with(b"event: ping\ndata: {}\n\n", |event, _data| names.push(event.to_owned()));
    /// assert_eq!(names, ["ping"]);
    /// ```
    #[inline]
    pub fn feed_with(&mut self, chunk: &[u8], mut inspect: impl FnMut(&str, &[u8])) -> ChunkFacts {
        let mut seen = Seen::default();
        let state = &mut self.state;
        self.parser.feed(chunk, |item| {
            if let SseItem::Event { event, data } = &item {
                inspect(event, data);
            }
            state.item(item, &mut seen)
        });
        self.state.facts(seen)
    }

    /// Ends the stream (EOF), completing a last event that lacked its blank line.
    pub fn finish(&mut self) -> ChunkFacts {
        let mut seen = Seen::default();
        let state = &mut self.state;
        self.parser.finish(|item| state.item(item, &mut seen));
        self.state.facts(seen)
    }

    /// Whether any content arrived.
    pub fn content_seen(&self) -> bool {
        self.state.content_seen
    }
    /// Whether the terminal marker arrived.
    pub fn terminal_seen(&self) -> bool {
        self.state.terminal_seen
    }
    /// Whether an event over the bound was seen: only its name, its start and its end were
    /// read (see [`oversized_unread`](StreamScanner::oversized_unread)).
    pub fn oversized_seen(&self) -> bool {
        self.state.oversized
    }
    /// Whether the last event over the bound showed no usage in the end kept of it, so
    /// that a usage it held is not known (a budget should not settle below its
    /// reservation then). An oversized event whose end holds a usage object that the
    /// scanner reads there (OpenAI Chat's and Responses' `usage`, Anthropic
    /// `message_delta`'s, Gemini's `usageMetadata`) leaves it false: the dialects report
    /// usage cumulatively, so that one is the count so far.
    pub fn oversized_unread(&self) -> bool {
        self.state.oversized_unread
    }
    /// Why the model stopped, once it said.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.state.finish
    }
    /// The usage reported so far, merged by the dialect's rules (Anthropic's
    /// `message_delta` usage is cumulative; Gemini repeats `usageMetadata`, the last wins;
    /// OpenAI sends one usage chunk at the end, only with `include_usage`).
    pub fn usage(&self) -> Option<Usage> {
        self.state.usage
    }
}

/// What an OpenAI Chat chunk says, gathered in one pass over its keys.
#[derive(Default)]
struct ChatChunk<'a> {
    error: bool,
    content: bool,
    finish: Option<&'a str>,
    usage: bool,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

/// What a Gemini chunk says, gathered in one pass over its keys.
#[derive(Default)]
struct GeminiChunk<'a> {
    error: bool,
    error_first: bool,
    candidates: bool,
    content: bool,
    finish: Option<&'a str>,
    usage: bool,
    prompt: Option<u64>,
    candidates_tokens: Option<u64>,
    thoughts: Option<u64>,
}

/// Sets `slot` to `value` unless it was set: the first occurrence of a key wins.
fn first<T>(slot: &mut Option<T>, value: impl FnOnce() -> Option<T>) {
    if slot.is_none() {
        *slot = value();
    }
}

impl ScanState {
    /// The facts of the chunk just read.
    #[inline]
    fn facts(&mut self, seen: Seen) -> ChunkFacts {
        let mut facts = ChunkFacts {
            content: seen.content,
            liveness: seen.liveness,
            terminal: seen.terminal,
            error: None,
        };
        if self.error.is_some() {
            facts.error = self.error.take();
        }
        facts
    }

    fn item(&mut self, item: SseItem<'_>, seen: &mut Seen) {
        match item {
            SseItem::Comment(_) => seen.liveness = true,
            SseItem::Oversized { event, head, tail } => self.oversized(event, head, tail, seen),
            SseItem::OtherField { name, value } => {
                if name == b"error" {
                    self.error = Some(stream_error(self.dialect.provider(), value));
                    self.terminal_seen = true;
                }
            }
            SseItem::Event { event, data } => self.event(event, data, seen),
        }
    }

    fn event(&mut self, event: &str, data: &[u8], seen: &mut Seen) {
        let mut content = false;
        match self.dialect {
            StreamDialect::OpenAiChat => {
                if data.starts_with(b"[DONE]") {
                    self.terminal_seen = true;
                    seen.terminal = true;
                    return;
                }
                // Every chunk carries `"finish_reason":null` (and `"usage":null` with
                // include_usage): the values are read where they are, only when set.
                let mut c = ChatChunk::default();
                each_key(data, |k| match k.last() {
                    b'r' if k.is(b"error") => c.error = true,
                    b't' if k.is(b"content") => c.content |= nonempty_string_at(data, k.value()),
                    b'l' if k.is(b"refusal") => c.content |= nonempty_string_at(data, k.value()),
                    b's' if k.is(b"tool_calls") => c.content = true,
                    b'l' if k.is(b"function_call") => c.content = true,
                    b'n' if k.is(b"finish_reason") => {
                        first(&mut c.finish, || string_at(data, k.value()))
                    }
                    b'e' if k.is(b"usage") => c.usage |= data.get(k.value()) == Some(&b'{'),
                    b's' if k.is(b"prompt_tokens") => {
                        first(&mut c.prompt_tokens, || u64_at(data, k.value()))
                    }
                    b's' if k.is(b"completion_tokens") => {
                        first(&mut c.completion_tokens, || u64_at(data, k.value()))
                    }
                    _ => {}
                });
                if c.error {
                    if let Some(err) = error_object(data) {
                        self.error = Some(stream_error(Provider::OpenAi, &err));
                        return;
                    }
                }
                content = c.content;
                if let Some(r) = c.finish {
                    self.finish = Some(FinishReason::parse(r));
                }
                if let (true, Some(input)) = (c.usage, c.prompt_tokens) {
                    self.usage = Some(Usage {
                        input_tokens: input,
                        output_tokens: c.completion_tokens.unwrap_or(0),
                    });
                }
            }
            StreamDialect::OpenAiResponses => match event {
                "error" => {
                    self.error = Some(stream_error(Provider::OpenAi, data));
                }
                "response.completed" | "response.incomplete" | "response.failed" => {
                    self.terminal_seen = true;
                    seen.terminal = true;
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
                            self.error = Some(stream_error(Provider::OpenAi, err.as_bytes()));
                        }
                    }
                }
                e => content = e.ends_with(".delta"),
            },
            StreamDialect::Anthropic => match event {
                "content_block_delta" => content = true,
                "error" => self.error = Some(stream_error(Provider::Anthropic, data)),
                "message_stop" => {
                    self.terminal_seen = true;
                    seen.terminal = true;
                }
                "message_start" => {
                    // The usage is the message's own.
                    if let Some(m) = member(data, b"message") {
                        self.merge_anthropic_usage(anthropic_usage(&data[m]));
                    }
                }
                "message_delta" => {
                    self.merge_anthropic_usage(anthropic_usage(data));
                    let stop = member(data, b"delta")
                        .and_then(|d| Some(d.start + member(&data[d], b"stop_reason")?.start))
                        .and_then(|at| json_string(data, at));
                    if let Some(r) = stop {
                        self.finish = Some(FinishReason::parse(&r));
                    }
                }
                _ => {}
            },
            StreamDialect::Gemini => {
                let mut g = GeminiChunk::default();
                let mut keys = 0usize;
                each_key(data, |k| {
                    match k.last() {
                        b'r' if k.is(b"error") => {
                            g.error = true;
                            g.error_first |= keys == 0;
                        }
                        b's' if k.is(b"candidates") => g.candidates = true,
                        b't' if k.is(b"text") => g.content = true,
                        b'l' if k.is(b"functionCall") => g.content = true,
                        b'n' if k.is(b"finishReason") => {
                            first(&mut g.finish, || string_at(data, k.value()))
                        }
                        b'a' if k.is(b"usageMetadata") => {
                            g.usage |= data.get(k.value()) == Some(&b'{')
                        }
                        b't' if k.is(b"promptTokenCount") => {
                            first(&mut g.prompt, || u64_at(data, k.value()))
                        }
                        b't' if k.is(b"candidatesTokenCount") => {
                            first(&mut g.candidates_tokens, || u64_at(data, k.value()))
                        }
                        b't' if k.is(b"thoughtsTokenCount") => {
                            first(&mut g.thoughts, || u64_at(data, k.value()))
                        }
                        _ => {}
                    }
                    keys += 1;
                });
                if g.error && (g.error_first || !g.candidates) {
                    if let Some(err) = error_object(data) {
                        self.error = Some(stream_error(Provider::Gemini, &err));
                        return;
                    }
                }
                content = g.content;
                // A candidate's `finishReason` ends the stream: it is Gemini's terminal
                // marker (the chunk may carry the last text too).
                if let Some(r) = g.finish {
                    self.finish = Some(FinishReason::parse(r));
                    self.terminal_seen = true;
                    seen.terminal = true;
                }
                // Gemini repeats `usageMetadata` on every chunk: the last one wins.
                if g.usage {
                    self.usage = Some(Usage {
                        input_tokens: g.prompt.unwrap_or(0),
                        output_tokens: g
                            .candidates_tokens
                            .unwrap_or(0)
                            .saturating_add(g.thoughts.unwrap_or(0)),
                    });
                }
            }
        }
        if content {
            self.content_seen = true;
            seen.content = true;
        } else {
            seen.liveness = true;
        }
    }

    /// An event too large to read whole ([`SseItem::Oversized`]): what its name and the
    /// start of its data tell. Its name, else the `type` its payload starts with, says a
    /// terminal event (OpenAI Responses' `response.completed` with a large image inline is
    /// whole and paid for; `response.incomplete` gives its reason if it is in the start)
    /// or an error (an `error` event, or a payload whose first key is `error`: classified
    /// from the start, as much as it holds). Any other large event of OpenAI Chat or Gemini
    /// is content (nothing else is that large); of the named dialects, content if its name
    /// is a content delta, else a sign of life.
    ///
    /// Its tail (the last bytes of its data) gives what the event ends with, read by
    /// [`tail_finish`] and [`tail_usage`]: a Gemini candidates chunk's `finishReason` (its
    /// terminal marker, after the content: a chunk holding a large inline image ends the
    /// stream as a small one does) and `usageMetadata`, OpenAI Chat's `finish_reason` and
    /// `usage`, OpenAI Responses' `usage` in a terminal event, Anthropic `message_delta`'s
    /// `usage`.
    #[cold]
    fn oversized(&mut self, event: &str, head: &[u8], tail: &[u8], seen: &mut Seen) {
        self.oversized = true;
        self.oversized_unread = true;
        let mut ty = None;
        let mut reason = None;
        let mut error_first = false;
        let mut keys = 0usize;
        each_key(head, |k| {
            if keys == 0 && k.is(b"error") {
                error_first = true;
            }
            if k.is(b"type") {
                first(&mut ty, || string_at(head, k.value()));
            }
            if k.is(b"reason") {
                first(&mut reason, || string_at(head, k.value()));
            }
            keys += 1;
        });
        let name = if event == "message" {
            ty.unwrap_or("")
        } else {
            event
        };
        if error_first || name == "error" {
            self.error = Some(stream_error(self.dialect.provider(), &salvage_error(head)));
            return;
        }
        let content = match self.dialect {
            StreamDialect::OpenAiResponses => match name {
                "response.completed" | "response.incomplete" | "response.failed" => {
                    self.terminal_seen = true;
                    seen.terminal = true;
                    if let Some(u) = tail_usage(tail, b"usage") {
                        self.usage = Some(u);
                        self.oversized_unread = false;
                    }
                    match (name, reason) {
                        ("response.failed", _) => {
                            self.error = Some(stream_error(Provider::OpenAi, &salvage_error(head)));
                        }
                        (_, Some(r)) => self.finish = Some(FinishReason::parse(r)),
                        ("response.completed", None) => self.finish = Some(FinishReason::Stop),
                        _ => {}
                    }
                    false
                }
                n => n.ends_with(".delta"),
            },
            StreamDialect::Anthropic => match name {
                "message_stop" => {
                    self.terminal_seen = true;
                    seen.terminal = true;
                    false
                }
                "message_delta" => {
                    if let Some(u) = tail_usage(tail, b"usage") {
                        self.merge_anthropic_usage(Some(u));
                        self.oversized_unread = false;
                    }
                    false
                }
                n => n == "content_block_delta",
            },
            StreamDialect::OpenAiChat => {
                if let Some(r) = tail_finish(tail, b"finish_reason", CHAT_FINISH) {
                    self.finish = Some(FinishReason::parse(r));
                }
                if let Some(u) = tail_usage(tail, b"usage") {
                    self.usage = Some(u);
                    self.oversized_unread = false;
                }
                true
            }
            StreamDialect::Gemini => {
                // Only a candidates chunk (its first key, in the head) ends the stream.
                let mut candidates = false;
                each_key(head, |k| candidates |= k.is(b"candidates"));
                if let Some(r) = candidates
                    .then(|| tail_finish(tail, b"finishReason", GEMINI_FINISH))
                    .flatten()
                {
                    self.finish = Some(FinishReason::parse(r));
                    self.terminal_seen = true;
                    seen.terminal = true;
                }
                if let Some(u) = tail_usage(tail, b"usageMetadata") {
                    self.usage = Some(u);
                    self.oversized_unread = false;
                }
                true
            }
        };
        if content {
            self.content_seen = true;
            seen.content = true;
        } else {
            seen.liveness = true;
        }
    }

    /// Merges the usage of an Anthropic `message_start` or `message_delta`: the output
    /// count is cumulative; `message_delta`'s input fields are optional, so the
    /// `message_start` count stays unless it sends one.
    fn merge_anthropic_usage(&mut self, new: Option<Usage>) {
        if let Some(new) = new {
            let old = self.usage.unwrap_or_default();
            self.usage = Some(Usage {
                input_tokens: if new.input_tokens > 0 {
                    new.input_tokens
                } else {
                    old.input_tokens
                },
                output_tokens: new.output_tokens,
            });
        }
    }
}

/// OpenAI Chat's finish reasons (the `finish_reason` enum of the Chat Completions API
/// reference).
const CHAT_FINISH: &[&str] = &[
    "stop",
    "length",
    "tool_calls",
    "content_filter",
    "function_call",
];

/// Gemini's finish reasons (the `FinishReason` enum of the Gemini API reference).
const GEMINI_FINISH: &[&str] = &[
    "FINISH_REASON_UNSPECIFIED",
    "STOP",
    "MAX_TOKENS",
    "SAFETY",
    "RECITATION",
    "LANGUAGE",
    "OTHER",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "MALFORMED_FUNCTION_CALL",
    "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT",
    "IMAGE_OTHER",
    "NO_IMAGE",
    "IMAGE_RECITATION",
    "UNEXPECTED_TOOL_CALL",
    "TOO_MANY_TOOL_CALLS",
];

/// The last `"key":` in the tail of an oversized event (its last bytes, which may begin
/// anywhere: inside a string, a number, a key).
///
/// The heuristic and its limits: keys are found as [`each_key`] finds them, so a key
/// quoted in the answer's text (`\"finishReason\":`, escaped) is never taken for one,
/// even when the tail begins inside that string; but the nesting of what is found is not
/// known, so JSON the model produced as structure (a function call's arguments) could hold
/// the same key. The dialects put the keys read here after the content (a candidate's
/// `finishReason` follows its parts, `usageMetadata` and `usage` end the object), so the
/// last occurrence is taken: a mimic can only be taken when the real key is missing (a
/// chunk that is not the last, whose arguments end with such a key), or when the key
/// lies before the tail (more than [`oversized_head`](crate::sse::oversized_head) bytes
/// from the end; then nothing is read).
#[cold]
fn tail_key<'a>(tail: &'a [u8], key: &[u8]) -> Option<Key<'a>> {
    let mut last = None;
    each_key(tail, |k| {
        if k.is(key) {
            last = Some(k);
        }
    });
    last
}

/// The finish reason the last `"key":` of an oversized event's tail gives, if its value
/// is a string of the dialect's enum `known` (anything else reads as nothing).
#[cold]
fn tail_finish<'a>(tail: &'a [u8], key: &[u8], known: &[&str]) -> Option<&'a str> {
    let k = tail_key(tail, key)?;
    string_at(tail, k.value()).filter(|r| known.contains(r))
}

/// The usage in the object that is the value of the last `"key":` (`usage`,
/// `usageMetadata`) of an oversized event's tail, by core's rules for that object
/// ([`Usage::from_value`]); `None` if the object is not whole there.
#[cold]
fn tail_usage(tail: &[u8], key: &[u8]) -> Option<Usage> {
    let k = tail_key(tail, key)?;
    let at = k.value();
    let end = container_end(tail, at)?;
    let obj: Value = serde_json::from_slice(&tail[at..end]).ok()?;
    if !obj.is_object() {
        return None;
    }
    let name = std::str::from_utf8(key).ok()?.to_owned();
    let mut wrap = serde_json::Map::new();
    wrap.insert(name, obj);
    Usage::from_value(&Value::Object(wrap))
}

/// The start of an oversized error payload as an error object to classify: the start
/// itself when it is whole JSON, else `{"error": {…}}` with what its keys still say (the
/// first `type` other than `"error"`, `code` as a string or a number, `status`), so that
/// an overloaded error whose message made it too large still classifies as overloaded.
#[cold]
fn salvage_error(head: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if serde_json::from_slice::<serde::de::IgnoredAny>(head).is_ok() {
        return std::borrow::Cow::Borrowed(head);
    }
    let mut error = serde_json::Map::new();
    each_key(head, |k| {
        let at = k.value();
        let name = match k.last() {
            b'e' if k.is(b"type") => "type",
            b'e' if k.is(b"code") => "code",
            b's' if k.is(b"status") => "status",
            _ => return,
        };
        if error.contains_key(name) {
            return;
        }
        if let Some(v) = string_at(head, at) {
            if !(name == "type" && v == "error") {
                error.insert(name.to_owned(), Value::from(v));
            }
        } else if let Some(n) = u64_at(head, at) {
            error.insert(name.to_owned(), Value::from(n));
        }
    });
    let mut v = serde_json::Map::new();
    v.insert("error".to_owned(), Value::Object(error));
    std::borrow::Cow::Owned(Value::Object(v).to_string().into_bytes())
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

/// A key found by [`each_key`]: `json[close]` is its closing quote, `json[colon]` the
/// colon after it.
#[derive(Clone, Copy)]
struct Key<'a> {
    json: &'a [u8],
    close: usize,
    colon: usize,
}

impl Key<'_> {
    /// The key's last byte (a quote for an empty key): a cheap first test.
    #[inline]
    fn last(self) -> u8 {
        self.json[self.close - 1]
    }

    /// Whether the key is `name`: its bytes end the key and a quote comes before them.
    #[inline]
    fn is(self, name: &[u8]) -> bool {
        self.close > name.len()
            && &self.json[self.close - name.len()..self.close] == name
            && self.json[self.close - name.len() - 1] == b'"'
    }

    /// The index of the key's value (whitespace skipped).
    #[inline]
    fn value(self) -> usize {
        skip_ws(self.json, self.colon + 1)
    }
}

/// Calls `f(key)` for each `"key":` in `json`, in order, at any depth.
///
/// One pass over the payload for its colons (`memchr`, which skips the long runs of text
/// between them a vector at a time); a colon with a quote before it (whitespace allowed
/// between) ends a key, which the caller tells apart by its last bytes ([`Key::is`])
/// without reading it whole. A colon inside a string is never preceded by an unescaped
/// quote: a key read back from there ends with a backslash or is a fragment of JSON
/// syntax, so it matches none of the names the dialects look for.
#[inline]
fn each_key<'a>(json: &'a [u8], mut f: impl FnMut(Key<'a>)) {
    for colon in memchr::memchr_iter(b':', json) {
        let close = match json[..colon].last() {
            Some(b'"') => colon - 1,
            Some(b' ' | b'\t' | b'\r' | b'\n') => {
                match json[..colon].iter().rposition(|b| !b.is_ascii_whitespace()) {
                    Some(c) if json[c] == b'"' => c,
                    _ => continue,
                }
            }
            _ => continue,
        };
        if close > 0 {
            f(Key { json, close, colon });
        }
    }
}

/// The id and the model a JSON answer or stream event names: its top-level `id` and
/// `model` (OpenAI Chat and Responses, Anthropic, and every OpenAI Chat chunk), Gemini's
/// `responseId` and `modelVersion`, else those of the object under a top-level `message`
/// (Anthropic's `message_start` event) or `response` (OpenAI Responses' `response.created`).
/// Strings only; `(None, None)` when the JSON names neither.
///
/// ```
/// use tower_ai_core::stream::response_identity;
/// let start = br#"{"type":"message_start","message":{"id":"msg_01","type":"message","model":"claude-sonnet-4-5"}}"#;
/// let (id, model) = response_identity(start);
/// assert_eq!((id.as_deref(), model.as_deref()), (Some("msg_01"), Some("claude-sonnet-4-5")));
/// let gemini = br#"{"candidates":[],"modelVersion":"gemini-2.5-flash","responseId":"abc"}"#;
/// assert_eq!(response_identity(gemini).1.as_deref(), Some("gemini-2.5-flash"));
/// ```
pub fn response_identity(
    json: &[u8],
) -> (
    Option<std::borrow::Cow<'_, str>>,
    Option<std::borrow::Cow<'_, str>>,
) {
    fn of(
        obj: &[u8],
    ) -> (
        Option<std::borrow::Cow<'_, str>>,
        Option<std::borrow::Cow<'_, str>>,
    ) {
        let string = |a: &[u8], b: &[u8]| {
            member(obj, a)
                .or_else(|| member(obj, b))
                .and_then(|r| json_string(obj, r.start))
        };
        (
            string(b"id", b"responseId"),
            string(b"model", b"modelVersion"),
        )
    }
    let (id, model) = of(json);
    if id.is_some() || model.is_some() {
        return (id, model);
    }
    for key in [&b"message"[..], b"response"] {
        if let Some(r) = member(json, key) {
            let found = of(&json[r]);
            if found.0.is_some() || found.1.is_some() {
                return found;
            }
        }
    }
    (None, None)
}

/// The string at `json[at..]` when it is a short one without escapes (a finish reason).
fn string_at(json: &[u8], at: usize) -> Option<&str> {
    let rest = json.get(at..)?.strip_prefix(b"\"")?;
    let end = memchr::memchr2(b'"', b'\\', rest)?;
    (rest[end] == b'"')
        .then(|| std::str::from_utf8(&rest[..end]).ok())
        .flatten()
}

/// Whether a non-empty string starts at `json[at]`.
fn nonempty_string_at(json: &[u8], at: usize) -> bool {
    json.get(at) == Some(&b'"') && json.get(at + 1).is_some_and(|&b| b != b'"')
}

/// The non-negative integer at `json[at..]`.
fn u64_at(json: &[u8], at: usize) -> Option<u64> {
    let digits = json.get(at..)?;
    let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..n]).ok()?.parse().ok()
}

/// The usage in the `usage` object of an Anthropic event's object `obj`, by core's rules
/// ([`Usage::from_json`]); `None` without one.
fn anthropic_usage(obj: &[u8]) -> Option<Usage> {
    let u = member(obj, b"usage")?;
    if obj[u.start] != b'{' {
        return None;
    }
    Usage::from_json(obj)
}

/// The span of the value of `key` among the top-level members of the JSON object `json`
/// (the last one if the key repeats, as in a parsed value); `None` if `json` does not
/// start with a well-formed object prefix holding it.
fn member(json: &[u8], key: &[u8]) -> Option<std::ops::Range<usize>> {
    let mut i = skip_ws(json, 0);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(json, i + 1);
    if json.get(i) == Some(&b'}') {
        return None;
    }
    let mut found = None;
    loop {
        if json.get(i) != Some(&b'"') {
            return None;
        }
        let k_end = string_end(json, i)?;
        let k = &json[i + 1..k_end - 1];
        i = skip_ws(json, k_end);
        if json.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(json, i + 1);
        let v_end = value_end(json, i)?;
        if k == key {
            found = Some(i..v_end);
        }
        i = skip_ws(json, v_end);
        match json.get(i)? {
            b',' => i = skip_ws(json, i + 1),
            b'}' => return found,
            _ => return None,
        }
    }
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while matches!(json.get(i), Some(b' ' | b'\t' | b'\r' | b'\n')) {
        i += 1;
    }
    i
}

/// The index just past the string that starts at `json[at]` (a quote).
fn string_end(json: &[u8], at: usize) -> Option<usize> {
    if json.get(at) != Some(&b'"') {
        // Not a string (`null`, a number): reading on would take the next key for it.
        return None;
    }
    let mut i = at + 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', json.get(i..)?)?;
        if json[i] == b'"' {
            return Some(i + 1);
        }
        i += 2; // a backslash and the byte it escapes
    }
}

/// The index just past the JSON value that starts at `json[at]`.
fn value_end(json: &[u8], at: usize) -> Option<usize> {
    match json.get(at)? {
        b'"' => string_end(json, at),
        b'{' | b'[' => container_end(json, at),
        _ => {
            let n = json[at..]
                .iter()
                .take_while(|b| !matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n'))
                .count();
            (n > 0).then_some(at + n)
        }
    }
}

/// The JSON string at `json[at]`, unescaped.
fn json_string(json: &[u8], at: usize) -> Option<std::borrow::Cow<'_, str>> {
    let end = string_end(json, at)?;
    let quoted = &json[at..end];
    let raw = &quoted[1..quoted.len() - 1];
    if raw.contains(&b'\\') {
        serde_json::from_slice::<String>(quoted)
            .ok()
            .map(std::borrow::Cow::Owned)
    } else {
        std::str::from_utf8(raw)
            .ok()
            .map(std::borrow::Cow::Borrowed)
    }
}

/// The index just past the JSON object or array that starts at `json[at]`, brackets
/// counted outside strings; `None` if it does not start there or does not end.
fn container_end(json: &[u8], at: usize) -> Option<usize> {
    if !matches!(json.get(at), Some(b'{' | b'[')) {
        return None;
    }
    let mut depth = 0usize;
    let mut i = at;
    while let Some(&b) = json.get(i) {
        match b {
            b'"' => {
                i = string_end(json, i)?;
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
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
