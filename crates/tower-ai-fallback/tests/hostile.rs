//! Careless callers (issue #16): a caller's idempotency key is not reused for another
//! route's body, and a client's error text never carries a credential into a
//! `RouteFailure`.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_ai_core::{AiBody, AiError, BoxError, ClassifyLayer};
use tower_ai_fallback::{FallbackChain, ModelFallbackLayer, Route};
use tower_ai_retry::AiRetryLayer;

type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

fn chain() -> FallbackChain<AiBody, tower_ai_core::ClassifiedBody<http_body_util::Full<Bytes>>> {
    FallbackChain::builder()
        .route(Route::primary("a"))
        .route(Route::model("b"))
        .route(Route::model("c"))
        .max_attempts(None)
        .build()
        .unwrap()
}

async fn run(seen: &Seen, key: Option<&str>) {
    let s = seen.clone();
    // `a` and `b` are overloaded, `c` answers.
    let provider = service_fn(move |r: Request<AiBody>| {
        let model = tower_ai_core::model_of(&r).unwrap().into_owned();
        let key = r
            .headers()
            .get("idempotency-key")
            .map(|v| v.to_str().unwrap().to_owned());
        s.lock().unwrap().push((model.clone(), key));
        let status = if model == "c" { 200 } else { 503 };
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(http_body_util::Full::new(Bytes::new()))?,
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(ModelFallbackLayer::new(chain()))
        .layer(
            AiRetryLayer::builder()
                .max_attempts(2)
                .budget(std::time::Duration::from_secs(10), 100, 1.0)
                .build()
                .unwrap(),
        )
        .layer(ClassifyLayer::new())
        .service(provider);
    let mut req = Request::post("https://api.openai.com/v1/chat/completions");
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    let req = req
        .body(AiBody::from(r#"{"model":"a","messages":[]}"#))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn a_caller_key_is_made_per_route_and_kept_across_retries() {
    let seen: Seen = Arc::default();
    run(&seen, Some("caller-7")).await;
    let calls = std::mem::take(&mut *seen.lock().unwrap());
    let key = |m: &str| -> Vec<Option<String>> {
        calls
            .iter()
            .filter(|(model, _)| model == m)
            .map(|(_, k)| k.clone())
            .collect()
    };
    // Two attempts on each failing route, one on the last: each route its own key, the
    // same on its retry, the first route's the caller's own.
    assert_eq!(key("a"), vec![Some("caller-7".to_owned()); 2], "{calls:?}");
    assert_eq!(
        key("b"),
        vec![Some("caller-7-route1".to_owned()); 2],
        "{calls:?}"
    );
    assert_eq!(
        key("c"),
        vec![Some("caller-7-route2".to_owned())],
        "{calls:?}"
    );
    // The same call again: the same keys (a provider can deduplicate the replay).
    run(&seen, Some("caller-7")).await;
    assert_eq!(*seen.lock().unwrap(), calls);
}

#[tokio::test(start_paused = true)]
async fn without_a_caller_key_each_route_gets_a_fresh_one_from_the_retry_layer() {
    let seen: Seen = Arc::default();
    run(&seen, None).await;
    let calls = seen.lock().unwrap().clone();
    let keys: std::collections::HashSet<_> = calls
        .iter()
        .map(|(m, k)| (m.clone(), k.clone().unwrap()))
        .collect();
    assert_eq!(
        keys.len(),
        3,
        "one key per route, kept across its retries: {calls:?}"
    );
    let distinct: std::collections::HashSet<_> = keys.iter().map(|(_, k)| k).collect();
    assert_eq!(distinct.len(), 3, "{calls:?}");
}

#[derive(Debug)]
struct ReqwestLike;
impl std::fmt::Display for ReqwestLike {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("error sending request for url (https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent?key=AIzaSECRET)")
    }
}
impl std::error::Error for ReqwestLike {}

#[tokio::test(start_paused = true)]
async fn route_failures_never_carry_a_credential() {
    // A client error that did not go through Classify (no AiError::transport on the way).
    let provider = service_fn(|_: Request<AiBody>| async {
        Err::<Response<Bytes>, BoxError>(Box::new(ReqwestLike))
    });
    let chain = FallbackChain::<AiBody, Bytes>::builder()
        .route(Route::primary("a"))
        .route(Route::model("b"))
        .on(
            tower_ai_core::ErrorKind::Unknown,
            tower_ai_fallback::Action::Next,
        )
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(ModelFallbackLayer::new(chain))
        .service(provider);
    let req =
        Request::post("https://generativelanguage.googleapis.com/v1beta/models/a:generateContent")
            .body(AiBody::from(r#"{"model":"a"}"#))
            .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    let Some(AiError::AllRoutesFailed { failures }) = err.downcast_ref::<AiError>() else {
        panic!("{err}")
    };
    assert_eq!(failures.len(), 2);
    for f in failures {
        assert!(!f.message.contains("SECRET"), "{}", f.message);
        assert!(f.message.contains("key=[REDACTED]"), "{}", f.message);
    }
}
