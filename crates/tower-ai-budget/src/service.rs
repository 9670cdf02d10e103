use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower_ai_core::keys::{Global, KeyFn};
use tower_ai_core::stream::StreamDialect;
use tower_ai_core::{AiError, BoxError, Provider, ReplayBody, RequestMeta};
use tower_service::Service;

use crate::body::BudgetBody;
use crate::budget::{Budget, Decision};
use crate::config::WhenFull;
use crate::event::{emit, BudgetEvent, BudgetListener};
use crate::future::{Guard, ResponseFuture, WaitState};

/// Holds each request to a token budget before it reaches the provider: see the
/// [crate docs](crate).
///
/// Made by [`TokenBudgetLayer`](crate::TokenBudgetLayer); every service of one layer shares
/// its budget.
pub struct TokenBudget<S, K = Global, L = ()> {
    inner: S,
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
            budget,
            key_fn,
            listener,
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
            budget: self.budget.clone(),
            key_fn: self.key_fn.clone(),
            listener: self.listener.clone(),
        }
    }
}

impl<S: fmt::Debug, K, L> fmt::Debug for TokenBudget<S, K, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBudget")
            .field("inner", &self.inner)
            .field("limits", &self.budget.limits)
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

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let limits = &*self.budget.limits;
        if limits.counts_tokens() {
            // Parsed once and stored: the key function's `model_of`, the layers below
            // and every retry of this request read it from the extensions.
            RequestMeta::get_or_insert(&mut req);
        }
        let Some(key) = self.key_fn.key(&req) else {
            // No key: exempt from the budget.
            return ResponseFuture::called(self.inner.call(req), None, None, None);
        };
        let (cost, dialect) = if limits.counts_tokens() {
            let meta = RequestMeta::of(&req); // borrowed: stored above
            let dialect = StreamDialect::of(Provider::of(&req), req.uri().path());
            (self.budget.cost_of(Some(&meta)), Some(dialect))
        } else {
            (self.budget.cost_of(None), None)
        };
        let cost = match cost {
            Ok(c) => c,
            Err(limit) => return self.reject(&req, key, limit, None),
        };
        let now = Instant::now();
        let deadline = match limits.when_full {
            WhenFull::Wait { max_wait } => Some(now + max_wait),
            WhenFull::Reject => None,
        };
        let observe = limits.sync_from_headers.then(|| (self.budget.clone(), key));
        match self.budget.try_admit(key, &cost, now, None, None, deadline) {
            Decision::Admitted { reservation, soft } => {
                if let Some(s) = soft {
                    emit(
                        &*self.listener,
                        BudgetEvent::SoftLimit {
                            key,
                            limit: s.limit,
                            used: s.used,
                            max: s.max,
                        },
                    );
                }
                let guard = reservation.map(|r| Guard::new(self.budget.clone(), r));
                ResponseFuture::called(self.inner.call(req), guard, dialect, observe)
            }
            Decision::Wait { ticket, limit, .. } => {
                emit(&*self.listener, BudgetEvent::Waiting { key, limit });
                let label = self.key_fn.label(&req);
                let listener: Arc<dyn BudgetListener> = self.listener.clone();
                // The wait sends later, through its own service: it takes the one made
                // ready by `poll_ready`, and a fresh clone (not yet ready) stays here.
                let clone = self.inner.clone();
                let svc = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::waiting(
                    WaitState::new(
                        req,
                        svc,
                        self.budget.clone(),
                        listener,
                        key,
                        label,
                        cost,
                        ticket,
                        now,
                        deadline.unwrap_or(now),
                    ),
                    dialect,
                    observe,
                )
            }
            Decision::Reject { limit, retry_after } => self.reject(&req, key, limit, retry_after),
        }
    }
}

impl<S, K, L> TokenBudget<S, K, L> {
    fn reject<ReqB>(
        &self,
        req: &Request<ReqB>,
        key: tower_ai_core::keys::Key,
        limit: tower_ai_core::BudgetLimit,
        retry_after: Option<std::time::Duration>,
    ) -> ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>>,
        K: KeyFn<ReqB>,
        L: BudgetListener,
    {
        emit(
            &*self.listener,
            BudgetEvent::Rejected {
                key,
                limit,
                retry_after,
            },
        );
        ResponseFuture::rejected(AiError::BudgetExceeded {
            key: self.key_fn.label(req),
            limit,
            retry_after,
        })
    }
}
