//! The [`ModelFallback`] service.

use std::fmt;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_ai_core::{BoxError, ReplayBody};
use tower_service::Service;

use crate::config::FallbackChain;
use crate::future::ResponseFuture;

/// Sends each request down a [`FallbackChain`] of routes until one serves it; see the
/// [crate docs](crate).
///
/// `poll_ready` is the wrapped service's (the first route's); cross-provider routes are
/// made ready when they are tried.
pub struct ModelFallback<S, ReqB, ResB> {
    inner: S,
    chain: FallbackChain<ReqB, ResB>,
}

impl<S: Clone, ReqB, ResB> Clone for ModelFallback<S, ReqB, ResB> {
    fn clone(&self) -> Self {
        ModelFallback {
            inner: self.inner.clone(),
            chain: self.chain.clone(),
        }
    }
}

impl<S: fmt::Debug, ReqB, ResB> fmt::Debug for ModelFallback<S, ReqB, ResB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelFallback")
            .field("inner", &self.inner)
            .field("chain", &self.chain)
            .finish()
    }
}

impl<S, ReqB, ResB> ModelFallback<S, ReqB, ResB> {
    /// Wraps `inner` with `chain`.
    pub fn new(inner: S, chain: FallbackChain<ReqB, ResB>) -> Self {
        ModelFallback { inner, chain }
    }

    /// The chain (for [`FallbackChain::served`]).
    pub fn chain(&self) -> &FallbackChain<ReqB, ResB> {
        &self.chain
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the wrapped service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for ModelFallback<S, ReqB, ResB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    ReqB: ReplayBody + From<Bytes>,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqB, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // Take the instance `poll_ready` made ready; keep a fresh clone for the next call.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::start(self.chain.inner.clone(), ready, req)
    }
}
