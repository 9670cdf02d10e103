//! The fallback decisions: what a route's outcome means, and which route comes next.
//! Plain functions over the chain, unit-tested without Tower.

use std::sync::Arc;
use std::time::Duration;

use http::Response;
use tokio::time::Instant;
use tower_ai_core::{
    redact_secrets, redacted_chain, AiError, BoxError, Classification, ErrorKind, Provider,
    RequestedWait, WaitSource,
};

use crate::config::{Action, Chain, Route};

/// What served a response: put in the response's extensions by
/// [`ModelFallback`](crate::ModelFallback) when a route other than the first served it (or
/// every time, with [`mark_primary`](crate::FallbackChainBuilder::mark_primary)).
/// [`FallbackChain::served`](crate::FallbackChain::served) answers for both cases.
///
/// Cheap: the names are `Arc<str>`s shared with the chain's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Served {
    /// The route's name.
    pub route: Arc<str>,
    /// The model the route asked for: its rewrite target, else the model of the request
    /// it sent (after a cross-provider rewrite) when its body names one.
    pub model: Option<Arc<str>>,
    /// The route's position in the chain (0 for the first).
    pub index: usize,
    /// Whether the answer is a degraded one, made without a call.
    pub degraded: bool,
}

impl Served {
    /// The `Served` a response carries, if any (`None` for an unmarked first-route answer).
    pub fn get<B>(res: &Response<B>) -> Option<&Served> {
        res.extensions().get::<Served>()
    }
}

/// A route's failure, as judged.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) action: Action,
    pub(crate) classification: Classification,
    pub(crate) message: String,
}

/// `None` for a success; otherwise what the failure calls for.
pub(crate) fn judge_response<ReqB, ResB, B>(
    chain: &Chain<ReqB, ResB>,
    res: &Response<B>,
) -> Option<Failure> {
    // The happy path: a 2xx that `Classify` left unmarked is a success; no verdict is
    // built for it.
    if res.status().is_success() && res.extensions().get::<Classification>().is_none() {
        return None;
    }
    let c = Classification::of(res);
    let kind = c.kind?;
    let action = action_for(chain, kind, [c.wait]);
    let message = c
        .message()
        .map(|m| redact_secrets(m).into_owned())
        .unwrap_or_else(|| format!("HTTP {} ({kind})", c.status.as_u16()));
    Some(Failure {
        action,
        classification: c.into_owned(),
        message,
    })
}

/// What an error from a route calls for.
pub(crate) fn judge_error<ReqB, ResB>(
    chain: &Chain<ReqB, ResB>,
    err: &BoxError,
    provider: Provider,
) -> Failure {
    // A client's error text can hold a credential (a URL with `?key=`): redacted.
    let message = redacted_chain(&**err);
    let failure = |action, classification| Failure {
        action,
        classification,
        message: message.clone(),
    };
    // A layer below that refused without calling says when it would let the request
    // through: kept as the failure's wait, so that a reply to the caller (ErrorReply's
    // `AllRoutesFailed`) can say `retry-after`.
    let not_before = |mut c: Classification, wait: Duration| {
        c.wait = RequestedWait::new(wait, WaitSource::RetryAfter, wait);
        c
    };
    match AiError::find(&**err) {
        // A layer below refused without calling: move on without spending time.
        Some(e @ (AiError::CircuitOpen { until, .. } | AiError::CoolingDown { until, .. })) => {
            let wait = until.saturating_duration_since(Instant::now());
            failure(
                Action::Next,
                not_before(Classification::failure(e.kind(), provider), wait),
            )
        }
        Some(e @ AiError::BudgetExceeded { retry_after, .. }) => {
            let kind = e.kind();
            let c = Classification::failure(kind, provider);
            let c = match retry_after {
                Some(d) => not_before(c, *d),
                None => c,
            };
            failure(chain.action(kind), c)
        }
        Some(AiError::RetriesExhausted { last, wait, .. }) => {
            let kind = last.kind.unwrap_or(ErrorKind::Unknown);
            failure(action_for(chain, kind, [*wait, last.wait]), last.clone())
        }
        Some(AiError::Provider { classification }) => {
            let kind = classification.kind.unwrap_or(ErrorKind::Unknown);
            failure(
                action_for(chain, kind, [classification.wait]),
                classification.clone(),
            )
        }
        // Any other AiError (its own kind) or a foreign error (judged by its chain).
        _ => {
            let kind = ErrorKind::of_error(&**err);
            failure(chain.action(kind), Classification::failure(kind, provider))
        }
    }
}

/// The action for a failure of `kind`: the next route when the provider asked for a wait
/// longer than allowed (and the chain's `long_wait_moves_on` is on), whatever the kind;
/// else the kind's action.
fn action_for<ReqB, ResB, const N: usize>(
    chain: &Chain<ReqB, ResB>,
    kind: ErrorKind,
    waits: [Option<RequestedWait>; N],
) -> Action {
    let long_wait = waits.iter().flatten().any(RequestedWait::exceeds_max);
    if long_wait && chain.long_wait_moves_on {
        Action::Next
    } else {
        chain.action(kind)
    }
}

/// The next route after `from` that `action` allows; `window` is the failed route's
/// context window (0 when unknown).
pub(crate) fn next_route<ReqB, ResB>(
    routes: &[Route<ReqB, ResB>],
    from: usize,
    action: Action,
    window: u64,
) -> Option<usize> {
    let later = routes.iter().enumerate().skip(from + 1);
    match action {
        Action::Stop => None,
        Action::Next => later
            .filter(|(_, r)| !r.content_policy)
            .map(|(i, _)| i)
            .next(),
        Action::LargerContext => later
            .filter(|(_, r)| {
                !r.is_degraded() && !r.content_policy && r.context_window.unwrap_or(0) > window
            })
            .map(|(i, _)| i)
            .next(),
        Action::ContentPolicy => later
            .filter(|(_, r)| r.content_policy)
            .map(|(i, _)| i)
            .next(),
    }
}

/// How many routes after `j` an ordinary fallback could still send to: the attempts a
/// retry on route `j` must leave for them.
pub(crate) fn upstream_after<ReqB, ResB>(routes: &[Route<ReqB, ResB>], j: usize) -> u32 {
    routes[j + 1..]
        .iter()
        .filter(|r| !r.is_degraded() && !r.content_policy)
        .count() as u32
}

/// The degraded route after `j`, if the chain ends in one.
pub(crate) fn degraded_after<ReqB, ResB>(routes: &[Route<ReqB, ResB>], j: usize) -> Option<usize> {
    routes
        .iter()
        .enumerate()
        .skip(j + 1)
        .find(|(_, r)| r.is_degraded())
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http::StatusCode;
    use tower_ai_core::{RequestedWait, WaitSource};

    use super::*;
    use crate::config::FallbackChain;

    fn chain() -> FallbackChain<Bytes, Bytes> {
        FallbackChain::builder()
            .route(crate::Route::primary("small").context_window(8_000))
            .route(crate::Route::model("mid").context_window(8_000))
            .route(crate::Route::model("policy").content_policy())
            .route(crate::Route::model("large").context_window(200_000))
            .route(crate::Route::model("huge").context_window(1_000_000))
            .route(crate::Route::degraded_static(
                "busy",
                StatusCode::OK,
                "busy",
            ))
            .build()
            .unwrap()
    }

    #[test]
    fn next_route_by_action() {
        let c = chain();
        let r = &c.inner.routes;
        assert_eq!(next_route(r, 0, Action::Next, 8_000), Some(1));
        assert_eq!(
            next_route(r, 1, Action::Next, 8_000),
            Some(3),
            "policy route skipped"
        );
        assert_eq!(next_route(r, 0, Action::LargerContext, 8_000), Some(3));
        assert_eq!(next_route(r, 3, Action::LargerContext, 200_000), Some(4));
        assert_eq!(next_route(r, 4, Action::LargerContext, 1_000_000), None);
        assert_eq!(next_route(r, 0, Action::ContentPolicy, 0), Some(2));
        assert_eq!(next_route(r, 2, Action::ContentPolicy, 0), None);
        assert_eq!(
            next_route(r, 4, Action::Next, 0),
            Some(5),
            "degraded ends the chain"
        );
        assert_eq!(next_route(r, 0, Action::Stop, 0), None);
        assert_eq!(upstream_after(r, 0), 3);
        assert_eq!(upstream_after(r, 4), 0);
        assert_eq!(degraded_after(r, 1), Some(5));
    }

    fn response(status: u16, c: Option<Classification>) -> Response<()> {
        let mut res = Response::new(());
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        if let Some(c) = c {
            res.extensions_mut().insert(c);
        }
        res
    }

    #[test]
    fn judging_responses() {
        let c = chain();
        assert!(judge_response(&c.inner, &response(200, None)).is_none());
        let f = judge_response(&c.inner, &response(401, None)).unwrap();
        assert_eq!(f.action, Action::Stop);
        let f = judge_response(&c.inner, &response(529, None)).unwrap();
        assert_eq!(f.action, Action::Next);
        assert_eq!(f.message, "HTTP 529 (overloaded)");
        let mut long = Classification::failure(ErrorKind::BadRequest, Provider::OpenAi);
        long.status = StatusCode::TOO_MANY_REQUESTS;
        long.wait = RequestedWait::new(
            Duration::from_secs(3600),
            WaitSource::RetryAfter,
            Duration::from_secs(60),
        );
        let f = judge_response(&c.inner, &response(429, Some(long))).unwrap();
        assert_eq!(
            f.action,
            Action::Next,
            "a long wait moves on whatever the kind"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_keeps_when_it_would_let_the_request_through() {
        let c = chain();
        let budget: BoxError = Box::new(AiError::BudgetExceeded {
            key: "k".into(),
            limit: tower_ai_core::BudgetLimit::TokensPerMinute,
            retry_after: Some(Duration::from_secs(61)),
        });
        let f = judge_error(&c.inner, &budget, Provider::OpenAi);
        assert_eq!(f.action, Action::Next);
        assert_eq!(f.classification.kind, Some(ErrorKind::RateLimited));
        assert_eq!(
            f.classification.wait.map(|w| w.delay),
            Some(Duration::from_secs(61))
        );
        let cooling: BoxError = Box::new(AiError::CoolingDown {
            key: "k".into(),
            until: tokio::time::Instant::now() + Duration::from_secs(30),
        });
        let f = judge_error(&c.inner, &cooling, Provider::OpenAi);
        assert_eq!(
            f.classification.wait.map(|w| w.delay),
            Some(Duration::from_secs(30))
        );
        // What a gateway answers when every route was refused so: a 429 with retry-after.
        let reply = tower_ai_core::ErrorReply::from_error(&AiError::AllRoutesFailed {
            failures: vec![tower_ai_core::RouteFailure {
                route: "primary".into(),
                classification: judge_error(&c.inner, &budget, Provider::OpenAi).classification,
                message: String::new(),
            }],
        });
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(reply.retry_after, Some(Duration::from_secs(61)));
    }

    #[test]
    fn judging_errors() {
        let c = chain();
        let open: BoxError = Box::new(AiError::CircuitOpen {
            key: "k".into(),
            until: tokio::time::Instant::now(),
        });
        assert_eq!(
            judge_error(&c.inner, &open, Provider::OpenAi).action,
            Action::Next
        );
        let io: BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let f = judge_error(&c.inner, &io, Provider::OpenAi);
        assert_eq!(f.action, Action::Next);
        assert_eq!(f.classification.kind, Some(ErrorKind::Connection));
        let mut last = Classification::failure(ErrorKind::Unauthorized, Provider::OpenAi);
        let ex: BoxError = Box::new(AiError::RetriesExhausted {
            attempts: 1,
            last: last.clone(),
            wait: None,
        });
        assert_eq!(
            judge_error(&c.inner, &ex, Provider::OpenAi).action,
            Action::Stop
        );
        last.kind = Some(ErrorKind::RateLimited);
        let ex: BoxError = Box::new(AiError::RetriesExhausted {
            attempts: 1,
            last,
            wait: RequestedWait::new(
                Duration::from_secs(600),
                WaitSource::RetryAfter,
                Duration::from_secs(30),
            ),
        });
        assert_eq!(
            judge_error(&c.inner, &ex, Provider::OpenAi).action,
            Action::Next
        );
        // An in-stream provider error with a long wait moves on too, whatever its kind.
        let mut long = Classification::failure(ErrorKind::BadRequest, Provider::OpenAi);
        let provider_err =
            |c: Classification| -> BoxError { Box::new(AiError::Provider { classification: c }) };
        assert_eq!(
            judge_error(&c.inner, &provider_err(long.clone()), Provider::OpenAi).action,
            Action::Stop
        );
        long.wait = RequestedWait::new(
            Duration::from_secs(3600),
            WaitSource::RetryAfter,
            Duration::from_secs(60),
        );
        assert_eq!(
            judge_error(&c.inner, &provider_err(long), Provider::OpenAi).action,
            Action::Next
        );
        let odd: BoxError = "something odd".into();
        assert_eq!(
            judge_error(&c.inner, &odd, Provider::OpenAi).action,
            Action::Stop
        );
    }
}
