//! [`ResponseFuture`] of [`RetryAfterAware`](crate::RetryAfterAware).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::SystemTime;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::util::Oneshot;
use tower_ai_core::keys::{cap_label, Key, KeyFn};
use tower_ai_core::{
    AiError, AttemptBudget, BoxError, Classification, Deadline, ErrorKind, RateLimitInfo,
};
use tower_service::Service;

use crate::config::OnCooldown;
use crate::cooldown::{Admit, Lesson, WaitSlot};
use crate::layer::Shared;
use crate::service::jitter;
use crate::store::{Check, SharedCooldown, StoreFuture};

/// What the future needs to learn from its response: the hot path's whole state.
struct Learn<K> {
    shared: Arc<Shared<K>>,
    key: Option<Key>,
    seq: Option<u64>,
    sent_at: Instant,
    // The key's label in the shared state (only with a store).
    label: Option<Box<str>>,
}

impl<K> Learn<K> {
    /// Learns from a response; returns the publication of a cooldown it extended.
    #[inline]
    fn from<ResB>(&self, res: &Response<ResB>) -> Option<StoreFuture<()>> {
        let key = self.key?;
        learn(
            &self.shared,
            key,
            self.seq,
            self.sent_at,
            res,
            self.label.as_deref(),
        )
    }
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateProjReplace]
    enum State<F, W, K> {
        // Sent at once: the common case, the inner future and what to learn, inline.
        Called { #[pin] fut: F, learn: Learn<K> },
        // Everything else (a wait, a store's round trip, a later send, a publication):
        // boxed, so the future of every call stays the size of the inner one plus a few
        // words.
        Slow { slow: Pin<Box<W>> },
        Rejected { err: Option<BoxError> },
    }
}

pin_project! {
    /// The future of [`RetryAfterAware`](crate::RetryAfterAware): the inner call (learning
    /// from its response), or a wait for the key's cooldown followed by a `Oneshot` on a
    /// clone of the inner service (boxed), or a refusal (`AiError::CoolingDown`).
    pub struct ResponseFuture<S, B, K>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, Slow<S, B, K>, K>,
    }
}

pin_project! {
    #[project = StageProj]
    enum Stage<O, R> {
        Waiting { #[pin] sleep: Sleep },
        // Asking the shared state (a store's round trip) before sending.
        Checking { check: StoreFuture<SharedCooldown> },
        Sending { #[pin] fut: O },
        // Sharing the cooldown a response taught before handing the response out.
        Publishing { publish: StoreFuture<()>, held: Option<R> },
        Done,
    }
}

pin_project! {
    /// The future's slow path: everything but a call sent at once.
    #[project = SlowProj]
    struct Slow<S, B, K>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        stage: Stage<Oneshot<S, Request<B>>, S::Response>,
        req: Option<Request<B>>,
        service: Option<S>,
        // A waiting request's place among the waiters (given back when it stops waiting).
        slot: Option<WaitSlot>,
        called_at: Instant,
        rng: fastrand::Rng,
        learn: Learn<K>,
    }
}

impl<S, B, K> fmt::Debug for ResponseFuture<S, B, K>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Slow { slow } => match &slow.stage {
                Stage::Waiting { .. } => "waiting",
                Stage::Checking { .. } => "checking",
                Stage::Sending { .. } => "sending",
                Stage::Publishing { .. } => "publishing",
                Stage::Done => "done",
            },
            State::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, B, K> ResponseFuture<S, B, K>
where
    S: Service<Request<B>>,
{
    pub(crate) fn called(
        fut: S::Future,
        key: Option<Key>,
        seq: Option<u64>,
        now: Instant,
        shared: Arc<Shared<K>>,
        label: Option<Box<str>>,
    ) -> Self {
        ResponseFuture {
            state: State::Called {
                fut,
                learn: Learn {
                    shared,
                    key,
                    seq,
                    sent_at: now,
                    label,
                },
            },
        }
    }

    fn slow(
        stage: Stage<Oneshot<S, Request<B>>, S::Response>,
        req: Option<Request<B>>,
        service: Option<S>,
        slot: Option<WaitSlot>,
        rng: fastrand::Rng,
        learn: Learn<K>,
    ) -> Self {
        ResponseFuture {
            state: State::Slow {
                slow: Box::pin(Slow {
                    stage,
                    req,
                    service,
                    slot,
                    called_at: learn.sent_at,
                    rng,
                    learn,
                }),
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn waiting(
        wake: Instant,
        req: Request<B>,
        service: S,
        slot: WaitSlot,
        key: Option<Key>,
        now: Instant,
        rng: fastrand::Rng,
        shared: Arc<Shared<K>>,
        label: Option<Box<str>>,
    ) -> Self {
        let learn = Learn {
            shared,
            key,
            seq: None,
            sent_at: now,
            label,
        };
        let sleep = tokio::time::sleep_until(wake);
        let stage = Stage::Waiting { sleep };
        ResponseFuture::slow(stage, Some(req), Some(service), Some(slot), rng, learn)
    }

    pub(crate) fn rejected(err: AiError) -> Self {
        ResponseFuture {
            state: State::Rejected {
                err: Some(Box::new(err)),
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn checking(
        check: StoreFuture<SharedCooldown>,
        req: Request<B>,
        service: S,
        key: Option<Key>,
        seq: Option<u64>,
        now: Instant,
        rng: fastrand::Rng,
        shared: Arc<Shared<K>>,
        label: Option<Box<str>>,
    ) -> Self {
        let learn = Learn {
            shared,
            key,
            seq,
            sent_at: now,
            label,
        };
        let stage = Stage::Checking { check };
        ResponseFuture::slow(stage, Some(req), Some(service), None, rng, learn)
    }
}

/// Learns from `res`; returns the publication of a cooldown it extended, when the layer
/// shares its state.
fn learn<K, ResB>(
    shared: &Shared<K>,
    key: Key,
    seq: Option<u64>,
    sent_at: Instant,
    res: &Response<ResB>,
    label: Option<&str>,
) -> Option<StoreFuture<()>> {
    let (wait, info) = if res.status().is_success() {
        // Core's scan is one cheap pass with no allocation.
        (
            None,
            RateLimitInfo::from_headers_with(res.headers(), SystemTime::now),
        )
    } else {
        // The classification has read the headers already (Classify's, or one made from
        // the head here): take its wait and buckets instead of parsing them again. Any
        // status the classification calls a rate limit or an overload teaches a wait.
        let c = Classification::of(res);
        let wait = match c.kind {
            Some(ErrorKind::RateLimited | ErrorKind::Overloaded) => c.wait.map(|w| w.requested),
            _ => None,
        };
        let info = if c.is_success() {
            RateLimitInfo::from_headers_with(res.headers(), SystemTime::now)
        } else {
            c.rate_limit
        };
        (wait, info)
    };
    let info = Some(info).filter(|i| !i.is_empty());
    if wait.is_none() && info.is_none() {
        return None;
    }
    let now = Instant::now();
    let (until, extended) =
        shared
            .cooldowns
            .learn(key, seq, sent_at, now, Lesson { wait, info })?;
    tracing::debug!(
        http.response.status_code = res.status().as_u16(),
        cooldown_ms = until.saturating_duration_since(now).as_millis() as u64,
        "retry_after_aware learned a cooldown"
    );
    #[cfg(feature = "metrics")]
    {
        crate::meter::learned();
        shared.cooldowns.refresh_gauge(now);
    }
    match (extended, label, &shared.config.store) {
        (true, Some(label), Some(store)) if until > now => store.publish(label, until - now),
        _ => None,
    }
}

/// Whether a request held until `until` gives up instead of waiting on.
fn gives_up<K, B>(
    shared: &Shared<K>,
    req: Option<&Request<B>>,
    until: Instant,
    called_at: Instant,
) -> bool {
    let has_fallback = req
        .and_then(AttemptBudget::of)
        .is_some_and(AttemptBudget::has_fallback);
    has_fallback
        || match shared.config.on_cooldown {
            OnCooldown::FailFast => true,
            OnCooldown::Wait { max_wait } => until > called_at + max_wait,
        }
}

impl<S, B, K, ResB> Future for ResponseFuture<S, B, K>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    K: KeyFn<B>,
{
    type Output = Result<Response<ResB>, BoxError>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.as_mut().project().state.project() {
            StateProj::Called { fut, learn } => {
                let result = ready!(fut.poll(cx)).map_err(Into::into);
                let publish = match &result {
                    Ok(res) => learn.from(res),
                    Err(_) => None,
                };
                let Some(publish) = publish else {
                    return Poll::Ready(result);
                };
                publishing(self, publish, result, cx)
            }
            StateProj::Slow { slow } => slow.as_mut().poll(cx),
            StateProj::Rejected { err } => Poll::Ready(Err(err
                .take()
                .unwrap_or_else(|| "retry_after_aware: polled after completion".into()))),
        }
    }
}

/// A call sent at once taught a cooldown to share: the response waits in the slow path
/// until every replica holds the key.
#[cold]
#[inline(never)]
fn publishing<S, B, K, ResB>(
    mut fut: Pin<&mut ResponseFuture<S, B, K>>,
    publish: StoreFuture<()>,
    result: Result<Response<ResB>, BoxError>,
    cx: &mut Context<'_>,
) -> Poll<Result<Response<ResB>, BoxError>>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    K: KeyFn<B>,
{
    let state = fut
        .as_mut()
        .project()
        .state
        .project_replace(State::Rejected { err: None });
    let StateProjReplace::Called { learn, .. } = state else {
        return Poll::Ready(result);
    };
    let stage = Stage::Publishing {
        publish,
        held: result.ok(),
    };
    let next = ResponseFuture::slow(stage, None, None, None, fastrand::Rng::with_seed(0), learn);
    fut.as_mut().project().state.set(next.state);
    fut.poll(cx)
}

impl<S, B, K, ResB> Future for Slow<S, B, K>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    K: KeyFn<B>,
{
    type Output = Result<Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let result = match this.stage.as_mut().project() {
                StageProj::Sending { fut } => ready!(fut.poll(cx)).map_err(Into::into),
                StageProj::Publishing { publish, held } => {
                    ready!(publish.as_mut().poll(cx));
                    let held = held.take();
                    this.stage.set(Stage::Done);
                    return Poll::Ready(
                        held.ok_or_else(|| "retry_after_aware: polled after completion".into()),
                    );
                }
                StageProj::Done => {
                    return Poll::Ready(Err("retry_after_aware: polled after completion".into()))
                }
                StageProj::Checking { check } => {
                    let answer = ready!(check.as_mut().poll(cx));
                    let Some(key) = this.learn.key else {
                        return Poll::Ready(
                            Err("retry_after_aware: checking without a key".into()),
                        );
                    };
                    let shared = Arc::clone(&this.learn.shared);
                    let now = Instant::now();
                    if let SharedCooldown::Cooling(d) = answer {
                        // Held by another replica's cooldown: kept here until its end (no
                        // round trip for the next request), and waited for like our own.
                        shared.cooldowns.learn_shared(key, now, now + d);
                        if let Admit::Wait { until, spread } = shared.cooldowns.admit(key, now) {
                            let past_deadline = this
                                .req
                                .as_ref()
                                .and_then(Deadline::of)
                                .is_some_and(|dl| until >= dl.instant());
                            if this.slot.is_none() && !past_deadline {
                                *this.slot = shared.cooldowns.enter_wait(key);
                            }
                            let stop = past_deadline || this.slot.is_none();
                            let req = this.req.as_ref();
                            match wake(&shared, req, *this.called_at, this.rng, until, spread, stop)
                            {
                                Ok(at) => this.stage.set(Stage::Waiting {
                                    sleep: tokio::time::sleep_until(at),
                                }),
                                Err(e) => return Poll::Ready(Err(gave_up(&mut this, e))),
                            }
                            continue;
                        }
                    }
                    // Clear, or the store could not be asked (decided in-process): send.
                    if let Err(e) = send(&mut this, now) {
                        return Poll::Ready(Err(e));
                    }
                    continue;
                }
                StageProj::Waiting { mut sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    let Some(key) = this.learn.key else {
                        return Poll::Ready(Err("retry_after_aware: waiting without a key".into()));
                    };
                    let shared = Arc::clone(&this.learn.shared);
                    let now = Instant::now();
                    match shared.cooldowns.admit(key, now) {
                        Admit::Go { seq } => {
                            this.learn.seq = seq;
                            // With a shared state, another replica may have extended the
                            // cooldown meanwhile: look before sending.
                            let store = shared.config.store.as_deref().filter(|s| s.consult());
                            if let (Some(store), Some(label)) = (store, this.learn.label.as_deref())
                            {
                                let check = match store.check(label) {
                                    Check::Later(f) => f,
                                    Check::Now(a) => Box::pin(std::future::ready(a)),
                                };
                                this.stage.set(Stage::Checking { check });
                                continue;
                            }
                            if let Err(e) = send(&mut this, now) {
                                return Poll::Ready(Err(e));
                            }
                        }
                        Admit::Wait { until, spread } => {
                            let req = this.req.as_ref();
                            match wake(
                                &shared,
                                req,
                                *this.called_at,
                                this.rng,
                                until,
                                spread,
                                false,
                            ) {
                                Ok(at) => sleep.reset(at),
                                Err(e) => return Poll::Ready(Err(gave_up(&mut this, e))),
                            }
                        }
                    }
                    continue;
                }
            };
            if let Ok(res) = &result {
                if let Some(publish) = this.learn.from(res) {
                    // Every replica holds the key once this resolves (bounded by the
                    // store's timeout): only then does the caller get the answer.
                    this.stage.set(Stage::Publishing {
                        publish,
                        held: result.ok(),
                    });
                    continue;
                }
            }
            this.stage.set(Stage::Done);
            return Poll::Ready(result);
        }
    }
}

/// Sends the held request through the held service (readiness first, by `Oneshot`).
fn send<S, B, K>(this: &mut SlowProj<'_, S, B, K>, now: Instant) -> Result<(), BoxError>
where
    S: Service<Request<B>>,
{
    let (Some(svc), Some(req)) = (this.service.take(), this.req.take()) else {
        return Err("retry_after_aware: polled after completion".into());
    };
    this.learn.sent_at = now;
    *this.slot = None;
    this.stage.set(Stage::Sending {
        fut: Oneshot::new(svc, req),
    });
    Ok(())
}

/// Still cooling down until `until`: gives up (`stop`, or when waiting on would be too
/// long) with `AiError::CoolingDown`, or tells when to look again.
fn wake<K: KeyFn<B>, B>(
    shared: &Shared<K>,
    req: Option<&Request<B>>,
    called_at: Instant,
    rng: &mut fastrand::Rng,
    until: Instant,
    spread: bool,
    stop: bool,
) -> Result<Instant, BoxError> {
    if stop || gives_up(shared, req, until, called_at) {
        let label = req.map_or_else(
            || "unknown".to_owned(),
            |r| cap_label(shared.key_fn.label(r)),
        );
        #[cfg(feature = "metrics")]
        crate::meter::refused("gave_up_waiting");
        return Err(Box::new(AiError::CoolingDown { key: label, until }));
    }
    Ok(if spread {
        until + jitter(rng, shared.config.release_spread)
    } else {
        until
    })
}

/// The future gave up waiting with `err`: it is done and leaves its place among the
/// waiters.
fn gave_up<S, B, K>(this: &mut SlowProj<'_, S, B, K>, err: BoxError) -> BoxError
where
    S: Service<Request<B>>,
{
    this.stage.set(Stage::Done);
    *this.slot = None;
    err
}
