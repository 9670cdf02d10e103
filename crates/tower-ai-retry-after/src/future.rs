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

pin_project! {
    #[project = StateProj]
    enum State<F, O, R> {
        Called { #[pin] fut: F },
        Waiting { #[pin] sleep: Sleep },
        // Asking the shared state (a store's round trip) before sending.
        Checking { check: StoreFuture<SharedCooldown> },
        Sending { #[pin] fut: O },
        // Sharing the cooldown a response taught before handing the response out.
        // (The response waits in the state, not in a field of its own: most states are
        // larger than a response, so the future does not grow for it.)
        Publishing { publish: StoreFuture<()>, held: Option<R> },
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
        state: State<S::Future, Oneshot<S, Request<B>>, S::Response>,
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
        // The key's label in the shared state (only with a store).
        label: Option<Box<str>>,
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
            State::Checking { .. } => "checking",
            State::Sending { .. } => "sending",
            State::Publishing { .. } => "publishing",
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
        label: Option<Box<str>>,
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
            label,
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
            label,
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
            label: None,
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
        ResponseFuture {
            state: State::Checking { check },
            req: Some(req),
            service: Some(service),
            slot: None,
            key,
            seq,
            sent_at: now,
            called_at: now,
            rng,
            err: None,
            shared: Some(shared),
            label,
        }
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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let result = match this.state.as_mut().project() {
                StateProj::Called { fut } => ready!(fut.poll(cx)).map_err(Into::into),
                StateProj::Sending { fut } => ready!(fut.poll(cx)).map_err(Into::into),
                StateProj::Publishing { publish, held } => {
                    ready!(publish.as_mut().poll(cx));
                    let held = held.take();
                    this.state.set(State::Rejected);
                    return Poll::Ready(
                        held.ok_or_else(|| "retry_after_aware: polled after completion".into()),
                    );
                }
                StateProj::Rejected => {
                    let err = this.err.take().map_or_else(
                        || BoxError::from("retry_after_aware: polled after completion"),
                        |e| Box::new(e) as BoxError,
                    );
                    return Poll::Ready(Err(err));
                }
                StateProj::Checking { check } => {
                    let answer = ready!(check.as_mut().poll(cx));
                    let (Some(shared), Some(key)) = (this.shared.as_ref(), *this.key) else {
                        return Poll::Ready(
                            Err("retry_after_aware: checking without a key".into()),
                        );
                    };
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
                            if past_deadline
                                || this.slot.is_none()
                                || gives_up(shared, this.req.as_ref(), until, *this.called_at)
                            {
                                let label = this.req.as_ref().map_or_else(
                                    || "unknown".to_owned(),
                                    |r| cap_label(shared.key_fn.label(r)),
                                );
                                #[cfg(feature = "metrics")]
                                crate::meter::refused("gave_up_waiting");
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
                            this.state.set(State::Waiting {
                                sleep: tokio::time::sleep_until(wake),
                            });
                            continue;
                        }
                    }
                    // Clear, or the store could not be asked (decided in-process): send.
                    let (Some(svc), Some(req)) = (this.service.take(), this.req.take()) else {
                        return Poll::Ready(Err(
                            "retry_after_aware: polled after completion".into()
                        ));
                    };
                    *this.sent_at = now;
                    *this.slot = None;
                    this.state.set(State::Sending {
                        fut: Oneshot::new(svc, req),
                    });
                    continue;
                }
                StateProj::Waiting { mut sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    let (Some(shared), Some(key)) = (this.shared.as_ref(), *this.key) else {
                        return Poll::Ready(Err("retry_after_aware: waiting without a key".into()));
                    };
                    let now = Instant::now();
                    match shared.cooldowns.admit(key, now) {
                        Admit::Go { seq } => {
                            *this.seq = seq;
                            // With a shared state, another replica may have extended the
                            // cooldown meanwhile: look before sending.
                            let store = shared.config.store.as_deref().filter(|s| s.consult());
                            if let (Some(store), Some(label)) = (store, this.label.as_deref()) {
                                let check = match store.check(label) {
                                    Check::Later(f) => f,
                                    Check::Now(a) => Box::pin(std::future::ready(a)),
                                };
                                this.state.set(State::Checking { check });
                                continue;
                            }
                            let (Some(svc), Some(req)) = (this.service.take(), this.req.take())
                            else {
                                return Poll::Ready(Err(
                                    "retry_after_aware: polled after completion".into(),
                                ));
                            };
                            *this.sent_at = now;
                            *this.slot = None;
                            this.state.set(State::Sending {
                                fut: Oneshot::new(svc, req),
                            });
                        }
                        Admit::Wait { until, spread } => {
                            if gives_up(shared, this.req.as_ref(), until, *this.called_at) {
                                let label = this.req.as_ref().map_or_else(
                                    || "unknown".to_owned(),
                                    |r| cap_label(shared.key_fn.label(r)),
                                );
                                #[cfg(feature = "metrics")]
                                crate::meter::refused("gave_up_waiting");
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
                if let Some(publish) = learn(
                    shared,
                    key,
                    *this.seq,
                    *this.sent_at,
                    res,
                    this.label.as_deref(),
                ) {
                    // Every replica holds the key once this resolves (bounded by the
                    // store's timeout): only then does the caller get the answer.
                    this.state.set(State::Publishing {
                        publish,
                        held: result.ok(),
                    });
                    continue;
                }
            }
            return Poll::Ready(result);
        }
    }
}
