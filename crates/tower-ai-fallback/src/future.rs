//! The response future of [`ModelFallback`](crate::ModelFallback).

use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower_ai_core::{
    model_of, model_path_span, redacted_chain, AiError, AttemptBudget, BoxError, Classification,
    ErrorKind, Provider, ReplayBody, RetainedHead, RetainedRequest, RouteFailure,
};
use tower_service::Service;

use crate::config::{Action, Chain, RouteService, Target};
use crate::fallback::{degraded_after, judge_error, judge_response, next_route, upstream_after};
use crate::rewrite::replace_model;

type Res<ResB> = Result<Response<ResB>, BoxError>;

pin_project! {
    #[project = StateProj]
    enum State<F, O, X, R> {
        // The first call on the wrapped service, made in `call` on the service that
        // `poll_ready` made ready: no box, no extra readiness round.
        Called { #[pin] fut: F },
        // A later call on the wrapped service (another model): readiness first. Boxed,
        // like the next one: only a fallback pays for it, and the future stays as small
        // as the first route's (it is moved by every layer around it).
        Again { fut: Pin<Box<O>> },
        // A call on a cross-provider route's service.
        Other { fut: Pin<Box<X>> },
        // Decided without a call (a degraded answer, or every route skipped).
        Ready { res: Option<R> },
        Done,
    }
}

pin_project! {
    /// The response future of [`ModelFallback`](crate::ModelFallback): one route's call at
    /// a time, moving down the chain on failures that call for it.
    ///
    /// While the first route is being called it holds that route's future inline (no
    /// box); later routes on the wrapped service go through a boxed [`Oneshot`],
    /// cross-provider routes through their boxed service.
    pub struct ResponseFuture<S, ReqB, ResB>
    where
        S: Service<Request<ReqB>>,
    {
        #[pin]
        state: State<
            S::Future,
            Oneshot<S, Request<ReqB>>,
            Oneshot<RouteService<ReqB, ResB>, Request<ReqB>>,
            Res<ResB>,
        >,
        ctx: Ctx<S, ReqB, ResB>,
    }
}

impl<S, ReqB, ResB> fmt::Debug for ResponseFuture<S, ReqB, ResB>
where
    S: Service<Request<ReqB>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let route = self.ctx.chain.routes.get(self.ctx.index).map(|r| &*r.name);
        f.debug_struct("ResponseFuture")
            .field("route", &route)
            .field("failures", &self.ctx.failures.len())
            .finish_non_exhaustive()
    }
}

enum Budget {
    Unlimited,
    Local(u32),
    /// A budget this chain created (and put in the request's extensions).
    Shared(AttemptBudget),
    /// A budget a chain further out created: that chain already paid for the call that
    /// reached this one and reserved units for its own later routes.
    Adopted(Adopted),
}

struct Adopted {
    budget: AttemptBudget,
    /// The outer chains' reservation when this chain adopted the budget: this chain's
    /// reservations go on top of it, and it is put back when this chain is done.
    base: u32,
    /// Whether this chain's first call still rides on the unit the outer chain paid.
    prepaid: bool,
    /// Whether the reservation has been put back to `base`.
    restored: bool,
}

impl Adopted {
    fn restore(&mut self) {
        if !self.restored {
            self.restored = true;
            self.budget.set_reserved(self.base);
        }
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        // A future dropped before it finished (a cancelled request) still hands the
        // outer chain its reservation back.
        self.restore();
    }
}

/// Everything but the in-flight call.
struct Ctx<S, ReqB, ResB> {
    chain: Arc<Chain<ReqB, ResB>>,
    /// The wrapped service: ready and unused while `svc_ready`, else a used instance to
    /// clone for later calls. Inline, not in a box of its own: the copy's head is in an
    /// allocation of its own already (an `Arc`, to share), and a second one for the
    /// service would cost more than the bytes it keeps out of the future.
    svc: S,
    /// A copy of the caller's request, kept whole for later routes (never sent, never
    /// mutated). `None` for a single-route chain or a body that cannot be replayed: no
    /// fallback. (The caller's request itself only lives through `start`: the first
    /// route sends it.) Its head (method, URI, headers: most of a copy) is behind an
    /// `Arc`, offered with each request sent ([`RetainedHead::offer`]) so that a layer
    /// below that keeps a copy too (AiRetry) can share it instead of copying it again.
    original: Option<RetainedRequest<ReqB, Arc<RetainedHead>>>,
    svc_ready: bool,
    budget: Budget,
    /// The route being tried.
    index: usize,
    failures: Vec<RouteFailure>,
    /// The last route's result, kept only with `return_last` (boxed: rare, and large).
    last: Option<Box<Res<ResB>>>,
    /// The model the current route sent (not read on the first route's happy path).
    sent_model: Option<Arc<str>>,
}

enum Step<F, O, X, R> {
    Run(State<F, O, X, R>),
    Ready(R),
}

type StepOf<S, ReqB, ResB> = Step<
    <S as Service<Request<ReqB>>>::Future,
    Oneshot<S, Request<ReqB>>,
    Oneshot<RouteService<ReqB, ResB>, Request<ReqB>>,
    Res<ResB>,
>;

impl<S, ReqB, ResB> ResponseFuture<S, ReqB, ResB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    ReqB: ReplayBody + From<Bytes>,
{
    /// Starts on the chain's first route with `svc`, the service `poll_ready` made ready.
    pub(crate) fn start(chain: Arc<Chain<ReqB, ResB>>, svc: S, mut req: Request<ReqB>) -> Self {
        // The copy for later routes is taken before the budget goes in, so that it does
        // not clone the budget's extension on the happy path.
        let original = if chain.routes.len() > 1 {
            RetainedRequest::copy_shared(&req)
        } else {
            None
        };
        let budget = match (chain.max_attempts, AttemptBudget::of(&req)) {
            // A fallback layer further out already caps this request: draw from its budget.
            // It paid for this call and reserved units for its later routes: ours go on top.
            (_, Some(outer)) => Budget::Adopted(Adopted {
                budget: outer.clone(),
                base: outer.reserved(),
                prepaid: true,
                restored: true,
            }),
            (None, None) => Budget::Unlimited,
            (Some(max), None) if chain.share_budget => {
                let b = AttemptBudget::new(max);
                b.attach(&mut req);
                Budget::Shared(b)
            }
            (Some(max), None) => Budget::Local(max),
        };
        let mut ctx = Ctx {
            chain,
            svc,
            original,
            svc_ready: true,
            budget,
            index: 0,
            failures: Vec::new(),
            last: None,
            sent_model: None,
        };
        let state = match ctx.run_from(Some(0), Action::Next, 0, Some(req)) {
            Step::Run(state) => state,
            Step::Ready(res) => State::Ready { res: Some(res) },
        };
        ResponseFuture { state, ctx }
    }
}

impl<S, ReqB, ResB> Ctx<S, ReqB, ResB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    ReqB: ReplayBody + From<Bytes>,
{
    fn provider(&self) -> Provider {
        self.original
            .as_ref()
            .map_or(Provider::Generic, RetainedRequest::provider)
    }

    /// Tries `candidate`, then (when it is skipped or cannot be sent) the next route that
    /// `action` allows, until one is running or answered. `first` is the caller's request
    /// itself (from `start`): sent as it is by the first route that goes; later calls
    /// send copies of `original`.
    fn run_from(
        &mut self,
        mut candidate: Option<usize>,
        action: Action,
        window: u64,
        mut first: Option<Request<ReqB>>,
    ) -> StepOf<S, ReqB, ResB> {
        let chain = self.chain.clone();
        loop {
            let Some(j) = candidate else {
                return self.exhausted();
            };
            self.index = j;
            let route = &chain.routes[j];
            if let Target::Degraded(make) = &route.target {
                let replayed = self.original.as_ref().and_then(RetainedRequest::replay);
                let Some(req) = replayed.as_ref().or(first.as_ref()) else {
                    return self.exhausted();
                };
                tracing::debug!(route = &*route.name, "serving a degraded answer");
                let mut res = make(req);
                self.mark(&mut res, j);
                return Step::Ready(Ok(res));
            }
            if j > 0 && self.too_late(&chain) {
                // No call route can answer in time: only a degraded one may still serve.
                tracing::debug!(
                    route = &*route.name,
                    "route not started: the deadline is too near"
                );
                #[cfg(feature = "metrics")]
                crate::meter::fallback("deadline");
                self.failures.push(RouteFailure {
                    route: route.name.to_string(),
                    classification: Classification::failure(ErrorKind::Timeout, self.provider()),
                    message: "not started: the request's deadline leaves less than the chain's min_route_time".to_owned(),
                });
                candidate = degraded_after(&chain.routes, j);
                continue;
            }
            let mut req = match first.take() {
                Some(req) => req,
                None => match self.original.as_ref().and_then(RetainedRequest::replay) {
                    Some(req) => req,
                    None => return self.exhausted(),
                },
            };
            if let Budget::Shared(b) | Budget::Adopted(Adopted { budget: b, .. }) = &self.budget {
                if j > 0 {
                    b.attach(&mut req);
                }
            }
            if let Err(message) = prepare(route, &mut req) {
                self.failures.push(RouteFailure {
                    route: route.name.to_string(),
                    classification: Classification::failure(
                        ErrorKind::BadRequest,
                        Provider::of(&req),
                    ),
                    message,
                });
                candidate = next_route(&chain.routes, j, Action::Next, window);
                continue;
            }
            if j > 0 {
                if let Some(name) = &chain.idempotency_header {
                    per_route_key(&mut req, name, j);
                }
            }
            if route.skip.as_ref().is_some_and(|skip| skip(&req)) {
                tracing::debug!(route = &*route.name, "route skipped (circuit open)");
                #[cfg(feature = "metrics")]
                crate::meter::fallback("skipped");
                self.failures.push(RouteFailure {
                    route: route.name.to_string(),
                    classification: Classification::failure(
                        ErrorKind::Overloaded,
                        Provider::of(&req),
                    ),
                    message: "skipped: the route's skip predicate (circuit open) is true"
                        .to_owned(),
                });
                if self.original.is_none() {
                    // The only copy of a body that cannot be replayed: keep it for the
                    // next route.
                    first = Some(req);
                }
                candidate = next_route(&chain.routes, j, action, window);
                continue;
            }
            if !self.take_attempt(j) {
                tracing::debug!(route = &*route.name, "attempt budget spent");
                #[cfg(feature = "metrics")]
                crate::meter::fallback("attempt_budget");
                if self.original.is_none() {
                    first = Some(req);
                }
                candidate = degraded_after(&chain.routes, j);
                continue;
            }
            if let Some(original) = &self.original {
                original.head().offer(&mut req);
            }
            if j > 0 || self.chain.mark_primary {
                // What the route really asked for (a user rewrite may map the model).
                self.sent_model = route
                    .model
                    .clone()
                    .or_else(|| model_of(&req).map(|m| Arc::from(&*m)));
            }
            return Step::Run(match &route.target {
                Target::Inner if self.svc_ready => {
                    self.svc_ready = false;
                    State::Called {
                        fut: self.svc.call(req),
                    }
                }
                Target::Inner => State::Again {
                    fut: Box::pin(Oneshot::new(self.svc.clone(), req)),
                },
                Target::Service { svc, .. } => {
                    if self.svc_ready {
                        // Release whatever the ready instance holds (a permit) now.
                        self.svc = self.svc.clone();
                        self.svc_ready = false;
                    }
                    State::Other {
                        fut: Box::pin(Oneshot::new(svc.clone(), req)),
                    }
                }
                Target::Degraded(_) => unreachable!("handled above"),
            });
        }
    }

    /// Whether the request's deadline leaves less than the chain's `min_route_time` (read
    /// only when a later route would start).
    fn too_late(&self, chain: &Chain<ReqB, ResB>) -> bool {
        let Some(deadline) = self.original.as_ref().and_then(RetainedRequest::deadline) else {
            return false;
        };
        let left = deadline.remaining();
        left.is_zero() || left < chain.min_route_time
    }

    fn take_attempt(&mut self, j: usize) -> bool {
        match &mut self.budget {
            Budget::Unlimited => true,
            Budget::Local(left) => match left.checked_sub(1) {
                Some(l) => {
                    *left = l;
                    true
                }
                None => false,
            },
            Budget::Shared(b) => {
                b.set_reserved(upstream_after(&self.chain.routes, j));
                b.try_acquire()
            }
            Budget::Adopted(a) => {
                let later = upstream_after(&self.chain.routes, j);
                a.budget.set_reserved(a.base.saturating_add(later));
                a.restored = false;
                if std::mem::take(&mut a.prepaid) {
                    // The outer chain paid for the call that reached this chain.
                    return true;
                }
                // Another route of this chain is, to the outer chain, one more call on
                // its route: it may not take the units reserved for the outer routes.
                a.budget.try_acquire_retry()
            }
        }
    }

    /// Hands the outer chain its reservation back (an adopted budget), once this chain
    /// has its answer.
    fn finish(&mut self) {
        if let Budget::Adopted(a) = &mut self.budget {
            a.restore();
        }
    }

    /// Judges the current route's result: done, or on to another route.
    fn on_result(&mut self, result: Res<ResB>) -> StepOf<S, ReqB, ResB> {
        let chain = self.chain.clone();
        let j = self.index;
        let route = &chain.routes[j];
        let failure = match &result {
            Ok(res) => match judge_response(&chain, res) {
                None => {
                    return Step::Ready(result.map(|mut res| {
                        self.mark(&mut res, j);
                        res
                    }));
                }
                Some(f) => f,
            },
            Err(e) => judge_error(&chain, e, self.provider()),
        };
        if failure.action == Action::Stop || self.original.is_none() {
            return Step::Ready(result);
        }
        let window = route.context_window.unwrap_or(0);
        let mut next = next_route(&chain.routes, j, failure.action, window);
        if failure.classification.kind == Some(ErrorKind::QuotaExhausted) {
            // Quota and billing are per account: no route on the same one can serve.
            let mut skipped = false;
            while let Some(n) = next.filter(|&n| route.same_account(j, &chain.routes[n], n)) {
                skipped = true;
                next = next_route(&chain.routes, n, failure.action, window);
            }
            if skipped && next.is_none() {
                tracing::debug!(
                    route = &*route.name,
                    "quota exhausted and no route on another account: passed through"
                );
                return Step::Ready(result);
            }
        }
        if next.is_none() && self.failures.is_empty() {
            // No route can take this failure (no larger model, no content-policy route,
            // a one-route chain) and none was tried before: it reaches the caller as is.
            return Step::Ready(result);
        }
        tracing::debug!(
            route = &*route.name,
            gen_ai.request.model = route.model.as_deref(),
            error.type = failure.classification.kind.map_or("unknown", ErrorKind::as_str),
            next = next.map(|n| &*chain.routes[n].name),
            "route failed"
        );
        #[cfg(feature = "metrics")]
        crate::meter::fallback(
            failure
                .classification
                .kind
                .map_or("unknown", ErrorKind::as_str),
        );
        self.failures.push(RouteFailure {
            route: route.name.to_string(),
            classification: failure.classification,
            message: failure.message,
        });
        if chain.return_last {
            self.last = Some(Box::new(result));
        }
        self.run_from(next, failure.action, window, None)
    }

    fn exhausted(&mut self) -> StepOf<S, ReqB, ResB> {
        #[cfg(feature = "metrics")]
        crate::meter::exhausted();
        if let Some(last) = self.last.take() {
            return Step::Ready(*last);
        }
        let failures = std::mem::take(&mut self.failures);
        Step::Ready(Err(Box::new(AiError::AllRoutesFailed { failures })))
    }

    /// Marks a response with what served it (the first route's only on request).
    fn mark(&self, res: &mut Response<ResB>, j: usize) {
        #[cfg(feature = "metrics")]
        crate::meter::served(self.chain.served_keys.get(j));
        if j == 0 && !self.chain.mark_primary {
            return;
        }
        let route = &self.chain.routes[j];
        if let Some(mut served) = route.served.clone() {
            if !served.degraded {
                served.model = self.sent_model.clone();
            }
            res.extensions_mut().insert(served);
        }
        if let (Some(name), Some(value)) = (&self.chain.header, &route.header) {
            res.headers_mut().insert(name.clone(), value.clone());
        }
    }
}

/// Rewrites a request for `route`: its model, then its user rewrite.
fn prepare<ReqB, ResB>(
    route: &crate::config::Route<ReqB, ResB>,
    req: &mut Request<ReqB>,
) -> Result<(), String>
where
    ReqB: ReplayBody + From<Bytes>,
{
    if let (Some(quoted), Some(model)) = (&route.quoted_model, &route.model) {
        // Gemini names the model in the path and Azure OpenAI the deployment: that is
        // what is called, so the path changes; the body's `model` too, when it has one.
        let span = model_path_span(req.uri().path());
        let body = req.body().bytes().and_then(|b| replace_model(b, quoted));
        if span.is_none() && body.is_none() {
            return Err(format!(
                "route {:?}: the body has no top-level \"model\" string and the path names no model to rewrite",
                &*route.name
            ));
        }
        if let Some(span) = span {
            *req.uri_mut() = with_path_model(req.uri(), span, model)
                .map_err(|e| format!("route {:?}: {e}", &*route.name))?;
        }
        if let Some(body) = body {
            *req.body_mut() = ReqB::from(body);
        }
        // A parsed RequestMeta names the old model; the rest of it still holds, so the
        // layers below need not parse the body again.
        if let Some(meta) = tower_ai_core::RequestMeta::stored_mut(req) {
            meta.model.clone_from(&route.model);
        }
    }
    if let Target::Service {
        rewrite: Some(f), ..
    } = &route.target
    {
        // A rewrite for another provider may change anything in the body.
        tower_ai_core::RequestMeta::remove(req);
        f(req).map_err(|e| {
            format!(
                "route {:?}: rewrite failed: {}",
                &*route.name,
                redacted_chain(&*e)
            )
        })?;
    }
    Ok(())
}

/// `uri` with the model segment of its path (at `span`, see [`model_path_span`]) set to
/// `model`, percent-encoded as a path segment; the query is kept.
fn with_path_model(uri: &Uri, span: Range<usize>, model: &str) -> Result<Uri, String> {
    let path = uri.path();
    let query = uri.query();
    let mut pq =
        String::with_capacity(path.len() + 3 * model.len() + query.map_or(0, |q| q.len() + 1));
    pq.push_str(&path[..span.start]);
    for &b in model.as_bytes() {
        // RFC 3986 unreserved characters stay; everything else (`/`, `:`, `?`, `%`,
        // spaces, non-ASCII) is percent-encoded, so the model stays one segment.
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            pq.push(b as char);
        } else {
            pq.push('%');
            pq.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            pq.push(char::from(b"0123456789ABCDEF"[usize::from(b & 15)]));
        }
    }
    pq.push_str(&path[span.end..]);
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query =
        Some(PathAndQuery::try_from(pq).map_err(|e| format!("the new path is invalid: {e}"))?);
    Uri::from_parts(parts).map_err(|e| format!("the new URI is invalid: {e}"))
}

/// Makes a caller-set idempotency key route `j`'s own: `<key>-route<j>` (see
/// [`FallbackChainBuilder::idempotency_header`](crate::FallbackChainBuilder::idempotency_header)).
/// Deterministic, so every retry of the route (and every replay of the call) sends the
/// same key. A key that cannot be extended (too long for a header) is removed: no key is
/// better than one shared with another body.
fn per_route_key<B>(req: &mut Request<B>, name: &http::HeaderName, j: usize) {
    let Some(key) = req.headers().get(name) else {
        return;
    };
    let mut derived = Vec::with_capacity(key.len() + 12);
    derived.extend_from_slice(key.as_bytes());
    derived.extend_from_slice(b"-route");
    derived.extend_from_slice(j.to_string().as_bytes());
    match http::HeaderValue::from_bytes(&derived) {
        Ok(v) => {
            req.headers_mut().insert(name, v);
        }
        Err(_) => {
            req.headers_mut().remove(name);
        }
    }
}

impl<S, ReqB, ResB> Future for ResponseFuture<S, ReqB, ResB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    ReqB: ReplayBody + From<Bytes>,
{
    type Output = Result<Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let mut result = match this.state.as_mut().project() {
                StateProj::Called { fut } => ready!(fut.poll(cx)).map_err(Into::into),
                StateProj::Again { fut } => ready!(fut.as_mut().poll(cx)).map_err(Into::into),
                StateProj::Other { fut } => ready!(fut.as_mut().poll(cx)),
                StateProj::Ready { res } => {
                    this.ctx.finish();
                    let res = res.take();
                    this.state.set(State::Done);
                    return Poll::Ready(res.unwrap_or_else(|| Err(polled_after_completion())));
                }
                StateProj::Done => return Poll::Ready(Err(polled_after_completion())),
            };
            // The happy path, decided where the response is: a success moves once, to
            // the caller, instead of through `on_result` and a `Step`.
            if let Ok(res) = &mut result {
                if judge_response(&this.ctx.chain, res).is_none() {
                    this.ctx.mark(res, this.ctx.index);
                    this.ctx.finish();
                    this.state.set(State::Done);
                    return Poll::Ready(result);
                }
            }
            match this.ctx.on_result(result) {
                Step::Ready(res) => {
                    this.ctx.finish();
                    this.state.set(State::Done);
                    return Poll::Ready(res);
                }
                Step::Run(state) => this.state.set(state),
            }
        }
    }
}

#[cold]
fn polled_after_completion() -> BoxError {
    "ModelFallback's ResponseFuture polled after completion".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(uri: &str, model: &str) -> String {
        let uri: Uri = uri.parse().unwrap();
        let span = model_path_span(uri.path()).unwrap();
        with_path_model(&uri, span, model).unwrap().to_string()
    }

    #[test]
    fn the_path_model_is_replaced_as_one_segment_and_the_query_kept() {
        assert_eq!(
            rewrite(
                "https://generativelanguage.googleapis.com/v1beta/models/gemini-a:streamGenerateContent?alt=sse",
                "gemini-2.5-flash"
            ),
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        );
        assert_eq!(
            rewrite(
                "https://r.openai.azure.com/openai/deployments/a/chat/completions?api-version=2024-10-21",
                "b_2"
            ),
            "https://r.openai.azure.com/openai/deployments/b_2/chat/completions?api-version=2024-10-21"
        );
        // A name that would change the route is encoded: it stays one segment.
        assert_eq!(
            rewrite("/v1beta/models/x:generateContent", "a/b:c d?%é"),
            "/v1beta/models/a%2Fb%3Ac%20d%3F%25%C3%A9:generateContent"
        );
    }
}
