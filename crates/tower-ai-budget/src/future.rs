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
use crate::budget::{Budget, Cost, Decision, Finish, Hold, KeyFast, Reservation};
use crate::event::{emit, BudgetEvent, BudgetListener};
use tower_ai_core::Usage;

/// An admitted request's hold on the budget: ending it (on drop) gives back its place in
/// flight and settles its reservation.
pub(crate) struct Guard(Option<Held>);

enum Held {
    /// A place in flight: one atomic step to give back.
    Permit(Arc<KeyFast>),
    /// Tokens and money reserved (and maybe a place in flight): settled under the lock,
    /// refunded if `refund` (the call failed), else kept unless the usage is known.
    Reserved {
        budget: Arc<Budget>,
        reservation: Reservation,
        refund: bool,
    },
}

impl Held {
    #[inline]
    fn end(self, usage: Option<Usage>) {
        match self {
            Held::Permit(fast) => fast.release(),
            Held::Reserved {
                budget,
                reservation,
                refund,
            } => {
                let finish = match (usage, refund) {
                    (_, true) => Finish::Refund,
                    (Some(u), false) => Finish::Used(u),
                    (None, false) => Finish::Keep,
                };
                budget.finish(&reservation, finish);
            }
        }
    }
}

impl Guard {
    /// The guard of what `hold` holds, if anything.
    pub(crate) fn new(budget: &Arc<Budget>, hold: Hold) -> Option<Self> {
        match hold {
            Hold::Nothing => None,
            Hold::Permit(fast) => Some(Guard::permit(fast)),
            Hold::Reserved(reservation) => Some(Guard(Some(Held::Reserved {
                budget: budget.clone(),
                reservation,
                refund: false,
            }))),
        }
    }

    /// The guard of a place in flight taken on the fast path.
    pub(crate) fn permit(fast: Arc<KeyFast>) -> Self {
        Guard(Some(Held::Permit(fast)))
    }

    /// The call failed: give back the tokens and money when the guard ends.
    pub(crate) fn refund(&mut self) {
        if let Some(Held::Reserved { refund, .. }) = &mut self.0 {
            *refund = true;
        }
    }

    /// Whether the response's usage is worth reading (tokens or money are reserved and
    /// not refunded).
    pub(crate) fn reads_usage(&self) -> bool {
        matches!(self.0, Some(Held::Reserved { refund: false, .. }))
    }

    /// The largest JSON body copied to read its usage.
    pub(crate) fn max_usage_body(&self) -> usize {
        match &self.0 {
            Some(Held::Reserved { budget, .. }) => budget.limits.max_usage_body,
            _ => 0,
        }
    }

    /// Ends the hold with the usage the provider reported.
    pub(crate) fn finish_used(mut self, usage: Usage) {
        if let Some(held) = self.0.take() {
            held.end(Some(usage));
        }
    }
}

impl Drop for Guard {
    #[inline]
    fn drop(&mut self) {
        if let Some(held) = self.0.take() {
            held.end(None);
        }
    }
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(Held::Permit(fast)) => f.debug_tuple("Permit").field(fast).finish(),
            Some(Held::Reserved {
                reservation,
                refund,
                ..
            }) => f
                .debug_struct("Reserved")
                .field("reservation", reservation)
                .field("refund", refund)
                .finish(),
            None => f.write_str("Done"),
        }
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
                None,
            );
            match decision {
                Decision::Admitted { hold, soft } => {
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
                    let guard = Guard::new(&self.budget, hold);
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
        // Whether the output was returned (polling again is an error).
        done: bool,
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
            done: false,
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
            done: false,
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
            done: false,
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

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(Err("TokenBudget future polled after completion".into()));
        }
        let res = match this.state.as_mut().project() {
            // The common case, kept short: the request was sent at once. The inner future
            // stays (done) until this one is dropped.
            StateProj::Called { fut } => {
                let res = ready!(fut.poll(cx));
                *this.done = true;
                if this.dialect.is_none() && this.observe.is_none() {
                    // Nothing to read from the response: wrap its body with the guard.
                    let guard = this.guard.take();
                    return Poll::Ready(match res {
                        Ok(res) => Ok(res.map(|body| BudgetBody::new(body, guard, Reader::None))),
                        Err(e) => Err(e.into()),
                    });
                }
                res.map_err(Into::into)
            }
            _ => ready!(Self::poll_other(this.state.as_mut(), this.guard, cx)),
        };
        *this.done = true;
        Poll::Ready(respond(
            res,
            this.guard.take(),
            *this.dialect,
            this.observe.take(),
        ))
    }
}

impl<S, ReqB, ResB> ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    /// Every state but `Called`: the wait for the budget, the call after it, a refusal.
    #[inline(never)]
    fn poll_other(
        mut state: Pin<&mut State<S, ReqB>>,
        guard: &mut Option<Guard>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<ResB>, BoxError>> {
        loop {
            match state.as_mut().project() {
                StateProj::Called { fut } => return fut.poll(cx).map_err(Into::into),
                StateProj::Sending { fut } => return fut.as_mut().poll(cx).map_err(Into::into),
                StateProj::Rejected { err } => {
                    return Poll::Ready(Err(match err.take() {
                        Some(e) => e,
                        None => "TokenBudget future polled after completion".into(),
                    }))
                }
                StateProj::Waiting { wait } => {
                    let (g, svc, req) = match ready!(wait.poll_admit(cx)) {
                        Ok(admitted) => admitted,
                        Err(e) => return Poll::Ready(Err(e)),
                    };
                    *guard = g;
                    state.set(State::Sending {
                        fut: Box::pin(Oneshot::new(svc, req)),
                    });
                }
            }
        }
    }
}

/// The response, its body wrapped to hold the guard and read the usage; or the error,
/// with the reservation refunded.
#[inline]
fn respond<ResB>(
    res: Result<Response<ResB>, BoxError>,
    mut guard: Option<Guard>,
    dialect: Option<StreamDialect>,
    observe: Option<(Arc<Budget>, Key)>,
) -> Result<Response<BudgetBody<ResB>>, BoxError> {
    match res {
        Ok(res) => {
            if let Some((budget, key)) = observe {
                let info = RateLimitInfo::from_headers(res.headers(), SystemTime::now());
                budget.observe(key, &info, Instant::now());
            }
            let mut reader = Reader::None;
            if let Some(g) = guard.as_mut() {
                if !res.status().is_success() {
                    // The provider refused or failed: it neither bills nor (as far as
                    // documented) counts the tokens of an error.
                    g.refund();
                } else if let (Some(dialect), true) = (dialect, g.reads_usage()) {
                    reader = Reader::for_response(res.headers(), dialect);
                }
            }
            Ok(res.map(|body| BudgetBody::new(body, guard, reader)))
        }
        Err(e) => {
            if let Some(g) = guard.as_mut() {
                g.refund();
            }
            drop(guard);
            Err(e)
        }
    }
}
