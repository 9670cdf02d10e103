//! The [`CircuitBreaker`] service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_ai_core::keys::{cap_label, HostModel, Key, KeyFn};
use tower_ai_core::{AiError, BoxError};
use tower_service::Service;

use crate::body::BreakerBody;
use crate::breaker::Admit;
use crate::clock;
use crate::future::{ResponseFuture, Ticket};
use crate::registry::{Lane, Registry};

/// Fails fast on a key whose provider is sick; see the [crate docs](crate).
///
/// Made by [`CircuitBreakerLayer`](crate::CircuitBreakerLayer); every service from one
/// layer shares its breakers. Errors are [`BoxError`]s: the inner service's, or an
/// [`AiError::CircuitOpen`] for a refused call.
pub struct CircuitBreaker<S, K = HostModel> {
    inner: S,
    /// The layer's registry and key function, behind one `Arc`: a clone (a layer above
    /// may clone this service for every call) writes one shared count, not two.
    parts: Arc<Parts<K>>,
    /// The lane of the last key this service called, if still good: most services call
    /// one key again and again, and then skip the per-thread cache. Clones keep it.
    last: Option<(Key, Arc<Lane>)>,
}

/// A breaker layer's registry and key function.
struct Parts<K> {
    registry: Arc<Registry>,
    key_fn: Arc<K>,
}

impl<S, K> CircuitBreaker<S, K> {
    pub(crate) fn from_parts(inner: S, registry: Arc<Registry>, key_fn: Arc<K>) -> Self {
        CircuitBreaker {
            inner,
            parts: Arc::new(Parts { registry, key_fn }),
            last: None,
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
            parts: self.parts.clone(),
            // Kept: a layer above that clones its inner service for every call (the
            // `mem::replace` pattern) calls through a clone each time. A clone that runs
            // on another thread finds the stripe differs and looks its own lane up.
            last: self.last.clone(),
        }
    }
}

impl<S: fmt::Debug, K> fmt::Debug for CircuitBreaker<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("config", &self.parts.registry.cfg)
            .finish_non_exhaustive()
    }
}

impl<S, K, ReqB, ResB> Service<Request<ReqB>> for CircuitBreaker<S, K>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    K: KeyFn<ReqB>,
{
    type Response = Response<BreakerBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // One call site of the inner service, so the request is moved once.
        match self.admit(&req) {
            Ok(ticket) => ResponseFuture::called(self.inner.call(req), ticket),
            Err(refused) => ResponseFuture::rejected(refused),
        }
    }
}

impl<S, K> CircuitBreaker<S, K> {
    /// Decides `req`'s fate: a ticket to record its outcome with (`None`: untracked), or
    /// the refusal.
    #[inline]
    fn admit<B>(&mut self, req: &Request<B>) -> Result<Option<Ticket>, BoxError>
    where
        K: KeyFn<B>,
    {
        let Some(key) = self.parts.key_fn.key(req) else {
            return Ok(None);
        };
        let lane = match &self.last {
            Some((k, lane)) if *k == key && lane.is_current() => lane.clone(),
            _ => {
                let Some(lane) = self
                    .parts
                    .registry
                    .lane(key, || cap_label(self.parts.key_fn.label(req)))
                else {
                    return Ok(None);
                };
                if let Some((_, old)) = self.last.replace((key, lane.clone())) {
                    crate::registry::let_go(old);
                }
                lane
            }
        };
        match lane.core.admit(clock::now) {
            Admit::Pass { word, probe } => Ok(Some(Ticket::new(lane, word, probe))),
            Admit::Untracked => Ok(None),
            Admit::Reject { until } => Err(refusal(&lane, until)),
        }
    }
}

/// The error of a refused call (boxed here, out of the hot path: the caller gets a
/// `BoxError` anyway, and an `AiError` inline would make every future larger).
#[cold]
#[inline(never)]
fn refusal(lane: &Lane, until: tokio::time::Instant) -> BoxError {
    Box::new(AiError::CircuitOpen {
        key: lane.core.label.to_string(),
        until,
    })
}

#[cfg(test)]
mod tests {
    use std::future::{ready, Future, Ready};
    use std::sync::atomic::Ordering;
    use std::task::Waker;

    use tower_layer::Layer;

    use super::*;
    use crate::window::{pin_thread_stripe, thread_stripe};
    use crate::CircuitBreakerLayer;

    /// Always ready, answers 200 at once.
    #[derive(Clone, Copy)]
    struct Ok200;

    impl Service<Request<&'static str>> for Ok200 {
        type Response = Response<()>;
        type Error = BoxError;
        type Future = Ready<Result<Response<()>, BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<&'static str>) -> Self::Future {
            ready(Ok(Response::new(())))
        }
    }

    fn send<K: KeyFn<&'static str>>(svc: &mut CircuitBreaker<Ok200, K>, path: &'static str) {
        let mut cx = Context::from_waker(Waker::noop());
        assert!(svc.poll_ready(&mut cx).is_ready());
        let req = Request::get(path).body("").unwrap();
        let mut fut = std::pin::pin!(svc.call(req));
        assert!(matches!(fut.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
    }

    fn by_path(r: &Request<&'static str>) -> Option<Key> {
        Some(Key::of(r.uri().path()))
    }

    #[test]
    fn the_cached_lane_of_a_forgotten_key_is_not_used_again() {
        let layer = CircuitBreakerLayer::builder()
            .key_fn(by_path)
            .build()
            .unwrap();
        let handle = layer.handle();
        let mut svc = layer.layer(Ok200);
        let key = Key::of("/a");
        send(&mut svc, "/a");
        send(&mut svc, "/a");
        assert_eq!(handle.metrics(key).unwrap().calls, 2);
        let (_, dead) = svc.last.clone().expect("the service keeps the lane of /a");

        assert!(handle.forget(key));
        assert!(dead.core.evicted.load(Ordering::Relaxed));
        send(&mut svc, "/a");
        // The call counted into the breaker the handle sees now, not into the dead one.
        assert_eq!(handle.metrics(key).unwrap().calls, 1);
        let (_, fresh) = svc.last.clone().unwrap();
        assert!(!Arc::ptr_eq(&fresh.core, &dead.core));
        assert_eq!(dead.core.metrics(tokio::time::Instant::now()).calls, 2);
    }

    #[test]
    fn the_cached_lane_of_a_key_evicted_by_the_bound_is_not_used_again() {
        // One key per shard: other keys evict /a from its shard soon enough.
        let layer = CircuitBreakerLayer::builder()
            .key_fn(by_path)
            .max_keys(16)
            .build()
            .unwrap();
        let handle = layer.handle();
        let mut svc = layer.layer(Ok200);
        send(&mut svc, "/a");
        let (_, dead) = svc.last.clone().unwrap();
        let mut other = svc.clone();
        let paths: Vec<&'static str> = (0..1000)
            .map(|i| &*Box::leak(format!("/{i}").into_boxed_str()))
            .collect();
        for p in &paths {
            send(&mut other, p);
            if dead.core.evicted.load(Ordering::Relaxed) {
                break;
            }
        }
        assert!(
            dead.core.evicted.load(Ordering::Relaxed),
            "/a was never evicted"
        );
        assert!(handle.metrics(Key::of("/a")).is_none());
        send(&mut svc, "/a");
        assert_eq!(handle.metrics(Key::of("/a")).unwrap().calls, 1);
        assert_eq!(dead.core.metrics(tokio::time::Instant::now()).calls, 1);
    }

    #[test]
    fn a_service_moved_to_another_thread_takes_that_threads_lane() {
        let stripes = crate::window::stripe_count();
        let layer = CircuitBreakerLayer::builder()
            .key_fn(by_path)
            .build()
            .unwrap();
        let mut svc = layer.layer(Ok200);
        send(&mut svc, "/a");
        let here = svc.last.clone().unwrap().1;
        assert_eq!(here.stripe, thread_stripe());
        let other_stripe = (here.stripe + 1) % stripes;
        let there = std::thread::spawn(move || {
            pin_thread_stripe(other_stripe);
            send(&mut svc, "/a");
            svc.last.clone().unwrap().1
        })
        .join()
        .unwrap();
        assert_eq!(there.stripe, other_stripe);
        assert!(Arc::ptr_eq(&here.core, &there.core), "one breaker per key");
        assert_eq!(layer.handle().metrics(Key::of("/a")).unwrap().calls, 2);
    }

    /// Clock reads per call through `svc` (after a first call that made its key).
    fn clock_reads_per_call<K: KeyFn<&'static str>>(mut svc: CircuitBreaker<Ok200, K>) -> f64 {
        send(&mut svc, "/a");
        let before = crate::clock::reads();
        for _ in 0..100 {
            send(&mut svc, "/a");
        }
        (crate::clock::reads() - before) as f64 / 100.0
    }

    #[test]
    fn a_closed_success_reads_the_clock_only_when_the_config_needs_it() {
        use std::time::Duration;
        type ByPath = fn(&Request<&'static str>) -> Option<Key>;
        let layer = |b: crate::CircuitBreakerBuilder<ByPath>| b.build().unwrap().layer(Ok200);
        let base = || CircuitBreakerLayer::builder().key_fn(by_path as ByPath);
        // The default: a count window, no slow-call detection.
        assert_eq!(clock_reads_per_call(layer(base())), 0.0);
        // A time window buckets each call by the time it ends.
        let timed = base().time_window(Duration::from_secs(60), 6);
        assert_eq!(clock_reads_per_call(layer(timed)), 1.0);
        // Slow-call detection times each call: its start and its end.
        let slow = base().slow_calls(Duration::from_secs(30), 0.5);
        assert_eq!(clock_reads_per_call(layer(slow)), 2.0);
    }

    #[test]
    fn a_clone_keeps_the_cached_lane() {
        let layer = CircuitBreakerLayer::builder()
            .key_fn(by_path)
            .build()
            .unwrap();
        let mut svc = layer.layer(Ok200);
        send(&mut svc, "/a");
        let lane = svc.last.clone().unwrap().1;
        let clone = svc.clone();
        assert!(Arc::ptr_eq(&clone.last.unwrap().1, &lane));
    }
}
