//! The response future of [`CircuitBreaker`](crate::CircuitBreaker).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::Response;
use pin_project_lite::pin_project;
use tower_ai_core::stream::is_event_stream;
use tower_ai_core::{BoxError, Classification, ErrorKind};

use crate::body::BreakerBody;
use crate::breaker::{is_probe, Verdict};
use crate::clock;
use crate::registry::Lane;

/// An admitted call's claim on its breaker: records the outcome once, and gives a
/// half-open permit back if the call is dropped before it completes.
///
/// Two words, so that the response future stays small to move (a future of 128 bytes
/// around the bench's provider is moved with a few register copies, one larger through
/// `memcpy`). `stamp` is the state word the call was admitted under. With slow-call
/// detection on, the call's start (microseconds on the breaker's clock, modulo 2^40:
/// 12.7 days) fills its upper 40 bits and the word keeps its lower 24 (the state and 21
/// bits of generation), which is enough to tell whether the state changed since: a stale
/// outcome is dropped unless exactly a multiple of 2^21 transitions happened while the
/// call was in flight. The low three bits are the state in either layout, so whether the
/// call holds a half-open permit is read from them (a probe is admitted in the half-open
/// state, and only a probe is).
pub(crate) struct Ticket {
    lane: Arc<Lane>,
    /// See above; [`RECORDED`] once the outcome is recorded.
    stamp: u64,
}

/// A `stamp` no state has: the outcome is recorded, no permit is held.
const RECORDED: u64 = u64::MAX;

/// The bits of the state word a timed ticket keeps.
const WORD_BITS: u32 = 24;
const WORD_MASK: u64 = (1 << WORD_BITS) - 1;
/// The range of a timed ticket's start, in microseconds.
const START_MASK: u64 = (1 << (64 - WORD_BITS)) - 1;

impl Ticket {
    #[inline]
    pub(crate) fn new(lane: Arc<Lane>, word: u64, probe: bool) -> Self {
        debug_assert_eq!(probe, is_probe(word));
        let stamp = if lane.core.times_calls() {
            let start = lane.core.nanos(clock::now()) / 1_000;
            (start << WORD_BITS) | (word & WORD_MASK)
        } else {
            word
        };
        Ticket { lane, stamp }
    }

    /// The full state word the call was admitted under, or [`RECORDED`] (which matches
    /// no state) once the state has changed since. For the breaker, whose checks under
    /// its lock decide.
    fn word(&self) -> u64 {
        if !self.lane.core.times_calls() || self.stamp == RECORDED {
            return self.stamp;
        }
        let now = self.lane.core.word();
        if now & WORD_MASK == self.stamp & WORD_MASK {
            now
        } else {
            RECORDED
        }
    }

    /// Records the call's outcome at its response head, or, for a successful head of a
    /// streamed answer (`text/event-stream`), hands the ticket on to be recorded at the
    /// body's end. The common case, a plain success of a call neither timed nor probing,
    /// is one header lookup and one atomic add in a closed count window (no clock read,
    /// no lock); everything else goes the long way, out of line.
    #[inline(always)]
    fn complete<B>(mut self, res: &Result<Response<B>, BoxError>) -> Option<Pending> {
        if let Ok(r) = res {
            // The classification a layer below attached wins; without one, a status
            // under 400 is a success (what `Classification::of` would find, without
            // building a whole classification to find no kind in it).
            if r.status().as_u16() < 400 && r.extensions().get::<Classification>().is_none() {
                if is_event_stream(r.headers()) {
                    return Some(self.defer());
                }
                if !is_probe(self.stamp) && !self.lane.core.times_calls() {
                    self.lane.core.record_success(&self.lane, self.stamp);
                    self.stamp = RECORDED;
                    return None;
                }
            }
        }
        self.complete_slow(res)
    }

    #[cold]
    #[inline(never)]
    fn complete_slow<B>(mut self, res: &Result<Response<B>, BoxError>) -> Option<Pending> {
        let kind = match res {
            Ok(r) => {
                let kind = Classification::of(r).kind;
                if kind.is_none() && is_event_stream(r.headers()) {
                    return Some(self.defer());
                }
                kind
            }
            // An `AiError` in the chain gives its own kind.
            Err(e) => Some(ErrorKind::of_error(&**e)),
        };
        let verdict = self.verdict(kind);
        let (now, slow) = self.timed();
        self.record(verdict, slow, now);
        None
    }

    /// The verdict on an outcome of `kind` (`None`: a success).
    fn verdict(&self, kind: Option<ErrorKind>) -> Verdict {
        match kind {
            None => Verdict::Success,
            Some(k) if self.lane.core.config().failure_policy().is_failure(k) => Verdict::Failure,
            Some(_) => Verdict::Ignored,
        }
    }

    /// The time now and whether the call was slow, when calls are timed.
    fn timed(&self) -> (Option<tokio::time::Instant>, bool) {
        let core = &self.lane.core;
        if core.times_calls() {
            let now = clock::now();
            let start = self.stamp >> WORD_BITS;
            let took = (core.nanos(now) / 1_000).wrapping_sub(start) & START_MASK;
            (Some(now), core.is_slow(Duration::from_micros(took)))
        } else {
            (None, false)
        }
    }

    fn record(&mut self, verdict: Verdict, slow: bool, now: Option<tokio::time::Instant>) {
        let (word, probe) = (self.word(), is_probe(self.stamp));
        self.stamp = RECORDED;
        self.lane
            .core
            .record(&self.lane, word, probe, verdict, slow, now);
    }

    /// A streamed answer's head arrived: the call is timed to it (a stream's length is
    /// the answer's, not the provider's latency), its outcome waits for the body's end.
    /// A timed ticket no longer needs its start: the upper bits of its stamp keep whether
    /// the head was slow, so the ticket stays two words.
    #[cold]
    #[inline(never)]
    fn defer(mut self) -> Pending {
        if self.lane.core.times_calls() {
            let (_, slow) = self.timed();
            self.stamp = (u64::from(slow) << WORD_BITS) | (self.stamp & WORD_MASK);
        }
        Pending(self)
    }
}

/// The ticket of a streamed answer, carried by its body until it ends (a timed one
/// holds whether its head was slow instead of its start: see [`Ticket::defer`]).
pub(crate) struct Pending(Ticket);

impl Pending {
    /// Records the end of the body: a success at its clean end (`kind: None`), else as
    /// the error's kind says.
    pub(crate) fn finish(mut self, kind: Option<ErrorKind>) {
        let t = &mut self.0;
        let slow = t.lane.core.times_calls() && t.stamp >> WORD_BITS == 1;
        let verdict = t.verdict(kind);
        t.record(verdict, slow, None);
    }
}

impl fmt::Debug for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pending").field(&self.0).finish()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if is_probe(self.stamp) {
            self.lane.core.release_probe(self.word());
        }
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("key", &self.lane.core.label)
            .field("probe", &is_probe(self.stamp))
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
    type Output = Result<Response<BreakerBody<B>>, BoxError>;

    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { fut, ticket } => {
                let res = ready!(fut.poll(cx)).map_err(Into::into);
                // Taken: the claim on the lane goes with the ticket (or with the body).
                let pending = match ticket.take() {
                    Some(t) => t.complete(&res),
                    None => None,
                };
                Poll::Ready(res.map(|r| r.map(|b| BreakerBody::new(b, pending))))
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower_ai_core::keys::Key;

    use super::*;
    use crate::breaker::Admit;
    use crate::event::{CircuitState, Emitter};
    use crate::registry::Registry;
    use crate::CircuitBreakerConfig;

    fn timed() -> Arc<Lane> {
        let cfg = CircuitBreakerConfig::builder()
            .slow_calls(Duration::from_millis(1500), 1.0)
            .minimum_calls(50)
            .build()
            .unwrap();
        let reg = Registry::new(cfg, Emitter::new(()));
        reg.lane(Key::of("k"), || "k".into()).unwrap()
    }

    fn ticket(lane: &Arc<Lane>) -> Ticket {
        let Admit::Pass { word, probe } = lane.core.admit(clock::now) else {
            panic!("closed: admitted")
        };
        Ticket::new(lane.clone(), word, probe)
    }

    fn ok() -> Result<Response<()>, BoxError> {
        Ok(Response::new(()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_ticket_measures_the_call_to_the_microsecond() {
        let lane = timed();
        let fast = ticket(&lane);
        let slow = ticket(&lane);
        tokio::time::advance(Duration::from_micros(1_500_000)).await;
        fast.complete(&ok()); // exactly the threshold: not slow
        tokio::time::advance(Duration::from_micros(1)).await;
        slow.complete(&ok());
        let m = lane.core.metrics(clock::now());
        assert_eq!((m.calls, m.slow_calls), (2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_ticket_admitted_before_a_transition_records_nothing() {
        let lane = timed();
        let stale = ticket(&lane);
        lane.core.force(CircuitState::Closed, clock::now()); // a reset: a new generation
        let fresh = ticket(&lane);
        tokio::time::advance(Duration::from_secs(2)).await;
        stale.complete(&ok());
        fresh.complete(&ok());
        let m = lane.core.metrics(clock::now());
        assert_eq!(
            (m.calls, m.slow_calls),
            (1, 1),
            "only the call admitted after the reset"
        );
    }
}
