//! Test helpers: a response body fed by the test through a channel, and a reader that
//! records what the caller sees and when.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower_ai_core::{AiError, BoxError, StallPhase};

/// A body whose frames the test sends; dropping the sender ends it.
pub use tower_ai_sim::testing::{BodySender as Tx, ChannelBody as ChanBody};

pub fn chan() -> (Tx, ChanBody) {
    tower_ai_sim::testing::body_channel()
}

/// The connection-reset error the tests fail bodies with.
pub fn reset() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer")
}

/// A 200 `text/event-stream` response with `body`.
pub fn sse(body: ChanBody) -> Response<ChanBody> {
    Response::builder()
        .header("content-type", "text/event-stream; charset=utf-8")
        .body(body)
        .unwrap()
}

/// A 200 JSON response with `body`.
pub fn json(body: ChanBody) -> Response<ChanBody> {
    Response::builder()
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

pub const OPENAI: &str = "https://api.openai.com/v1/chat/completions";
pub const RESPONSES: &str = "https://api.openai.com/v1/responses";
pub const ANTHROPIC: &str = "https://api.anthropic.com/v1/messages";
pub const GEMINI: &str =
    "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";
pub const LLAMA: &str = "http://127.0.0.1:8080/v1/chat/completions";

/// A streamed request (it says `accept: text/event-stream`).
pub fn streamed(uri: &str) -> Request<&'static str> {
    Request::post(uri)
        .header("accept", "text/event-stream")
        .body("{}")
        .unwrap()
}

/// A request not known to be streamed.
pub fn unary(uri: &str) -> Request<&'static str> {
    Request::post(uri).body("{}").unwrap()
}

/// What the caller read from a body.
#[derive(Debug)]
pub struct Read {
    /// The data frames, as they came.
    pub frames: Vec<Bytes>,
    /// The error frame that ended it, if any.
    pub error: Option<BoxError>,
    /// When it ended, since the reader started.
    pub at: Duration,
}

impl Read {
    /// All bytes read, joined.
    pub fn bytes(&self) -> Vec<u8> {
        self.frames.iter().flat_map(|b| b.iter().copied()).collect()
    }
    /// The `AiError` that ended the body.
    pub fn ai_error(&self) -> &AiError {
        self.error
            .as_ref()
            .and_then(|e| e.downcast_ref::<AiError>())
            .unwrap_or_else(|| panic!("expected an AiError, got {:?}", self.error))
    }
    /// The stall's phase, deadline and byte count.
    pub fn stall(&self) -> (StallPhase, Duration, u64) {
        match self.ai_error() {
            AiError::Stalled {
                phase,
                after,
                bytes_received,
            } => (*phase, *after, *bytes_received),
            other => panic!("expected Stalled, got {other:?}"),
        }
    }
}

/// Reads `body` to its end (or error), recording when it ended.
pub async fn read_body<B>(body: B) -> Read
where
    B: Body<Data = Bytes, Error = BoxError>,
{
    let t0 = Instant::now();
    let mut body = std::pin::pin!(body);
    let mut frames = Vec::new();
    let mut error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    frames.push(d);
                }
            }
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    // After an error frame the body ends.
    if error.is_some() {
        assert!(body.frame().await.is_none(), "a frame after the error");
    }
    Read {
        frames,
        error,
        at: t0.elapsed(),
    }
}
