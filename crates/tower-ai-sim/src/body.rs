//! The response body: whole for JSON, paced frame by frame for streams.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// The error a stalled stream ends with once its stall has lasted
/// [`stall_duration`](crate::ScenarioBuilder::stall_duration).
///
/// Over HTTP, hyper then closes the connection without the terminating
/// chunk, so a client sees an incomplete body, never a clean end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimBodyError {
    stalled_for: Duration,
}

impl SimBodyError {
    /// How long the stream had stalled.
    pub fn stalled_for(&self) -> Duration {
        self.stalled_for
    }
}

impl fmt::Display for SimBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "simulated stream stalled for {:?} and was cut",
            self.stalled_for
        )
    }
}

impl std::error::Error for SimBodyError {}

/// One step of a stream's script.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    /// Send these bytes as one frame.
    Data(Bytes),
    /// Wait, then go on.
    Wait(Duration),
    /// Send nothing for this long, then fail.
    Stall(Duration),
}

/// The body of every response the simulator gives.
///
/// JSON answers and errors are one frame with an exact size hint. Streams
/// yield one frame per SSE event (or JSON-array element), waiting the
/// scenario's token interval on `tokio`'s clock before each token, so over
/// HTTP they arrive event by event. A stall is a pending `poll_frame` with a
/// timer registered: no busy loop, and on a paused clock it costs nothing.
///
/// `SimBody` is `Send`, `Sync` and `Unpin`.
pub struct SimBody {
    kind: Kind,
}

enum Kind {
    Full(Option<Bytes>),
    Stream(Box<StreamState>),
}

struct StreamState {
    steps: VecDeque<Step>,
    sleep: Option<Pin<Box<Sleep>>>,
    sleeping: bool,
    stalled: Option<Duration>,
    failed: bool,
}

impl SimBody {
    /// An empty body.
    pub fn empty() -> Self {
        SimBody {
            kind: Kind::Full(None),
        }
    }

    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        SimBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
        }
    }

    pub(crate) fn stream(steps: VecDeque<Step>) -> Self {
        SimBody {
            kind: Kind::Stream(Box::new(StreamState {
                steps,
                sleep: None,
                sleeping: false,
                stalled: None,
                failed: false,
            })),
        }
    }
}

impl Default for SimBody {
    fn default() -> Self {
        SimBody::empty()
    }
}

impl fmt::Debug for SimBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Full(b) => f
                .debug_struct("SimBody")
                .field("len", &b.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Stream(s) => f
                .debug_struct("SimBody")
                .field("steps_left", &s.steps.len())
                .field("sleeping", &s.sleeping)
                .field("stalled", &s.stalled)
                .finish(),
        }
    }
}

fn deadline(after: Duration) -> Instant {
    let now = Instant::now();
    // A very long stall must not overflow the clock: about 30 years is "forever".
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
}

impl StreamState {
    fn start_sleep(&mut self, d: Duration) {
        let at = deadline(d);
        match &mut self.sleep {
            Some(s) => s.as_mut().reset(at),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        self.sleeping = true;
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, SimBodyError>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        loop {
            if self.sleeping {
                if let Some(sleep) = &mut self.sleep {
                    ready!(sleep.as_mut().poll(cx));
                }
                self.sleeping = false;
                if let Some(stalled_for) = self.stalled.take() {
                    self.failed = true;
                    self.steps.clear();
                    return Poll::Ready(Some(Err(SimBodyError { stalled_for })));
                }
            }
            match self.steps.pop_front() {
                None => return Poll::Ready(None),
                Some(Step::Data(b)) => return Poll::Ready(Some(Ok(Frame::data(b)))),
                Some(Step::Wait(d)) if d.is_zero() => {}
                Some(Step::Wait(d)) => self.start_sleep(d),
                Some(Step::Stall(d)) => {
                    self.stalled = Some(d);
                    self.start_sleep(d);
                }
            }
        }
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = SimBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, SimBodyError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(s) => s.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Stream(s) => s.failed || (s.steps.is_empty() && !s.sleeping),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream(s) => {
                let known: u64 = s
                    .steps
                    .iter()
                    .map(|st| match st {
                        Step::Data(b) => b.len() as u64,
                        _ => 0,
                    })
                    .sum();
                let mut hint = SizeHint::new();
                hint.set_lower(known);
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test(start_paused = true)]
    async fn paces_and_stalls() {
        let steps = VecDeque::from(vec![
            Step::Data(Bytes::from_static(b"a")),
            Step::Wait(Duration::from_millis(100)),
            Step::Data(Bytes::from_static(b"b")),
            Step::Stall(Duration::from_secs(10)),
            Step::Data(Bytes::from_static(b"never")),
        ]);
        let mut body = SimBody::stream(steps);
        let t0 = Instant::now();
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "a");
        assert_eq!(t0.elapsed(), Duration::ZERO);
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "b");
        assert_eq!(t0.elapsed(), Duration::from_millis(100));
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.stalled_for(), Duration::from_secs(10));
        assert_eq!(t0.elapsed(), Duration::from_millis(10_100));
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }

    #[test]
    fn full_body_hint() {
        let b = SimBody::full("hello");
        assert_eq!(b.size_hint().exact(), Some(5));
        assert!(!b.is_end_stream());
        assert!(SimBody::full("").is_end_stream());
    }
}
