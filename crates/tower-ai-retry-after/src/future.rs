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
use tower_ai_core::{AiError, AttemptBudget, BoxError, Classification, ErrorKind, RateLimitInfo};
use tower_service::Service;

use crate::config::OnCooldown;
use crate::cooldown::{Admit, Lesson, WaitSlot};
use crate::layer::Shared;
use crate::service::jitter;

pin_project! {
    #[project = StateProj]
    enum State<F, O> {
        Called { #[pin] fut: F },
        Waiting { #[pin] sleep: Sleep },
        Sending { #[pin] fut: O },
        Rejected,
    }
}

pin_project! {
    /// The future of [`RetryAfterAware`](crate::RetryAfterAware): the inner call (learning
    /// from its response), or a wait for the key's cooldown followed by a `Oneshot` on a
    /// clone of the inner service, or a refusal (`AiError::CoolingDown`), unboxed.
    pub struct ResponseFuture<S, B, K>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, Oneshot<S, Request<B>>>,
        req: Option<Request<B>>,
        service: Option<S>,
        // A waiting request's place among the waiters (given back when it stops waiting).
        slot: Option<WaitSlot>,
        key: Option<Key>,
        seq: Option<u64>,
        sent_at: Instant,
        called_at: Instant,
        rng: fastrand::Rng,
        err: Option<AiError>,
        shared: Option<Arc<Shared<K>>>,
    }
}

impl<S, B, K> fmt::Debug for ResponseFuture<S, B, K>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Waiting { .. } => "waiting",
            State::Sending { .. } => "sending",
            State::Rejected => "rejected",
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
    ) -> Self {
        ResponseFuture {
            state: State::Called { fut },
            req: None,
            service: None,
            slot: None,
            key,
            seq,
            sent_at: now,
            called_at: now,
            rng: fastrand::Rng::with_seed(0),
            err: None,
            shared: Some(shared),
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
    ) -> Self {
        ResponseFuture {
            state: State::Waiting {
                sleep: tokio::time::sleep_until(wake),
            },
            req: Some(req),
            service: Some(service),
            slot: Some(slot),
            key,
            seq: None,
            sent_at: now,
            called_at: now,
            rng,
            err: None,
            shared: Some(shared),
        }
    }

    pub(crate) fn rejected(err: AiError) -> Self {
        let now = Instant::now();
        ResponseFuture {
            state: State::Rejected,
            req: None,
            service: None,
            slot: None,
            key: None,
            seq: None,
            sent_at: now,
            called_at: now,
            rng: fastrand::Rng::with_seed(0),
            err: Some(err),
            shared: None,
        }
    }
}

fn learn<K, ResB>(
    shared: &Shared<K>,
    key: Key,
    seq: Option<u64>,
    sent_at: Instant,
    res: &Response<ResB>,
) {
    let (wait, info) = if res.status().is_success() {
        // Core's scan is one cheap pass with no allocation.
        (
            None,
            RateLimitInfo::from_headers(res.headers(), SystemTime::now()),
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
            RateLimitInfo::from_headers(res.headers(), SystemTime::now())
        } else {
            c.rate_limit
        };
        (wait, info)
    };
    let info = Some(info).filter(|i| !i.is_empty());
    if wait.is_none() && info.is_none() {
        return;
    }
    let now = Instant::now();
    if let Some(until) = shared
        .cooldowns
        .learn(key, seq, sent_at, now, Lesson { wait, info })
    {
        tracing::debug!(
            http.response.status_code = res.status().as_u16(),
            cooldown_ms = until.saturating_duration_since(now).as_millis() as u64,
            "retry_after_aware learned a cooldown"
        );
    }
}

impl<S, B, K, ResB> Future for ResponseFuture<S, B, K>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    K: KeyFn<B>,
{
    type Output = Result<Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let result = match this.state.as_mut().project() {
                StateProj::Called { fut } => ready!(fut.poll(cx)).map_err(Into::into),
                StateProj::Sending { fut } => ready!(fut.poll(cx)).map_err(Into::into),
                StateProj::Rejected => {
                    let err = this.err.take().map_or_else(
                        || BoxError::from("retry_after_aware: polled after completion"),
                        |e| Box::new(e) as BoxError,
                    );
                    return Poll::Ready(Err(err));
                }
                StateProj::Waiting { mut sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    let (Some(shared), Some(key)) = (this.shared.as_ref(), *this.key) else {
                        return Poll::Ready(Err("retry_after_aware: waiting without a key".into()));
                    };
                    let now = Instant::now();
                    match shared.cooldowns.admit(key, now) {
                        Admit::Go { seq } => {
                            let (Some(svc), Some(req)) = (this.service.take(), this.req.take())
                            else {
                                return Poll::Ready(Err(
                                    "retry_after_aware: polled after completion".into(),
                                ));
                            };
                            *this.seq = seq;
                            *this.sent_at = now;
                            *this.slot = None;
                            this.state.set(State::Sending {
                                fut: Oneshot::new(svc, req),
                            });
                        }
                        Admit::Wait { until, spread } => {
                            let has_fallback = this
                                .req
                                .as_ref()
                                .and_then(AttemptBudget::of)
                                .is_some_and(AttemptBudget::has_fallback);
                            let too_long = has_fallback
                                || match shared.config.on_cooldown {
                                    OnCooldown::FailFast => true,
                                    OnCooldown::Wait { max_wait } => {
                                        until > *this.called_at + max_wait
                                    }
                                };
                            if too_long {
                                let label = this.req.as_ref().map_or_else(
                                    || "unknown".to_owned(),
                                    |r| cap_label(shared.key_fn.label(r)),
                                );
                                this.state.set(State::Rejected);
                                *this.slot = None;
                                return Poll::Ready(Err(Box::new(AiError::CoolingDown {
                                    key: label,
                                    until,
                                })));
                            }
                            let wake = if spread {
                                until + jitter(this.rng, shared.config.release_spread)
                            } else {
                                until
                            };
                            sleep.as_mut().reset(wake);
                        }
                    }
                    continue;
                }
            };
            if let (Ok(res), Some(shared), Some(key)) = (&result, this.shared.as_ref(), *this.key) {
                learn(shared, key, *this.seq, *this.sent_at, res);
            }
            return Poll::Ready(result);
        }
    }
}
