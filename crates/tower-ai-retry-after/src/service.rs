//! [`RetryAfterAware`], the service.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tower_ai_core::keys::{cap_label, HostModel, Key, KeyFn};
use tower_ai_core::{AiError, AttemptBudget, BoxError, Deadline};
use tower_service::Service;

use crate::config::OnCooldown;
use crate::cooldown::Admit;
use crate::future::ResponseFuture;
use crate::layer::{RetryAfterAwareLayer, Shared};
use crate::store::{Check, SharedCooldown};

/// Holds requests for a key that is cooling down; learns cooldowns from responses. See
/// the [crate docs](crate).
pub struct RetryAfterAware<S, K = HostModel> {
    inner: S,
    /// The layer's state; a clone is a refcount bump, no allocation.
    shared: Arc<Shared<K>>,
    rng: fastrand::Rng,
    /// Clones made from this instance: mixed into a clone's seed, because `clone` only
    /// has `&self` and so cannot advance `rng`. Per instance, never shared, so it is an
    /// uncontended counter.
    forks: AtomicU64,
}

impl<S: fmt::Debug, K> fmt::Debug for RetryAfterAware<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryAfterAware")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S: Clone, K> Clone for RetryAfterAware<S, K> {
    fn clone(&self) -> Self {
        RetryAfterAware {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
            rng: fork(&self.rng, &self.forks),
            forks: AtomicU64::new(0),
        }
    }
}

impl<S, K> RetryAfterAware<S, K> {
    /// Wraps `inner`, sharing `layer`'s state.
    pub fn new(inner: S, layer: &RetryAfterAwareLayer<K>) -> Self {
        RetryAfterAware::from_shared(inner, layer.shared.clone())
    }

    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<K>>) -> Self {
        let rng = shared.next_rng();
        RetryAfterAware {
            inner,
            shared,
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

impl<S, K, B, ResB> Service<Request<B>> for RetryAfterAware<S, K>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    K: KeyFn<B>,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, K>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> ResponseFuture<S, B, K> {
        let shared = &*self.shared;
        let key = shared.key_fn.key(&req);
        let now = Instant::now();
        let admit = match key {
            Some(k) => shared.cooldowns.admit(k, now),
            None => Admit::Go { seq: None },
        };
        // With a shared state, the key's label names it there (a `Key` is seeded per
        // process). Without one (the default), this is one `None` read.
        let label = match (&shared.config.store, key) {
            (Some(_), Some(_)) => Some(shared_label(shared, &req)),
            _ => None,
        };
        match admit {
            Admit::Go { seq } => {
                if let (Some(name), Some(k)) = (&label, key) {
                    if let Some(store) = shared.config.store.as_deref().filter(|s| s.consult()) {
                        match store.check(name) {
                            Check::Now(SharedCooldown::Cooling(d)) => {
                                shared.cooldowns.learn_shared(k, now, now + d);
                                return self.hold(req, key, now, label);
                            }
                            Check::Later(check) => {
                                return ResponseFuture::checking(
                                    check,
                                    req,
                                    self.inner.clone(),
                                    key,
                                    seq,
                                    now,
                                    fastrand::Rng::with_seed(self.rng.u64(..)),
                                    self.shared.clone(),
                                    label,
                                );
                            }
                            _ => {}
                        }
                    }
                }
                // Sent now, by the instance `poll_ready` made ready: no clone (a clone
                // of the layers below writes every one of their shared counts).
                ResponseFuture::called(
                    self.inner.call(req),
                    key,
                    seq,
                    now,
                    self.shared.clone(),
                    label,
                )
            }
            Admit::Wait { until, spread } => self.wait(req, key, until, spread, now, label),
        }
    }
}

/// The label a shared state knows a key by.
#[cold]
fn shared_label<K: KeyFn<B>, B>(shared: &Shared<K>, req: &Request<B>) -> Box<str> {
    cap_label(shared.key_fn.label(req)).into_boxed_str()
}

impl<S, K> RetryAfterAware<S, K> {
    /// A request for a key the shared state says is cooling (just learned): waits for it
    /// like a locally known cooldown.
    #[cold]
    fn hold<B, ResB>(
        &mut self,
        req: Request<B>,
        key: Option<Key>,
        now: Instant,
        label: Option<Box<str>>,
    ) -> ResponseFuture<S, B, K>
    where
        S: Service<Request<B>, Response = Response<ResB>> + Clone,
        K: KeyFn<B>,
    {
        let admit = match key {
            Some(k) => self.shared.cooldowns.admit(k, now),
            None => Admit::Go { seq: None },
        };
        match admit {
            Admit::Wait { until, spread } => self.wait(req, key, until, spread, now, label),
            // Ended meanwhile (a cooldown shorter than a clock tick): send.
            Admit::Go { seq } => ResponseFuture::called(
                self.inner.call(req),
                key,
                seq,
                now,
                self.shared.clone(),
                label,
            ),
        }
    }

    /// A request for a key cooling down until `until`: refused, or held in its future.
    fn wait<B, ResB>(
        &mut self,
        req: Request<B>,
        key: Option<Key>,
        until: Instant,
        spread: bool,
        now: Instant,
        label: Option<Box<str>>,
    ) -> ResponseFuture<S, B, K>
    where
        S: Service<Request<B>, Response = Response<ResB>> + Clone,
        K: KeyFn<B>,
    {
        let shared = &*self.shared;
        // With a later fallback route able to serve (ModelFallback's shared
        // attempt budget says so), waiting here would only delay the answer; and
        // a request whose deadline comes before the cooldown's end would only be
        // sent when nobody waits for its answer.
        let past_deadline = Deadline::of(&req).is_some_and(|d| until >= d.instant());
        let refuse = past_deadline
            || AttemptBudget::of(&req).is_some_and(AttemptBudget::has_fallback)
            || match shared.config.on_cooldown {
                OnCooldown::FailFast => true,
                OnCooldown::Wait { max_wait } => until > now + max_wait,
            };
        // A place among the waiters, within the per-key and total caps: a waiter
        // holds its request, so waiters are bounded.
        let slot = match (refuse, key) {
            (false, Some(k)) => shared.cooldowns.enter_wait(k),
            _ => None,
        };
        let Some(slot) = slot else {
            tracing::debug!(
                until_ms = until.saturating_duration_since(now).as_millis() as u64,
                full = !refuse,
                past_deadline,
                "retry_after_aware refused: cooling down"
            );
            #[cfg(feature = "metrics")]
            crate::meter::refused(if !refuse {
                "waiters_full"
            } else if past_deadline {
                "past_deadline"
            } else if AttemptBudget::of(&req).is_some_and(AttemptBudget::has_fallback) {
                "fallback_available"
            } else if let OnCooldown::FailFast = shared.config.on_cooldown {
                "fail_fast"
            } else {
                "wait_too_long"
            });
            return ResponseFuture::rejected(AiError::CoolingDown {
                key: cap_label(shared.key_fn.label(&req)),
                until,
            });
        };
        let wake = if spread {
            until + jitter(&mut self.rng, shared.config.release_spread)
        } else {
            until
        };
        tracing::debug!(
            wait_ms = wake.saturating_duration_since(now).as_millis() as u64,
            "retry_after_aware waiting for cooldown"
        );
        #[cfg(feature = "metrics")]
        crate::meter::waits(wake.saturating_duration_since(now));
        // The ready inner service stays here, ready for the next call: a waiting
        // request holds no permit; it gets readiness again with `Oneshot`.
        ResponseFuture::waiting(
            wake,
            req,
            self.inner.clone(),
            slot,
            key,
            now,
            fastrand::Rng::with_seed(self.rng.u64(..)),
            self.shared.clone(),
            label,
        )
    }
}

/// A clone's RNG, forked from its parent's without a shared counter: the parent's next
/// output (read from a copy, as `clone` cannot advance the parent) mixed with the
/// parent's fork count, so clones of one parent (AiRetry clones its inner service per
/// call) never share a sequence and their release jitter stays spread.
fn fork(parent: &fastrand::Rng, forks: &AtomicU64) -> fastrand::Rng {
    let n = forks.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
    let mut copy = parent.clone();
    fastrand::Rng::with_seed(copy.u64(..) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

pub(crate) fn jitter(rng: &mut fastrand::Rng, window: std::time::Duration) -> std::time::Duration {
    let n = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
    std::time::Duration::from_nanos(if n == 0 { 0 } else { rng.u64(0..=n) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_of_one_parent_get_distinct_rngs() {
        let layer = RetryAfterAwareLayer::new();
        let parent = RetryAfterAware::new((), &layer);
        let (mut a, mut b) = (parent.clone(), parent.clone());
        assert_ne!(a.rng.u64(..), b.rng.u64(..));
        // The layer's state is shared, not copied.
        assert!(Arc::ptr_eq(&a.shared, &parent.shared));
    }
}
