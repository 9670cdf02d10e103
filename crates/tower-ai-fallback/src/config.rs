//! The chain of routes and its builder.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;
use tower_ai_core::{BoxError, ClassifiedBody, ErrorKind};
use tower_service::Service;

use crate::fallback::Served;
use crate::rewrite::json_string;

/// The boxed service of a cross-provider route (its future is boxed; the first route's is
/// not).
pub type RouteService<ReqB, ResB> = BoxCloneSyncService<Request<ReqB>, Response<ResB>, BoxError>;

type RewriteFn<ReqB> = Arc<dyn Fn(&mut Request<ReqB>) -> Result<(), BoxError> + Send + Sync>;
type DegradedFn<ReqB, ResB> = Arc<dyn Fn(&Request<ReqB>) -> Response<ResB> + Send + Sync>;
type SkipFn<ReqB> = Arc<dyn Fn(&Request<ReqB>) -> bool + Send + Sync>;

/// What to do when a route fails with a given [`ErrorKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Action {
    /// Move on to the next route (content-policy routes excepted).
    Next,
    /// Move on to the next route whose [context window](Route::context_window) is larger
    /// than the failed route's (a route without one counts as 0).
    LargerContext,
    /// Move on to the next [content-policy](Route::content_policy) route; if there is none,
    /// return the failure as it is.
    ContentPolicy,
    /// No fallback: the failure reaches the caller as it is.
    Stop,
}

/// The default action for a kind: the retryable kinds, quota exhaustion, a model that
/// does not exist here and a request over this model's limits move on; a context window
/// too small moves to a larger one; a content filter to a content-policy route; every
/// other client error (400, 401, 403, 422) and an unknown failure stop.
pub const fn default_action(kind: ErrorKind) -> Action {
    match kind {
        ErrorKind::ContextLengthExceeded => Action::LargerContext,
        ErrorKind::ContentFiltered => Action::ContentPolicy,
        ErrorKind::Overloaded
        | ErrorKind::ServerError
        | ErrorKind::Timeout
        | ErrorKind::Connection
        | ErrorKind::Stalled
        | ErrorKind::QuotaExhausted
        | ErrorKind::RateLimited
        | ErrorKind::NotFound
        | ErrorKind::RequestTooLarge => Action::Next,
        _ => Action::Stop,
    }
}

/// A response body that a degraded answer can be made of.
pub trait DegradedBody: Sized {
    /// A body holding `bytes`.
    fn from_bytes(bytes: Bytes) -> Self;
}

impl<B> DegradedBody for ClassifiedBody<B> {
    fn from_bytes(bytes: Bytes) -> Self {
        ClassifiedBody::full(bytes)
    }
}
impl DegradedBody for Bytes {
    fn from_bytes(bytes: Bytes) -> Self {
        bytes
    }
}
impl DegradedBody for Vec<u8> {
    fn from_bytes(bytes: Bytes) -> Self {
        bytes.to_vec()
    }
}
impl DegradedBody for String {
    fn from_bytes(bytes: Bytes) -> Self {
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
impl DegradedBody for http_body_util::Full<Bytes> {
    fn from_bytes(bytes: Bytes) -> Self {
        http_body_util::Full::new(bytes)
    }
}

pub(crate) enum Target<ReqB, ResB> {
    /// The wrapped service (its model rewritten when the route has one).
    Inner,
    /// Another service, with an optional rewrite.
    Service {
        svc: RouteService<ReqB, ResB>,
        rewrite: Option<RewriteFn<ReqB>>,
    },
    /// An answer made without any call.
    Degraded(DegradedFn<ReqB, ResB>),
}

impl<ReqB, ResB> Clone for Target<ReqB, ResB> {
    fn clone(&self) -> Self {
        match self {
            Target::Inner => Target::Inner,
            Target::Service { svc, rewrite } => Target::Service {
                svc: svc.clone(),
                rewrite: rewrite.clone(),
            },
            Target::Degraded(f) => Target::Degraded(f.clone()),
        }
    }
}

/// One route of a [`FallbackChain`]: where a request goes and how it is changed on the way.
///
/// - [`Route::primary`]: the wrapped service, the request as the caller sent it (the
///   usual first route; it costs nothing to try).
/// - [`Route::model`]: the wrapped service with the body's top-level `"model"` value
///   rewritten (aggregators and OpenAI-compatible gateways serve many models on one
///   endpoint). Every other byte of the body is kept.
/// - [`Route::service`]: another service (another provider, base URL, credentials), with
///   an optional [`rewrite`](Route::rewrite) of URL, headers and body and an optional
///   [`model`](Route::model_name) rewrite applied first.
/// - [`Route::degraded`] / [`Route::degraded_static`]: an answer made without a call,
///   marked `degraded` in [`Served`]; it ends the chain.
pub struct Route<ReqB, ResB> {
    pub(crate) name: Arc<str>,
    pub(crate) model: Option<Arc<str>>,
    pub(crate) quoted_model: Option<Bytes>,
    pub(crate) target: Target<ReqB, ResB>,
    pub(crate) context_window: Option<u64>,
    pub(crate) content_policy: bool,
    pub(crate) skip: Option<SkipFn<ReqB>>,
    pub(crate) header: Option<HeaderValue>,
    pub(crate) served: Option<Served>,
    pub(crate) account: Option<Arc<str>>,
}

impl<ReqB, ResB> Clone for Route<ReqB, ResB> {
    fn clone(&self) -> Self {
        Route {
            name: self.name.clone(),
            model: self.model.clone(),
            quoted_model: self.quoted_model.clone(),
            target: self.target.clone(),
            context_window: self.context_window,
            content_policy: self.content_policy,
            skip: self.skip.clone(),
            header: self.header.clone(),
            served: self.served.clone(),
            account: self.account.clone(),
        }
    }
}

impl<ReqB, ResB> fmt::Debug for Route<ReqB, ResB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.target {
            Target::Inner if self.model.is_some() => "model",
            Target::Inner => "primary",
            Target::Service { .. } => "service",
            Target::Degraded(_) => "degraded",
        };
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("kind", &kind)
            .field("model", &self.model)
            .field("context_window", &self.context_window)
            .field("content_policy", &self.content_policy)
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl<ReqB, ResB> Route<ReqB, ResB> {
    fn with_target(name: impl Into<Arc<str>>, target: Target<ReqB, ResB>) -> Self {
        Route {
            name: name.into(),
            model: None,
            quoted_model: None,
            target,
            context_window: None,
            content_policy: false,
            skip: None,
            header: None,
            served: None,
            account: None,
        }
    }

    /// The wrapped service, with the request as the caller sent it.
    pub fn primary(name: impl Into<Arc<str>>) -> Self {
        Route::with_target(name, Target::Inner)
    }

    /// The wrapped service, with the request's model set to `model`: the model segment of
    /// the path where the provider reads it there (Gemini's `models/{model}:…`, Azure
    /// OpenAI's `deployments/{name}/…`; the query is kept), and the body's top-level
    /// `"model"` value when it has one. The route is named after the model (see
    /// [`name`](Route::name) to change it); [`Served`] names the model called.
    pub fn model(model: impl Into<Arc<str>>) -> Self {
        let model = model.into();
        let mut r = Route::with_target(model.clone(), Target::Inner);
        r.model = Some(model);
        r
    }

    /// Another service: another provider, base URL or credentials. Its future is boxed
    /// (only when this route is tried). Add a [`rewrite`](Route::rewrite) to adapt URL,
    /// headers and body to it.
    pub fn service<S>(name: impl Into<Arc<str>>, svc: S) -> Self
    where
        S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        ReqB: 'static,
        ResB: 'static,
    {
        let svc = BoxCloneSyncService::new(svc.map_err(Into::into));
        Route::with_target(name, Target::Service { svc, rewrite: None })
    }

    /// A degraded answer made by `f` from the request ("the assistant is busy", a cached
    /// answer), without any call. It ends the chain; [`Served::degraded`] is true.
    pub fn degraded<F>(name: impl Into<Arc<str>>, f: F) -> Self
    where
        F: Fn(&Request<ReqB>) -> Response<ResB> + Send + Sync + 'static,
    {
        Route::with_target(name, Target::Degraded(Arc::new(f)))
    }

    /// A degraded answer with a fixed status and body (`content-type: application/json`
    /// when the body starts with `{` or `[`, else `text/plain; charset=utf-8`).
    pub fn degraded_static(
        name: impl Into<Arc<str>>,
        status: StatusCode,
        body: impl Into<Bytes>,
    ) -> Self
    where
        ResB: DegradedBody,
    {
        let body: Bytes = body.into();
        let content_type = if matches!(body.first(), Some(b'{' | b'[')) {
            HeaderValue::from_static("application/json")
        } else {
            HeaderValue::from_static("text/plain; charset=utf-8")
        };
        Route::degraded(name, move |_req: &Request<ReqB>| {
            let mut res = Response::new(ResB::from_bytes(body.clone()));
            *res.status_mut() = status;
            res.headers_mut()
                .insert(http::header::CONTENT_TYPE, content_type.clone());
            res
        })
    }

    /// Renames the route (names appear in [`Served`], in
    /// [`RouteFailure`](tower_ai_core::RouteFailure)s and in the optional response header).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the request's model to `model` before sending, as [`Route::model`] does (for a
    /// [`service`](Route::service) route, before its [`rewrite`](Route::rewrite)).
    pub fn model_name(mut self, model: impl Into<Arc<str>>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// The route's context window in tokens: a context-length failure moves to the next
    /// route with a larger one.
    pub fn context_window(mut self, tokens: u64) -> Self {
        self.context_window = Some(tokens);
        self
    }

    /// Marks the route as the one to try when a content filter refused the request. A
    /// content-policy route is used for [`Action::ContentPolicy`] only, never as an
    /// ordinary next route.
    pub fn content_policy(mut self) -> Self {
        self.content_policy = true;
        self
    }

    /// Skips the route without calling it when `f` returns true for the request as it
    /// would be sent (after this route's model rewrite and [`rewrite`](Route::rewrite)),
    /// typically a circuit breaker's handle: `move |req| handle.is_open_for(req)`, which
    /// derives the same key (host + model) the breaker below would. A skipped route is
    /// recorded as a failure of kind [`Overloaded`](ErrorKind::Overloaded), and the chain
    /// moves on at once.
    pub fn skip_if<F>(mut self, f: F) -> Self
    where
        F: Fn(&Request<ReqB>) -> bool + Send + Sync + 'static,
    {
        self.skip = Some(Arc::new(f));
        self
    }

    /// Changes each request sent on this [`service`](Route::service) route: URI, headers,
    /// body (from another dialect's JSON to this provider's). An error is recorded as this
    /// route's failure, and the chain moves on. On other routes this does nothing.
    pub fn rewrite<F>(mut self, f: F) -> Self
    where
        F: Fn(&mut Request<ReqB>) -> Result<(), BoxError> + Send + Sync + 'static,
    {
        if let Target::Service { rewrite, .. } = &mut self.target {
            *rewrite = Some(Arc::new(f));
        }
        self
    }

    /// Declares the account (credential group, billing account) the route's calls are
    /// made on. A quota or billing failure ([`ErrorKind::QuotaExhausted`]: OpenAI's
    /// `insufficient_quota`, Anthropic's spend-limit 429 and `billing_error`) never falls
    /// back to a later route on the same account (the money is gone for every model
    /// there): the chain skips those routes, and when no route on another account is
    /// left the failure reaches the caller as it is.
    ///
    /// Without a declaration, [`primary`](Route::primary) and [`model`](Route::model)
    /// routes share the wrapped service's account, each [`service`](Route::service) route
    /// has an account of its own, and degraded answers use none.
    pub fn account(mut self, account: impl Into<Arc<str>>) -> Self {
        self.account = Some(account.into());
        self
    }

    /// The route's name.
    pub fn route_name(&self) -> &str {
        &self.name
    }

    /// Whether `self` and `other` (at positions `i` and `j` of a chain) bill the same
    /// account: see [`account`](Route::account).
    pub(crate) fn same_account(&self, i: usize, other: &Route<ReqB, ResB>, j: usize) -> bool {
        fn id<ReqB, ResB>(r: &Route<ReqB, ResB>, i: usize) -> Option<Result<&str, usize>> {
            match (&r.account, &r.target) {
                (Some(a), _) => Some(Ok(a)),
                (None, Target::Degraded(_)) => None,
                // The wrapped service: one implicit account for all its routes.
                (None, Target::Inner) => Some(Err(usize::MAX)),
                (None, Target::Service { .. }) => Some(Err(i)),
            }
        }
        match (id(self, i), id(other, j)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    }

    pub(crate) fn is_degraded(&self) -> bool {
        matches!(self.target, Target::Degraded(_))
    }
}

/// A configuration that makes no sense, found by [`FallbackChainBuilder::build`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The chain has no route.
    #[error("a fallback chain needs at least one route")]
    NoRoutes,
    /// A route has an empty name.
    #[error("route #{index} has an empty name")]
    EmptyName {
        /// Its position in the chain.
        index: usize,
    },
    /// Two routes share a name.
    #[error("two routes are named {name:?}; names must be unique")]
    DuplicateName {
        /// The name.
        name: String,
    },
    /// A route rewrites the model to an empty name.
    #[error("route {route:?} rewrites the model to an empty name")]
    EmptyModel {
        /// The route.
        route: String,
    },
    /// A route's context window is zero.
    #[error("route {route:?} has a context window of 0 tokens")]
    ZeroContextWindow {
        /// The route.
        route: String,
    },
    /// A degraded route is not the last one (the routes after it could never be reached).
    #[error("degraded route {route:?} must be the last route of the chain")]
    DegradedNotLast {
        /// The route.
        route: String,
    },
    /// The first route is a degraded answer or a content-policy route: every request would
    /// be answered degraded, or by the content-policy route.
    #[error("the first route {route:?} must send upstream and not be a content-policy route")]
    BadFirstRoute {
        /// The route.
        route: String,
    },
    /// `max_attempts(0)`: no request could ever be sent.
    #[error("max_attempts must be at least 1")]
    ZeroAttempts,
    /// A route name cannot be sent in the served-route header.
    #[error("route name {route:?} is not a valid header value for the served-route header")]
    InvalidHeaderValue {
        /// The route.
        route: String,
    },
}

/// A validated fallback chain and its policy, shared (one `Arc`) by the layer, every
/// service it makes and every request future. Cheap to clone.
pub struct FallbackChain<ReqB, ResB> {
    pub(crate) inner: Arc<Chain<ReqB, ResB>>,
}

impl<ReqB, ResB> Clone for FallbackChain<ReqB, ResB> {
    fn clone(&self) -> Self {
        FallbackChain {
            inner: self.inner.clone(),
        }
    }
}

pub(crate) struct Chain<ReqB, ResB> {
    pub(crate) routes: Vec<Route<ReqB, ResB>>,
    pub(crate) triggers: Vec<(ErrorKind, Action)>,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) share_budget: bool,
    pub(crate) mark_primary: bool,
    pub(crate) header: Option<HeaderName>,
    pub(crate) return_last: bool,
    pub(crate) long_wait_moves_on: bool,
    pub(crate) idempotency_header: Option<HeaderName>,
    pub(crate) min_route_time: Duration,
    /// Each route's `tower_ai.fallback.served` key.
    #[cfg(feature = "metrics")]
    pub(crate) served_keys: Box<[::metrics::Key]>,
}

impl<ReqB, ResB> Chain<ReqB, ResB> {
    pub(crate) fn action(&self, kind: ErrorKind) -> Action {
        self.triggers
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or_else(|| default_action(kind), |(_, a)| *a)
    }
}

impl<ReqB, ResB> fmt::Debug for FallbackChain<ReqB, ResB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.inner;
        f.debug_struct("FallbackChain")
            .field("routes", &c.routes)
            .field("triggers", &c.triggers)
            .field("max_attempts", &c.max_attempts)
            .field("share_budget", &c.share_budget)
            .field("mark_primary", &c.mark_primary)
            .field("header", &c.header)
            .field("return_last", &c.return_last)
            .finish()
    }
}

impl<ReqB, ResB> FallbackChain<ReqB, ResB> {
    /// A builder.
    pub fn builder() -> FallbackChainBuilder<ReqB, ResB> {
        FallbackChainBuilder::new()
    }

    /// A chain on the wrapped service: the request as sent, then each of `models` by a
    /// rewrite of the body's `"model"` value.
    ///
    /// # Errors
    ///
    /// As [`FallbackChainBuilder::build`] (an empty or duplicate model name).
    pub fn models<I, M>(models: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = M>,
        M: Into<Arc<str>>,
    {
        let mut b = FallbackChain::builder().route(Route::primary("primary"));
        for m in models {
            b = b.route(Route::model(m));
        }
        b.build()
    }

    /// The route names, in order.
    pub fn route_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.inner.routes.iter().map(|r| &*r.name)
    }

    /// What served `res`: the [`Served`] in its extensions, or (a response the first route
    /// served, which is not marked unless
    /// [`mark_primary`](FallbackChainBuilder::mark_primary) is on) the first route.
    pub fn served<B>(&self, res: &Response<B>) -> Cow<'_, Served> {
        match res.extensions().get::<Served>() {
            Some(s) => Cow::Owned(s.clone()),
            None => match &self.inner.routes[0].served {
                Some(s) => Cow::Borrowed(s),
                None => unreachable_first(),
            },
        }
    }
}

#[cold]
fn unreachable_first() -> Cow<'static, Served> {
    // `build` fills `served` for every route.
    Cow::Owned(Served {
        route: Arc::from(""),
        model: None,
        index: 0,
        degraded: false,
    })
}

/// Builds a [`FallbackChain`].
pub struct FallbackChainBuilder<ReqB, ResB> {
    routes: Vec<Route<ReqB, ResB>>,
    triggers: Vec<(ErrorKind, Action)>,
    max_attempts: Option<Option<u32>>,
    share_budget: bool,
    mark_primary: bool,
    header: Option<HeaderName>,
    return_last: bool,
    long_wait_moves_on: bool,
    idempotency_header: Option<HeaderName>,
    min_route_time: Duration,
}

impl<ReqB, ResB> fmt::Debug for FallbackChainBuilder<ReqB, ResB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackChainBuilder")
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

impl<ReqB, ResB> Default for FallbackChainBuilder<ReqB, ResB> {
    fn default() -> Self {
        Self::new()
    }
}

impl<ReqB, ResB> FallbackChainBuilder<ReqB, ResB> {
    /// An empty chain with the default triggers ([`default_action`]), an attempt budget of
    /// (upstream routes + 2) shared with the layers below, no served-route header.
    pub fn new() -> Self {
        FallbackChainBuilder {
            routes: Vec::new(),
            triggers: Vec::new(),
            max_attempts: None,
            share_budget: true,
            mark_primary: false,
            header: None,
            return_last: false,
            long_wait_moves_on: true,
            idempotency_header: Some(HeaderName::from_static("idempotency-key")),
            min_route_time: Duration::ZERO,
        }
    }

    /// Appends a route.
    pub fn route(mut self, route: Route<ReqB, ResB>) -> Self {
        self.routes.push(route);
        self
    }

    /// Sets the action for failures of `kind` (the last setting for a kind wins).
    pub fn on(mut self, kind: ErrorKind, action: Action) -> Self {
        self.triggers.retain(|(k, _)| *k != kind);
        self.triggers.push((kind, action));
        self
    }

    /// The most upstream calls one request may make across the chain, retries included
    /// (see [`AttemptBudget`](crate::AttemptBudget)); `None` for no cap beyond one call per
    /// route. Default: the number of upstream routes + 2.
    pub fn max_attempts(mut self, max: Option<u32>) -> Self {
        self.max_attempts = Some(max);
        self
    }

    /// Whether the attempt budget is put in the extensions of every request sent, so a
    /// retry layer below draws its retries from it (default true). Off, the cap counts
    /// only this layer's own route attempts, and the happy path allocates nothing for it.
    pub fn share_budget(mut self, share: bool) -> Self {
        self.share_budget = share;
        self
    }

    /// Whether responses served by the first route also carry [`Served`] (and the
    /// header). Default false: the first route's responses are left untouched (no
    /// allocation), and [`FallbackChain::served`] reports the first route for a response
    /// without `Served`.
    pub fn mark_primary(mut self, mark: bool) -> Self {
        self.mark_primary = mark;
        self
    }

    /// Also report the serving route's name in this response header.
    pub fn served_header(mut self, name: HeaderName) -> Self {
        self.header = Some(name);
        self
    }

    /// When every eligible route failed, return the last route's response or error as it
    /// is instead of [`AiError::AllRoutesFailed`](tower_ai_core::AiError::AllRoutesFailed).
    /// Default false.
    pub fn return_last(mut self, yes: bool) -> Self {
        self.return_last = yes;
        self
    }

    /// The least time a route needs to answer: a later route that calls a provider is not
    /// started when the request's [`Deadline`](tower_ai_core::Deadline) leaves less than
    /// this (default zero: not once the deadline has passed). Such a route is skipped, as
    /// every call route after it, with a [`RouteFailure`](tower_ai_core::RouteFailure) of kind
    /// `Timeout`; a degraded route after them still answers (it makes no call). The first
    /// route always goes: the caller sent the request. A request without a `Deadline` is
    /// not affected.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ai_core::AiBody;
    /// use tower_ai_fallback::{FallbackChain, Route};
    ///
    /// let chain = FallbackChain::<AiBody, AiBody>::builder()
    ///     .route(Route::primary("gpt-4o"))
    ///     .route(Route::model("gpt-4o-mini"))
    ///     .min_route_time(Duration::from_secs(2)) // the p99 of an answer
    ///     .build()
    ///     .unwrap();
    /// # let _ = chain;
    /// ```
    pub fn min_route_time(mut self, d: Duration) -> Self {
        self.min_route_time = d;
        self
    }

    /// Whether a route whose provider asked for a wait longer than allowed (a
    /// classification whose wait [exceeds the maximum](tower_ai_core::RequestedWait::exceeds_max),
    /// or `RetriesExhausted { wait: Some(..) }` with such a wait) moves on to the next
    /// route at once, whatever its kind's action (default true).
    pub fn long_wait_moves_on(mut self, yes: bool) -> Self {
        self.long_wait_moves_on = yes;
        self
    }

    /// The idempotency-key header whose caller-set value is made per route (default
    /// `idempotency-key`, the header AiRetry sends and providers read), or `None` to send
    /// it as the caller set it on every route.
    ///
    /// A provider that honours idempotency keys answers a repeated key with the first
    /// request's result, or refuses it when the body differs; a later route sends another
    /// model (another body) and must not reuse the first route's key. So the first route
    /// sends the caller's key as it is, and route `i > 0` sends `<key>-route<i>`: the same
    /// on every retry of that route (and on every replay of the same call), different
    /// from every other route's.
    pub fn idempotency_header(mut self, name: Option<HeaderName>) -> Self {
        self.idempotency_header = name;
        self
    }

    /// Validates the chain.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming what makes no sense: no routes, an empty or duplicate
    /// name, an empty model, a zero context window, a degraded route that is not last, a
    /// first route that is degraded or content-policy only, `max_attempts(Some(0))`, or a
    /// route name that cannot go in the served-route header.
    pub fn build(self) -> Result<FallbackChain<ReqB, ResB>, ConfigError> {
        let mut routes = self.routes;
        let Some(first) = routes.first() else {
            return Err(ConfigError::NoRoutes);
        };
        if first.is_degraded() || first.content_policy {
            return Err(ConfigError::BadFirstRoute {
                route: first.name.to_string(),
            });
        }
        let last = routes.len() - 1;
        for (i, r) in routes.iter().enumerate() {
            if r.name.is_empty() {
                return Err(ConfigError::EmptyName { index: i });
            }
            if routes[..i].iter().any(|o| o.name == r.name) {
                return Err(ConfigError::DuplicateName {
                    name: r.name.to_string(),
                });
            }
            if r.model.as_deref() == Some("") {
                return Err(ConfigError::EmptyModel {
                    route: r.name.to_string(),
                });
            }
            if r.context_window == Some(0) {
                return Err(ConfigError::ZeroContextWindow {
                    route: r.name.to_string(),
                });
            }
            if r.is_degraded() && i != last {
                return Err(ConfigError::DegradedNotLast {
                    route: r.name.to_string(),
                });
            }
        }
        let upstream = routes.iter().filter(|r| !r.is_degraded()).count() as u32;
        let max_attempts = match self.max_attempts {
            None => Some(upstream + 2),
            Some(Some(0)) => return Err(ConfigError::ZeroAttempts),
            Some(m) => m,
        };
        for (i, r) in routes.iter_mut().enumerate() {
            r.quoted_model = r.model.as_deref().map(json_string);
            if self.header.is_some() {
                r.header = Some(HeaderValue::from_str(&r.name).map_err(|_| {
                    ConfigError::InvalidHeaderValue {
                        route: r.name.to_string(),
                    }
                })?);
            }
            r.served = Some(Served {
                route: r.name.clone(),
                model: r.model.clone(),
                index: i,
                degraded: r.is_degraded(),
            });
        }
        Ok(FallbackChain {
            inner: Arc::new(Chain {
                #[cfg(feature = "metrics")]
                served_keys: crate::meter::served_keys(routes.iter().map(|r| &*r.name)),
                routes,
                triggers: self.triggers,
                max_attempts,
                share_budget: self.share_budget,
                mark_primary: self.mark_primary,
                header: self.header,
                return_last: self.return_last,
                long_wait_moves_on: self.long_wait_moves_on,
                idempotency_header: self.idempotency_header,
                min_route_time: self.min_route_time,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = FallbackChainBuilder<Bytes, Bytes>;

    #[test]
    fn validation() {
        assert_eq!(B::new().build().unwrap_err(), ConfigError::NoRoutes);
        let dup = B::new()
            .route(Route::model("a"))
            .route(Route::model("a"))
            .build();
        assert!(matches!(dup, Err(ConfigError::DuplicateName { .. })));
        let deg = B::new()
            .route(Route::primary("p"))
            .route(Route::degraded_static("busy", StatusCode::OK, "x"))
            .route(Route::model("b"))
            .build();
        assert!(matches!(deg, Err(ConfigError::DegradedNotLast { .. })));
        let first = B::new().route(Route::model("a").content_policy()).build();
        assert!(matches!(first, Err(ConfigError::BadFirstRoute { .. })));
        let zero = B::new()
            .route(Route::primary("p"))
            .max_attempts(Some(0))
            .build();
        assert_eq!(zero.unwrap_err(), ConfigError::ZeroAttempts);
        let empty = B::new().route(Route::model("")).build();
        assert!(matches!(empty, Err(ConfigError::EmptyName { .. })));
        let empty_model = B::new().route(Route::primary("p").model_name("")).build();
        assert!(matches!(empty_model, Err(ConfigError::EmptyModel { .. })));
        let cw = B::new()
            .route(Route::primary("p").context_window(0))
            .build();
        assert!(matches!(cw, Err(ConfigError::ZeroContextWindow { .. })));
        let hdr = B::new()
            .route(Route::primary("bad\nname"))
            .served_header(HeaderName::from_static("x-route"))
            .build();
        assert!(matches!(hdr, Err(ConfigError::InvalidHeaderValue { .. })));
        assert_eq!(
            ConfigError::ZeroAttempts.to_string(),
            "max_attempts must be at least 1"
        );
    }

    #[test]
    fn defaults() {
        let chain = FallbackChain::<Bytes, Bytes>::models(["b", "c"]).unwrap();
        assert_eq!(
            chain.route_names().collect::<Vec<_>>(),
            ["primary", "b", "c"]
        );
        assert_eq!(chain.inner.max_attempts, Some(5));
        assert_eq!(chain.inner.action(ErrorKind::Unauthorized), Action::Stop);
        assert_eq!(chain.inner.action(ErrorKind::QuotaExhausted), Action::Next);
        assert_eq!(
            chain.inner.action(ErrorKind::ContextLengthExceeded),
            Action::LargerContext
        );
        let c = B::new()
            .route(Route::primary("p"))
            .on(ErrorKind::RateLimited, Action::Stop)
            .on(ErrorKind::BadRequest, Action::Next)
            .build()
            .unwrap();
        assert_eq!(c.inner.action(ErrorKind::RateLimited), Action::Stop);
        assert_eq!(c.inner.action(ErrorKind::BadRequest), Action::Next);
        let res = Response::new(Bytes::new());
        assert_eq!(&*c.served(&res).route, "p");
    }
}
