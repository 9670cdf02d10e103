//! The response future of [`CircuitBreaker`](crate::CircuitBreaker).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_ai_core::{AiError, BoxError, Classification, ErrorKind};

use crate::breaker::Verdict;
use crate::registry::Lane;

/// An admitted call's claim on its breaker: records the outcome once, and gives a
/// half-open permit back if the call is dropped before it completes.
pub(crate) struct Ticket {
    lane: Arc<Lane>,
    word: u64,
    probe: bool,
    start: Option<Instant>,
    done: bool,
}

impl Ticket {
    pub(crate) fn new(lane: Arc<Lane>, word: u64, probe: bool) -> Self {
        let start = lane.core.times_calls().then(Instant::now);
        Ticket {
            lane,
            word,
            probe,
            start,
            done: false,
        }
    }

    fn finish(mut self, verdict: Verdict) {
        self.done = true;
        let core = &self.lane.core;
        let (now, slow) = match self.start {
            Some(s) => {
                let now = Instant::now();
                (Some(now), core.is_slow(now.saturating_duration_since(s)))
            }
            None => (None, false),
        };
        core.record(self.lane.stripe, self.word, self.probe, verdict, slow, now);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.probe && !self.done {
            self.lane.core.release_probe(self.word);
        }
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("key", &self.lane.core.label)
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// The response future of [`CircuitBreaker`](crate::CircuitBreaker): the inner call,
    /// whose outcome it records, or a rejection made without touching the inner service.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called {
            #[pin]
            fut: F,
            ticket: Option<Ticket>,
        },
        // Boxed when made (the caller gets a `BoxError` anyway): an `AiError` inline
        // would make every future of this type several hundred bytes to move.
        Rejected {
            err: Option<BoxError>,
        },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn called(fut: F, ticket: Option<Ticket>) -> Self {
        ResponseFuture {
            state: State::Called { fut, ticket },
        }
    }

    pub(crate) fn rejected(err: AiError) -> Self {
        ResponseFuture {
            state: State::Rejected {
                err: Some(Box::new(err)),
            },
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            State::Called { ticket, .. } => f
                .debug_struct("ResponseFuture::Called")
                .field("ticket", ticket)
                .finish_non_exhaustive(),
            State::Rejected { err } => f
                .debug_struct("ResponseFuture::Rejected")
                .field("err", err)
                .finish(),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { fut, ticket } => {
                let res = ready!(fut.poll(cx)).map_err(Into::into);
                if let Some(t) = ticket.take() {
                    let kind = match &res {
                        // The classification a layer below attached, or one from the
                        // status (no allocation, no clock read, for a success).
                        Ok(r) => Classification::of(r).kind,
                        // An `AiError` in the chain gives its own kind.
                        Err(e) => Some(ErrorKind::of_error(&**e)),
                    };
                    let verdict = match kind {
                        None => Verdict::Success,
                        Some(k) if t.lane.core.config().failure_policy().is_failure(k) => {
                            Verdict::Failure
                        }
                        Some(_) => Verdict::Ignored,
                    };
                    t.finish(verdict);
                }
                Poll::Ready(res)
            }
            StateProj::Rejected { err } => {
                let err = err
                    .take()
                    .expect("circuit breaker ResponseFuture polled after completion");
                Poll::Ready(Err(err))
            }
        }
    }
}
