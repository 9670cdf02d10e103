//! [`ResponseFuture`] of [`AiRetry`](crate::AiRetry): `Called → Waiting → Retrying`.

use std::borrow::Borrow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::util::Oneshot;
use tower_ai_core::{
    AiError, AttemptBudget, BoxError, Classification, ErrorKind, ReplayBody, RequestedWait,
    RetainedHead, RetainedRequest,
};
use tower_service::Service;

use crate::config::{AiRetryConfig, OnExhausted};
use crate::key::Key;
use crate::service::attempt_value;

/// Why AiRetry stopped retrying a failure. Put into the extensions of a final failure
/// response (with the response's [`Classification`]), so the layers above (ModelFallback)
/// can tell "no retry could help" from "gave up".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StopReason {
    /// The classification says a retry cannot help (quota, 400, 401, …).
    NotRetryable,
    /// Every allowed attempt was made.
    MaxAttempts,
    /// The next wait would have crossed the `max_elapsed` deadline.
    Deadline,
    /// The next wait (a backoff or the provider's `Retry-After`) would have ended at or
    /// after the request's [`Deadline`](tower_ai_core::Deadline): no attempt could be
    /// answered in time, so retrying ends at once with the last answer or error.
    RequestDeadline,
    /// The retry budget is empty.
    Budget,
    /// The provider asked for a wait longer than `max_wait`.
    WaitTooLong,
    /// The request body cannot be sent again.
    NotReplayable,
    /// The request's [`AttemptBudget`] (shared with ModelFallback) has no unit left for a
    /// retry on this route: what remains is reserved for later routes.
    AttemptBudget,
    /// A layer below refused (`CircuitOpen`, `CoolingDown`, `BudgetExceeded`) and a later
    /// fallback route can serve, so waiting here would only delay the answer.
    FallbackAvailable,
}

impl StopReason {
    /// A short snake_case name, for trace fields.
    pub const fn as_str(self) -> &'static str {
        match self {
            StopReason::NotRetryable => "not_retryable",
            StopReason::MaxAttempts => "max_attempts",
            StopReason::Deadline => "deadline",
            StopReason::RequestDeadline => "request_deadline",
            StopReason::Budget => "budget",
            StopReason::WaitTooLong => "wait_too_long",
            StopReason::NotReplayable => "not_replayable",
            StopReason::AttemptBudget => "attempt_budget",
            StopReason::FallbackAvailable => "fallback_available",
        }
    }
}

/// The extension AiRetry puts on a final failure response: how many attempts were made
/// and why retrying stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RetryStop {
    /// Attempts made, the first included.
    pub attempts: u32,
    /// Why no further attempt was made.
    pub reason: StopReason,
}

pin_project! {
    #[project = StateProj]
    enum State<F, O> {
        Called { #[pin] fut: F },
        // Boxed, both: only a retry pays for them, and the happy path's future stays
        // small (a `Oneshot` holds a whole request).
        Waiting { sleep: Pin<Box<Sleep>> },
        Retrying { fut: Pin<Box<O>> },
        // Refused before any call (a model name longer than any real one).
        Refused { err: Option<BoxError> },
    }
}

pin_project! {
    /// The future of [`AiRetry`](crate::AiRetry): the first attempt, then for each retry
    /// a `Sleep` and a `Oneshot` on a clone of the inner service (which drives its
    /// readiness first). What only a retry needs (the service to call again, the copy of
    /// the request, the key, the randomness) is in one box, made with the copy: the
    /// future that every layer above moves holds the first attempt's future and little
    /// else.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, Oneshot<S, Request<B>>>,
        // `None` when no retry is possible (`max_attempts` 1, or refused before a call).
        pub(crate) cold: Option<ColdBox<S, B>>,
        attempts: u32,
        config: Arc<AiRetryConfig>,
        span: tracing::Span,
    }
}

/// What only a retry reads, in one box made by `call` (the copy of the request is
/// written into it in place). `H` is where the copy's head is: in the box
/// ([`RetainedHead`]), or shared with the copy a layer above keeps (`Arc<RetainedHead>`).
pub(crate) struct Cold<S, B, H> {
    /// The instance that made the first call, cloned for each retry (set once called).
    pub(crate) service: Option<S>,
    /// The request as the caller gave it (without the two headers), kept to send again.
    pub(crate) retained: Option<RetainedRequest<B, H>>,
    /// The idempotency key this layer added to the first attempt, for the others.
    pub(crate) key: Option<Key>,
    /// When the call began; read only when there is a deadline.
    pub(crate) start: Option<Instant>,
    pub(crate) prev_backoff: Option<Duration>,
    pub(crate) rng: fastrand::Rng,
}

impl<S, B, H> Cold<S, B, H> {
    /// A box with nothing in it yet: `call` writes the copy into it, then the rest.
    pub(crate) fn boxed(retained: Option<RetainedRequest<B, H>>) -> Box<Self> {
        Box::new(Cold {
            service: None,
            retained,
            key: None,
            start: None,
            prev_backoff: None,
            rng: fastrand::Rng::with_seed(0),
        })
    }
}

/// The box of what only a retry reads: with a copy of the request of its own, or with
/// one that shares its head with the copy a layer above (ModelFallback) keeps of the same
/// request. The second is less than half the size (the head, with its headers inline, is
/// most of a copy) and nothing of the head is copied for it.
pub(crate) enum ColdBox<S, B> {
    Own(Box<Cold<S, B, RetainedHead>>),
    Shared(Box<Cold<S, B, Arc<RetainedHead>>>),
}

impl<S, B> ColdBox<S, B> {
    /// Sets what `call` learns once the first attempt is made.
    pub(crate) fn called(
        &mut self,
        service: S,
        key: Option<Key>,
        start: Option<Instant>,
        rng: fastrand::Rng,
    ) {
        fn set<S, B, H>(
            c: &mut Cold<S, B, H>,
            service: S,
            key: Option<Key>,
            start: Option<Instant>,
            rng: fastrand::Rng,
        ) {
            c.service = Some(service);
            c.key = key;
            c.start = start;
            c.rng = rng;
        }
        match self {
            ColdBox::Own(c) => set(c, service, key, start, rng),
            ColdBox::Shared(c) => set(c, service, key, start, rng),
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Waiting { .. } => "waiting",
            State::Retrying { .. } => "retrying",
            State::Refused { .. } => "refused",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn new(
        fut: S::Future,
        cold: Option<ColdBox<S, B>>,
        config: Arc<AiRetryConfig>,
        span: tracing::Span,
    ) -> Self {
        ResponseFuture {
            state: State::Called { fut },
            cold,
            attempts: 1,
            config,
            span,
        }
    }

    /// A future that fails with `err` at once, without a call.
    pub(crate) fn refused(err: BoxError, config: Arc<AiRetryConfig>, span: tracing::Span) -> Self {
        ResponseFuture {
            state: State::Refused { err: Some(err) },
            cold: None,
            attempts: 0,
            config,
            span,
        }
    }
}

/// Where a chosen wait came from.
#[derive(Clone, Copy)]
enum Source {
    Provider(RequestedWait),
    Until,
    Backoff,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Provider(w) => w.source.as_str(),
            Source::Until => "until",
            Source::Backoff => "backoff",
        }
    }
}

/// What a failure asks for: a provider's wait, a layer's "not before", or nothing.
#[derive(Clone, Copy)]
enum Asked {
    Nothing,
    Provider(RequestedWait),
    Until(Duration),
}

enum Plan {
    Retry(Duration, Source),
    Stop(StopReason),
}

struct Ctx<'a, S, B> {
    cold: Option<&'a mut ColdBox<S, B>>,
    attempts: u32,
    config: &'a AiRetryConfig,
}

impl<S, B> Ctx<'_, S, B> {
    fn plan(&mut self, asked: Asked, now: Instant) -> Plan {
        if self.attempts >= self.config.max_attempts {
            return Plan::Stop(StopReason::MaxAttempts);
        }
        match self.cold.as_deref_mut() {
            None => Plan::Stop(StopReason::NotReplayable),
            Some(ColdBox::Own(c)) => plan_with(c, self.attempts, self.config, asked, now),
            Some(ColdBox::Shared(c)) => plan_with(c, self.attempts, self.config, asked, now),
        }
    }
}

/// [`Ctx::plan`] with the retry's box.
fn plan_with<S, B, H: Borrow<RetainedHead>>(
    cold: &mut Cold<S, B, H>,
    attempts_made: u32,
    cfg: &AiRetryConfig,
    asked: Asked,
    now: Instant,
) -> Plan {
    let Some(retained) = &cold.retained else {
        return Plan::Stop(StopReason::NotReplayable);
    };
    let attempts = retained.attempt_budget();
    if matches!(asked, Asked::Until(_)) && attempts.is_some_and(AttemptBudget::has_fallback) {
        // A refusal from below with a fallback route behind us: move on, don't wait.
        return Plan::Stop(StopReason::FallbackAvailable);
    }
    let (wait, source) = match asked {
        Asked::Provider(w) => {
            // Used as given, never shortened; too long ends the retries now. Only
            // our own `max_wait` decides: Classify's maximum (its `delay` clamp)
            // is its own default, not a limit on what this layer honours.
            if w.requested > cfg.max_wait {
                return Plan::Stop(StopReason::WaitTooLong);
            }
            (w.requested, Source::Provider(w))
        }
        Asked::Until(d) => {
            if d > cfg.max_wait {
                return Plan::Stop(StopReason::WaitTooLong);
            }
            (d, Source::Until)
        }
        Asked::Nothing => {
            let d = cfg
                .backoff
                .wait(attempts_made - 1, cold.prev_backoff, &mut cold.rng);
            (d, Source::Backoff)
        }
    };
    if let (Some(max), Some(start)) = (cfg.max_elapsed, cold.start) {
        if now + wait >= start + max {
            return Plan::Stop(StopReason::Deadline);
        }
    }
    // The attempt after the wait needs time too: a wait ending at the deadline is
    // as useless as one ending after it.
    if let Some(deadline) = retained.deadline() {
        if now
            .checked_add(wait)
            .is_none_or(|end| end >= deadline.instant())
        {
            return Plan::Stop(StopReason::RequestDeadline);
        }
    }
    // Both budgets must allow the retry, and a refusal by either spends nothing of
    // the other: the attempt unit is taken first (an atomic step that can fail) and
    // handed back if the retry budget then refuses.
    let unit = match attempts {
        Some(b) if !b.try_acquire_retry() => return Plan::Stop(StopReason::AttemptBudget),
        b => b,
    };
    if let Some(budget) = &cfg.budget {
        if !budget.try_withdraw(now) {
            if let Some(b) = unit {
                b.release();
            }
            return Plan::Stop(StopReason::Budget);
        }
    }
    if let Source::Backoff = source {
        cold.prev_backoff = Some(wait);
    }
    Plan::Retry(wait, source)
}

/// What an error asks for, and whether it may be retried at all.
fn judge_error(err: &BoxError, now: Instant, config: &AiRetryConfig) -> (bool, ErrorKind, Asked) {
    if let Some(ai) = AiError::find(&**err) {
        let kind = ai.kind();
        return match ai {
            // The breaker's job is to fail fast; waiting for it to half-open is opt-in.
            AiError::CircuitOpen { .. } if !config.wait_on_open_circuit => {
                (false, kind, Asked::Nothing)
            }
            AiError::Provider { classification } => (
                classification.is_retryable(),
                kind,
                classification.wait.map_or(Asked::Nothing, Asked::Provider),
            ),
            AiError::CoolingDown { until, .. } | AiError::CircuitOpen { until, .. } => (
                kind.is_retryable(),
                kind,
                Asked::Until(until.saturating_duration_since(now)),
            ),
            AiError::BudgetExceeded {
                retry_after: Some(d),
                ..
            } => (kind.is_retryable(), kind, Asked::Until(*d)),
            _ => (kind.is_retryable(), kind, Asked::Nothing),
        };
    }
    let kind = ErrorKind::of_error(&**err);
    (kind.is_retryable(), kind, Asked::Nothing)
}

enum Step<T> {
    Done(T),
    Wait(Duration),
}

impl<S, B, ResB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayBody,
{
    type Output = Result<Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let result = match this.state.as_mut().project() {
                StateProj::Called { fut } => ready!(fut.poll(cx)).map_err(Into::into),
                StateProj::Retrying { fut } => ready!(fut.as_mut().poll(cx)).map_err(Into::into),
                StateProj::Refused { err } => {
                    return Poll::Ready(Err(err
                        .take()
                        .unwrap_or_else(|| "ai_retry: polled after completion".into())));
                }
                StateProj::Waiting { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    *this.attempts += 1;
                    let fut = match this.cold.as_mut() {
                        Some(ColdBox::Own(c)) => again(c, *this.attempts, this.config),
                        Some(ColdBox::Shared(c)) => again(c, *this.attempts, this.config),
                        // Unreachable: a retry is only planned with what it needs.
                        None => Err("ai_retry: no request to send again"),
                    };
                    match fut {
                        Ok(fut) => this.state.set(State::Retrying { fut }),
                        Err(e) => return Poll::Ready(Err(e.into())),
                    }
                    continue;
                }
            };
            // The happy path, decided where the response is: a success moves once, to
            // the caller, instead of through `decide` and a `Step`.
            if let Ok(res) = &result {
                if Classification::of(res).is_success() {
                    succeeded(res, *this.attempts, this.span);
                    this.span.record("attempts", *this.attempts);
                    return Poll::Ready(result);
                }
            }
            let mut ctx = Ctx {
                cold: this.cold.as_mut(),
                attempts: *this.attempts,
                config: this.config,
            };
            let step = decide(result, &mut ctx, this.span);
            match step {
                Step::Done(out) => {
                    this.span.record("attempts", *this.attempts);
                    return Poll::Ready(out);
                }
                Step::Wait(wait) => {
                    this.state.set(State::Waiting {
                        sleep: Box::pin(tokio::time::sleep(wait)),
                    });
                }
            }
        }
    }
}

/// A retry's call, boxed.
type Retry<S, B> = Pin<Box<Oneshot<S, Request<B>>>>;

/// The call of attempt number `attempt` (counted from 1), on a clone of the service, with
/// a copy of the request from `cold` (the retained request itself for the last attempt
/// allowed) and the two headers this layer adds.
fn again<S, B, H>(
    cold: &mut Cold<S, B, H>,
    attempt: u32,
    config: &AiRetryConfig,
) -> Result<Retry<S, B>, &'static str>
where
    S: Service<Request<B>> + Clone,
    B: ReplayBody,
    H: Borrow<RetainedHead>,
{
    // Keep a copy while another retry is possible; the last attempt takes the retained
    // request itself.
    let mut req = if attempt < config.max_attempts {
        cold.retained.as_ref().and_then(RetainedRequest::replay)
    } else {
        None
    };
    if req.is_none() {
        req = cold.retained.take().map(RetainedRequest::into_request);
    }
    // Unreachable: a retry is only planned with a retained request and a service.
    let Some(mut req) = req else {
        return Err("ai_retry: no request to send again");
    };
    let Some(service) = &cold.service else {
        return Err("ai_retry: no service to call again");
    };
    let headers = req.headers_mut();
    if let (Some(name), Some(key)) = (&config.idempotency_header, cold.key) {
        let _ = headers.try_insert(name, key.value());
    }
    if let Some(name) = &config.attempt_header {
        let _ = headers.try_insert(name, attempt_value(attempt - 1));
    }
    Ok(Box::pin(Oneshot::new(service.clone(), req)))
}

fn decide<S, B, ResB>(
    result: Result<Response<ResB>, BoxError>,
    ctx: &mut Ctx<'_, S, B>,
    span: &tracing::Span,
) -> Step<Result<Response<ResB>, BoxError>> {
    let attempt = ctx.attempts;
    match result {
        Ok(res) => {
            // The happy path: `Classification::of` borrows Classify's verdict, or makes a
            // success without reading a header or allocating.
            let c = Classification::of(&res);
            if c.is_success() {
                succeeded(&res, attempt, span);
                return Step::Done(Ok(res));
            }
            let kind = c.kind.map_or("unknown", ErrorKind::as_str);
            let status = res.status().as_u16();
            let plan = if c.is_retryable() {
                let asked = c.wait.map_or(Asked::Nothing, Asked::Provider);
                ctx.plan(asked, Instant::now())
            } else {
                Plan::Stop(StopReason::NotRetryable)
            };
            match plan {
                Plan::Retry(wait, source) => {
                    tracing::debug!(parent: span, attempt, http.response.status_code = status, error.type = kind,
                        request_id = tower_ai_core::telemetry::request_id(res.headers()),
                        wait_ms = wait.as_millis() as u64, wait.source = source.as_str(), "ai_retry retrying");
                    #[cfg(feature = "metrics")]
                    crate::meter::retry(kind, source.as_str(), wait);
                    Step::Wait(wait)
                }
                Plan::Stop(reason) => {
                    tracing::debug!(parent: span, attempt, http.response.status_code = status, error.type = kind,
                        request_id = tower_ai_core::telemetry::request_id(res.headers()),
                        stop = reason.as_str(), "ai_retry stopped");
                    #[cfg(feature = "metrics")]
                    crate::meter::ended(reason.as_str(), attempt);
                    let mut c = c.into_owned();
                    finish_response(res, &mut c, reason, ctx)
                }
            }
        }
        Err(err) => {
            let now = Instant::now();
            let (retryable, kind, asked) = judge_error(&err, now, ctx.config);
            let plan = if retryable {
                ctx.plan(asked, now)
            } else {
                Plan::Stop(StopReason::NotRetryable)
            };
            match plan {
                Plan::Retry(wait, source) => {
                    tracing::debug!(parent: span, attempt, error.type = kind.as_str(),
                        wait_ms = wait.as_millis() as u64, wait.source = source.as_str(), "ai_retry retrying after error");
                    #[cfg(feature = "metrics")]
                    crate::meter::retry(kind.as_str(), source.as_str(), wait);
                    Step::Wait(wait)
                }
                Plan::Stop(reason) => {
                    tracing::debug!(parent: span, attempt, error.type = kind.as_str(), stop = reason.as_str(), "ai_retry stopped on error");
                    #[cfg(feature = "metrics")]
                    crate::meter::ended(reason.as_str(), attempt);
                    Step::Done(Err(err))
                }
            }
        }
    }
}

/// Records a successful attempt (`res` is its answer).
fn succeeded<ResB>(res: &Response<ResB>, attempt: u32, span: &tracing::Span) {
    tracing::debug!(parent: span, attempt, http.response.status_code = res.status().as_u16(),
        request_id = tower_ai_core::telemetry::request_id(res.headers()), "ai_retry attempt succeeded");
    #[cfg(feature = "metrics")]
    crate::meter::succeeded(attempt);
}

/// The caller's answer once retries end on a failure response.
fn finish_response<S, B, ResB>(
    mut res: Response<ResB>,
    c: &mut Classification,
    reason: StopReason,
    ctx: &Ctx<'_, S, B>,
) -> Step<Result<Response<ResB>, BoxError>> {
    let mut too_long = None;
    if reason == StopReason::WaitTooLong {
        if let Some(w) = c.wait {
            // The wait as clamped to *our* maximum (core's clamp), so `exceeds_max()`
            // and `delay` speak of the limit that refused it.
            c.wait = RequestedWait::new(w.requested, w.source, ctx.config.max_wait);
            too_long = c.wait;
        }
    }
    let exhausted = matches!(
        reason,
        StopReason::MaxAttempts
            | StopReason::Deadline
            | StopReason::RequestDeadline
            | StopReason::Budget
            | StopReason::WaitTooLong
            | StopReason::AttemptBudget
    );
    if exhausted && ctx.config.on_exhausted == OnExhausted::Error {
        return Step::Done(Err(Box::new(AiError::RetriesExhausted {
            attempts: ctx.attempts,
            last: c.clone(),
            wait: too_long,
        })));
    }
    res.extensions_mut().insert(RetryStop {
        attempts: ctx.attempts,
        reason,
    });
    if reason != StopReason::NotRetryable || res.extensions().get::<Classification>().is_none() {
        res.extensions_mut().insert(c.clone());
    }
    Step::Done(Ok(res))
}
