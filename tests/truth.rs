//! The table of truth: for each dialect and each way an answer can end, what the caller
//! gets, what the circuit breaker counted, what the token budget settled and what was
//! traced, through CircuitBreaker → TokenBudget → StallDetector → Classify (the order of
//! `AiStack`) on a paused clock. Every case is asserted; the table in
//! `crates/tower-ai-stall/TRUTH.md` (shown in the crate docs) is rendered from the same
//! cases and must match it exactly (`UPDATE_TRUTH=1 cargo test --test truth` rewrites it).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tower::{service_fn, Layer, ServiceExt};
use tower_ai::circuit_breaker::CircuitBreakerLayer;
use tower_ai::stall::{StallConfig, StallDetectorLayer};
use tower_ai::TokenBudgetLayer;
use tower_ai_core::keys::{Global, KeyFn};
use tower_ai_core::{AiBody, AiError, BoxError, ClassifyLayer, ErrorKind};
use tower_ai_sim::testing::TraceLog;

const S: Duration = Duration::from_secs(1);
/// The event bound of the stall detector and the budget in these cases.
const MAX_EVENT: usize = 1024;
/// The usage every answer reports: 10 in, 20 out.
const USAGE: u64 = 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Dialect {
    Chat,
    Responses,
    Azure,
    Anthropic,
    Gemini,
    Compatible,
}
use Dialect::*;
const DIALECTS: [Dialect; 6] = [Chat, Responses, Azure, Anthropic, Gemini, Compatible];

impl Dialect {
    fn name(self) -> &'static str {
        match self {
            Chat => "OpenAI Chat",
            Responses => "OpenAI Responses",
            Azure => "Azure OpenAI",
            Anthropic => "Anthropic Messages",
            Gemini => "Gemini",
            Compatible => "OpenAI-compatible",
        }
    }

    fn uri(self, stream: bool) -> &'static str {
        match (self, stream) {
            (Chat, _) => "https://api.openai.com/v1/chat/completions",
            (Responses, _) => "https://api.openai.com/v1/responses",
            (Azure, _) => "https://x.openai.azure.com/openai/deployments/gpt4/chat/completions?api-version=2024-10-21",
            (Anthropic, _) => "https://api.anthropic.com/v1/messages",
            (Gemini, true) => "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            (Gemini, false) => "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent",
            (Compatible, _) => "http://127.0.0.1:8080/v1/chat/completions",
        }
    }

    fn request(self, stream: bool) -> Request<AiBody> {
        let body = match self {
            Gemini => r#"{"contents":[{"parts":[{"text":"Tell me a story"}]}],"generationConfig":{"maxOutputTokens":1000}}"#.to_owned(),
            Responses => format!(r#"{{"model":"gpt-4o","stream":{stream},"max_output_tokens":1000,"input":"Tell me a story"}}"#),
            _ => format!(r#"{{"model":"gpt-4o","stream":{stream},"max_tokens":1000,"messages":[{{"role":"user","content":"Tell me a story"}}]}}"#),
        };
        let mut req = Request::post(self.uri(stream)).header("content-type", "application/json");
        if self == Anthropic {
            req = req.header("anthropic-version", "2023-06-01");
        }
        req.body(AiBody::from(body)).unwrap()
    }

    fn sse(self, event: &str, data: &str) -> String {
        match self {
            Responses | Anthropic => format!("event: {event}\ndata: {data}\n\n"),
            Gemini => format!("data: {data}\r\n\r\n"),
            _ => format!("data: {data}\n\n"),
        }
    }

    /// The events before the first content.
    fn preamble(self) -> String {
        match self {
            Responses => self.sse("response.created", r#"{"type":"response.created","response":{"status":"in_progress"}}"#),
            Anthropic => self.sse("message_start", r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude","stop_reason":null,"usage":{"input_tokens":10,"output_tokens":1}}}"#)
                + &self.sse("ping", r#"{"type":"ping"}"#),
            Gemini => String::new(),
            _ => self.sse("", r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#),
        }
    }

    /// One content event, `text` its text.
    fn token(self, text: &str) -> String {
        match self {
            Responses => self.sse("response.output_text.delta", &format!(r#"{{"type":"response.output_text.delta","delta":"{text}"}}"#)),
            Anthropic => self.sse("content_block_delta", &format!(r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"{text}"}}}}"#)),
            Gemini => self.sse("", &format!(r#"{{"candidates":[{{"content":{{"parts":[{{"text":"{text}"}}],"role":"model"}},"index":0}}],"usageMetadata":{{"promptTokenCount":10,"totalTokenCount":10}}}}"#)),
            _ => self.sse("", &format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"{text}"}},"finish_reason":null}}]}}"#)),
        }
    }

    /// The events that close the answer with `finish` (`stop`/`length` in the dialect's
    /// words) and the usage; `marker`: with the terminal marker (for OpenAI Responses and
    /// Gemini the marker *is* the closing event, so without it nothing is sent). `pad`
    /// makes the closing event that large.
    fn close(self, length: bool, marker: bool, pad: usize) -> String {
        let pad = "A".repeat(pad);
        match self {
            Responses if !marker => String::new(),
            Responses if length => self.sse("response.incomplete", &format!(r#"{{"type":"response.incomplete","response":{{"status":"incomplete","incomplete_details":{{"reason":"max_output_tokens"}},"output":[{{"type":"message","text":"{pad}"}}],"usage":{{"input_tokens":10,"output_tokens":20,"total_tokens":30}}}}}}"#)),
            Responses => self.sse("response.completed", &format!(r#"{{"type":"response.completed","response":{{"status":"completed","output":[{{"type":"image_generation_call","result":"{pad}"}}],"usage":{{"input_tokens":10,"output_tokens":20,"total_tokens":30}}}}}}"#)),
            Anthropic => {
                let r = if length { "max_tokens" } else { "end_turn" };
                let mut s = self.sse("message_delta", &format!(r#"{{"type":"message_delta","delta":{{"stop_reason":"{r}","stop_sequence":null,"pad":"{pad}"}},"usage":{{"output_tokens":20}}}}"#));
                if marker {
                    s += &self.sse("message_stop", r#"{"type":"message_stop"}"#);
                }
                s
            }
            Gemini if !marker => String::new(),
            Gemini => {
                let r = if length { "MAX_TOKENS" } else { "STOP" };
                self.sse("", &format!(r#"{{"candidates":[{{"content":{{"parts":[{{"text":"{pad}"}}],"role":"model"}},"finishReason":"{r}","index":0}}],"usageMetadata":{{"promptTokenCount":10,"candidatesTokenCount":20,"totalTokenCount":30}}}}"#))
            }
            _ => {
                let r = if length { "length" } else { "stop" };
                let mut s = self.sse("", &format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"{pad}"}},"finish_reason":"{r}"}}]}}"#))
                    + &self.sse("", r#"{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#);
                if marker {
                    s += "data: [DONE]\n\n";
                }
                s
            }
        }
    }

    /// The dialect's error event inside a 200 stream (overloaded), its message `pad` long.
    fn error_event(self, pad: usize) -> String {
        let m = "x".repeat(pad);
        match self {
            Responses => self.sse("error", &format!(r#"{{"type":"error","code":"server_is_overloaded","message":"{m}"}}"#)),
            Anthropic => self.sse("error", &format!(r#"{{"type":"error","error":{{"type":"overloaded_error","message":"{m}"}}}}"#)),
            Gemini => self.sse("", &format!(r#"{{"error":{{"code":503,"message":"{m}","status":"UNAVAILABLE"}}}}"#)),
            _ => self.sse("", &format!(r#"{{"error":{{"message":"{m}","type":"server_error","param":null,"code":null}}}}"#)),
        }
    }

    /// A non-streamed answer that stopped for `reason` (stop, length, filter, tool).
    fn json(self, reason: Finish) -> String {
        let r = |chat: &'static str, ant: &'static str, gem: &'static str| match self {
            Anthropic => ant,
            Gemini => gem,
            _ => chat,
        };
        let r = match reason {
            Finish::Stop => r("stop", "end_turn", "STOP"),
            Finish::Length => r("length", "max_tokens", "MAX_TOKENS"),
            Finish::Filter => r("content_filter", "refusal", "SAFETY"),
            Finish::Tool => r("tool_calls", "tool_use", "STOP"),
        };
        match self {
            Responses => match reason {
                Finish::Length => r#"{"id":"resp_1","object":"response","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"output":[],"usage":{"input_tokens":10,"output_tokens":20,"total_tokens":30}}"#.to_owned(),
                Finish::Filter => r#"{"id":"resp_1","object":"response","status":"incomplete","incomplete_details":{"reason":"content_filter"},"output":[],"usage":{"input_tokens":10,"output_tokens":20,"total_tokens":30}}"#.to_owned(),
                _ => r#"{"id":"resp_1","object":"response","status":"completed","incomplete_details":null,"output":[],"usage":{"input_tokens":10,"output_tokens":20,"total_tokens":30}}"#.to_owned(),
            },
            Anthropic => format!(r#"{{"id":"msg_1","type":"message","role":"assistant","content":[{{"type":"text","text":"Hi"}}],"model":"claude","stop_reason":"{r}","stop_sequence":null,"usage":{{"input_tokens":10,"output_tokens":20}}}}"#),
            Gemini => format!(r#"{{"candidates":[{{"content":{{"parts":[{{"text":"Hi"}}],"role":"model"}},"finishReason":"{r}","index":0}}],"usageMetadata":{{"promptTokenCount":10,"candidatesTokenCount":20,"totalTokenCount":30}}}}"#),
            _ => format!(r#"{{"id":"c1","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"Hi"}},"finish_reason":"{r}"}}],"usage":{{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}}}"#),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Finish {
    Stop,
    Length,
    Filter,
    Tool,
}

/// The ways an answer ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ending {
    Marker,
    CleanEof,
    Reset,
    IdleStall,
    TotalDeadline,
    ErrorEvent,
    OversizedTerminal,
    OversizedError,
    OversizedOrdinary,
    TokenLimit,
    Json(Finish),
}
use Ending::*;
const ENDINGS: [Ending; 14] = [
    Marker,
    CleanEof,
    Reset,
    IdleStall,
    TotalDeadline,
    ErrorEvent,
    OversizedTerminal,
    OversizedError,
    OversizedOrdinary,
    TokenLimit,
    Json(Finish::Stop),
    Json(Finish::Length),
    Json(Finish::Filter),
    Json(Finish::Tool),
];

impl Ending {
    fn name(self) -> &'static str {
        match self {
            Marker => "stream with its terminal marker",
            CleanEof => "stream ends cleanly without its terminal marker",
            Reset => "connection reset mid-body",
            IdleStall => "idle stall after content",
            TotalDeadline => "total deadline (keep-alives, no end)",
            ErrorEvent => "error event inside the 200 stream",
            OversizedTerminal => "oversized closing event, then the marker",
            OversizedError => "oversized error event",
            OversizedOrdinary => "oversized content event, then a normal end",
            TokenLimit => "stream cut by the output-token limit",
            Json(Finish::Stop) => "JSON answer, natural stop",
            Json(Finish::Length) => "JSON answer, output-token limit",
            Json(Finish::Filter) => "JSON answer, content filter",
            Json(Finish::Tool) => "JSON answer, tool call",
        }
    }
}

/// What a body does after its parts.
#[derive(Clone, Copy)]
enum Then {
    End,
    Reset,
    Hang,
    /// A keep-alive comment every 2 s, forever.
    KeepAlive,
}

/// A response body fed by a task on the (paused) clock.
struct ChanBody(mpsc::UnboundedReceiver<Result<Bytes, BoxError>>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

fn body(parts: Vec<String>, then: Then) -> ChanBody {
    let (tx, rx) = mpsc::unbounded_channel::<Result<Bytes, BoxError>>();
    tokio::spawn(async move {
        for p in parts {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = tx.send(Ok(Bytes::from(p)));
        }
        match then {
            Then::End => {}
            Then::Reset => {
                let err: BoxError = Box::new(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "connection reset by peer",
                ));
                let _ = tx.send(Err(err));
            }
            Then::Hang => std::future::pending::<()>().await,
            Then::KeepAlive => loop {
                tokio::time::sleep(2 * S).await;
                if tx
                    .send(Ok(Bytes::from_static(b": keep-alive\n\n")))
                    .is_err()
                {
                    return;
                }
            },
        }
    });
    ChanBody(rx)
}

/// The response the provider gives for `ending` in `d`, and the bytes it sends.
fn answer(d: Dialect, ending: Ending) -> (Response<ChanBody>, Vec<u8>) {
    if let Json(f) = ending {
        let json = d.json(f);
        let sent = json.clone().into_bytes();
        let res = Response::builder()
            .header("content-type", "application/json")
            .body(body(vec![json], Then::End))
            .unwrap();
        return (res, sent);
    }
    let big = 4 * MAX_EVENT;
    let (pre, tok) = (d.preamble(), d.token("Hi"));
    let (mut parts, then) = match ending {
        Marker => (vec![pre, tok, d.close(false, true, 0)], Then::End),
        CleanEof => (vec![pre, tok, d.close(false, false, 0)], Then::End),
        Reset => (vec![pre, tok], Then::Reset),
        IdleStall => (vec![pre, tok], Then::Hang),
        TotalDeadline => (vec![pre, tok], Then::KeepAlive),
        ErrorEvent => (vec![pre, tok, d.error_event(10)], Then::End),
        OversizedTerminal => (vec![pre, tok, d.close(false, true, big)], Then::End),
        OversizedError => (vec![pre, tok, d.error_event(big)], Then::End),
        OversizedOrdinary => (
            vec![pre, tok, d.token(&"B".repeat(big)), d.close(false, true, 0)],
            Then::End,
        ),
        TokenLimit => (vec![pre, tok, d.close(true, true, 0)], Then::End),
        Json(_) => unreachable!(),
    };
    parts.retain(|p| !p.is_empty());
    let sent = parts.concat().into_bytes();
    let res = Response::builder()
        .header("content-type", "text/event-stream")
        .body(body(parts, then))
        .unwrap();
    (res, sent)
}

/// One row of the table: what was observed (and expected).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Row {
    caller: String,
    breaker: &'static str,
    budget: &'static str,
    trace: String,
}

fn row(caller: &str, breaker: &'static str, budget: &'static str, trace: &str) -> Row {
    Row {
        caller: caller.to_owned(),
        breaker,
        budget,
        trace: trace.to_owned(),
    }
}

const SUCCESS: &str = "success";
const FAILURE: &str = "failure";
const USAGE_SETTLED: &str = "the usage reported (30)";
const RESERVATION: &str = "max(usage so far, reservation)";

/// What each case must come to.
fn expected(d: Dialect, ending: Ending) -> Row {
    let truncated = "`AiError::Truncated`";
    let no_marker = "stream ended without its terminal event";
    match ending {
        Marker => row("the whole body", SUCCESS, USAGE_SETTLED, "—"),
        // OpenAI Responses and Gemini: without the marker nothing closes the answer, so no
        // usage arrived; the others sent theirs before the marker.
        CleanEof => row(truncated, FAILURE, RESERVATION, no_marker),
        Reset => row("the transport error", FAILURE, RESERVATION, "—"),
        IdleStall => row(
            "`AiError::Stalled` (Idle)",
            FAILURE,
            RESERVATION,
            "stream stalled",
        ),
        TotalDeadline => row(
            "`AiError::Stalled` (Total)",
            FAILURE,
            RESERVATION,
            "stream stalled",
        ),
        ErrorEvent | OversizedError => row(
            match d {
                Chat | Azure | Compatible => "`AiError::Provider` (ServerError)",
                _ => "`AiError::Provider` (Overloaded)",
            },
            FAILURE,
            RESERVATION,
            "provider error inside the stream",
        ),
        OversizedTerminal => match d {
            // The usage ends the closing event, in the end kept of it (Gemini's marker,
            // its finishReason, too).
            Responses | Anthropic | Gemini => row("the whole body", SUCCESS, USAGE_SETTLED, "—"),
            // The large chunk ends with no usage: what it held is not known, so the
            // budget does not settle below the reservation.
            Chat | Azure | Compatible => row("the whole body", SUCCESS, RESERVATION, "—"),
        },
        OversizedOrdinary => match d {
            // Each Gemini chunk ends with its usageMetadata.
            Gemini => row("the whole body", SUCCESS, USAGE_SETTLED, "—"),
            _ => row("the whole body", SUCCESS, RESERVATION, "—"),
        },
        TokenLimit => row(
            "the whole body; `StreamOutcome` says Length",
            SUCCESS,
            USAGE_SETTLED,
            "answer truncated at the output-token limit",
        ),
        Json(Finish::Length) => row(
            "the whole body; `StreamOutcome` says Length",
            SUCCESS,
            USAGE_SETTLED,
            "answer truncated at the output-token limit",
        ),
        Json(_) => row("the whole body", SUCCESS, USAGE_SETTLED, "—"),
    }
}

/// Runs one case and says what happened.
async fn observe(d: Dialect, ending: Ending, log: &TraceLog) -> Row {
    let before = log.events().len();
    let breaker = CircuitBreakerLayer::new();
    let handle = breaker.handle();
    let budget = TokenBudgetLayer::builder()
        .tokens_per_minute(1_000_000)
        .max_event(MAX_EVENT)
        .build()
        .unwrap();
    let stall = StallDetectorLayer::with_config(
        StallConfig::builder()
            .head(10 * S)
            .first_byte(5 * S)
            .first_content(10 * S)
            .idle(5 * S)
            .total(30 * S)
            .max_event(MAX_EVENT)
            .build_config()
            .unwrap(),
    );
    let (res, sent) = answer(d, ending);
    let res = std::sync::Arc::new(std::sync::Mutex::new(Some(res)));
    let provider = service_fn(move |_req: Request<AiBody>| {
        let res = res.lock().unwrap().take().expect("one call");
        async move { Ok::<_, BoxError>(res) }
    });
    let svc = breaker.layer(budget.layer(stall.layer(ClassifyLayer::new().layer(provider))));
    let stream = !matches!(ending, Json(_));
    let key = KeyFn::<AiBody>::key(&Global, &d.request(stream)).unwrap();

    let res = svc.oneshot(d.request(stream)).await.expect("the head");
    let reserved = budget.snapshot(key).and_then(|s| s.tokens).unwrap();
    let outcome = res
        .extensions()
        .get::<tower_ai::stall::StreamOutcome>()
        .cloned();
    let mut body = res.into_body();
    let mut got = Vec::new();
    let err: Option<BoxError> = loop {
        match body.frame().await {
            None => break None,
            Some(Err(e)) => break Some(e),
            Some(Ok(f)) => got.extend_from_slice(&f.into_data().unwrap_or_default()),
        }
    };
    drop(body);
    let caller = match &err {
        None => {
            assert_eq!(got, sent, "{d:?} {ending:?}: every byte");
            let length = outcome
                .and_then(|o| o.get().map(|s| s.truncated_by_model()))
                .unwrap_or(false);
            if length {
                "the whole body; `StreamOutcome` says Length".to_owned()
            } else {
                "the whole body".to_owned()
            }
        }
        Some(e) => match e.downcast_ref::<AiError>() {
            Some(AiError::Truncated { .. }) => "`AiError::Truncated`".to_owned(),
            Some(AiError::Stalled { phase, .. }) => format!("`AiError::Stalled` ({phase:?})"),
            Some(AiError::Provider { classification }) => format!(
                "`AiError::Provider` ({:?})",
                classification.kind.unwrap_or(ErrorKind::Unknown)
            ),
            Some(other) => format!("{other:?}"),
            None if e.downcast_ref::<std::io::Error>().is_some() => {
                "the transport error".to_owned()
            }
            None => format!("{e}"),
        },
    };
    let m = handle.all_metrics();
    let (calls, failures) = m
        .iter()
        .fold((0, 0), |(c, f), m| (c + m.calls, f + m.failures));
    let breaker = match (calls, failures) {
        (1, 0) => SUCCESS,
        (1, 1) => FAILURE,
        (0, 0) => "nothing",
        _ => panic!("{d:?} {ending:?}: breaker {m:?}"),
    };
    let settled = budget.snapshot(key).and_then(|s| s.tokens).unwrap();
    assert!(reserved > USAGE, "{d:?}: reserved {reserved}");
    let budget = if settled == USAGE {
        USAGE_SETTLED
    } else if settled == reserved {
        RESERVATION
    } else {
        panic!("{d:?} {ending:?}: settled {settled}, reserved {reserved}")
    };
    let warnings: Vec<String> = log.events()[before..]
        .iter()
        .filter(|e| e.level == tracing::Level::WARN)
        .filter_map(|e| e.message().map(str::to_owned))
        .collect();
    Row {
        caller,
        breaker,
        budget,
        trace: if warnings.is_empty() {
            "—".to_owned()
        } else {
            warnings.join("; ")
        },
    }
}

#[tokio::test(start_paused = true)]
async fn the_table_of_truth() {
    let log = TraceLog::default();
    let _guard = log.install();
    // Rows grouped by outcome: each ending lists the dialects that share a row.
    let mut table: BTreeMap<(Ending, Row), Vec<Dialect>> = BTreeMap::new();
    for ending in ENDINGS {
        for d in DIALECTS {
            let got = observe(d, ending, &log).await;
            assert_eq!(got, expected(d, ending), "{} / {}", d.name(), ending.name());
            table.entry((ending, got)).or_default().push(d);
        }
    }
    let mut md = String::from(
        "| The answer | Dialects | The caller gets | The breaker counts | The budget settles | Warning traced |\n|---|---|---|---|---|---|\n",
    );
    for ((ending, row), dialects) in &table {
        let names: Vec<&str> = dialects.iter().map(|d| d.name()).collect();
        let names = if dialects.len() == DIALECTS.len() {
            "all".to_owned()
        } else {
            names.join(", ")
        };
        md += &format!(
            "| {} | {} | {} | a {} | {} | {} |\n",
            ending.name(),
            names,
            row.caller,
            row.breaker,
            row.budget,
            row.trace
        );
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crates/tower-ai-stall/TRUTH.md"
    );
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    let (start, end) = ("<!-- truth table: begin -->\n", "<!-- truth table: end -->");
    let rendered = format!("{start}{md}{end}");
    if std::env::var_os("UPDATE_TRUTH").is_some() {
        let head = doc.split(start).next().unwrap_or("").to_owned();
        let tail = doc.split(end).nth(1).unwrap_or("\n").to_owned();
        std::fs::write(path, format!("{head}{rendered}{tail}")).unwrap();
        return;
    }
    assert!(
        doc.contains(&rendered),
        "crates/tower-ai-stall/TRUTH.md does not show the table the cases give; \
         rerun with UPDATE_TRUTH=1 to rewrite it. The cases give:\n{rendered}"
    );
}
