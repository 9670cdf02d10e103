//! [`AiRetry`], the service.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::Entry;
use http::{HeaderValue, Method, Request, Response};
use tokio::time::Instant;
use tower_ai_core::overrides::RetryLimits;
use tower_ai_core::{check_model, BoxError, ReplayBody, RetainedRequest};
use tower_service::Service;

use crate::config::AiRetryConfig;
use crate::future::{Cold, ColdBox, ResponseFuture};
use crate::key::Key;
use crate::layer::{AiRetryLayer, Shared};

/// Sends a request again when the provider's answer says it may help, when the provider
/// says, inside a budget. See the [crate docs](crate).
pub struct AiRetry<S> {
    inner: S,
    local: Local,
    rng: fastrand::Rng,
    /// Clones made from this instance: mixed into a clone's seed, because `clone` only
    /// has `&self` and so cannot advance `rng`. Per instance, never shared.
    forks: AtomicU64,
}

/// What one instance keeps to itself: the configuration and the budget deposits it
/// has not yet added to the shared budget.
struct Local {
    /// The layer's configuration, shared by refcount (a clone allocates nothing); from
    /// this instance's second call on, its own copy (see `Local::count_call`).
    config: Arc<AiRetryConfig>,
    /// Calls made by this instance, counted up to 2.
    calls: u8,
    /// Deposits held back: `n` calls since the first of them, made in time slot `epoch`,
    /// when the budget had been asked for `asked` withdrawals.
    pending: u32,
    epoch: u64,
    asked: u64,
}

/// Deposits an instance holds back at most before adding them to the budget.
const BATCH: u32 = 16;

impl Local {
    fn new(config: Arc<AiRetryConfig>) -> Self {
        Local {
            config,
            calls: 0,
            pending: 0,
            epoch: 0,
            asked: 0,
        }
    }

    /// Counts a call; on the second, makes the configuration this instance's own.
    fn count_call(&mut self) {
        if self.calls < 2 {
            self.calls += 1;
            if self.calls == 2 {
                // An instance that serves many calls (one per task or connection) gets
                // its own copy of the configuration, once: the refcount each call's
                // future takes then stays off the cache line that every other clone of
                // the layer shares, so that tasks on other threads never contend on it.
                // An instance made for one call (the clone a layer above takes per
                // call) never copies.
                self.config = Arc::new(AiRetryConfig::clone(&self.config));
            }
        }
    }

    /// Deposits this call in the budget: at once on the instance's first call (it may be
    /// its only one), else in batches (see [`RetryBudget`](crate::RetryBudget)): the
    /// clock is read once per batch, and the shared slots are written once per batch.
    fn deposit(&mut self, now: Option<Instant>) {
        let Some(budget) = &self.config.budget else {
            return;
        };
        if self.calls < 2 {
            budget.deposit(now.unwrap_or_else(Instant::now));
            return;
        }
        let asked = budget.asked();
        if self.pending == 0 {
            self.epoch = budget.epoch(now.unwrap_or_else(Instant::now));
            self.asked = asked;
        }
        self.pending += 1;
        if self.pending >= BATCH || asked != self.asked {
            budget.add(self.epoch, self.pending);
            self.pending = 0;
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        if self.pending > 0 {
            if let Some(budget) = &self.config.budget {
                budget.add(self.epoch, self.pending);
            }
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for AiRetry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AiRetry")
            .field("inner", &self.inner)
            .field("config", &self.local.config)
            .finish()
    }
}

impl<S: Clone> Clone for AiRetry<S> {
    /// A clone shares the configuration and the budget, and draws its own random numbers
    /// (so two clones never make the same idempotency key).
    fn clone(&self) -> Self {
        AiRetry {
            inner: self.inner.clone(),
            local: Local::new(Arc::clone(&self.local.config)),
            rng: fork(&self.rng, &self.forks),
            forks: AtomicU64::new(0),
        }
    }
}

impl<S> AiRetry<S> {
    /// Wraps `inner` with the settings (and the budget) of `layer`.
    pub fn new(inner: S, layer: &AiRetryLayer) -> Self {
        AiRetry::from_shared(inner, layer.shared.clone())
    }

    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        let rng = shared.next_rng();
        AiRetry {
            inner,
            local: Local::new(Arc::clone(&shared.config)),
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
        self.local.count_call();
        let cfg = &*self.local.config;
        let span = tracing::debug_span!(
            "ai_retry",
            http.request.method = %req.method(),
            attempts = tracing::field::Empty,
        );
        // A model name longer than any real one is refused before any layer below keeps
        // it (a label, a map entry) or a provider sees it.
        if let Err(e) = check_model(&req) {
            // The ready instance is let go now (whatever it holds, a permit, with it).
            let fresh = self.inner.clone();
            drop(std::mem::replace(&mut self.inner, fresh));
            let config = self.local.config.clone();
            return ResponseFuture::refused(Box::new(e), config, span);
        }
        // A request's own attempt limit (one extensions lookup): a config of its own, made
        // only for such a request.
        let config = match RetryLimits::of(&req).and_then(|l| l.max_attempts) {
            Some(n) => {
                let mut c = cfg.clone();
                c.max_attempts = n.clamp(1, 100);
                Arc::new(c)
            }
            None => self.local.config.clone(),
        };
        let cfg = &*config;
        // The copy for a retry is taken first, without the two headers: it costs two
        // entries less to clone and to drop, and a retry puts them in (the same key,
        // the next attempt number). A map already at http's maximum size gets neither
        // (`try_*`: no panic on a caller's request).
        // A layer above (ModelFallback) that keeps a copy of this very request offers its
        // head: shared when the request still has exactly that head (a layer between
        // changed nothing of it), which spares copying the head and makes the box less
        // than half the size; else a copy of our own, as without such a layer.
        let mut cold = (cfg.max_attempts > 1).then(|| match RetainedRequest::share_offered(&req) {
            Some(kept) => ColdBox::Shared(Cold::boxed(Some(kept))),
            None => {
                let mut cold = Cold::boxed(None);
                RetainedRequest::copy_into(&req, &mut cold.retained);
                ColdBox::Own(cold)
            }
        });
        let mut key = None;
        if let Some(name) = &cfg.idempotency_header {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                // A key the caller set is kept (and is in the copy already).
                if let Ok(Entry::Vacant(v)) = req.headers_mut().try_entry(name) {
                    let k = Key::draw(&mut self.rng);
                    if v.try_insert(k.value()).is_ok() {
                        key = Some(k);
                    }
                }
            }
        }
        if let Some(name) = &cfg.attempt_header {
            let _ = req.headers_mut().try_insert(name, attempt_value(0));
        }
        // The clock is read only for what needs it: the deadline, and the budget once
        // per batch of deposits.
        let start = cfg.max_elapsed.map(|_| Instant::now());
        self.local.deposit(start);
        // The instance `poll_ready` made ready makes the call; a retry calls a clone of it
        // (made only when a retry is possible, straight into the box), which drives its
        // own readiness first.
        let fut = self.inner.call(req);
        // Drawn whether or not a retry is possible, so that a seeded layer's sequence does
        // not depend on the configuration.
        let rng = fastrand::Rng::with_seed(self.rng.u64(..));
        if let Some(cold) = &mut cold {
            cold.called(self.inner.clone(), key, start, rng);
        }
        ResponseFuture::new(fut, cold, config, span)
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
        assert!(Arc::ptr_eq(&a.local.config, &parent.local.config));
        assert!(Arc::ptr_eq(&a.local.config, &layer.shared.config));
        assert_ne!(Key::draw(&mut a.rng), Key::draw(&mut b.rng));
    }

    #[test]
    fn a_busy_instance_deposits_in_batches_and_when_dropped() {
        use std::future::Future;
        use std::task::Waker;
        use std::time::Duration;
        let layer = AiRetryLayer::builder()
            .budget(Duration::from_secs(10), 0, 1.0)
            .build()
            .unwrap();
        let budget = layer.config().budget().unwrap().clone();
        let svc = tower::service_fn(|_: Request<&'static str>| async {
            Ok::<_, BoxError>(Response::new(()))
        });
        let mut one = AiRetry::new(svc, &layer);
        let mut cx = Context::from_waker(Waker::noop());
        let mut call = |one: &mut AiRetry<_>| {
            let fut = std::pin::pin!(one.call(Request::new("{}")));
            assert!(fut.poll(&mut cx).is_ready());
        };
        let remaining = || budget.remaining(Instant::now());
        // The first call at once, then nothing until a batch is full.
        call(&mut one);
        assert_eq!(remaining(), 1);
        for _ in 0..BATCH - 1 {
            call(&mut one);
        }
        assert_eq!(remaining(), 1);
        call(&mut one);
        assert_eq!(remaining(), 1 + u64::from(BATCH));
        // A retry asked of the budget: the next call adds what is held back.
        call(&mut one);
        call(&mut one);
        assert!(budget.try_withdraw(Instant::now()));
        assert_eq!(remaining(), u64::from(BATCH));
        call(&mut one);
        assert_eq!(remaining(), u64::from(BATCH) + 3);
        // Dropping the instance adds the rest.
        call(&mut one);
        drop(one);
        assert_eq!(remaining(), u64::from(BATCH) + 4);
    }

    #[test]
    fn the_head_a_layer_above_offers_is_shared_only_while_the_request_has_it() {
        use tower_ai_core::{AiBody, AttemptBudget};
        let layer = AiRetryLayer::new(3);
        let svc =
            tower::service_fn(|_: Request<AiBody>| async { Ok::<_, BoxError>(Response::new(())) });
        let mut retry = AiRetry::new(svc, &layer);
        let offered = |change: fn(&mut Request<AiBody>)| {
            let mut req = Request::post("https://api.openai.com/v1/chat/completions")
                .header("authorization", "Bearer k")
                .body(AiBody::from(r#"{"model":"gpt-4o"}"#))
                .unwrap();
            // The slot that ModelFallback's budget makes, and its head in it.
            AttemptBudget::new(3).attach(&mut req);
            let kept = RetainedRequest::copy_shared(&req).unwrap();
            assert!(kept.head().offer(&mut req));
            change(&mut req);
            (kept, req)
        };
        let shared = |fut: &ResponseFuture<_, AiBody>| match &fut.cold {
            Some(ColdBox::Shared(c)) => Some(c.retained.as_ref().unwrap().head().clone()),
            Some(ColdBox::Own(_)) => None,
            None => panic!("no box"),
        };
        // The request as offered: the head is shared, not copied.
        let (kept, req) = offered(|_| {});
        let fut = retry.call(req);
        assert!(Arc::ptr_eq(&shared(&fut).unwrap(), kept.head()));
        // Changed below the layer that offered it: a copy of its own.
        let (_, req) = offered(|r| {
            r.headers_mut()
                .insert("authorization", HeaderValue::from_static("Bearer other"));
        });
        assert!(shared(&retry.call(req)).is_none());
        let (_, req) =
            offered(|r| *r.uri_mut() = "https://api.openai.com/v1/responses".parse().unwrap());
        assert!(shared(&retry.call(req)).is_none());
    }

    #[test]
    fn an_instance_copies_the_config_on_its_second_call_only() {
        use std::future::Future;
        use std::task::Waker;
        let layer = AiRetryLayer::new(3);
        let svc = tower::service_fn(|_: Request<&'static str>| async {
            Ok::<_, BoxError>(Response::new(()))
        });
        let mut one = AiRetry::new(svc, &layer);
        let mut cx = Context::from_waker(Waker::noop());
        for call in 1..=3 {
            let fut = std::pin::pin!(one.call(Request::new("{}")));
            assert!(fut.poll(&mut cx).is_ready());
            // Shared for the first call; its own from the second on, kept after that.
            assert_eq!(
                Arc::ptr_eq(&one.local.config, &layer.shared.config),
                call == 1
            );
        }
        let copy = Arc::clone(&one.local.config);
        let fut = std::pin::pin!(one.call(Request::new("{}")));
        assert!(fut.poll(&mut cx).is_ready());
        assert!(Arc::ptr_eq(&copy, &one.local.config));
        // The copy shares the budget: a retry taken through it shows in the layer's.
        let (mine, theirs) = (
            one.local.config.budget().unwrap(),
            layer.config().budget().unwrap(),
        );
        let now = Instant::now();
        let before = theirs.remaining(now);
        assert!(mine.try_withdraw(now));
        assert_eq!(theirs.remaining(now), before - 1);
    }
}
