//! RetryAfterAware on a paused clock against `tower_test::mock` and the simulator.

use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_ai_core::keys::ApiKeyHash;
use tower_ai_core::{AiError, BoxError};
use tower_ai_retry_after::{CooldownConfig, RetryAfterAwareLayer};
use tower_test::mock;

mod support;
use support::{request, resp, stack};

fn gate(spread_ms: u64) -> RetryAfterAwareLayer {
    RetryAfterAwareLayer::builder()
        .release_spread(Duration::from_millis(spread_ms))
        .seed(1)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn no_request_leaves_before_the_cooldown_ends() {
    let layer = gate(0);
    let (svc, mut handle) = stack(&layer);
    let first = tokio::spawn(svc.clone().oneshot(request("gpt-4o")));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(resp(429, &[("retry-after", "5")]));
    assert_eq!(first.await.unwrap().unwrap().status(), 429);
    let learned_at = Instant::now();

    tokio::time::advance(Duration::from_secs(1)).await;
    let mut svc2 = svc.clone();
    std::future::poll_fn(|cx| svc2.poll_ready(cx))
        .await
        .unwrap();
    let mut waiting = tokio_test::task::spawn(svc2.call(request("gpt-4o")));
    tokio_test::assert_pending!(waiting.poll());
    // Other keys pass untouched, and the service stays ready while one request waits.
    let other = tokio::spawn(svc.clone().oneshot(request("gpt-4o-mini")));
    let (req, send) = handle.next_request().await.unwrap();
    assert!(req.body().contains("gpt-4o-mini"));
    send.send_response(resp(200, &[]));
    other.await.unwrap().unwrap();

    tokio::time::advance(Duration::from_millis(3_999)).await;
    tokio_test::assert_pending!(waiting.poll());
    assert!(
        handle.poll_request().is_pending(),
        "left before the cooldown ended"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    tokio_test::assert_pending!(waiting.poll());
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(learned_at.elapsed(), Duration::from_secs(5));
    assert!(req.body().contains(r#""gpt-4o""#));
    send.send_response(resp(200, &[]));
    assert_eq!(tokio_test::assert_ready_ok!(waiting.poll()).status(), 200);
}

#[tokio::test(start_paused = true)]
async fn fail_fast_and_max_wait_refuse_with_cooling_down() {
    let layer = RetryAfterAwareLayer::builder().fail_fast().build().unwrap();
    let (svc, mut handle) = stack(&layer);
    let t = tokio::spawn(svc.clone().oneshot(request("gpt-4o")));
    let (_, send) = handle.next_request().await.unwrap();
    let start = Instant::now();
    send.send_response(resp(503, &[("retry-after", "30")]));
    t.await.unwrap().unwrap();
    let err: BoxError = svc.clone().oneshot(request("gpt-4o")).await.unwrap_err();
    match err.downcast_ref::<AiError>() {
        Some(AiError::CoolingDown { key, until }) => {
            assert_eq!(key, "api.openai.com/gpt-4o");
            assert_eq!(*until, start + Duration::from_secs(30));
        }
        other => panic!("{other:?}"),
    }

    // Waiting mode refuses a wait over max_wait, at once.
    let layer = RetryAfterAwareLayer::builder()
        .wait(Duration::from_secs(10))
        .build()
        .unwrap();
    let (svc, mut handle) = stack(&layer);
    let t = tokio::spawn(svc.clone().oneshot(request("gpt-4o")));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(resp(529, &[("retry-after", "11")]));
    t.await.unwrap().unwrap();
    let before = Instant::now();
    let err = svc.clone().oneshot(request("gpt-4o")).await.unwrap_err();
    assert!(matches!(
        err.downcast_ref::<AiError>(),
        Some(AiError::CoolingDown { .. })
    ));
    assert_eq!(before.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn learns_from_exhausted_rate_limit_headers_on_a_success() {
    let layer = gate(0);
    let (svc, mut handle) = stack(&layer);
    let sent = Instant::now();
    let t = tokio::spawn(svc.clone().oneshot(request("gpt-4o")));
    let (_, send) = handle.next_request().await.unwrap();
    tokio::time::advance(Duration::from_millis(300)).await; // the answer takes 300 ms
    send.send_response(resp(
        200,
        &[
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "6.5s"),
        ],
    ));
    assert_eq!(t.await.unwrap().unwrap().status(), 200);
    let waiting = tokio::spawn(svc.clone().oneshot(request("gpt-4o")));
    // The reset is measured from the send: 6.5 s after it, not after the answer.
    tokio::time::sleep_until(sent + Duration::from_millis(6_499)).await;
    assert!(handle.poll_request().is_pending());
    let (_, send) = handle.next_request().await.unwrap();
    assert_eq!(sent.elapsed(), Duration::from_millis(6_500));
    send.send_response(resp(200, &[]));
    waiting.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn waiters_are_released_spread_out_not_as_a_herd() {
    let layer = gate(400);
    let (svc, mut handle) = stack(&layer);
    let t = tokio::spawn(svc.clone().oneshot(request("gpt-4o")));
    let (_, send) = handle.next_request().await.unwrap();
    let start = Instant::now();
    send.send_response(resp(429, &[("retry-after", "2")]));
    t.await.unwrap().unwrap();
    let waiters: Vec<_> = (0..20)
        .map(|_| tokio::spawn(svc.clone().oneshot(request("gpt-4o"))))
        .collect();
    let mut at = Vec::new();
    for _ in 0..20 {
        let (_, send) = handle.next_request().await.unwrap();
        at.push(start.elapsed());
        send.send_response(resp(200, &[]));
    }
    for w in waiters {
        w.await.unwrap().unwrap();
    }
    assert!(
        at.iter()
            .all(|t| *t >= Duration::from_secs(2) && *t <= Duration::from_millis(2_400)),
        "{at:?}"
    );
    let distinct: std::collections::BTreeSet<_> = at.iter().collect();
    assert!(distinct.len() >= 15, "released together: {at:?}");
}

#[tokio::test(start_paused = true)]
async fn hostile_retry_after_is_capped_and_quota_429_teaches_nothing() {
    let layer = RetryAfterAwareLayer::builder()
        .max_cooldown(Duration::from_secs(20))
        .wait(Duration::from_secs(60))
        .release_spread(Duration::ZERO)
        .build()
        .unwrap();
    let (svc, mut handle) = stack(&layer);
    for value in ["99999999999", "-3", "NaN", "Tue, 99 Zzz"] {
        let t = tokio::spawn(svc.clone().oneshot(request("m")));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(resp(429, &[("retry-after", value)]));
        t.await.unwrap().unwrap();
        let start = Instant::now();
        let t = tokio::spawn(svc.clone().oneshot(request("m")));
        let (_, send) = handle.next_request().await.unwrap();
        assert!(
            start.elapsed() <= Duration::from_secs(20),
            "{value}: held {:?}",
            start.elapsed()
        );
        send.send_response(resp(200, &[]));
        t.await.unwrap().unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
    }
    // A 429 without a wait (a quota error) starts no cooldown.
    let t = tokio::spawn(svc.clone().oneshot(request("q")));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(resp(429, &[]));
    t.await.unwrap().unwrap();
    let start = Instant::now();
    let t = tokio::spawn(svc.clone().oneshot(request("q")));
    let (_, send) = handle.next_request().await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    send.send_response(resp(200, &[]));
    t.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn api_key_keys_are_hashed_and_separate() {
    let layer = RetryAfterAwareLayer::with_config(
        CooldownConfig::builder()
            .fail_fast()
            .build_config()
            .unwrap(),
    )
    .key_fn(ApiKeyHash);
    let (svc, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let svc = ServiceBuilder::new().layer(layer.clone()).service(svc);
    let with_key = |k: &str| {
        let mut r = request("gpt-4o");
        r.headers_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
        r
    };
    let t = tokio::spawn(svc.clone().oneshot(with_key("sk-secret-a")));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(resp(429, &[("retry-after", "9")]));
    t.await.unwrap().unwrap();
    let err = svc
        .clone()
        .oneshot(with_key("sk-secret-a"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("api-key#") && !msg.contains("sk-secret"),
        "{msg}"
    );
    let t = tokio::spawn(svc.clone().oneshot(with_key("sk-secret-b")));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(resp(200, &[]));
    t.await.unwrap().unwrap();
    assert_eq!(layer.tracked_keys(), 1);
}

#[test]
fn the_builder_rejects_zero_and_absurd_values() {
    let err = |b: tower_ai_retry_after::CooldownConfigBuilder| b.build().unwrap_err().to_string();
    assert!(err(CooldownConfig::builder().wait(Duration::ZERO)).starts_with("invalid max_wait"));
    assert!(err(CooldownConfig::builder().max_cooldown(Duration::ZERO))
        .starts_with("invalid max_cooldown"));
    assert!(
        err(CooldownConfig::builder().release_spread(Duration::from_secs(3600)))
            .starts_with("invalid release_spread")
    );
    assert!(err(CooldownConfig::builder().max_keys(0)).starts_with("invalid max_keys"));
    assert!(err(CooldownConfig::builder().recheck(Duration::ZERO)).starts_with("invalid recheck"));
    assert!(err(CooldownConfig::builder().idle(Duration::ZERO)).starts_with("invalid idle"));
    assert!(CooldownConfig::builder().build().is_ok());
}

/// Against the simulator: a burst larger than the window's limit. With the gate, the
/// provider sees at most its limit per window, and nobody finds the 429 twice.
#[tokio::test(start_paused = true)]
async fn simulator_burst_is_paced_to_the_provider_limit() {
    use tower_ai_core::{AiBody, ClassifyLayer};
    use tower_ai_sim::{Latency, ModelSpec, Scenario, Simulator};
    let sim = Simulator::new(
        Scenario::builder()
            .seed(2)
            .model(ModelSpec::new("claude-sonnet"))
            .rpm_limit(20)
            .latency(Latency::fixed(Duration::from_millis(500)))
            .build()
            .unwrap(),
    );
    let gate = RetryAfterAwareLayer::builder()
        .wait(Duration::from_secs(120))
        .pace_below(30)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(gate)
        .layer(ClassifyLayer::new())
        .service(sim.service());
    let body =
        r#"{"model":"claude-sonnet","max_tokens":50,"messages":[{"role":"user","content":"Hi"}]}"#;
    // 5 at once (learn the headers), then 55 more spread over 5 s.
    let mut tasks = Vec::new();
    for i in 0..60 {
        let req = Request::post("https://api.anthropic.com/v1/messages")
            .body(AiBody::from(body))
            .unwrap();
        tasks.push(tokio::spawn(svc.clone().oneshot(req)));
        if i >= 5 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap().unwrap().status() == 200 {
            ok += 1;
        }
    }
    let stats = sim.stats();
    println!(
        "burst: {ok} ok, {} upstream, {} answered 429",
        stats.total,
        stats.count(429)
    );
    assert_eq!(ok, 60);
    // In-flight requests before the first answer can't be known: a few 429s at most.
    assert!(stats.count(429) <= 5, "{stats:?}");
    // No window got more than its 20.
    let calls = sim.calls();
    for w in 0..4u64 {
        let n = calls
            .iter()
            .filter(|c| c.status == 200 && c.at.as_secs() / 60 == w)
            .count();
        assert!(n <= 20);
    }
}

#[tokio::test(start_paused = true)]
async fn a_cooling_route_is_refused_at_once_when_a_fallback_route_can_serve() {
    // Waiting mode, but the request carries ModelFallback's attempt budget with a unit
    // reserved for a later route: the chain should move on, not wait here.
    let layer = gate(0);
    let (svc, mut handle) = stack(&layer);
    let t = tokio::spawn(svc.clone().oneshot(request("gpt-4o")));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(resp(429, &[("retry-after", "5")]));
    t.await.unwrap().unwrap();

    let budget = tower_ai_core::AttemptBudget::new(3);
    assert!(budget.try_acquire());
    budget.set_reserved(1);
    let mut req = request("gpt-4o");
    req.extensions_mut().insert(budget);
    let before = Instant::now();
    let err = svc.clone().oneshot(req).await.unwrap_err();
    assert!(matches!(
        err.downcast_ref::<AiError>(),
        Some(AiError::CoolingDown { .. })
    ));
    assert_eq!(before.elapsed(), Duration::ZERO);

    // The same request without a fallback behind it waits for the cooldown.
    let waiting = tokio::spawn(svc.clone().oneshot(request("gpt-4o")));
    let (_, send) = handle.next_request().await.unwrap();
    assert_eq!(before.elapsed(), Duration::from_secs(5));
    send.send_response(resp(200, &[]));
    assert_eq!(waiting.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn learns_from_any_status_classified_as_overloaded() {
    // A provider that signals overload with a 500 (Classify reads the body and says
    // Overloaded, with the wait from its headers): a cooldown is learned.
    use tower_ai_core::{Classification, ErrorKind, Provider, RequestedWait, WaitSource};
    let layer = gate(0);
    let (svc, mut handle) = stack(&layer);
    let t = tokio::spawn(svc.clone().oneshot(request("gpt-4o")));
    let (_, send) = handle.next_request().await.unwrap();
    let mut r = resp(500, &[("retry-after", "4")]);
    let mut c = Classification::failure(ErrorKind::Overloaded, Provider::Generic);
    c.status = http::StatusCode::INTERNAL_SERVER_ERROR;
    c.wait = RequestedWait::new(
        Duration::from_secs(4),
        WaitSource::RetryAfter,
        Duration::from_secs(120),
    );
    r.extensions_mut().insert(c);
    send.send_response(r);
    assert_eq!(t.await.unwrap().unwrap().status(), 500);
    let learned_at = Instant::now();
    let waiting = tokio::spawn(svc.clone().oneshot(request("gpt-4o")));
    tokio::time::sleep(Duration::from_millis(3_999)).await;
    assert!(handle.poll_request().is_pending(), "ignored the overload");
    let (_, send) = handle.next_request().await.unwrap();
    assert_eq!(learned_at.elapsed(), Duration::from_secs(4));
    send.send_response(resp(200, &[]));
    waiting.await.unwrap().unwrap();
}

/// Issue #16: in a proxy forwarding each tenant's own API key, one tenant's 429 cooled
/// the model down for every tenant. The composite key keeps cooldowns per tenant; the
/// default still shares them (one provider account).
#[tokio::test(start_paused = true)]
async fn the_composite_key_cools_down_only_the_tenant_that_was_told_to_wait() {
    use tower_ai_core::keys::ApiKeyHostModel;
    let tenant = |key: &str| {
        let mut r = request("gpt-4o");
        r.headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        r
    };
    for per_tenant in [false, true] {
        let base = RetryAfterAwareLayer::builder().fail_fast().build().unwrap();
        let (svc, mut handle) = mock::pair::<Request<String>, Response<String>>();
        // `key_fn` makes a new state: build the per-tenant layer once.
        let layer_pt = base.key_fn(ApiKeyHostModel);
        let run = |req: Request<String>| {
            let svc = svc.clone();
            let (a, b) = (base.clone(), layer_pt.clone());
            async move {
                if per_tenant {
                    ServiceBuilder::new()
                        .layer(b)
                        .service(svc)
                        .oneshot(req)
                        .await
                } else {
                    ServiceBuilder::new()
                        .layer(a)
                        .service(svc)
                        .oneshot(req)
                        .await
                }
            }
        };
        let a = tokio::spawn(run(tenant("sk-a")));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(resp(429, &[("retry-after", "30")]));
        assert_eq!(a.await.unwrap().unwrap().status(), 429);
        // Tenant b, same model, one second later.
        tokio::time::advance(Duration::from_secs(1)).await;
        let b = tokio::spawn(run(tenant("sk-b")));
        if per_tenant {
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(resp(200, &[]));
            assert_eq!(b.await.unwrap().unwrap().status(), 200);
        } else {
            let err = b.await.unwrap().unwrap_err();
            assert!(
                matches!(
                    err.downcast_ref::<AiError>(),
                    Some(AiError::CoolingDown { .. })
                ),
                "{err}"
            );
        }
    }
}
