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

use crate::body::{BodyHold, BudgetBody, Reader};
use crate::budget::{Budget, Cost, Decision, Finish, Hold, KeyFast, Patience, Reservation};
use crate::config::NanoPrice;
use crate::event::{emit, BudgetEvent, BudgetListener};
use crate::lease::Stripe;
use crate::store::{Spent, StoreAdmit, StoreDecision, StoreLease, StoreRequest};

/// A place in flight, given back (one atomic step) when dropped.
pub(crate) struct Permit(Arc<KeyFast>);

impl Permit {
    pub(crate) fn new(fast: Arc<KeyFast>) -> Self {
        Permit(fast)
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        self.0.release();
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Permit").field(&self.0).finish()
    }
}

/// Tokens and money reserved (and maybe a place in flight), settled under the lock (or
/// by the budget's store): by [`finish`](Self::finish) with the usage the response
/// reported, or when dropped (the reservation kept; refunded if the call failed).
pub(crate) struct Reserved {
    held: Held,
}

/// Where a reservation is held, with its flags: `refund` (the call failed) and `settled`
/// (by `finish` already). The flags live in the variants, beside the enum's tag, so a
/// local reservation takes no more room than before there was a store.
enum Held {
    /// In this process, under the budget's lock.
    Local {
        budget: Arc<Budget>,
        reservation: Reservation,
        refund: bool,
        settled: bool,
    },
    /// In this process, in a stripe (admitted from its lease: see `lease.rs`), in `slot`
    /// of its table. The stripe, not the budget, is what the call holds: its count is
    /// written by the thread that uses the stripe, not by every thread.
    Leased {
        stripe: Arc<Stripe>,
        slot: u32,
        refund: bool,
        settled: bool,
    },
    /// In the budget's store, priced for the settlement. Boxed: a lease is larger than a
    /// local reservation, and every response future and body would grow by the difference.
    Store {
        budget: Arc<Budget>,
        lease: Box<(Option<StoreLease>, NanoPrice)>,
        refund: bool,
        settled: bool,
    },
}

impl Held {
    fn flags(&mut self) -> (&mut bool, &mut bool) {
        match self {
            Held::Local {
                refund, settled, ..
            }
            | Held::Leased {
                refund, settled, ..
            }
            | Held::Store {
                refund, settled, ..
            } => (refund, settled),
        }
    }
}

impl Reserved {
    /// The call failed: give back the tokens and money.
    pub(crate) fn refund(&mut self) {
        *self.held.flags().0 = true;
    }

    /// Settles the reservation as `end` says (a refund stands); once: later calls and the
    /// drop do nothing.
    pub(crate) fn settle(&mut self, end: Finish) {
        let (refund, settled) = self.held.flags();
        if *settled {
            return;
        }
        let end = if *refund { Finish::Refund } else { end };
        *settled = true;
        match &mut self.held {
            Held::Local {
                budget,
                reservation,
                ..
            } => budget.finish(*reservation, end),
            Held::Leased { stripe, slot, .. } => stripe.finish(*slot, end),
            Held::Store {
                budget,
                lease: held,
                ..
            } => {
                let (lease, price) = &mut **held;
                if let (Some(lease), Some(stored)) = (lease.take(), &budget.limits.store) {
                    let spent = spent(&lease, price, end);
                    #[cfg(feature = "metrics")]
                    crate::meter::settled(lease.tokens, spent.tokens, spent.spend);
                    stored.store.settle(&stored.limits, lease, spent);
                }
            }
        }
    }

    /// The largest JSON body copied to read its usage.
    pub(crate) fn max_usage_body(&self) -> usize {
        match &self.held {
            Held::Local { budget, .. } | Held::Store { budget, .. } => budget.limits.max_usage_body,
            Held::Leased { stripe, .. } => stripe.max_usage_body,
        }
    }

    /// The largest SSE event read whole.
    pub(crate) fn max_event(&self) -> usize {
        match &self.held {
            Held::Local { budget, .. } | Held::Store { budget, .. } => budget.limits.max_event,
            Held::Leased { stripe, .. } => stripe.max_event,
        }
    }
}

/// What a request held in a store cost, as `end` says (the in-process budget's rules).
fn spent(lease: &StoreLease, price: &NanoPrice, end: Finish) -> Spent {
    match end {
        Finish::Keep => Spent::new(lease.tokens, lease.spend),
        Finish::Refund => Spent::new(0, 0),
        Finish::Used(u) => Spent::new(u.total(), price.cost(u.input_tokens, u.output_tokens)),
        Finish::AtLeast(u) => Spent::new(
            u.total().max(lease.tokens),
            price.cost(u.input_tokens, u.output_tokens).max(lease.spend),
        ),
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let (refund, settled) = self.held.flags();
        if !*settled {
            let end = if *refund {
                Finish::Refund
            } else {
                Finish::Keep
            };
            self.settle(end);
        }
    }
}

impl fmt::Debug for Reserved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (held, refund): (&dyn fmt::Debug, bool) = match &self.held {
            Held::Local {
                reservation,
                refund,
                ..
            } => (reservation, *refund),
            Held::Leased { slot, refund, .. } => (slot, *refund),
            Held::Store { lease, refund, .. } => (&lease.0, *refund),
        };
        f.debug_struct("Reserved")
            .field("held", held)
            .field("refund", &refund)
            .finish()
    }
}

/// An admitted request's hold on the budget, until its response body ends or is dropped.
#[derive(Debug)]
pub(crate) enum Guard {
    Permit(Permit),
    Reserved(Reserved),
}

impl Guard {
    /// The guard of what `hold` holds, if anything.
    pub(crate) fn new(budget: &Arc<Budget>, hold: Hold) -> Option<Self> {
        match hold {
            Hold::Nothing => None,
            Hold::Permit(fast) => Some(Guard::Permit(Permit(fast))),
            Hold::Reserved(reservation) => Some(Guard::Reserved(Reserved {
                held: Held::Local {
                    budget: budget.clone(),
                    reservation,
                    refund: false,
                    settled: false,
                },
            })),
        }
    }

    /// The guard of a request admitted from a stripe's lease, its reservation in `slot`.
    #[inline]
    pub(crate) fn leased(stripe: &Arc<Stripe>, slot: u32) -> Self {
        Guard::Reserved(Reserved {
            held: Held::Leased {
                stripe: stripe.clone(),
                slot,
                refund: false,
                settled: false,
            },
        })
    }

    /// The guard of a request admitted by the budget's store.
    pub(crate) fn stored(budget: &Arc<Budget>, lease: StoreLease, price: NanoPrice) -> Self {
        Guard::Reserved(Reserved {
            held: Held::Store {
                budget: budget.clone(),
                lease: Box::new((Some(lease), price)),
                refund: false,
                settled: false,
            },
        })
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
    patience: Patience,
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
        patience: Patience,
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
            patience,
            sleep: Box::pin(tokio::time::sleep_until(patience.give_up)),
        }
    }

    /// Waits until the request is admitted (the guard, the service and the request to
    /// send) or refused.
    fn refuse(
        &mut self,
        limit: tower_ai_core::BudgetLimit,
        retry_after: Option<std::time::Duration>,
    ) -> BoxError {
        reject(
            &*self.listener,
            self.key,
            &mut self.label,
            limit,
            retry_after,
        )
    }

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
                Some(self.patience),
                None,
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
                    return Poll::Ready(Err(self.refuse(limit, retry_after)));
                }
                Decision::Wait { limit, until, .. } => {
                    let give_up = self.patience.give_up;
                    if now >= give_up {
                        self.ticket_active = false;
                        self.budget.cancel(self.key, self.ticket);
                        let retry_after = Some(self.patience.retry_after(until, now));
                        return Poll::Ready(Err(self.refuse(limit, retry_after)));
                    }
                    let at = until.map_or(give_up, |u| u.min(give_up));
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

/// A request decided by the budget's store: waiting for its round trip, or (in wait
/// mode) for the time the store said it may fit. Boxed, like [`WaitState`].
pub(crate) struct StoreWait<S, ReqB> {
    req: Option<Request<ReqB>>,
    svc: Option<S>,
    budget: Arc<Budget>,
    listener: Arc<dyn BudgetListener>,
    key: Key,
    label: String,
    cost: Cost,
    started: Instant,
    /// When a waiting caller gives up (`None`: reject mode).
    deadline: Option<Instant>,
    pending: Option<Pin<Box<dyn Future<Output = StoreDecision> + Send>>>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Refused once and waiting (reported as a wait).
    waited: bool,
}

/// Tells `listener` of a refusal and makes its error (the label is taken: a refused
/// future is done with it). The in-process and the store waits refuse alike.
fn reject(
    listener: &dyn BudgetListener,
    key: Key,
    label: &mut String,
    limit: tower_ai_core::BudgetLimit,
    retry_after: Option<std::time::Duration>,
) -> BoxError {
    emit(
        listener,
        BudgetEvent::Rejected {
            key,
            limit,
            retry_after,
        },
    );
    Box::new(AiError::BudgetExceeded {
        key: std::mem::take(label),
        limit,
        retry_after,
    })
}

/// When a request the store refused for `retry_after` asks again, if it waits: not after
/// its deadline, at least 1 ms on, and 10 ms on when the store cannot tell (a concurrency
/// limit says zero: a place comes back when some response ends, anywhere).
pub(crate) fn retry_at(
    now: Instant,
    deadline: Option<Instant>,
    retry_after: Option<std::time::Duration>,
) -> Option<Instant> {
    let after = retry_after?;
    let after = if after.is_zero() {
        std::time::Duration::from_millis(10)
    } else {
        after.max(std::time::Duration::from_millis(1))
    };
    let at = now + after;
    (at <= deadline?).then_some(at)
}

impl<S, ReqB> StoreWait<S, ReqB> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        req: Request<ReqB>,
        svc: S,
        budget: Arc<Budget>,
        listener: Arc<dyn BudgetListener>,
        key: Key,
        label: String,
        cost: Cost,
        started: Instant,
        deadline: Option<Instant>,
        next: Result<Pin<Box<dyn Future<Output = StoreDecision> + Send>>, Instant>,
    ) -> Self {
        let (pending, sleep, waited) = match next {
            Ok(fut) => (Some(fut), None, false),
            Err(at) => (None, Some(Box::pin(tokio::time::sleep_until(at))), true),
        };
        StoreWait {
            req: Some(req),
            svc: Some(svc),
            budget,
            listener,
            key,
            label,
            cost,
            started,
            deadline,
            pending,
            sleep,
            waited,
        }
    }

    /// Waits for the store's verdict (and, refused in wait mode, asks again when it may
    /// fit): the guard, the service and the request to send, or the refusal.
    #[allow(clippy::type_complexity)]
    fn poll_admit(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(Option<Guard>, S, Request<ReqB>), BoxError>> {
        loop {
            if let Some(sleep) = self.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
                let Some(stored) = &self.budget.limits.store else {
                    return Poll::Ready(Err(after_completion()));
                };
                let label = &self.label;
                let name = || label.clone();
                let request = StoreRequest::new(self.key, self.cost.tokens, self.cost.spend, &name);
                match stored.store.admit(&stored.limits, &request) {
                    StoreAdmit::Ready(d) => {
                        if let Some(done) = self.decided(d) {
                            return Poll::Ready(done);
                        }
                    }
                    StoreAdmit::Pending(fut) => self.pending = Some(fut),
                }
                continue;
            }
            let Some(pending) = self.pending.as_mut() else {
                return Poll::Ready(Err(after_completion()));
            };
            let decision = ready!(pending.as_mut().poll(cx));
            self.pending = None;
            if let Some(done) = self.decided(decision) {
                return Poll::Ready(done);
            }
        }
    }

    /// Acts on a verdict: `Some` when the wait is over, `None` when it goes on (a sleep
    /// set until the request may fit).
    #[allow(clippy::type_complexity)]
    fn decided(
        &mut self,
        decision: StoreDecision,
    ) -> Option<Result<(Option<Guard>, S, Request<ReqB>), BoxError>> {
        match decision {
            StoreDecision::Admitted(lease) => {
                let now = Instant::now();
                if !self.waited {
                    // Only a round trip: admitted at once, as far as the caller can tell.
                    #[cfg(feature = "metrics")]
                    crate::meter::admitted(None);
                } else {
                    emit(
                        &*self.listener,
                        BudgetEvent::Admitted {
                            key: self.key,
                            waited: now.saturating_duration_since(self.started),
                        },
                    );
                }
                let guard = Guard::stored(&self.budget, lease, self.cost.price);
                Some(match (self.svc.take(), self.req.take()) {
                    (Some(svc), Some(req)) => Ok((Some(guard), svc, req)),
                    _ => Err(after_completion()),
                })
            }
            StoreDecision::Refused { limit, retry_after } => {
                match retry_at(Instant::now(), self.deadline, retry_after) {
                    Some(at) => {
                        if !self.waited {
                            self.waited = true;
                            emit(
                                &*self.listener,
                                BudgetEvent::Waiting {
                                    key: self.key,
                                    limit,
                                },
                            );
                        }
                        self.sleep = Some(Box::pin(tokio::time::sleep_until(at)));
                        None
                    }
                    None => Some(Err(reject(
                        &*self.listener,
                        self.key,
                        &mut self.label,
                        limit,
                        retry_after,
                    ))),
                }
            }
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
    }
}

/// What reads a response: its stream dialect (to read the usage; `None` when the budget
/// counts no tokens) and, when syncing from the provider's headers, the budget and key.
type Reading = (Option<StreamDialect>, Option<(Arc<Budget>, Key)>);

pin_project! {
    #[project = StateProj]
    enum State<S, ReqB>
    where
        S: Service<Request<ReqB>>,
    {
        // Sent at once, with nothing to read from the response: the common case, kept
        // small and apart (its drop and its poll stay short). `done`: the output was
        // returned.
        Fast { #[pin] fut: S::Future, permit: Option<Permit>, done: bool },
        Slow { #[pin] slow: Slow<S, ReqB> },
    }
}

pin_project! {
    #[project = SlowProj]
    enum Slow<S, ReqB>
    where
        S: Service<Request<ReqB>>,
    {
        // Sent at once, with a reservation to settle or headers to read.
        Called { #[pin] fut: S::Future, guard: Option<Guard>, reading: Reading },
        Waiting { wait: Box<WaitState<S, ReqB>>, reading: Reading },
        // Waiting for the budget's store.
        StoreWaiting { wait: Box<StoreWait<S, ReqB>>, reading: Reading },
        Sending { fut: Pin<Box<Oneshot<S, Request<ReqB>>>>, guard: Option<Guard>, reading: Reading },
        Rejected { err: Option<Box<AiError>> },
    }
}

impl<S, ReqB> ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    /// The future of a request sent at once.
    #[inline]
    pub(crate) fn called(fut: S::Future, guard: Option<Guard>, reading: Reading) -> Self {
        let state = match (guard, reading) {
            (None, (None, None)) => State::Fast {
                fut,
                permit: None,
                done: false,
            },
            (Some(Guard::Permit(p)), (None, None)) => State::Fast {
                fut,
                permit: Some(p),
                done: false,
            },
            (guard, reading) => State::Slow {
                slow: Slow::Called {
                    fut,
                    guard,
                    reading,
                },
            },
        };
        ResponseFuture { state }
    }

    /// The future of a request sent at once on the fast path.
    #[inline]
    pub(crate) fn fast(fut: S::Future, permit: Option<Permit>) -> Self {
        ResponseFuture {
            state: State::Fast {
                fut,
                permit,
                done: false,
            },
        }
    }

    pub(crate) fn waiting(wait: WaitState<S, ReqB>, reading: Reading) -> Self {
        ResponseFuture {
            state: State::Slow {
                slow: Slow::Waiting {
                    wait: Box::new(wait),
                    reading,
                },
            },
        }
    }

    pub(crate) fn store_waiting(wait: StoreWait<S, ReqB>, reading: Reading) -> Self {
        ResponseFuture {
            state: State::Slow {
                slow: Slow::StoreWaiting {
                    wait: Box::new(wait),
                    reading,
                },
            },
        }
    }

    pub(crate) fn rejected(err: AiError) -> Self {
        ResponseFuture {
            state: State::Slow {
                slow: Slow::Rejected {
                    err: Some(Box::new(err)),
                },
            },
        }
    }
}

impl<S, ReqB> fmt::Debug for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Fast { permit, .. } => format!("Fast {{ permit: {permit:?} }}"),
            State::Slow {
                slow: Slow::Called { guard, .. },
            } => format!("Called {{ guard: {guard:?} }}"),
            State::Slow {
                slow: Slow::Waiting { .. },
            } => "Waiting".to_owned(),
            State::Slow {
                slow: Slow::StoreWaiting { .. },
            } => "StoreWaiting".to_owned(),
            State::Slow {
                slow: Slow::Sending { guard, .. },
            } => format!("Sending {{ guard: {guard:?} }}"),
            State::Slow {
                slow: Slow::Rejected { .. },
            } => "Rejected".to_owned(),
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

fn after_completion() -> BoxError {
    "TokenBudget future polled after completion".into()
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
        match self.project().state.project() {
            StateProj::Fast { fut, permit, done } => {
                if *done {
                    return Poll::Ready(Err(after_completion()));
                }
                let res = ready!(fut.poll(cx));
                *done = true;
                let hold = match permit.take() {
                    Some(p) => BodyHold::Permit(p),
                    None => BodyHold::None,
                };
                // An error drops the permit with `hold`: given back.
                Poll::Ready(match res {
                    Ok(res) => Ok(res.map(|body| BudgetBody::new(body, hold))),
                    Err(e) => Err(e.into()),
                })
            }
            StateProj::Slow { slow } => poll_slow(slow, cx),
        }
    }
}

/// Every state but `Fast`: the wait for the budget, the call after it, a refusal, and a
/// call whose response is read.
#[inline(never)]
fn poll_slow<S, ReqB, ResB>(
    mut state: Pin<&mut Slow<S, ReqB>>,
    cx: &mut Context<'_>,
) -> Poll<Result<Response<BudgetBody<ResB>>, BoxError>>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body,
    ResB::Data: AsRef<[u8]>,
{
    loop {
        let (res, guard, reading) = match state.as_mut().project() {
            SlowProj::Called {
                fut,
                guard,
                reading,
            } => {
                let res = ready!(fut.poll(cx)).map_err(Into::into);
                (res, guard.take(), (reading.0, reading.1.take()))
            }
            SlowProj::Sending {
                fut,
                guard,
                reading,
            } => {
                let res = ready!(fut.as_mut().poll(cx)).map_err(Into::into);
                (res, guard.take(), (reading.0, reading.1.take()))
            }
            SlowProj::Rejected { err } => {
                return Poll::Ready(Err(match err.take() {
                    Some(e) => e,
                    None => after_completion(),
                }))
            }
            SlowProj::Waiting { wait, reading } => {
                let (guard, svc, req) = match ready!(wait.poll_admit(cx)) {
                    Ok(admitted) => admitted,
                    Err(e) => {
                        state.set(Slow::Rejected { err: None });
                        return Poll::Ready(Err(e));
                    }
                };
                let reading = (reading.0, reading.1.take());
                state.set(Slow::Sending {
                    fut: Box::pin(Oneshot::new(svc, req)),
                    guard,
                    reading,
                });
                continue;
            }
            SlowProj::StoreWaiting { wait, reading } => {
                let (guard, svc, req) = match ready!(wait.poll_admit(cx)) {
                    Ok(admitted) => admitted,
                    Err(e) => {
                        state.set(Slow::Rejected { err: None });
                        return Poll::Ready(Err(e));
                    }
                };
                let reading = (reading.0, reading.1.take());
                state.set(Slow::Sending {
                    fut: Box::pin(Oneshot::new(svc, req)),
                    guard,
                    reading,
                });
                continue;
            }
        };
        state.set(Slow::Rejected { err: None });
        return Poll::Ready(respond(res, guard, reading));
    }
}

/// The response, its body wrapped to hold the guard and read the usage; or the error,
/// with the reservation refunded.
fn respond<ResB>(
    res: Result<Response<ResB>, BoxError>,
    guard: Option<Guard>,
    (dialect, observe): Reading,
) -> Result<Response<BudgetBody<ResB>>, BoxError> {
    match res {
        Ok(res) => {
            if let Some((budget, key)) = observe {
                let info = RateLimitInfo::from_headers(res.headers(), SystemTime::now());
                budget.observe(key, &info, Instant::now());
            }
            let hold = match guard {
                None => BodyHold::None,
                Some(Guard::Permit(p)) => BodyHold::Permit(p),
                Some(Guard::Reserved(mut r)) => {
                    let reader = if !res.status().is_success() {
                        // The provider refused or failed: it neither bills nor (as far as
                        // documented) counts the tokens of an error.
                        r.refund();
                        Reader::None
                    } else if let Some(dialect) = dialect {
                        Reader::for_response(res.headers(), dialect, r.max_event())
                    } else {
                        Reader::None
                    };
                    BodyHold::Reserved { guard: r, reader }
                }
            };
            Ok(res.map(|body| BudgetBody::new(body, hold)))
        }
        Err(e) => {
            if let Some(Guard::Reserved(mut r)) = guard {
                r.refund();
            }
            Err(e)
        }
    }
}
