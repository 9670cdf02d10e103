//! The response future of [`CircuitBreaker`](crate::CircuitBreaker).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::Response;
use pin_project_lite::pin_project;
use tower_ai_core::{BoxError, Classification, ErrorKind};

use crate::breaker::{is_probe, Verdict};
use crate::clock;
use crate::registry::Lane;

/// An admitted call's claim on its breaker: records the outcome once, and gives a
/// half-open permit back if the call is dropped before it completes.
///
/// Three words, so that the response future stays small to move: whether it holds a
/// permit is read from `word` (a probe is admitted in the half-open state, and only a
/// probe is), and the start time is kept as nanoseconds on the breaker's clock.
pub(crate) struct Ticket {
    lane: Arc<Lane>,
    /// The state word the call was admitted under; [`RECORDED`] once recorded.
    word: u64,
    /// When the call started (nanoseconds since the breaker's epoch, + 1), if slow-call
    /// detection times it; 0 otherwise.
    start: u64,
}

/// A `word` no state has: the outcome is recorded, no permit is held.
const RECORDED: u64 = u64::MAX;

impl Ticket {
    #[inline]
    pub(crate) fn new(lane: Arc<Lane>, word: u64, probe: bool) -> Self {
        debug_assert_eq!(probe, is_probe(word));
        let start = if lane.core.times_calls() {
            lane.core.nanos(clock::now()).saturating_add(1)
        } else {
            0
        };
        Ticket { lane, word, start }
    }

    /// Records the call's outcome. The common case, a plain success of a call neither
    /// timed nor probing, is one atomic add in a closed count window (no clock read, no
    /// lock); everything else goes the long way, out of line.
    #[inline]
    fn complete<B>(&mut self, res: &Result<Response<B>, BoxError>) {
        if let Ok(r) = res {
            // The classification a layer below attached wins; without one, a status
            // under 400 is a success (what `Classification::of` would find, without
            // building a whole classification to find no kind in it).
            if self.start == 0
                && !is_probe(self.word)
                && r.status().as_u16() < 400
                && r.extensions().get::<Classification>().is_none()
            {
                self.lane.core.record_success(self.lane.stripe, self.word);
                self.word = RECORDED;
                return;
            }
        }
        self.complete_slow(res);
    }

    #[cold]
    #[inline(never)]
    fn complete_slow<B>(&mut self, res: &Result<Response<B>, BoxError>) {
        let kind = match res {
            Ok(r) => Classification::of(r).kind,
            // An `AiError` in the chain gives its own kind.
            Err(e) => Some(ErrorKind::of_error(&**e)),
        };
        let core = &self.lane.core;
        let verdict = match kind {
            None => Verdict::Success,
            Some(k) if core.config().failure_policy().is_failure(k) => Verdict::Failure,
            Some(_) => Verdict::Ignored,
        };
        let (now, slow) = match self.start {
            0 => (None, false),
            start => {
                let now = clock::now();
                let took = core.nanos(now).saturating_sub(start - 1);
                (Some(now), core.is_slow(Duration::from_nanos(took)))
            }
        };
        let word = std::mem::replace(&mut self.word, RECORDED);
        core.record(self.lane.stripe, word, is_probe(word), verdict, slow, now);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if is_probe(self.word) {
            self.lane.core.release_probe(self.word);
        }
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("key", &self.lane.core.label)
            .field("probe", &is_probe(self.word))
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

    pub(crate) fn rejected(err: BoxError) -> Self {
        ResponseFuture {
            state: State::Rejected { err: Some(err) },
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

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { fut, ticket } => {
                let res = ready!(fut.poll(cx)).map_err(Into::into);
                if let Some(t) = ticket {
                    t.complete(&res);
                    *ticket = None; // drops the claim on the lane
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
