//! The response future of [`StallDetector`](crate::StallDetector).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::response::Parts;
use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_ai_core::stream::is_media_type;
use tower_ai_core::{AiError, BoxError, Provider};

use crate::body::StallBody;
use crate::config::StallConfig;
use crate::service::Route;
use crate::stall::{Check, Tracker};

pin_project! {
    /// The response future of [`StallDetector`](crate::StallDetector): waits for the head
    /// under the head and total deadlines and, for a `text/event-stream` success with
    /// [`await_first_byte`](crate::StallConfigBuilder::await_first_byte), for the first
    /// body byte under the first-byte and total deadlines.
    ///
    /// # Errors
    ///
    /// The inner service's error, as it is; [`AiError::Stalled`] with phase `Head`,
    /// `FirstByte` or `Total` when a deadline of the detector's expires first;
    /// [`AiError::DeadlineExceeded`] when the request's own deadline does (or had passed
    /// at the call: then the inner service was not called); and, while waiting for the
    /// first byte, [`AiError::Provider`] when the first chunk already carries an in-stream
    /// error, [`AiError::Truncated`] for a stream that ends before any byte, and
    /// [`AiError::Transport`] for a body that fails before any byte. None of these
    /// reached the caller as bytes, so retrying them is safe.
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
        // Created the first time the call makes us wait, then reset from phase to phase.
        // Boxed: an answer ready at once never makes one, and inline it would make every
        // call's future (and every future above it) larger by a timer's size.
        sleep: Option<Pin<Box<Sleep>>>,
        config: StallConfig,
        route: Route,
        // Taken the first time the call makes us wait (no clock read otherwise).
        start: Option<Instant>,
        // The request's `Deadline`: no deadline of this future ends after it.
        deadline: Option<Instant>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        Calling { #[pin] fut: F },
        // The request's deadline had passed at the call: the inner service was not called.
        Expired,
        // Boxed: only streams get here, and it keeps the future small for the rest.
        FirstByte { read_ahead: Box<ReadAhead<B>> },
        Done,
    }
}

/// What the future holds while it waits for a stream's first byte.
struct ReadAhead<B> {
    parts: Option<Parts>,
    body: Option<Pin<Box<B>>>,
    tracker: Option<Tracker>,
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn new(
        fut: F,
        config: StallConfig,
        route: Route,
        deadline: Option<Instant>,
    ) -> Self {
        ResponseFuture {
            state: State::Calling { fut },
            sleep: None,
            config,
            route,
            start: None,
            deadline,
        }
    }
}

impl<F, B> ResponseFuture<F, B> {
    /// The future of a request whose deadline had passed when it was called: it fails with
    /// [`AiError::DeadlineExceeded`] (not sent), the inner service uncalled.
    pub(crate) fn expired(config: StallConfig, route: Route) -> Self {
        ResponseFuture {
            state: State::Expired,
            sleep: None,
            config,
            route,
            start: None,
            deadline: None,
        }
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("system", &self.route.system)
            .field("dialect", &self.route.dialect)
            .field("streamed", &self.route.streamed)
            .finish_non_exhaustive()
    }
}

/// The error for a call cut at its request's deadline (or not `sent`: the deadline had
/// passed at the call), traced: the caller's deadline is not a stall of the provider's.
pub(crate) fn deadline_passed(system: Provider, sent: bool, bytes_received: u64) -> AiError {
    tracing::debug!(
        gen_ai.provider.name = system.gen_ai_name(),
        error.type = "deadline_exceeded",
        sent,
        bytes_received,
        "the request's deadline passed"
    );
    AiError::DeadlineExceeded {
        sent,
        bytes_received,
    }
}

/// What a response's head says its body is, for the detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// A success whose `content-type` is `text/event-stream`: a stream worth reading.
    Sse,
    /// A success whose `content-type` is `application/json`: a non-streamed answer, read
    /// for why the model stopped.
    Json,
    /// Anything else.
    Other,
}

/// The [`Answer`] of a response, from one look at its `content-type` (read as
/// [`is_event_stream`](tower_ai_core::stream::is_event_stream) reads it).
fn answer_of<B>(res: &Response<B>) -> Answer {
    if !res.status().is_success() {
        return Answer::Other;
    }
    let Some(v) = res.headers().get(http::header::CONTENT_TYPE) else {
        return Answer::Other;
    };
    if is_media_type(v.as_bytes(), b"text/event-stream") {
        Answer::Sse
    } else if is_media_type(v.as_bytes(), b"application/json") {
        Answer::Json
    } else {
        Answer::Other
    }
}

/// Polls the one timer of the future at `at`, creating it the first time it is needed
/// (a response that is ready at once never creates one).
fn poll_sleep(sleep: &mut Option<Pin<Box<Sleep>>>, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
    let s = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
    if s.deadline() != at {
        s.as_mut().reset(at);
    }
    s.as_mut().poll(cx)
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<StallBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let polled = fut.poll(cx);
                    let answer = match &polled {
                        Poll::Ready(Ok(res)) => answer_of(res),
                        _ => Answer::Other,
                    };
                    match polled {
                        Poll::Ready(Ok(mut res)) if answer != Answer::Sse => {
                            this.state.set(State::Done);
                            let tracker = if answer == Answer::Json {
                                let t = Tracker::json(this.config, this.route.system, *this.start)
                                    .with_deadline(*this.deadline);
                                if let Some(outcome) = t.outcome() {
                                    res.extensions_mut().insert(outcome.clone());
                                }
                                t
                            } else {
                                Tracker::plain(this.config, this.route.system, *this.start)
                                    .with_deadline(*this.deadline)
                            };
                            return Poll::Ready(Ok(res.map(|b| StallBody::new(b, tracker))));
                        }
                        Poll::Ready(Ok(res)) => {
                            // The head's instant matters only to a stream's deadlines.
                            let tracker = Tracker::stream(
                                *this.config,
                                this.route.system,
                                *this.start,
                                this.route.dialect,
                                Instant::now(),
                            )
                            .with_deadline(*this.deadline);
                            let (mut parts, body) = res.into_parts();
                            if let Some(outcome) = tracker.outcome() {
                                parts.extensions.insert(outcome.clone());
                            }
                            if this.config.await_first_byte {
                                this.state.set(State::FirstByte {
                                    read_ahead: Box::new(ReadAhead {
                                        parts: Some(parts),
                                        body: Some(Box::pin(body)),
                                        tracker: Some(tracker),
                                    }),
                                });
                                continue;
                            }
                            this.state.set(State::Done);
                            let body = StallBody::new(body, tracker);
                            return Poll::Ready(Ok(Response::from_parts(parts, body)));
                        }
                        Poll::Ready(Err(err)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(err.into()));
                        }
                        Poll::Pending => {}
                    }
                    let start = *this.start.get_or_insert_with(Instant::now);
                    let Some((at, phase, after)) = Tracker::head_or_request_deadline(
                        this.config,
                        this.route.streamed,
                        start,
                        *this.deadline,
                    ) else {
                        return Poll::Pending;
                    };
                    ready!(poll_sleep(this.sleep, at, cx));
                    this.state.set(State::Done);
                    if *this.deadline == Some(at) {
                        // The caller's deadline, not one of the detector's own.
                        return Poll::Ready(Err(Box::new(deadline_passed(
                            this.route.system,
                            true,
                            0,
                        ))));
                    }
                    tracing::warn!(
                        gen_ai.provider.name = this.route.system.gen_ai_name(),
                        error.type = "stalled",
                        stall.phase = ?phase,
                        stall.after_ms = after.as_millis() as u64,
                        "no response head in time"
                    );
                    #[cfg(feature = "metrics")]
                    crate::meter::stalled(phase);
                    return Poll::Ready(Err(Box::new(AiError::Stalled {
                        phase,
                        after,
                        bytes_received: 0,
                    })));
                }
                StateProj::FirstByte { read_ahead } => {
                    let ReadAhead {
                        parts,
                        body,
                        tracker,
                    } = &mut **read_ahead;
                    let (Some(b), Some(t)) = (body.as_mut(), tracker.as_mut()) else {
                        panic!("ResponseFuture polled after completion");
                    };
                    let end = match b.as_mut().poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => {
                            if let Some(data) = frame.data_ref() {
                                if data.is_empty() {
                                    continue;
                                }
                                if let Some(err) = t.on_data(data) {
                                    // Not one byte reached the caller: an error of the call.
                                    this.state.set(State::Done);
                                    return Poll::Ready(Err(Box::new(err)));
                                }
                            }
                            t.hold_frame(frame);
                            if t.wants_more_preamble() {
                                // Awaiting the first content: the preamble is held.
                                continue;
                            }
                            Some(())
                        }
                        Poll::Ready(Some(Err(err))) => {
                            t.on_body_error();
                            this.state.set(State::Done);
                            return Poll::Ready(Err(AiError::transport(err.into())));
                        }
                        Poll::Ready(None) => {
                            if let Some(err) = t.on_end() {
                                this.state.set(State::Done);
                                return Poll::Ready(Err(Box::new(err)));
                            }
                            None
                        }
                        Poll::Pending => {
                            t.arm(Instant::now);
                            let Some(at) = t.deadline() else {
                                return Poll::Pending;
                            };
                            ready!(poll_sleep(this.sleep, at, cx));
                            match t.check(Instant::now()) {
                                Check::Wait(_) => continue,
                                Check::Disarmed => return Poll::Pending,
                                Check::Stalled(err) => {
                                    this.state.set(State::Done);
                                    return Poll::Ready(Err(Box::new(err)));
                                }
                                Check::End => None,
                            }
                        }
                    };
                    let done = end.is_none();
                    let (Some(parts), Some(b), Some(t)) =
                        (parts.take(), body.take(), tracker.take())
                    else {
                        panic!("ResponseFuture polled after completion");
                    };
                    this.state.set(State::Done);
                    let body = StallBody::read_ahead(b, t, done);
                    return Poll::Ready(Ok(Response::from_parts(parts, body)));
                }
                StateProj::Expired => {
                    this.state.set(State::Done);
                    let system = this.route.system;
                    return Poll::Ready(Err(Box::new(deadline_passed(system, false, 0))));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One look at the head tells what `is_event_stream` and the JSON rule told apart.
    #[test]
    fn the_answer_of_a_head() {
        let res = |status: u16, ct: Option<&str>| {
            let mut b = Response::builder().status(status);
            if let Some(ct) = ct {
                b = b.header(http::header::CONTENT_TYPE, ct);
            }
            b.body(()).unwrap()
        };
        for (status, ct, want) in [
            (200, Some("text/event-stream"), Answer::Sse),
            (200, Some(" Text/Event-Stream; charset=utf-8"), Answer::Sse),
            (200, Some("text/event-streamx"), Answer::Other),
            (200, Some("application/json"), Answer::Json),
            (200, Some("Application/JSON;charset=utf-8"), Answer::Json),
            (200, Some("application/json\tx"), Answer::Json),
            (200, Some("application/jsonl"), Answer::Other),
            (200, Some("text/plain"), Answer::Other),
            (200, None, Answer::Other),
            (500, Some("application/json"), Answer::Other),
            (429, Some("text/event-stream"), Answer::Other),
        ] {
            let r = res(status, ct);
            assert_eq!(answer_of(&r), want, "{status} {ct:?}");
            assert_eq!(
                want == Answer::Sse,
                r.status().is_success() && tower_ai_core::stream::is_event_stream(r.headers())
            );
        }
    }
}
