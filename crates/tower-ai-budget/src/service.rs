use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower_ai_core::keys::{cap_label, Global, Key, KeyFn};
use tower_ai_core::stream::StreamDialect;
use tower_ai_core::{AiError, BoxError, BudgetLimit, Deadline, Provider, ReplayBody, RequestMeta};
use tower_service::Service;

use crate::body::BudgetBody;
use crate::budget::{
    azure_deployment, Budget, Cached, Cost, Decision, FastConfig, KeyFast, Patience, PriceBy,
};
use crate::config::WhenFull;
use crate::event::{emit, BudgetEvent, BudgetListener};
use crate::future::{retry_at, Guard, Permit, ResponseFuture, StoreWait, WaitState};
use crate::store::{StoreAdmit, StoreDecision, StoreRequest};

/// Holds each request to a token budget before it reaches the provider: see the
/// [crate docs](crate).
///
/// Made by [`TokenBudgetLayer`](crate::TokenBudgetLayer); every service of one layer shares
/// its budget.
pub struct TokenBudget<S, K = Global, L = ()> {
    inner: S,
    /// What every service of the layer shares, behind one `Arc`: a clone (a layer above
    /// may clone this service for every call) writes one shared count, not three.
    parts: Arc<Parts<K, L>>,
    /// The last key this service admitted on the fast path, and its state.
    cache: Cached,
    /// The budget's fast-path settings, at hand.
    fast: FastConfig,
}

/// The layer's budget, key function and listener.
struct Parts<K, L> {
    budget: Arc<Budget>,
    key_fn: Arc<K>,
    listener: Arc<L>,
}

impl<S, K, L> TokenBudget<S, K, L> {
    pub(crate) fn from_parts(
        inner: S,
        budget: Arc<Budget>,
        key_fn: Arc<K>,
        listener: Arc<L>,
    ) -> Self {
        TokenBudget {
            inner,
            fast: budget.fast,
            parts: Arc::new(Parts {
                budget,
                key_fn,
                listener,
            }),
            cache: None,
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

impl<S: Clone, K, L> Clone for TokenBudget<S, K, L> {
    fn clone(&self) -> Self {
        TokenBudget {
            inner: self.inner.clone(),
            parts: self.parts.clone(),
            cache: self.cache.clone(),
            fast: self.fast,
        }
    }
}

impl<S: fmt::Debug, K, L> fmt::Debug for TokenBudget<S, K, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBudget")
            .field("inner", &self.inner)
            .field("limits", &self.parts.budget.limits)
            .finish_non_exhaustive()
    }
}

impl<S, K, L, ReqB, ResB> Service<Request<ReqB>> for TokenBudget<S, K, L>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    K: KeyFn<ReqB>,
    L: BudgetListener,
    ReqB: ReplayBody,
    ResB: Body,
    ResB::Data: AsRef<[u8]>,
{
    type Response = Response<BudgetBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if !self.fast.enabled {
            return self.call_counting_tokens(req);
        }
        // No tokens or money to count: one atomic step on the key's state, without the
        // lock or the clock, while the key holds fast permits.
        let Some(key) = self.parts.key_fn.key(&req) else {
            return ResponseFuture::fast(self.inner.call(req), None);
        };
        match self.fast_admit(key) {
            Some(permit) if !self.fast.sync_from_headers => {
                #[cfg(feature = "metrics")]
                crate::meter::admitted(None);
                ResponseFuture::fast(self.inner.call(req), permit)
            }
            Some(permit) => {
                #[cfg(feature = "metrics")]
                crate::meter::admitted(None);
                ResponseFuture::called(
                    self.inner.call(req),
                    permit.map(Guard::Permit),
                    (None, Some((self.parts.budget.clone(), key))),
                )
            }
            None => self.locked(req, key, Ok(Cost::default()), None),
        }
    }
}

impl<S, K, L> TokenBudget<S, K, L> {
    /// Admits a request on the fast path if the key's state (cached per service clone)
    /// holds a permit: `Some` with its place in flight (`None` without a concurrency
    /// limit), or `None` for the locked path.
    #[inline]
    fn fast_admit(&mut self, key: Key) -> Option<Option<Permit>> {
        let in_flight_max = self.fast.in_flight_max;
        let fast = match &self.cache {
            Some((k, fast)) if *k == key => fast,
            _ => self.refresh_cache(key)?,
        };
        if !fast.try_acquire(in_flight_max) {
            return None;
        }
        Some(in_flight_max.map(|_| Permit::new(fast.clone())))
    }

    /// Points the cache at `key`'s state, if the key is held.
    #[cold]
    #[inline(never)]
    fn refresh_cache(&mut self, key: Key) -> Option<&Arc<KeyFast>> {
        self.cache = self.parts.budget.fast_of(key).map(|fast| (key, fast));
        self.cache.as_ref().map(|(_, fast)| fast)
    }

    /// A budget that counts tokens or money: the token estimate, then the locked path.
    #[inline(never)]
    fn call_counting_tokens<ReqB>(&mut self, mut req: Request<ReqB>) -> ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>> + Clone,
        K: KeyFn<ReqB>,
        L: BudgetListener,
        ReqB: ReplayBody,
    {
        let cost = if !self.parts.budget.limits.counts_tokens() {
            // Only with a store: a budget of requests and concurrency has nothing to estimate.
            Ok(Cost::default())
        } else if !self.parts.budget.limits.counts_spend() {
            match RequestMeta::stored(&req) {
                Some(meta) => self.parts.budget.cost_of(Some(meta), PriceBy::Model),
                // Parsed once and stored: the key function's `model_of`, the layers below
                // and every retry of this request read it from the extensions.
                None => self
                    .parts
                    .budget
                    .cost_of(Some(RequestMeta::get_or_insert(&mut req)), PriceBy::Model),
            }
        } else {
            if RequestMeta::stored(&req).is_none() {
                RequestMeta::get_or_insert(&mut req);
            }
            let meta = RequestMeta::stored(&req);
            // On Azure the deployment decides the model, not the caller's body.
            let by = if Provider::of(&req) == Provider::AzureOpenAi {
                PriceBy::Deployment(
                    azure_deployment(req.uri().path()).or_else(|| meta.and_then(|m| m.model())),
                )
            } else {
                PriceBy::Model
            };
            self.parts.budget.cost_of(meta, by)
        };
        let Some(key) = self.parts.key_fn.key(&req) else {
            // No key: exempt from the budget.
            return ResponseFuture::fast(self.inner.call(req), None);
        };
        // The path names the dialect of most endpoints, whoever the provider: then the
        // provider (which may read headers) is not needed.
        let path = req.uri().path();
        let dialect = match StreamDialect::of_path(path) {
            Some(d) => d,
            None => StreamDialect::of(Provider::of(&req), path),
        };
        if self.parts.budget.limits.store.is_some() {
            let dialect = self.parts.budget.limits.counts_tokens().then_some(dialect);
            return self.stored(req, key, cost, dialect);
        }
        self.locked_inline(req, key, cost, Some(dialect))
    }

    /// A budget kept in a store: the store decides (at once, or after a round trip).
    #[inline(never)]
    fn stored<ReqB>(
        &mut self,
        req: Request<ReqB>,
        key: Key,
        cost: Result<Cost, BudgetLimit>,
        dialect: Option<StreamDialect>,
    ) -> ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>> + Clone,
        K: KeyFn<ReqB>,
        L: BudgetListener,
    {
        let cost = match cost {
            Ok(c) => c,
            Err(limit) => return self.reject(&req, key, limit, None),
        };
        let Some(stored) = &self.parts.budget.limits.store else {
            return self.locked(req, key, Ok(cost), dialect);
        };
        let now = Instant::now();
        // As in-process: a waiter gives up at `max_wait`, or when it could no longer be
        // answered by its deadline (less the expected service time).
        let deadline = match self.parts.budget.limits.when_full {
            WhenFull::Wait { max_wait } => Some(
                Patience::new(
                    now,
                    max_wait,
                    Deadline::of(&req).map(Deadline::instant),
                    self.parts.budget.limits.expected_service,
                )
                .give_up,
            ),
            WhenFull::Reject => None,
        };
        let admit = {
            let key_fn = &*self.parts.key_fn;
            let r = &req;
            let name = move || cap_label(key_fn.label(r));
            let request = StoreRequest::new(key, cost.tokens, cost.spend, &name);
            stored.store.admit(&stored.limits, &request)
        };
        let next = match admit {
            StoreAdmit::Ready(StoreDecision::Admitted(lease)) => {
                #[cfg(feature = "metrics")]
                crate::meter::admitted(None);
                let guard = Guard::stored(&self.parts.budget, lease, cost.price);
                return ResponseFuture::called(self.inner.call(req), Some(guard), (dialect, None));
            }
            StoreAdmit::Ready(StoreDecision::Refused { limit, retry_after }) => {
                match retry_at(now, deadline, retry_after) {
                    None => return self.reject(&req, key, limit, retry_after),
                    Some(at) => {
                        emit(&*self.parts.listener, BudgetEvent::Waiting { key, limit });
                        Err(at)
                    }
                }
            }
            StoreAdmit::Pending(fut) => Ok(fut),
        };
        let label = cap_label(self.parts.key_fn.label(&req));
        let listener: Arc<dyn BudgetListener> = self.parts.listener.clone();
        // As in the in-process wait: sent later through a clone that gets ready only once
        // admitted.
        let svc = self.inner.clone();
        ResponseFuture::store_waiting(
            StoreWait::new(
                req,
                svc,
                self.parts.budget.clone(),
                listener,
                key,
                label,
                cost,
                now,
                deadline,
                next,
            ),
            (dialect, None),
        )
    }

    /// The locked path: reads the clock, decides, and admits, queues or refuses.
    #[inline(never)]
    fn locked<ReqB>(
        &mut self,
        req: Request<ReqB>,
        key: Key,
        cost: Result<Cost, BudgetLimit>,
        dialect: Option<StreamDialect>,
    ) -> ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>> + Clone,
        K: KeyFn<ReqB>,
        L: BudgetListener,
    {
        self.locked_inline(req, key, cost, dialect)
    }

    /// [`locked`](Self::locked), inlined into the token-counting path: the request is
    /// moved once less on the way to the inner service.
    #[inline(always)]
    fn locked_inline<ReqB>(
        &mut self,
        req: Request<ReqB>,
        key: Key,
        cost: Result<Cost, BudgetLimit>,
        dialect: Option<StreamDialect>,
    ) -> ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>> + Clone,
        K: KeyFn<ReqB>,
        L: BudgetListener,
    {
        let cost = match cost {
            Ok(c) => c,
            Err(limit) => return self.reject(&req, key, limit, None),
        };
        let limits = &*self.parts.budget.limits;
        let now = Instant::now();
        let observe = limits
            .sync_from_headers
            .then(|| (self.parts.budget.clone(), key));
        // A budget that lends leases: this thread's stripe admits while its lease of the
        // key has room, without the budget's lock (see `lease.rs`).
        let stripe = self.parts.budget.leases().then(crate::lease::stripe_index);
        if let Some(i) = stripe {
            if let Some((stripe, slot)) = self.parts.budget.lease_admit(key, &cost, now, i) {
                #[cfg(feature = "metrics")]
                crate::meter::admitted(None);
                let guard = Guard::leased(stripe, slot);
                return ResponseFuture::called(
                    self.inner.call(req),
                    Some(guard),
                    (dialect, observe),
                );
            }
        }
        // A waiter gives up at `max_wait`, or when it could no longer be answered by the
        // request's own deadline (less the expected service time) if that comes first: a
        // request predicted not to start before then is refused at once (one extensions
        // lookup, in wait mode only; a request admitted from a lease above never waits).
        let limits = &*self.parts.budget.limits;
        let patience = match limits.when_full {
            WhenFull::Wait { max_wait } => Some(Patience::new(
                now,
                max_wait,
                Deadline::of(&req).map(Deadline::instant),
                limits.expected_service,
            )),
            WhenFull::Reject => None,
        };
        let cache = self.fast.enabled.then_some(&mut self.cache);
        match self
            .parts
            .budget
            .try_admit(key, &cost, now, None, None, patience, cache, stripe)
        {
            Decision::Admitted { hold, soft } => {
                #[cfg(feature = "metrics")]
                crate::meter::admitted(None);
                if let Some(s) = soft {
                    emit(
                        &*self.parts.listener,
                        BudgetEvent::SoftLimit {
                            key,
                            limit: s.limit,
                            used: s.used,
                            max: s.max,
                        },
                    );
                }
                let guard = Guard::new(&self.parts.budget, hold);
                ResponseFuture::called(self.inner.call(req), guard, (dialect, observe))
            }
            Decision::Wait {
                key: held_under,
                ticket,
                limit,
                ..
            } => {
                emit(&*self.parts.listener, BudgetEvent::Waiting { key, limit });
                let label = cap_label(self.parts.key_fn.label(&req));
                let listener: Arc<dyn BudgetListener> = self.parts.listener.clone();
                // The wait sends later through a clone, which gets ready (`Oneshot`) only
                // once admitted: a waiting request holds no readiness of the inner service
                // (a `Buffer` or `ConcurrencyLimit` slot), and the service made ready by
                // `poll_ready` stays here for the next call.
                let svc = self.inner.clone();
                ResponseFuture::waiting(
                    WaitState::new(
                        req,
                        svc,
                        self.parts.budget.clone(),
                        listener,
                        held_under,
                        label,
                        cost,
                        ticket,
                        now,
                        patience.unwrap_or(Patience::new(
                            now,
                            Duration::ZERO,
                            None,
                            Duration::ZERO,
                        )),
                    ),
                    (dialect, observe),
                )
            }
            Decision::Reject { limit, retry_after } => self.reject(&req, key, limit, retry_after),
        }
    }

    fn reject<ReqB>(
        &self,
        req: &Request<ReqB>,
        key: Key,
        limit: BudgetLimit,
        retry_after: Option<std::time::Duration>,
    ) -> ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>>,
        K: KeyFn<ReqB>,
        L: BudgetListener,
    {
        emit(
            &*self.parts.listener,
            BudgetEvent::Rejected {
                key,
                limit,
                retry_after,
            },
        );
        ResponseFuture::rejected(AiError::BudgetExceeded {
            key: cap_label(self.parts.key_fn.label(req)),
            limit,
            retry_after,
        })
    }
}
