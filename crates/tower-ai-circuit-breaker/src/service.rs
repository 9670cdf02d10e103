//! The [`CircuitBreaker`] service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_ai_core::keys::{HostModel, KeyFn};
use tower_ai_core::{AiError, BoxError};
use tower_service::Service;

use crate::breaker::Admit;
use crate::future::{ResponseFuture, Ticket};
use crate::registry::Registry;

/// Fails fast on a key whose provider is sick; see the [crate docs](crate).
///
/// Made by [`CircuitBreakerLayer`](crate::CircuitBreakerLayer); every service from one
/// layer shares its breakers. Errors are [`BoxError`]s: the inner service's, or an
/// [`AiError::CircuitOpen`] for a refused call.
pub struct CircuitBreaker<S, K = HostModel> {
    inner: S,
    registry: Arc<Registry>,
    key_fn: Arc<K>,
}

impl<S, K> CircuitBreaker<S, K> {
    pub(crate) fn from_parts(inner: S, registry: Arc<Registry>, key_fn: Arc<K>) -> Self {
        CircuitBreaker {
            inner,
            registry,
            key_fn,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, K> Clone for CircuitBreaker<S, K> {
    fn clone(&self) -> Self {
        CircuitBreaker {
            inner: self.inner.clone(),
            registry: self.registry.clone(),
            key_fn: self.key_fn.clone(),
        }
    }
}

impl<S: fmt::Debug, K> fmt::Debug for CircuitBreaker<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("config", &self.registry.cfg)
            .finish_non_exhaustive()
    }
}

impl<S, K, ReqB, ResB> Service<Request<ReqB>> for CircuitBreaker<S, K>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    K: KeyFn<ReqB>,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let Some(key) = self.key_fn.key(&req) else {
            return ResponseFuture::called(self.inner.call(req), None);
        };
        let Some(lane) = self.registry.lane(key, || self.key_fn.label(&req)) else {
            return ResponseFuture::called(self.inner.call(req), None);
        };
        match lane.core.admit(tokio::time::Instant::now) {
            Admit::Pass { word, probe } => {
                let ticket = Ticket::new(lane, word, probe);
                ResponseFuture::called(self.inner.call(req), Some(ticket))
            }
            Admit::Untracked => ResponseFuture::called(self.inner.call(req), None),
            Admit::Reject { until } => ResponseFuture::rejected(AiError::CircuitOpen {
                key: lane.core.label.to_string(),
                until,
            }),
        }
    }
}
