//! The response future of [`TokenBudget`](crate::TokenBudget).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::SystemTime;

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::util::Oneshot;
use tower_ai_core::keys::Key;
use tower_ai_core::stream::StreamDialect;
use tower_ai_core::{AiError, BoxError, RateLimitInfo};
use tower_service::Service;

use crate::body::{BudgetBody, Reader};
use crate::budget::{Budget, Cost, Decision, Finish, Reservation};
use crate::event::{emit, BudgetEvent, BudgetListener};

/// An admitted request's hold on the budget: finishing it (on drop) corrects its
/// reservation and releases its concurrency permit.
pub(crate) struct Guard {
    budget: Arc<Budget>,
    reservation: Reservation,
    finish: Finish,
}

impl Guard {
    pub(crate) fn new(budget: Arc<Budget>, reservation: Reservation) -> Self {
        Guard {
            budget,
            reservation,
            finish: Finish::Keep,
        }
    }

    pub(crate) fn set(&mut self, finish: Finish) {
        self.finish = finish;
    }

    pub(crate) fn max_usage_body(&self) -> usize {
        self.budget.limits.max_usage_body
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.budget.finish(&self.reservation, self.finish);
    }
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("reservation", &self.reservation)
            .field("finish", &self.finish)
            .finish()
    }
}

/// A request waiting for the budget: boxed, so the future of the common case (it fits)
/// stays small.
pub(crate) struct WaitState<S, ReqB> {
    req: Option<Request<ReqB>>,
    svc: Option<S>,
    budget: Arc<Budget>,
    listener: Arc<dyn BudgetListener>,
    key: Key,
    label: String,
    cost: Cost,
    ticket: u64,
    ticket_active: bool,
    started: Instant,
    deadline: Instant,
    sleep: Pin<Box<Sleep>>,
}

impl<S, ReqB> WaitState<S, ReqB> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        req: Request<ReqB>,
        svc: S,
        budget: Arc<Budget>,
        listener: Arc<dyn BudgetListener>,
        key: Key,
        label: String,
        cost: Cost,
        ticket: u64,
        started: Instant,
        deadline: Instant,
    ) -> Self {
        WaitState {
            req: Some(req),
            svc: Some(svc),
            budget,
            listener,
            key,
            label,
            cost,
            ticket,
            ticket_active: true,
            started,
            deadline,
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    fn reject(
        &mut self,
        limit: tower_ai_core::BudgetLimit,
        retry_after: Option<std::time::Duration>,
    ) -> BoxError {
        emit(
            &*self.listener,
            BudgetEvent::Rejected {
                key: self.key,
                limit,
                retry_after,
            },
        );
        Box::new(AiError::BudgetExceeded {
            key: std::mem::take(&mut self.label),
            limit,
            retry_after,
        })
    }

    /// Waits until the request is admitted (the guard, the service and the request to
    /// send) or refused.
    #[allow(clippy::type_complexity)]
    fn poll_admit(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(Option<Guard>, S, Request<ReqB>), BoxError>> {
        loop {
            let now = Instant::now();
            let decision = self.budget.try_admit(
                self.key,
                &self.cost,
                now,
                Some(self.ticket),
                Some(cx.waker()),
                Some(self.deadline),
            );
            match decision {
                Decision::Admitted { reservation, soft } => {
                    self.ticket_active = false;
                    if let Some(s) = soft {
                        emit(
                            &*self.listener,
                            BudgetEvent::SoftLimit {
                                key: self.key,
                                limit: s.limit,
                                used: s.used,
                                max: s.max,
                            },
                        );
                    }
                    emit(
                        &*self.listener,
                        BudgetEvent::Admitted {
                            key: self.key,
                            waited: now.saturating_duration_since(self.started),
                        },
                    );
                    let guard = reservation.map(|r| Guard::new(self.budget.clone(), r));
                    return match (self.svc.take(), self.req.take()) {
                        (Some(svc), Some(req)) => Poll::Ready(Ok((guard, svc, req))),
                        _ => Poll::Ready(Err("TokenBudget future polled after completion".into())),
                    };
                }
                Decision::Reject { limit, retry_after } => {
                    // The budget already took the ticket out of the queue.
                    self.ticket_active = false;
                    return Poll::Ready(Err(self.reject(limit, retry_after)));
                }
                Decision::Wait { limit, until, .. } => {
                    if now >= self.deadline {
                        self.ticket_active = false;
                        self.budget.cancel(self.key, self.ticket);
                        let retry_after = Some(until.map_or(std::time::Duration::ZERO, |u| {
                            u.saturating_duration_since(now)
                        }));
                        return Poll::Ready(Err(self.reject(limit, retry_after)));
                    }
                    let at = until.map_or(self.deadline, |u| u.min(self.deadline));
                    if self.sleep.deadline() != at {
                        self.sleep.as_mut().reset(at);
                    }
                    ready!(self.sleep.as_mut().poll(cx));
                }
            }
        }
    }
}

impl<S, ReqB> Drop for WaitState<S, ReqB> {
    fn drop(&mut self) {
        if self.ticket_active {
            // Dropped while waiting: give the place in the queue to the next in line.
            self.budget.cancel(self.key, self.ticket);
        }
    }
}

pin_project! {
    /// The response future of [`TokenBudget`](crate::TokenBudget): the inner call when the
    /// request fit at once; otherwise a wait for the budget (on a `tokio` timer, no lock
    /// held), then the call; or a refusal.
    pub struct ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>>,
    {
        #[pin]
        state: State<S, ReqB>,
        guard: Option<Guard>,
        dialect: Option<StreamDialect>,
        observe: Option<(Arc<Budget>, Key)>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqB>
    where
        S: Service<Request<ReqB>>,
    {
        Called { #[pin] fut: S::Future },
        Waiting { wait: Box<WaitState<S, ReqB>> },
        Sending { fut: Pin<Box<Oneshot<S, Request<ReqB>>>> },
        Rejected { err: Option<Box<AiError>> },
    }
}

impl<S, ReqB> ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    pub(crate) fn called(
        fut: S::Future,
        guard: Option<Guard>,
        dialect: Option<StreamDialect>,
        observe: Option<(Arc<Budget>, Key)>,
    ) -> Self {
        ResponseFuture {
            state: State::Called { fut },
            guard,
            dialect,
            observe,
        }
    }

    pub(crate) fn waiting(
        wait: WaitState<S, ReqB>,
        dialect: Option<StreamDialect>,
        observe: Option<(Arc<Budget>, Key)>,
    ) -> Self {
        ResponseFuture {
            state: State::Waiting {
                wait: Box::new(wait),
            },
            guard: None,
            dialect,
            observe,
        }
    }

    pub(crate) fn rejected(err: AiError) -> Self {
        ResponseFuture {
            state: State::Rejected {
                err: Some(Box::new(err)),
            },
            guard: None,
            dialect: None,
            observe: None,
        }
    }
}

impl<S, ReqB> fmt::Debug for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl<S, ReqB, ResB> Future for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body,
    ResB::Data: AsRef<[u8]>,
{
    type Output = Result<Response<BudgetBody<ResB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let res = match this.state.as_mut().project() {
                StateProj::Called { fut } => ready!(fut.poll(cx)),
                StateProj::Sending { fut } => ready!(fut.as_mut().poll(cx)),
                StateProj::Rejected { err } => {
                    return Poll::Ready(Err(match err.take() {
                        Some(e) => e,
                        None => "TokenBudget future polled after completion".into(),
                    }))
                }
                StateProj::Waiting { wait } => {
                    let (guard, svc, req) = match ready!(wait.poll_admit(cx)) {
                        Ok(admitted) => admitted,
                        Err(e) => {
                            this.state.set(State::Rejected { err: None });
                            return Poll::Ready(Err(e));
                        }
                    };
                    *this.guard = guard;
                    this.state.set(State::Sending {
                        fut: Box::pin(Oneshot::new(svc, req)),
                    });
                    continue;
                }
            };
            this.state.set(State::Rejected { err: None });
            let mut guard = this.guard.take();
            return Poll::Ready(match res {
                Ok(res) => {
                    if let Some((budget, key)) = this.observe.take() {
                        let info = RateLimitInfo::from_headers(res.headers(), SystemTime::now());
                        budget.observe(key, &info, Instant::now());
                    }
                    let mut reader = Reader::None;
                    if let Some(g) = guard.as_mut() {
                        if !res.status().is_success() {
                            // The provider refused or failed: it neither bills nor (as far
                            // as documented) counts the tokens of an error.
                            g.set(Finish::Refund);
                        } else if let Some(dialect) = *this.dialect {
                            reader =
                                Reader::for_response(res.headers(), dialect, g.max_usage_body());
                        }
                    }
                    Ok(res.map(|body| BudgetBody::new(body, guard, reader)))
                }
                Err(e) => {
                    if let Some(g) = guard.as_mut() {
                        g.set(Finish::Refund);
                    }
                    drop(guard);
                    Err(e.into())
                }
            });
        }
    }
}
