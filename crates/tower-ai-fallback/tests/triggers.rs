//! Each trigger, the skip predicate, the budget, the served report, the request copy:
//! ModelFallback over a scripted provider behind `Classify`.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tower::{service_fn, ServiceExt};
use tower_ai_core::{
    AiBody, AiError, BoxError, Classification, ErrorKind, Provider as Dialect, RequestMeta,
    RequestedWait, StallPhase, WaitSource,
};
use tower_ai_fallback::{
    Action, AttemptBudget, FallbackChain, FallbackChainBuilder, ModelFallback, Route, Served,
};

type Builder = FallbackChainBuilder<AiBody, ResBody>;

fn two_models() -> Builder {
    FallbackChain::builder()
        .route(Route::primary("a"))
        .route(Route::model("b"))
}

async fn send(
    chain: FallbackChain<AiBody, ResBody>,
    p: &Provider,
    req: Request<AiBody>,
) -> Result<Response<ResBody>, BoxError> {
    ModelFallback::new(p.service(), chain).oneshot(req).await
}

async fn body_of(res: Response<ResBody>) -> Bytes {
    res.into_body().collect().await.unwrap().to_bytes()
}

fn ai_error(e: AiError) -> Answer {
    let e = Arc::new(std::sync::Mutex::new(Some(e)));
    fail(move || -> BoxError { Box::new(e.lock().unwrap().take().expect("one call")) })
}

#[tokio::test]
async fn each_next_trigger_moves_on() {
    let cases: Vec<(&str, Answer)> = vec![
        ("overloaded 503", status(503, OVERLOADED)),
        (
            "overloaded 529",
            status(
                529,
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            ),
        ),
        ("server error", status(500, SERVER)),
        ("timeout 504", status(504, "")),
        (
            "connection",
            fail(|| Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))),
        ),
        (
            "timeout error",
            fail(|| Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut))),
        ),
        (
            "stalled before the first byte",
            ai_error(AiError::Stalled {
                phase: StallPhase::FirstByte,
                after: Duration::from_secs(5),
                bytes_received: 0,
            }),
        ),
        (
            "model not found",
            status(
                404,
                r#"{"error":{"message":"The model `a` does not exist","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
            ),
        ),
    ];
    for (what, answer) in cases {
        let p = Provider::new();
        p.answer("a", answer);
        let res = send(two_models().build().unwrap(), &p, chat("a"))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(res.status(), 200, "{what}");
        assert_eq!(p.models_called(), ["a", "b"], "{what}");
        let served = Served::get(&res).expect(what);
        assert_eq!(
            (&*served.route, served.index, served.degraded),
            ("b", 1, false),
            "{what}"
        );
    }
}

#[tokio::test]
async fn quota_errors_never_fall_back_on_the_same_account() {
    let anthropic_billing = r#"{"type":"error","error":{"type":"billing_error","message":"Your credit balance is too low"}}"#;
    for (what, answer) in [
        ("openai insufficient_quota", status(429, QUOTA)),
        ("anthropic billing_error", status(402, anthropic_billing)),
    ] {
        // `primary` and `model` routes share the wrapped service's account: the quota
        // error is the caller's answer, untouched, and "b" is never called.
        let p = Provider::new();
        p.answer("a", answer.clone());
        let res = send(two_models().build().unwrap(), &p, chat("a"))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(res.status() == 429 || res.status() == 402, "{what}");
        assert_eq!(p.models_called(), ["a"], "{what}");
        assert!(Served::get(&res).is_none(), "{what}");
        let body = body_of(res).await;
        assert!(
            body.windows(7).any(|w| w == b"balance") || body.windows(5).any(|w| w == b"quota"),
            "{what}: the provider's body is passed through"
        );

        // A route declared on another account serves it; one on the same account is skipped.
        let p = Provider::new();
        p.answer("a", answer);
        let chain = FallbackChain::builder()
            .route(Route::primary("a").account("org-1"))
            .route(Route::model("b").account("org-1"))
            .route(Route::model("c").account("org-2"))
            .build()
            .unwrap();
        let res = send(chain, &p, chat("a")).await.unwrap();
        assert_eq!(res.status(), 200, "{what}");
        assert_eq!(p.models_called(), ["a", "c"], "{what}");
        assert_eq!(&*Served::get(&res).unwrap().route, "c", "{what}");
    }

    // Other failures still move on within the account.
    let p = Provider::new();
    p.answer("a", status(503, OVERLOADED));
    let res = send(two_models().build().unwrap(), &p, chat("a"))
        .await
        .unwrap();
    assert_eq!(p.models_called(), ["a", "b"]);
    assert_eq!(res.status(), 200);

    // A service route (another provider) has an account of its own by default.
    let p = Provider::new();
    p.answer("a", status(429, QUOTA));
    let backup = Provider::new();
    let chain = two_models()
        .route(Route::service("backup", backup.service()))
        .build()
        .unwrap();
    let res = send(chain, &p, chat("a")).await.unwrap();
    assert_eq!(p.models_called(), ["a"], "b shares a's account");
    assert_eq!(backup.models_called(), ["a"]);
    assert_eq!(&*Served::get(&res).unwrap().route, "backup");
}

#[tokio::test]
async fn client_errors_are_returned_as_they_are() {
    for (code, body, kind) in [
        (401, UNAUTHORIZED, ErrorKind::Unauthorized),
        (
            403,
            r#"{"error":{"message":"Country, region, or territory not supported","type":"request_forbidden","param":null,"code":"unsupported_country_region_territory"}}"#,
            ErrorKind::Forbidden,
        ),
        (
            400,
            r#"{"error":{"message":"Invalid value for 'temperature'","type":"invalid_request_error","param":"temperature","code":null}}"#,
            ErrorKind::BadRequest,
        ),
        (
            422,
            r#"{"error":{"message":"unprocessable"}}"#,
            ErrorKind::BadRequest,
        ),
    ] {
        let p = Provider::new();
        p.answer("a", status(code, body));
        let res = send(two_models().build().unwrap(), &p, chat("a"))
            .await
            .unwrap();
        assert_eq!(res.status(), code);
        assert_eq!(Classification::of(&res).kind, Some(kind));
        assert_eq!(p.models_called(), ["a"], "no fallback on {code}");
        assert!(Served::get(&res).is_none());
        // The provider's body reaches the caller whole.
        assert_eq!(body_of(res).await, body.as_bytes());
    }
}

#[tokio::test]
async fn unknown_transport_errors_stop() {
    let p = Provider::new();
    p.answer("a", fail(|| "something odd".into()));
    let err = send(two_models().build().unwrap(), &p, chat("a"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("something odd"), "{err}");
    assert_eq!(p.models_called(), ["a"]);
}

#[tokio::test]
async fn context_length_goes_to_the_next_larger_window() {
    let p = Provider::new();
    p.answer("a", status(400, CONTEXT))
        .answer("d", status(400, CONTEXT));
    let chain = FallbackChain::builder()
        .route(Route::primary("a").context_window(4_096))
        .route(Route::model("b").context_window(4_096))
        .route(Route::model("c").content_policy().context_window(1_000_000))
        .route(Route::model("smaller").context_window(2_000))
        .route(Route::model("d").context_window(32_000))
        .route(Route::model("unknown"))
        .route(Route::model("e").context_window(128_000))
        .build()
        .unwrap();
    let res = send(chain.clone(), &p, chat("a")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(p.models_called(), ["a", "d", "e"]);
    assert_eq!(&*chain.served(&res).route, "e");

    // Nothing larger: the provider's 400 comes back as it is.
    let p = Provider::new();
    p.answer("a", status(400, CONTEXT));
    let chain = FallbackChain::builder()
        .route(Route::primary("a").context_window(128_000))
        .route(Route::model("b").context_window(8_000))
        .build()
        .unwrap();
    let res = send(chain, &p, chat("a")).await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(p.models_called(), ["a"]);
}

#[tokio::test]
async fn content_filter_goes_to_the_content_policy_route() {
    let p = Provider::new();
    p.answer("a", status(400, FILTERED));
    let chain = FallbackChain::builder()
        .route(Route::primary("a"))
        .route(Route::model("b"))
        .route(Route::model("lenient").content_policy())
        .build()
        .unwrap();
    let res = send(chain.clone(), &p, chat("a")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(p.models_called(), ["a", "lenient"]);

    // An overload never goes to the content-policy route.
    let p = Provider::new();
    p.answer("a", status(503, OVERLOADED))
        .answer("b", status(503, OVERLOADED));
    let err = send(chain, &p, chat("a")).await.unwrap_err();
    assert_eq!(p.models_called(), ["a", "b"]);
    assert!(
        matches!(err.downcast_ref::<AiError>(), Some(AiError::AllRoutesFailed { failures }) if failures.len() == 2)
    );

    // Without a content-policy route, the filter's 400 comes back as it is.
    let p = Provider::new();
    p.answer("a", status(400, FILTERED));
    let res = send(two_models().build().unwrap(), &p, chat("a"))
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(
        Classification::of(&res).kind,
        Some(ErrorKind::ContentFiltered)
    );
    assert_eq!(p.models_called(), ["a"]);
}

#[tokio::test]
async fn a_long_requested_wait_moves_on_even_when_its_kind_stops() {
    // Rate limits are configured not to fall back; a wait over the maximum still does.
    let chain = || {
        two_models()
            .on(ErrorKind::RateLimited, Action::Stop)
            .build()
            .unwrap()
    };
    let p = Provider::new();
    p.answer("a", Answer::Status(429, r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#, vec![("retry-after", "3600")]));
    let res = send(chain(), &p, chat("a")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(p.models_called(), ["a", "b"]);

    // A short wait: the 429 is returned (the retry layer's business).
    let p = Provider::new();
    p.answer("a", Answer::Status(429, r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#, vec![("retry-after", "2")]));
    let res = send(chain(), &p, chat("a")).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(p.models_called(), ["a"]);

    // AiRetry's way of saying it: RetriesExhausted with the long wait attached.
    let mut last = Classification::failure(ErrorKind::RateLimited, Dialect::OpenAi);
    last.status = StatusCode::TOO_MANY_REQUESTS;
    let wait = RequestedWait::new(
        Duration::from_secs(900),
        WaitSource::RetryAfter,
        Duration::from_secs(60),
    );
    let p = Provider::new();
    p.answer(
        "a",
        ai_error(AiError::RetriesExhausted {
            attempts: 1,
            last: last.clone(),
            wait,
        }),
    );
    let res = send(chain(), &p, chat("a")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(p.models_called(), ["a", "b"]);

    // The same without a long wait: the error comes back.
    let p = Provider::new();
    p.answer(
        "a",
        ai_error(AiError::RetriesExhausted {
            attempts: 3,
            last,
            wait: None,
        }),
    );
    let err = send(chain(), &p, chat("a")).await.unwrap_err();
    assert!(matches!(
        err.downcast_ref::<AiError>(),
        Some(AiError::RetriesExhausted { attempts: 3, .. })
    ));
    assert_eq!(p.models_called(), ["a"]);
}

#[tokio::test(start_paused = true)]
async fn refusals_from_below_move_on_at_once() {
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    for refusal in [
        AiError::CircuitOpen {
            key: "api.openai.com/a".into(),
            until,
        },
        AiError::CoolingDown {
            key: "api.openai.com/a".into(),
            until,
        },
    ] {
        let p = Provider::new();
        p.answer("a", ai_error(refusal));
        let start = tokio::time::Instant::now();
        let res = send(two_models().build().unwrap(), &p, chat("a"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "no time spent on the refused route"
        );
        assert_eq!(p.models_called(), ["a", "b"]);
    }
}

#[tokio::test]
async fn an_open_circuit_is_skipped_without_a_call() {
    let open = Arc::new(AtomicBool::new(true));
    let flag = open.clone();
    let chain = FallbackChain::builder()
        .route(Route::primary("a").skip_if(move |_| flag.load(Ordering::Relaxed)))
        .route(Route::model("b"))
        .build()
        .unwrap();
    let p = Provider::new();
    let res = send(chain.clone(), &p, chat("a")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(p.models_called(), ["b"], "no call reached the open route");
    assert_eq!(&*Served::get(&res).unwrap().route, "b");

    // Every route open: AllRoutesFailed names the skipped one.
    let p = Provider::new();
    p.answer("b", status(503, OVERLOADED));
    let err = send(chain.clone(), &p, chat("a")).await.unwrap_err();
    let Some(AiError::AllRoutesFailed { failures }) = err.downcast_ref::<AiError>() else {
        panic!("{err}")
    };
    assert_eq!(
        failures
            .iter()
            .map(|f| f.route.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(failures[0].message.contains("skipped"));
    assert_eq!(failures[1].classification.kind, Some(ErrorKind::Overloaded));
    assert_eq!(p.models_called(), ["b"]);

    // Closed again: the first route serves.
    open.store(false, Ordering::Relaxed);
    let p = Provider::new();
    let res = send(chain, &p, chat("a")).await.unwrap();
    assert_eq!(p.models_called(), ["a"]);
    assert!(Served::get(&res).is_none());
}

#[tokio::test]
async fn all_routes_failed_lists_each_route() {
    let p = Provider::new();
    p.answer("a", status(503, OVERLOADED))
        .answer("b", status(500, SERVER))
        .answer("c", status(429, QUOTA));
    let chain = two_models().route(Route::model("c")).build().unwrap();
    let err = send(chain, &p, chat("a")).await.unwrap_err();
    let Some(AiError::AllRoutesFailed { failures }) = err.downcast_ref::<AiError>() else {
        panic!("{err}")
    };
    let got: Vec<_> = failures
        .iter()
        .map(|f| {
            (
                f.route.as_str(),
                f.classification.kind,
                f.classification.status.as_u16(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("a", Some(ErrorKind::Overloaded), 503),
            ("b", Some(ErrorKind::ServerError), 500),
            ("c", Some(ErrorKind::QuotaExhausted), 429)
        ]
    );
    assert_eq!(failures[0].message, "The server is overloaded");
    assert!(failures[2].message.contains("exceeded your current quota"));
    assert_eq!(err.to_string(), "all 3 route(s) failed");

    // return_last: the last response comes back instead.
    let p = Provider::new();
    p.answer("a", status(503, OVERLOADED))
        .answer("b", status(500, SERVER));
    let res = send(
        two_models().return_last(true).build().unwrap(),
        &p,
        chat("a"),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 500);
    assert_eq!(body_of(res).await, SERVER.as_bytes());
}

#[tokio::test]
async fn a_degraded_answer_ends_the_chain_and_is_marked() {
    let p = Provider::new();
    p.answer("a", status(503, OVERLOADED))
        .answer("b", status(529, ""));
    let chain = two_models()
        .route(Route::degraded_static(
            "busy",
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"message":"The assistant is busy, try again in a minute."}"#,
        ))
        .served_header(HeaderName::from_static("x-ai-route"))
        .build()
        .unwrap();
    let res = send(chain, &p, chat("a")).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["x-ai-route"], "busy");
    assert_eq!(res.headers()["content-type"], "application/json");
    let served = Served::get(&res).unwrap().clone();
    assert!(served.degraded);
    assert_eq!(
        (&*served.route, served.index, served.model),
        ("busy", 2, None)
    );
    assert!(body_of(res)
        .await
        .starts_with(b"{\"message\":\"The assistant is busy"));

    // A user function sees the request.
    let p = Provider::new();
    p.answer("a", status(503, OVERLOADED));
    let chain = FallbackChain::builder()
        .route(Route::primary("a"))
        .route(Route::degraded("cache", |req: &Request<AiBody>| {
            let model = tower_ai_core::model_of(req).unwrap().into_owned();
            Response::new(ResBody::full(Bytes::from(format!(
                "cached answer for {model}"
            ))))
        }))
        .build()
        .unwrap();
    let res = send(chain, &p, chat("a")).await.unwrap();
    assert!(Served::get(&res).unwrap().degraded);
    assert_eq!(body_of(res).await, "cached answer for a");
}

#[tokio::test]
async fn the_first_route_is_not_marked_unless_asked() {
    let p = Provider::new();
    let header = HeaderName::from_static("x-ai-route");
    let plain = two_models().served_header(header.clone()).build().unwrap();
    let res = send(plain.clone(), &p, chat("a")).await.unwrap();
    assert!(Served::get(&res).is_none());
    assert!(res.headers().get(&header).is_none());
    // The chain still answers for an unmarked response: its first route.
    let first = plain.served(&res);
    assert_eq!(
        (&*first.route, first.index, first.degraded),
        ("a", 0, false)
    );
    let chain = two_models()
        .served_header(header.clone())
        .mark_primary(true)
        .build()
        .unwrap();
    let res = send(chain.clone(), &p, chat("gpt-4o")).await.unwrap();
    let served = Served::get(&res).unwrap();
    assert_eq!(
        (&*served.route, served.model.as_deref()),
        ("a", Some("gpt-4o"))
    );
    assert_eq!(res.headers()[&header], "a");
}

#[tokio::test]
async fn the_attempt_budget_caps_calls_across_the_chain() {
    let p = Provider::new();
    for m in ["a", "b", "c"] {
        p.answer(m, status(503, OVERLOADED));
    }
    let chain = two_models()
        .route(Route::model("c"))
        .max_attempts(Some(2))
        .build()
        .unwrap();
    let err = send(chain, &p, chat("a")).await.unwrap_err();
    assert_eq!(
        p.models_called(),
        ["a", "b"],
        "the third route is over budget"
    );
    let budgets: Vec<_> = p.seen().iter().map(|s| s.budget_remaining).collect();
    assert_eq!(
        budgets,
        [Some(1), Some(0)],
        "the budget rides in the request extensions"
    );
    assert!(
        matches!(err.downcast_ref::<AiError>(), Some(AiError::AllRoutesFailed { failures }) if failures.len() == 2)
    );

    // A spent budget still lets a degraded answer through (it makes no call).
    let chain = two_models()
        .route(Route::model("c"))
        .route(Route::degraded_static(
            "busy",
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
        ))
        .max_attempts(Some(1))
        .build()
        .unwrap();
    let p2 = Provider::new();
    p2.answer("a", status(503, OVERLOADED));
    let res = send(chain, &p2, chat("a")).await.unwrap();
    assert_eq!(p2.models_called(), ["a"]);
    assert!(Served::get(&res).unwrap().degraded);

    // Not shared: counted here only, nothing in the extensions.
    let p3 = Provider::new();
    p3.answer("a", status(503, OVERLOADED));
    let chain = two_models().share_budget(false).build().unwrap();
    send(chain, &p3, chat("a")).await.unwrap();
    assert!(p3.seen().iter().all(|s| s.budget_remaining.is_none()));
}

/// A stand-in for AiRetry that follows the AttemptBudget protocol: it retries a 5xx up to
/// 10 times, each retry drawn with `try_acquire_retry`.
fn retrying(inner: Svc) -> Svc {
    Svc::new(service_fn(move |req: Request<AiBody>| {
        let inner = inner.clone();
        async move {
            let budget = AttemptBudget::of(&req).cloned();
            let mut tries = 0;
            loop {
                let copy = tower_ai_core::try_clone_request(&req).unwrap();
                let res = inner.clone().oneshot(copy).await?;
                tries += 1;
                let again = res.status().is_server_error()
                    && tries < 10
                    && budget
                        .as_ref()
                        .is_some_and(AttemptBudget::try_acquire_retry);
                if !again {
                    return Ok::<_, BoxError>(res);
                }
            }
        }
    }))
}

#[tokio::test]
async fn retries_below_draw_from_the_budget_and_leave_the_later_routes_theirs() {
    let p = Provider::new();
    p.answer("a", status(503, OVERLOADED))
        .answer("b", status(503, OVERLOADED));
    let chain = two_models()
        .route(Route::model("c"))
        .max_attempts(Some(6))
        .build()
        .unwrap();
    let svc = ModelFallback::new(retrying(p.service()), chain);
    let res = svc.oneshot(chat("a")).await.unwrap();
    assert_eq!(res.status(), 200);
    // 6 calls: "a" may use 4 (2 kept for b and c), "b" 1 (1 kept for c), "c" the last.
    assert_eq!(p.models_called(), ["a", "a", "a", "a", "b", "c"]);
}

#[tokio::test]
async fn a_nested_chain_leaves_the_outer_chain_its_reserved_units() {
    // Outer: "a" then "c", 4 calls in all. Inner (below the outer, above the retries):
    // the model it is given, then "b".
    let p = Provider::new();
    p.answer("a", status(503, OVERLOADED))
        .answer("b", status(503, OVERLOADED));
    let inner_chain = FallbackChain::builder()
        .route(Route::primary("as sent"))
        .route(Route::model("b"))
        .max_attempts(Some(100))
        .build()
        .unwrap();
    let inner = Svc::new(ModelFallback::new(retrying(p.service()), inner_chain));
    let outer_chain = FallbackChain::builder()
        .route(Route::primary("a"))
        .route(Route::model("c"))
        .max_attempts(Some(4))
        .build()
        .unwrap();
    let res = ModelFallback::new(inner, outer_chain)
        .oneshot(chat("a"))
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        200,
        "the outer chain's last route got its unit"
    );
    // The outer chain pays for "a" (3 left, 1 kept for "c"). The inner chain's first call
    // rides on that unit; its retries keep 1 for "b" and 1 for "c": one retry of "a".
    // "b" takes a unit but leaves "c"'s; "c" takes the last one.
    assert_eq!(p.models_called(), ["a", "a", "b", "c"]);
    let budgets: Vec<_> = p.seen().iter().map(|s| s.budget_remaining).collect();
    assert_eq!(budgets, [Some(3), Some(2), Some(1), Some(0)]);
}

#[tokio::test]
async fn later_routes_get_the_callers_request_untouched() {
    let p = Provider::new();
    let other = Provider::new();
    other.answer("a", status(500, SERVER));
    p.answer("a", status(503, OVERLOADED));
    let chain = FallbackChain::builder()
        .route(Route::primary("a"))
        .route(Route::service("other", other.service()).rewrite(|req| {
            *req.uri_mut() = "https://other.example/v2/chat".parse().unwrap();
            req.headers_mut().insert("x-other", "1".parse().unwrap());
            req.headers_mut().remove("authorization");
            Ok(())
        }))
        .route(Route::model("b"))
        .build()
        .unwrap();
    let original = chat("a");
    let original_body =
        Bytes::copy_from_slice(tower_ai_core::ReplayBody::bytes(original.body()).unwrap());
    let res = send(chain, &p, original).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen_other = other.seen();
    assert_eq!(seen_other[0].path, "/v2/chat");
    assert!(seen_other[0].headers.get("authorization").is_none());
    let seen = p.seen();
    assert_eq!(seen.len(), 2);
    let last = &seen[1];
    assert_eq!(last.path, "/v1/chat/completions");
    assert!(last.headers.get("x-other").is_none());
    assert_eq!(last.headers["authorization"], "Bearer sk-test");
    // Byte comparison: only the model value differs.
    let expected = tower_ai_fallback::rewrite_model(&original_body, "b").unwrap();
    assert_eq!(last.body, expected);
    let span = tower_ai_core::top_level_value_span(&original_body, b"model").unwrap();
    assert_eq!(&last.body[..span.start], &original_body[..span.start]);
    assert_eq!(&last.body[span.start + 3..], &original_body[span.end..]);
    assert_eq!(
        seen[0].body, original_body,
        "the first route got the body as sent"
    );
}

#[tokio::test]
async fn a_model_rewrite_updates_the_request_meta_in_place() {
    let p = Provider::new();
    p.answer("a", status(503, OVERLOADED));
    let metas = Arc::new(std::sync::Mutex::new(Vec::new()));
    let inner = p.service();
    let seen = metas.clone();
    let svc = Svc::new(service_fn(move |req: Request<AiBody>| {
        let meta = req.extensions().get::<RequestMeta>();
        seen.lock()
            .unwrap()
            .push(meta.map(|m| (m.model.clone(), m.stream)));
        inner.clone().oneshot(req)
    }));
    let mut req = chat("a");
    let meta = RequestMeta::of(&req).into_owned();
    let stream = meta.stream;
    req.extensions_mut().insert(meta);
    let res = ModelFallback::new(svc, two_models().build().unwrap())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(p.models_called(), ["a", "b"]);
    let metas = metas.lock().unwrap();
    assert_eq!(
        *metas,
        [
            Some((Some("a".into()), stream)),
            Some((Some("b".into()), stream))
        ],
        "the later route's request keeps its parsed meta, with the new model"
    );
}

#[tokio::test]
async fn a_failing_rewrite_moves_on() {
    let p = Provider::new();
    p.answer("a", status(503, OVERLOADED));
    let chain = FallbackChain::builder()
        .route(Route::primary("a"))
        .route(Route::service("broken", p.service()).rewrite(|_| Err("no such dialect".into())))
        .route(Route::model("b"))
        .build()
        .unwrap();
    let res = send(chain, &p, chat("a")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(p.models_called(), ["a", "b"]);
}

#[tokio::test]
async fn a_body_without_a_model_cannot_take_a_model_route() {
    let p = Provider::new();
    p.answer("", status(503, OVERLOADED));
    let req = Request::post(OPENAI_URL)
        .body(AiBody::from(r#"{"messages":[]}"#))
        .unwrap();
    let err = send(two_models().build().unwrap(), &p, req)
        .await
        .unwrap_err();
    let Some(AiError::AllRoutesFailed { failures }) = err.downcast_ref::<AiError>() else {
        panic!("{err}")
    };
    assert!(
        failures[1].message.contains("no top-level \"model\""),
        "{}",
        failures[1].message
    );
    assert_eq!(p.seen().len(), 1);
}

#[tokio::test]
async fn a_body_that_cannot_be_replayed_is_sent_once() {
    let p = Provider::new();
    p.answer("", status(503, OVERLOADED));
    let body = AiBody::streaming(http_body_util::Full::new(Bytes::from_static(
        br#"{"model":"a"}"#,
    )));
    let req = Request::post(OPENAI_URL).body(body).unwrap();
    let res = send(two_models().build().unwrap(), &p, req).await.unwrap();
    assert_eq!(
        res.status(),
        503,
        "returned as is: no copy to send elsewhere"
    );
    assert_eq!(p.seen().len(), 1);
}

#[tokio::test]
async fn the_skip_predicate_sees_the_request_as_the_route_would_send_it() {
    let p = Provider::new();
    p.answer("a", status(503, OVERLOADED));
    let chain =
        FallbackChain::builder()
            .route(Route::primary("a"))
            .route(Route::model("b").skip_if(|req: &Request<AiBody>| {
                tower_ai_core::model_of(req).as_deref() == Some("b")
            }))
            .route(Route::model("c"))
            .max_attempts(Some(2))
            .build()
            .unwrap();
    let res = send(chain, &p, chat("a")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        p.models_called(),
        ["a", "c"],
        "b skipped, and its skip cost no attempt"
    );
    assert_eq!(&*Served::get(&res).unwrap().route, "c");
}
