//! The response body of [`CircuitBreaker`](crate::CircuitBreaker).

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_ai_core::{BoxError, ErrorKind};

use crate::future::Pending;

pin_project! {
    /// The response body of [`CircuitBreaker`](crate::CircuitBreaker): the inner body,
    /// frame for frame, untouched.
    ///
    /// A streamed answer (`text/event-stream`) that arrived with a successful head carries
    /// its call's outcome to its end: a clean end records a success; an error records what
    /// its [`ErrorKind`] says (a stall, a truncation, an in-stream overload or server
    /// error, a reset connection: a failure; a rate limit: ignored). A body dropped (or
    /// unwrapped with [`into_inner`](Self::into_inner)) before its end records nothing,
    /// and a half-open probe's permit goes back. Any other body records nothing: its call
    /// was recorded when its head arrived.
    pub struct BreakerBody<B> {
        #[pin]
        inner: B,
        pending: Option<Pending>,
    }
}

impl<B> BreakerBody<B> {
    #[inline(always)]
    pub(crate) fn new(inner: B, pending: Option<Pending>) -> Self {
        BreakerBody { inner, pending }
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// The inner body, mutably.
    pub fn get_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    /// Unwraps the inner body; an outcome still pending is not recorded.
    pub fn into_inner(self) -> B {
        self.inner
    }

    /// Whether the body still carries its call's outcome (a streamed answer not yet at
    /// its end).
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }
}

impl<B> fmt::Debug for BreakerBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerBody")
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl<B> Body for BreakerBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if this.pending.is_none() {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match frame {
            Some(Ok(f)) => {
                if this.inner.is_end_stream() {
                    // The last frame: a reader may not poll again.
                    if let Some(p) = this.pending.take() {
                        p.finish(None);
                    }
                }
                Poll::Ready(Some(Ok(f)))
            }
            None => {
                if let Some(p) = this.pending.take() {
                    p.finish(None);
                }
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                let e: BoxError = e.into();
                if let Some(p) = this.pending.take() {
                    p.finish(Some(ErrorKind::of_error(&*e)));
                }
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
