//! [`AiRetry`], the service.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Method, Request, Response};
use tokio::time::Instant;
use tower_ai_core::{try_clone_request, BoxError, ReplayBody};
use tower_service::Service;

use crate::config::AiRetryConfig;
use crate::future::ResponseFuture;
use crate::layer::{AiRetryLayer, Shared};

/// Sends a request again when the provider's answer says it may help, when the provider
/// says, inside a budget. See the [crate docs](crate).
pub struct AiRetry<S> {
    inner: S,
    /// The layer's configuration, shared by refcount (a clone allocates nothing).
    config: Arc<AiRetryConfig>,
    rng: fastrand::Rng,
    /// Clones made from this instance: mixed into a clone's seed, because `clone` only
    /// has `&self` and so cannot advance `rng`. Per instance, never shared.
    forks: AtomicU64,
}

impl<S: fmt::Debug> fmt::Debug for AiRetry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AiRetry")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}

impl<S: Clone> Clone for AiRetry<S> {
    /// A clone shares the configuration and the budget, and draws its own random numbers
    /// (so two clones never make the same idempotency key).
    fn clone(&self) -> Self {
        AiRetry {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
            rng: fork(&self.rng, &self.forks),
            forks: AtomicU64::new(0),
        }
    }
}

impl<S> AiRetry<S> {
    /// Wraps `inner` with the settings (and a new budget) of `layer`.
    pub fn new(inner: S, layer: &AiRetryLayer) -> Self {
        AiRetry::from_shared(inner, layer.shared.clone())
    }

    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        let rng = shared.next_rng();
        AiRetry {
            inner,
            config: Arc::clone(&shared.config),
            rng,
            forks: AtomicU64::new(0),
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

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// A clone's RNG, forked from its parent's without a shared counter: the parent's next
/// output (read from a copy, as `clone` cannot advance the parent) mixed with the
/// parent's fork count, so clones of one parent never share a sequence (nor an
/// idempotency key).
fn fork(parent: &fastrand::Rng, forks: &AtomicU64) -> fastrand::Rng {
    let n = forks.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
    let mut copy = parent.clone();
    fastrand::Rng::with_seed(copy.u64(..) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

pub(crate) fn attempt_value(n: u32) -> HeaderValue {
    const SMALL: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match SMALL.get(n as usize) {
        Some(s) => HeaderValue::from_static(s),
        None => HeaderValue::from(n),
    }
}

fn idempotency_value(rng: &mut fastrand::Rng) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 32];
    let (a, b) = (rng.u64(..), rng.u64(..));
    for (i, byte) in buf.iter_mut().enumerate() {
        let word = if i < 16 { a } else { b };
        *byte = HEX[((word >> ((i % 16) * 4)) & 0xf) as usize];
    }
    // Always valid: lowercase hex.
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

impl<S, B, ResB> Service<Request<B>> for AiRetry<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayBody,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> ResponseFuture<S, B> {
        let cfg = &*self.config;
        let span = tracing::debug_span!(
            "ai_retry",
            http.request.method = %req.method(),
            attempts = tracing::field::Empty,
        );
        if let Some(name) = &cfg.idempotency_header {
            if req.method() != Method::GET
                && req.method() != Method::HEAD
                && !req.headers().contains_key(name)
            {
                req.headers_mut()
                    .insert(name.clone(), idempotency_value(&mut self.rng));
            }
        }
        if let Some(name) = &cfg.attempt_header {
            req.headers_mut().insert(name.clone(), attempt_value(0));
        }
        // Keep a copy to send again, only if the body can be replayed and a retry is
        // possible at all.
        let retained = if cfg.max_attempts > 1 {
            try_clone_request(&req)
        } else {
            None
        };
        let now = Instant::now();
        if let Some(budget) = &cfg.budget {
            budget.deposit(now);
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut = inner.call(req);
        ResponseFuture::new(
            fut,
            inner,
            retained,
            self.config.clone(),
            now,
            fastrand::Rng::with_seed(self.rng.u64(..)),
            span,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_config_and_draw_their_own_numbers() {
        let layer = AiRetryLayer::new(3);
        let parent = AiRetry::new((), &layer);
        let (mut a, mut b) = (parent.clone(), parent.clone());
        assert!(Arc::ptr_eq(&a.config, &parent.config));
        assert!(Arc::ptr_eq(&a.config, &layer.shared.config));
        assert_ne!(idempotency_value(&mut a.rng), idempotency_value(&mut b.rng));
    }
}
