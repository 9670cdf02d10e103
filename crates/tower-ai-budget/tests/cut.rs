//! TokenBudget settles a stream that did not reach its terminal event (cut by a reset, a
//! clean EOF without its marker, an error from a layer below, or dropped by the caller)
//! at the larger of the usage it reported and the reservation, tokens and money.

mod support;

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use support::{send, snapshot};
use tower::{service_fn, Layer};
use tower_ai_budget::{PriceTable, TokenBudgetLayer};
use tower_ai_core::BoxError;

/// A streamed body: its chunks, then an error (a connection reset) if `reset`.
struct Stream {
    parts: VecDeque<Bytes>,
    reset: bool,
}

impl Body for Stream {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(match self.parts.pop_front() {
            Some(b) => Some(Ok(Frame::data(b))),
            None if std::mem::take(&mut self.reset) => Some(Err("connection reset".into())),
            None => None,
        })
    }
    fn is_end_stream(&self) -> bool {
        self.parts.is_empty() && !self.reset
    }
}

/// How the caller reads the body.
#[derive(Clone, Copy, Debug)]
enum Read {
    /// To its end (or its error).
    All,
    /// `n` frames, then the body is dropped.
    Drop(usize),
}

const ANTHROPIC: &str = "https://api.anthropic.com/v1/messages";
const OPENAI: &str = "https://api.openai.com/v1/chat/completions";
const RESPONSES: &str = "https://api.openai.com/v1/responses";
const GEMINI: &str =
    "https://generativelanguage.googleapis.com/v1beta/models/gpt-4o:streamGenerateContent?alt=sse";

/// The tokens and the money (nano-units) `parts` settle at, for a request reserving
/// 10 input + 1000 output tokens, at 0.01 per input and 0.02 per output token (reserved:
/// 0.10 + 20.00).
async fn settled(uri: &str, parts: &[&str], reset: bool, read: Read) -> (u64, u64) {
    let layer = TokenBudgetLayer::builder()
        .tokens_per_minute(100_000)
        .spend_per_day(1000.0)
        .prices(PriceTable::new().model("gpt-4o", 10_000.0, 20_000.0))
        .build()
        .unwrap();
    let parts: VecDeque<Bytes> = parts
        .iter()
        .map(|p| Bytes::copy_from_slice(p.as_bytes()))
        .collect();
    let svc = layer.layer(service_fn(move |_req: Request<String>| {
        let body = Stream {
            parts: parts.clone(),
            reset,
        };
        let res = Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap();
        std::future::ready(Ok::<_, BoxError>(res))
    }));
    // "user" + 36 bytes = 40 bytes = 10 tokens.
    let content = "y".repeat(36);
    let body = format!(
        r#"{{"model":"gpt-4o","max_tokens":1000,"stream":true,"messages":[{{"role":"user","content":"{content}"}}]}}"#
    );
    let req = Request::post(uri).body(body).unwrap();
    let res = send(&svc, req).await.unwrap();
    let s = snapshot(&layer);
    assert_eq!(
        (s.tokens, s.spend_day),
        (Some(1010), Some(RESERVED_SPEND)),
        "reserved"
    );
    let mut body = res.into_body();
    let mut frames = 0;
    loop {
        if let Read::Drop(n) = read {
            if frames == n {
                break;
            }
        }
        match body.frame().await {
            Some(Ok(_)) => frames += 1,
            Some(Err(_)) | None => break,
        }
    }
    drop(body);
    let s = snapshot(&layer);
    assert_eq!(s.held, 0, "settled");
    (s.tokens.unwrap(), s.spend_day.unwrap())
}

/// 10 × 0.01 + 1000 × 0.02, in nano-units.
const RESERVED_SPEND: u64 = 20_100_000_000;

/// The spend of `input` and `output` tokens, in nano-units.
fn spend(input: u64, output: u64) -> u64 {
    input * 10_000_000 + output * 20_000_000
}

const A_START: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n";
const A_DELTA: &str = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n";
const A_USAGE: &str = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n";
const A_BIG_USAGE: &str = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":null},\"usage\":{\"output_tokens\":3000}}\n\n";
const A_STOP: &str = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

#[tokio::test(start_paused = true)]
async fn an_anthropic_stream_cut_after_content_keeps_its_reservation() {
    let full = (1010, RESERVED_SPEND);
    // Reset after content: message_start's usage (25 + 1) is no measure of the bill.
    assert_eq!(
        settled(ANTHROPIC, &[A_START, A_DELTA, A_DELTA], true, Read::All).await,
        full
    );
    // A clean EOF without message_stop.
    assert_eq!(
        settled(ANTHROPIC, &[A_START, A_DELTA], false, Read::All).await,
        full
    );
    // Even with message_delta's usage, the stream did not end: its count may still grow.
    assert_eq!(
        settled(ANTHROPIC, &[A_START, A_DELTA, A_USAGE], true, Read::All).await,
        full
    );
    // More reported than reserved: the usage.
    assert_eq!(
        settled(ANTHROPIC, &[A_START, A_DELTA, A_BIG_USAGE], true, Read::All).await,
        (3025, spend(25, 3000))
    );
    // A complete stream settles on its usage, whatever happens after message_stop.
    let done = (40, spend(25, 15));
    let all = [A_START, A_DELTA, A_USAGE, A_STOP];
    assert_eq!(settled(ANTHROPIC, &all, false, Read::All).await, done);
    assert_eq!(settled(ANTHROPIC, &all, true, Read::All).await, done);
}

#[tokio::test(start_paused = true)]
async fn every_dialect_cut_before_its_terminal_event_keeps_its_reservation() {
    let full = (1010, RESERVED_SPEND);
    // OpenAI: the include_usage chunk, but no [DONE].
    let content =
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n";
    let usage = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7}}\n\n";
    for reset in [false, true] {
        assert_eq!(
            settled(OPENAI, &[content, usage], reset, Read::All).await,
            full
        );
    }
    assert_eq!(
        settled(
            OPENAI,
            &[content, usage, "data: [DONE]\n\n"],
            false,
            Read::All
        )
        .await,
        (18, spend(11, 7))
    );

    // OpenAI Responses: deltas, no response.completed.
    let delta = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n";
    let completed = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"status\":\"completed\",\"usage\":{\"input_tokens\":12,\"output_tokens\":3}}}\n\n";
    assert_eq!(
        settled(RESPONSES, &[delta, delta], true, Read::All).await,
        full
    );
    assert_eq!(
        settled(RESPONSES, &[delta, completed], false, Read::All).await,
        (15, spend(12, 3))
    );

    // Gemini: usageMetadata on every chunk; the stream ends with a finishReason.
    let part = "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"a\"}]}}],\"usageMetadata\":{\"promptTokenCount\":10,\"candidatesTokenCount\":1}}\r\n\r\n";
    let last = "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"b\"}]},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":10,\"candidatesTokenCount\":5}}\r\n\r\n";
    for reset in [false, true] {
        assert_eq!(settled(GEMINI, &[part, part], reset, Read::All).await, full);
    }
    assert_eq!(
        settled(GEMINI, &[part, last], false, Read::All).await,
        (15, spend(10, 5))
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_dropped_before_its_end_settles_as_a_cut() {
    let full = (1010, RESERVED_SPEND);
    assert_eq!(
        settled(ANTHROPIC, &[A_START, A_DELTA, A_STOP], false, Read::Drop(2)).await,
        full
    );
    // What was reported before the drop counts when it is more than the reservation.
    assert_eq!(
        settled(
            ANTHROPIC,
            &[A_START, A_DELTA, A_BIG_USAGE, A_STOP],
            false,
            Read::Drop(3)
        )
        .await,
        (3025, spend(25, 3000))
    );
    // Dropped after the terminal event (the caller did not wait for the EOF): the usage.
    assert_eq!(
        settled(
            ANTHROPIC,
            &[A_START, A_DELTA, A_USAGE, A_STOP, ": trailing\n\n"],
            false,
            Read::Drop(4)
        )
        .await,
        (40, spend(25, 15))
    );
}
