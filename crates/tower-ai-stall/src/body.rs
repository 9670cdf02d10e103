//! [`StallBody`]: the response body with the stream's deadlines and checks.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_ai_core::BoxError;

use crate::stall::{Check, Held, StreamOutcome, Tracker};

pin_project! {
    #[project = InnerProj]
    enum Inner<B> {
        Inline { #[pin] body: B },
        // A body whose first frame the response future read ahead (to make a stall before
        // the first byte an error of the call) was boxed to be polled there and moved here.
        Boxed { body: Pin<Box<B>> },
    }
}

pin_project! {
    /// The response body of [`StallDetector`](crate::StallDetector).
    ///
    /// Frames pass through as the inner body yields them, never copied. For a
    /// `text/event-stream` success the body reads each chunk with
    /// [`StreamScanner`](tower_ai_core::stream::StreamScanner) (which keeps only the bytes
    /// of an event that spans chunks) and:
    ///
    /// - ends with an [`AiError::Stalled`] error frame when the first-byte, first-content,
    ///   idle or total deadline expires (an [`AiError::DeadlineExceeded`] frame when the
    ///   request's own deadline does), never with a clean end;
    /// - delivers the chunk that completed a provider error event (OpenAI `data:
    ///   {"error":…}`, Anthropic `event: error`, Gemini `data: {"error":…}`, llama.cpp's
    ///   `error:` field) *whole*, then ends with an [`AiError::Provider`] error frame whose
    ///   classification has status 200; every byte before it reaches the caller
    ///   unchanged. The chunk is not split, so bytes that followed the event in the same
    ///   chunk (llama.cpp's `data: [DONE]`) are delivered too;
    /// - ends with [`AiError::Truncated`] when the inner body ends without the dialect's
    ///   terminal marker (when [`require_terminal`](crate::StallConfigBuilder::require_terminal));
    /// - once the terminal marker arrived, ends cleanly if the connection then goes quiet.
    ///
    /// Other responses get only the total deadline. Errors are [`BoxError`]s holding an
    /// [`AiError`]: `err.downcast_ref::<AiError>()`. After an error frame the body ends.
    ///
    /// # Timer and `Unpin`
    ///
    /// One [`Sleep`] per body, created (boxed) only when the inner body first makes the
    /// caller wait, set to the earliest armed deadline and reset in place. A chunk costs
    /// no timer operation and no clock read: progress is timed when the body next waits
    /// (so time the caller spends between polls is not counted as the provider's), and
    /// the timer, left at an earlier deadline, catches up when it fires. The body is a few
    /// words plus the inner body (a stream's state is boxed apart), and `Unpin` when the
    /// inner body is.
    ///
    /// [`AiError`]: tower_ai_core::AiError
    /// [`AiError::Stalled`]: tower_ai_core::AiError::Stalled
    /// [`AiError::DeadlineExceeded`]: tower_ai_core::AiError::DeadlineExceeded
    /// [`AiError::Provider`]: tower_ai_core::AiError::Provider
    /// [`AiError::Truncated`]: tower_ai_core::AiError::Truncated
    pub struct StallBody<B> {
        #[pin]
        inner: Inner<B>,
        // Boxed and created only when the body first waits: a body is moved through every
        // layer above, and most of them never wait.
        sleep: Option<Pin<Box<Sleep>>>,
        tracker: Tracker,
        done: bool,
    }
}

impl<B> StallBody<B> {
    pub(crate) fn new(body: B, tracker: Tracker) -> Self {
        StallBody {
            inner: Inner::Inline { body },
            sleep: None,
            tracker,
            done: false,
        }
    }

    /// A body whose first frames the response future read ahead (held in `tracker`;
    /// `done`: the inner body ended too).
    pub(crate) fn read_ahead(body: Pin<Box<B>>, tracker: Tracker, done: bool) -> Self {
        StallBody {
            inner: Inner::Boxed { body },
            sleep: None,
            tracker,
            done,
        }
    }

    /// The outcome handle of an SSE response (the same one that is in the response's
    /// extensions).
    pub fn outcome(&self) -> Option<&StreamOutcome> {
        self.tracker.outcome()
    }

    /// Body bytes received from the inner body so far.
    pub fn bytes_received(&self) -> u64 {
        self.tracker.bytes()
    }
}

impl<B> fmt::Debug for StallBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StallBody")
            .field("sse", &self.tracker.is_sse())
            .field("bytes_received", &self.tracker.bytes())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<B> Body for StallBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        // Frames read ahead come first, also when the inner body ended behind them.
        match this.tracker.take_held() {
            None => {}
            Some(Held::Frame(frame)) => return Poll::Ready(Some(Ok(frame))),
            Some(Held::Error(err)) => {
                *this.done = true;
                return Poll::Ready(Some(Err(err)));
            }
        }
        if *this.done {
            return Poll::Ready(None);
        }
        // A JSON answer is read at its end, which a caller may take from the inner body's
        // `is_end_stream` after its last frame without polling again.
        let reads_json = this.tracker.reads_json();
        let (polled, inner_ended) = match this.inner.project() {
            InnerProj::Inline { mut body } => {
                let p = body.as_mut().poll_frame(cx);
                let ended = reads_json && p.is_ready() && body.is_end_stream();
                (p, ended)
            }
            InnerProj::Boxed { body } => {
                let p = body.as_mut().poll_frame(cx);
                let ended = reads_json && p.is_ready() && body.is_end_stream();
                (p, ended)
            }
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                // Progress only moves deadlines out or arms idle in place of first
                // content; both are timed, and the timer set, when the body next waits.
                if let Some(data) = frame.data_ref() {
                    if let Some(err) = this.tracker.on_data(data) {
                        this.tracker.hold_error(err);
                    }
                    if reads_json {
                        this.tracker.on_json(data);
                        if inner_ended {
                            this.tracker.end_json();
                        }
                    }
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(err))) => {
                this.tracker.on_body_error();
                *this.done = true;
                return Poll::Ready(Some(Err(err.into())));
            }
            Poll::Ready(None) => {
                *this.done = true;
                return Poll::Ready(
                    this.tracker
                        .on_end()
                        .map(|err| Err(Box::new(err) as BoxError)),
                );
            }
            Poll::Pending => {}
        }
        this.tracker.arm(Instant::now);
        loop {
            let Some(at) = this.tracker.deadline() else {
                return Poll::Pending;
            };
            let sleep = match this.sleep {
                Some(sleep) => {
                    // Only pulled in here: a later deadline is caught up with when the
                    // timer fires.
                    if sleep.deadline() > at {
                        sleep.as_mut().reset(at);
                    }
                    sleep
                }
                None => this.sleep.insert(Box::pin(tokio::time::sleep_until(at))),
            };
            ready!(sleep.as_mut().poll(cx));
            match this.tracker.check(Instant::now()) {
                // The timer was behind the progress made since it was set: catch up.
                Check::Wait(next) => {
                    if let Some(sleep) = this.sleep.as_mut() {
                        sleep.as_mut().reset(next);
                    }
                }
                Check::Disarmed => return Poll::Pending,
                Check::Stalled(err) => {
                    *this.done = true;
                    return Poll::Ready(Some(Err(Box::new(err))));
                }
                Check::End => {
                    *this.done = true;
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.done {
            return self.tracker.held().is_none();
        }
        if self.tracker.is_sse() {
            // A stream's end is judged (terminal marker, last event) when it is seen.
            return false;
        }
        match &self.inner {
            Inner::Inline { body } => body.is_end_stream(),
            Inner::Boxed { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        if self.done {
            return SizeHint::with_exact(self.tracker.held().unwrap_or(0));
        }
        let mut hint = match &self.inner {
            Inner::Inline { body } => body.size_hint(),
            Inner::Boxed { body } => body.size_hint(),
        };
        if let Some(extra) = self.tracker.held() {
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(extra));
            }
            hint.set_lower(hint.lower().saturating_add(extra));
        }
        hint
    }
}
