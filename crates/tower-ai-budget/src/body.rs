//! The response body: passed through untouched, read on the way for the usage, and the
//! holder of the request's reservation until it ends or is dropped.

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use serde_json::Value;
use tower_ai_core::stream::{is_event_stream, StreamDialect, StreamScanner};
use tower_ai_core::Usage;

use crate::budget::Finish;
use crate::future::{Permit, Reserved};

/// How the body is read for its usage.
pub(crate) enum Reader {
    /// Not read (error responses, budgets that count no tokens).
    None,
    /// A non-streamed JSON body: read in place when it comes in one frame, else copied
    /// (bounded) and read at its end.
    Json(Vec<u8>),
    /// A JSON body that outgrew the bound: not read.
    Overflow,
    /// A stream: every chunk fed to the dialect's scanner, nothing kept. Boxed: a scanner
    /// is larger than everything else in the body, which moves with every response.
    Sse(Box<StreamScanner>),
}

impl Reader {
    pub(crate) fn for_response(
        headers: &HeaderMap,
        dialect: StreamDialect,
        max_event: usize,
    ) -> Self {
        if is_event_stream(headers) {
            Reader::Sse(Box::new(StreamScanner::with_max_event(dialect, max_event)))
        } else {
            Reader::Json(Vec::new())
        }
    }

    /// Reads a chunk (`last`: the body ends with it). Returns the usage when it is known
    /// at once (a JSON body in one frame).
    fn feed(&mut self, chunk: &[u8], last: bool, max: usize) -> Option<Usage> {
        match self {
            Reader::None | Reader::Overflow => None,
            Reader::Sse(scanner) => {
                scanner.feed(chunk);
                None
            }
            Reader::Json(buf) => {
                if buf.is_empty() && last {
                    // The whole body in one frame (the common case): no copy, and the
                    // same bound as a body in several frames.
                    if chunk.len() > max {
                        *self = Reader::Overflow;
                        return None;
                    }
                    return usage_of_json(chunk);
                }
                if buf.len().saturating_add(chunk.len()) <= max {
                    buf.extend_from_slice(chunk);
                } else {
                    *self = Reader::Overflow;
                }
                None
            }
        }
    }

    /// How the reservation settles when the body ends cleanly (its last frame read).
    ///
    /// A stream that reached its terminal event settles on the usage it reported (unless
    /// the last event over [`max_event`](crate::TokenBudgetBuilder::max_event) showed no
    /// usage at its end, which is all of it that is read: its usage may lie in it, so the
    /// reservation stays the floor); one that ended without it
    /// was cut (a proxy closing the connection, say), and the
    /// provider may bill more than it reported so far: see [`Reader::cut`].
    fn at_end(&mut self) -> Finish {
        match self {
            Reader::None | Reader::Overflow => Finish::Keep,
            Reader::Sse(scanner) => {
                scanner.finish();
                if reached_terminal(scanner) && !scanner.oversized_unread() {
                    scanner.usage().map_or(Finish::Keep, Finish::Used)
                } else {
                    scanner.usage().map_or(Finish::Keep, Finish::AtLeast)
                }
            }
            Reader::Json(buf) if buf.is_empty() => Finish::Keep,
            Reader::Json(buf) => usage_of_json(buf).map_or(Finish::Keep, Finish::Used),
        }
    }

    /// How the reservation settles when the body fails or is dropped before its end: a
    /// stream that already reached its terminal event settles on its usage; otherwise
    /// the larger of the usage reported so far (Anthropic's `message_start` counts one
    /// output token) and the reservation, since the provider bills what it generated
    /// before it saw the connection go.
    fn cut(&self) -> Finish {
        match self {
            Reader::Sse(scanner) => match scanner.usage() {
                Some(u) if reached_terminal(scanner) && !scanner.oversized_unread() => {
                    Finish::Used(u)
                }
                Some(u) => Finish::AtLeast(u),
                None => Finish::Keep,
            },
            // A JSON body is read at its end only.
            Reader::None | Reader::Overflow | Reader::Json(_) => Finish::Keep,
        }
    }
}

/// Whether a stream reached its dialect's terminal event: its marker (`[DONE]`,
/// `response.completed`/`.incomplete`/`.failed`, `message_stop`), or for Gemini, which
/// has none, the `finishReason` of its last candidate chunk.
fn reached_terminal(scanner: &StreamScanner) -> bool {
    scanner.terminal_seen()
        || (scanner.dialect() == StreamDialect::Gemini && scanner.finish_reason().is_some())
}

/// The usage of a JSON response: an object of any dialect, or (Gemini's
/// `streamGenerateContent` without `alt=sse`) an array whose last element with usage wins.
pub(crate) fn usage_of_json(body: &[u8]) -> Option<Usage> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first == b'[' {
        let v: Value = serde_json::from_slice(body).ok()?;
        return v.as_array()?.iter().rev().find_map(Usage::from_value);
    }
    Usage::from_json(body)
}

/// What a response body holds for the budget until it ends or is dropped.
pub(crate) enum BodyHold {
    /// Nothing (a request limit alone, or already settled).
    None,
    /// A place in flight (given back when dropped).
    Permit(#[allow(dead_code)] Permit),
    /// A reservation to settle with the usage the reader finds.
    Reserved { guard: Reserved, reader: Reader },
}

pin_project! {
    /// The response body of [`TokenBudget`](crate::TokenBudget): the inner body, frame for
    /// frame, untouched. On the way it reads the usage (a bounded copy of a JSON body, or a
    /// scan of each SSE chunk that keeps nothing), and it holds the request's reservation:
    /// when the body ends, the reservation is replaced with the actual usage (or kept, if
    /// none came) and the concurrency permit is released. A stream that fails, ends or is
    /// dropped before its terminal event is charged the larger of the usage it reported
    /// and the reservation (see the [crate docs](crate#reserve-then-reconcile)).
    pub struct BudgetBody<B> {
        #[pin]
        inner: B,
        hold: BodyHold,
    }
}

impl<B> BudgetBody<B> {
    #[inline]
    pub(crate) fn new(inner: B, hold: BodyHold) -> Self {
        BudgetBody { inner, hold }
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// Unwraps the inner body, settling the reservation as if the body were dropped.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> fmt::Debug for BudgetBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BudgetBody")
            .field("holds_reservation", &!matches!(self.hold, BodyHold::None))
            .finish_non_exhaustive()
    }
}

impl<B> Body for BudgetBody<B>
where
    B: Body,
    B::Data: AsRef<[u8]>,
{
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        match this.hold {
            BodyHold::None => {}
            BodyHold::Permit(_) => {
                if !matches!(&frame, Some(Ok(_))) || this.inner.is_end_stream() {
                    // Ended: the place in flight goes back.
                    *this.hold = BodyHold::None;
                }
            }
            BodyHold::Reserved { guard, reader } => match &frame {
                Some(Ok(f)) => {
                    let end = this.inner.is_end_stream();
                    let usage = f
                        .data_ref()
                        .and_then(|d| reader.feed(d.as_ref(), end, guard.max_usage_body()));
                    if let Some(u) = usage {
                        settle(this.hold, |_| Finish::Used(u));
                    } else if end {
                        settle(this.hold, Reader::at_end);
                    }
                }
                None => settle(this.hold, Reader::at_end),
                // The body failed: a cut.
                Some(Err(_)) => settle(this.hold, |r| r.cut()),
            },
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Ends the hold as `end` says.
#[inline]
fn settle(hold: &mut BodyHold, end: impl FnOnce(&mut Reader) -> Finish) {
    if let BodyHold::Reserved { guard, reader } = hold {
        guard.settle(end(reader));
    }
    *hold = BodyHold::None;
}

impl Drop for BodyHold {
    /// A body dropped before its end (by the caller, or with the response) settles as a
    /// cut stream: it did not reach its terminal event.
    fn drop(&mut self) {
        if let BodyHold::Reserved { guard, reader } = self {
            guard.settle(reader.cut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_usage_of_objects_and_arrays() {
        let obj = br#"{"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        assert_eq!(usage_of_json(obj).map(|u| u.total()), Some(7));
        let arr = br#" [{"usageMetadata":{"promptTokenCount":2,"candidatesTokenCount":1}},
                        {"usageMetadata":{"promptTokenCount":2,"candidatesTokenCount":9}}]"#;
        assert_eq!(usage_of_json(arr).map(|u| u.output_tokens), Some(9));
        assert_eq!(usage_of_json(b""), None);
        assert_eq!(usage_of_json(b"[1,2"), None);
        assert_eq!(usage_of_json(b"<html>"), None);
    }

    #[test]
    fn media_type_is_matched_without_case() {
        let reader = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            Reader::for_response(
                &h,
                StreamDialect::OpenAiChat,
                tower_ai_core::sse::DEFAULT_MAX_EVENT,
            )
        };
        assert!(matches!(
            reader("Text/Event-Stream; charset=utf-8"),
            Reader::Sse(_)
        ));
        assert!(matches!(reader(" text/event-stream"), Reader::Sse(_)));
        assert!(matches!(reader("text/event-streamx"), Reader::Json(_)));
        assert!(matches!(reader("application/json"), Reader::Json(_)));
    }

    #[test]
    fn json_reader_is_bounded() {
        let json = || Reader::Json(Vec::new());
        let mut r = json();
        assert_eq!(r.feed(br#"{"usage":{"prompt_tokens":3,"#, false, 16), None);
        assert_eq!(r.feed(br#""completion_tokens":4}}"#, true, 16), None);
        assert_eq!(r.at_end(), Finish::Keep, "over the bound: not read");
        let mut r = json();
        assert_eq!(
            r.feed(br#"{"usage":{"prompt_tokens":3,"#, false, 1024),
            None
        );
        assert_eq!(r.feed(br#""completion_tokens":4}}"#, true, 1024), None);
        assert!(matches!(r.at_end(), Finish::Used(u) if u.total() == 7));
        let one = br#"{"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        let mut r = json();
        assert_eq!(
            r.feed(one, true, 1024).map(|u| u.total()),
            Some(7),
            "one frame: read in place"
        );
        let mut r = json();
        assert_eq!(r.feed(one, true, 16), None, "one frame over the bound");
        assert_eq!(r.at_end(), Finish::Keep);
    }
}
