//! TokenBudget against careless and hostile callers (issue #16): key churn cannot reset a
//! window, waiters are bounded and hold no inner readiness, Azure spend is priced by the
//! deployment, a one-frame JSON answer is bounded.

mod support;

use std::time::Duration;

use http::{Request, Response};
use support::*;
use tokio::time::advance;
use tokio_test::{assert_pending, assert_ready, task};
use tower::{Layer, Service};
use tower_ai_budget::{PriceTable, TokenBudgetLayer};
use tower_ai_core::keys::Key;
use tower_ai_core::BudgetLimit;

fn ok_provider() -> Provider {
    Provider::new(|_| Ok(no_usage()))
}

fn tenant_key(req: &Request<String>) -> Option<Key> {
    let t = req.headers().get("x-tenant")?;
    Some(Key::of(t.as_bytes()))
}

fn as_tenant(mut req: Request<String>, t: &str) -> Request<String> {
    req.headers_mut().insert("x-tenant", t.parse().unwrap());
    req
}

fn tenant(t: &str) -> Request<String> {
    as_tenant(chat(10, Some(1)), t)
}

/// The reproduction of #16 point 1: a caller refused for its RPM sends 32 requests under
/// junk keys (`max_keys(16)`), and must still be refused a second later.
#[tokio::test(start_paused = true)]
async fn key_churn_never_resets_an_exhausted_request_window() {
    let layer = TokenBudgetLayer::builder()
        .key_fn(tenant_key)
        .requests_per_minute(1)
        .max_keys(16)
        .reject()
        .build()
        .unwrap();
    let svc = layer.layer(ok_provider());
    send(&svc, tenant("victim")).await.unwrap();
    assert!(send(&svc, tenant("victim")).await.is_err());
    for i in 0..32 {
        let _ = send(&svc, tenant(&format!("junk-{i}"))).await;
    }
    advance(Duration::from_secs(1)).await;
    let err = send(&svc, tenant("victim"))
        .await
        .expect_err("an exhausted window survives key churn");
    assert_eq!(exceeded(&err).0, BudgetLimit::RequestsPerMinute);
    assert!(layer.key_count() <= 17, "{} keys", layer.key_count());
}

/// The same against a day's spend cap, where a reset is worth the most.
#[tokio::test(start_paused = true)]
async fn key_churn_never_resets_a_spend_cap() {
    let layer = TokenBudgetLayer::builder()
        .key_fn(tenant_key)
        .spend_per_day(1.0)
        // 0.01 per input token, nothing per output token.
        .prices(PriceTable::new().model("gpt-4o", 10_000.0, 0.0))
        .max_keys(16)
        .reject()
        .build()
        .unwrap();
    let svc = layer.layer(Provider::new(|_| Ok(json_usage(100, 0))));
    drain(
        send(&svc, as_tenant(chat(100, Some(1)), "victim"))
            .await
            .unwrap(),
    )
    .await;
    let (limit, _) = exceeded(
        &send(&svc, as_tenant(chat(10, Some(1)), "victim"))
            .await
            .unwrap_err(),
    );
    assert_eq!(limit, BudgetLimit::SpendPerDay);
    for round in 0..4 {
        for i in 0..32 {
            let _ = send(
                &svc,
                as_tenant(chat(2, Some(1)), &format!("junk-{round}-{i}")),
            )
            .await;
        }
        advance(Duration::from_secs(3600)).await;
        let err = send(&svc, as_tenant(chat(10, Some(1)), "victim"))
            .await
            .expect_err("a spent day survives key churn");
        assert_eq!(exceeded(&err).0, BudgetLimit::SpendPerDay);
    }
}

/// When every key held has something to lose, a new key shares the overflow key: admitted
/// within the overflow key's own limits, counted, and the map stays bounded. Once the
/// windows have passed, keys are evicted and new keys get their own state again.
#[tokio::test(start_paused = true)]
async fn a_full_map_sends_new_keys_to_the_overflow_key() {
    let layer = TokenBudgetLayer::builder()
        .key_fn(tenant_key)
        .requests_per_minute(1)
        .max_keys(4)
        .reject()
        .build()
        .unwrap();
    let svc = layer.layer(ok_provider());
    for i in 0..4 {
        send(&svc, tenant(&format!("k{i}"))).await.unwrap();
    }
    // The map is full of keys whose minute windows hold a request: k4 shares the
    // overflow key (its first request fits), k5 finds it spent.
    send(&svc, tenant("k4")).await.unwrap();
    let (limit, _) = exceeded(&send(&svc, tenant("k5")).await.unwrap_err());
    assert_eq!(limit, BudgetLimit::RequestsPerMinute);
    for i in 0..4 {
        assert!(
            send(&svc, tenant(&format!("k{i}"))).await.is_err(),
            "k{i} kept its window"
        );
    }
    assert!(layer.key_count() <= 5, "{}", layer.key_count());
    let stats = layer.stats();
    assert_eq!(stats.overflowed, 2);
    assert_eq!(stats.keys, layer.key_count());
    assert_eq!(
        layer
            .snapshot(layer.overflow_key())
            .and_then(|s| s.requests),
        Some(1)
    );
    // The windows pass: the old keys go, new keys get their own state.
    advance(Duration::from_secs(61)).await;
    for i in 10..14 {
        send(&svc, tenant(&format!("k{i}"))).await.unwrap();
        assert!(layer
            .snapshot(Key::of(format!("k{i}").as_bytes()))
            .is_some());
    }
    assert_eq!(layer.stats().overflowed, 2);
}

/// Point 8: once the map is full of busy keys, new keys go to the overflow key and the map
/// stays at its bound, however many come. (What a new key costs with 200 and with 20,000
/// busy keys is measured in `benches/overhead.rs`, `new_key_cost`: real time belongs in a
/// benchmark, not in a test.)
#[tokio::test(start_paused = true)]
async fn a_map_full_of_busy_keys_stays_bounded_under_new_keys() {
    let max_keys = 2_000;
    let layer = TokenBudgetLayer::builder()
        .key_fn(tenant_key)
        .max_concurrent(1)
        .max_keys(max_keys)
        .reject()
        .build()
        .unwrap();
    let svc = layer.layer(ok_provider());
    let mut held = Vec::with_capacity(max_keys);
    for i in 0..max_keys {
        held.push(send(&svc, tenant(&format!("busy-{i}"))).await.unwrap());
    }
    for i in 0..2_000 {
        let _ = send(&svc, tenant(&format!("new-{i}"))).await;
    }
    assert!(layer.key_count() <= max_keys + 1, "{}", layer.key_count());
    assert!(
        layer.stats().overflowed > 0,
        "new keys shared the overflow key"
    );
    drop(held);
}

/// Point 3: a flood of waiters on one key is cut at the per-key cap (default 256): the
/// request past it is refused at once, and a cancelled waiter frees its place.
#[tokio::test(start_paused = true)]
async fn waiters_per_key_are_capped_and_cancelled_ones_free_their_place() {
    // A day's wait: the 256th waiter's turn (256 minutes away) comes within it, so none
    // is refused for its predicted wait.
    let layer = TokenBudgetLayer::builder()
        .requests_per_minute(1)
        .wait(Duration::from_secs(24 * 3600))
        .build()
        .unwrap();
    let svc = layer.layer(ok_provider());
    send(&svc, chat(10, None)).await.unwrap();
    let mut waiters: Vec<_> = (0..256)
        .map(|_| task::spawn(send(&svc, chat(10, None))))
        .collect();
    for w in &mut waiters {
        assert_pending!(w.poll());
    }
    assert_eq!(snapshot(&layer).waiting, 256);
    let mut over = task::spawn(send(&svc, chat(10, None)));
    let err = assert_ready!(over.poll()).expect_err("past the cap: refused at once");
    assert_eq!(exceeded(&err).0, BudgetLimit::RequestsPerMinute);
    // A cancelled waiter frees its place.
    drop(waiters.pop());
    let mut next = task::spawn(send(&svc, chat(10, None)));
    assert_pending!(next.poll());
    assert_eq!(snapshot(&layer).waiting, 256);
    assert_eq!(layer.stats().waiters, 256);
}

/// Point 3: both caps configured; the total cap holds across keys.
#[tokio::test(start_paused = true)]
async fn waiters_in_all_are_capped() {
    let layer = TokenBudgetLayer::builder()
        .key_fn(tenant_key)
        .requests_per_minute(1)
        .wait(Duration::from_secs(300))
        .max_waiters_per_key(2)
        .max_waiters(5)
        .build()
        .unwrap();
    let svc = layer.layer(ok_provider());
    for k in ["a", "b", "c"] {
        send(&svc, tenant(k)).await.unwrap();
    }
    let mut waiting = Vec::new();
    for k in ["a", "a", "b", "b", "c"] {
        let mut w = task::spawn(send(&svc, tenant(k)));
        assert_pending!(w.poll());
        waiting.push(w);
    }
    // "a" is at its own cap; "c" has room of its own but the total is reached.
    for k in ["a", "c"] {
        let mut w = task::spawn(send(&svc, tenant(k)));
        let err = assert_ready!(w.poll()).expect_err("refused at once");
        assert_eq!(exceeded(&err).0, BudgetLimit::RequestsPerMinute);
    }
    assert_eq!(layer.stats().waiters, 5);
    // A waiter that times out frees its place too.
    drop(waiting.remove(0));
    let mut c2 = task::spawn(send(&svc, tenant("c")));
    assert_pending!(c2.poll());
    assert_eq!(layer.stats().waiters, 5);
    advance(Duration::from_secs(61)).await;
    // The window passed: each key's head is admitted and its queue drains in order.
    let mut admitted = 0;
    for w in waiting.iter_mut().chain(std::iter::once(&mut c2)) {
        if w.is_woken() {
            if let std::task::Poll::Ready(r) = w.poll() {
                admitted += usize::from(r.is_ok());
            }
        }
    }
    assert_eq!(admitted, 3, "one per key");
}

/// Point 3: a waiting request holds no readiness of the inner service (a
/// `ConcurrencyLimit` slot here): another key's request can get ready and be sent.
#[tokio::test(start_paused = true)]
async fn a_waiter_holds_no_ready_inner_service() {
    let layer = TokenBudgetLayer::builder()
        .key_fn(tenant_key)
        .requests_per_minute(1)
        .wait(Duration::from_secs(120))
        .build()
        .unwrap();
    let p = ok_provider();
    let svc = layer.layer(tower::limit::ConcurrencyLimit::new(p.clone(), 1));
    send(&svc, tenant("a")).await.unwrap();
    let mut waiter = task::spawn(send(&svc, tenant("a")));
    assert_pending!(waiter.poll());
    // The only slot below is free: "b" gets ready and is sent.
    let mut b = svc.clone();
    let mut ready = task::spawn(std::future::poll_fn(|cx| {
        tower::Service::<Request<String>>::poll_ready(&mut b, cx)
    }));
    assert_ready!(ready.poll()).unwrap();
    drop(ready);
    b.call(tenant("b")).await.unwrap();
    assert_eq!(p.calls(), 2);
    // The waiter gets readiness itself once admitted.
    advance(Duration::from_secs(61)).await;
    assert!(waiter.is_woken());
    assert_ready!(waiter.poll()).unwrap();
    assert_eq!(p.calls(), 3);
}

fn azure(deployment: &str, body_model: &str, input: u64) -> Request<String> {
    let mut r = chat_for(body_model, input, Some(1));
    *r.uri_mut() = format!(
        "https://res.openai.azure.com/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21"
    )
    .parse()
    .unwrap();
    r
}

/// Point 6: an Azure request is priced by its deployment, not by the body's `model`.
#[tokio::test(start_paused = true)]
async fn azure_is_priced_by_the_deployment() {
    let layer = TokenBudgetLayer::builder()
        .spend_per_day(1.0)
        .prices(
            PriceTable::new()
                // 0.01 per input token.
                .model("gpt-4o", 10_000.0, 0.0)
                .model("gpt-4o-mini", 1.0, 0.0)
                .deployment("prod-4o", 10_000.0, 0.0),
        )
        .reject()
        .build()
        .unwrap();
    let svc = layer.layer(ok_provider());
    // An expensive deployment with a cheap model in the body: priced as the deployment
    // (100 × 0.01 = 1.00, the whole cap).
    send(&svc, azure("prod-4o", "gpt-4o-mini", 100))
        .await
        .unwrap();
    assert_eq!(snapshot(&layer).spend_day, Some(1_000_000_000));
    let (limit, _) = exceeded(
        &send(&svc, azure("prod-4o", "gpt-4o-mini", 2))
            .await
            .unwrap_err(),
    );
    assert_eq!(limit, BudgetLimit::SpendPerDay);
}

/// Point 6: an unmapped deployment is priced by its name in the model table (operators
/// often name deployments after models), else by the `UnknownModel` policy; never by the
/// body.
#[tokio::test(start_paused = true)]
async fn an_unmapped_deployment_is_never_priced_by_the_body() {
    let layer = TokenBudgetLayer::builder()
        .spend_per_day(1.0)
        .prices(
            PriceTable::new()
                .model("gpt-4o", 10_000.0, 0.0)
                .model("gpt-4o-mini", 1.0, 0.0),
        )
        .reject()
        .build()
        .unwrap();
    let svc = layer.layer(ok_provider());
    // Named after a listed model: priced as it (50 × 0.01 = 0.50).
    send(&svc, azure("gpt-4o", "gpt-4o-mini", 50))
        .await
        .unwrap();
    assert_eq!(snapshot(&layer).spend_day, Some(500_000_000));
    // Unlisted: the UnknownModel policy (reject), whatever the body says.
    let (limit, retry) = exceeded(
        &send(&svc, azure("secret-gpt5", "gpt-4o-mini", 2))
            .await
            .unwrap_err(),
    );
    assert_eq!((limit, retry), (BudgetLimit::SpendPerDay, None));
}

/// Point 8: a JSON answer in one frame larger than `max_usage_body` is not parsed (its
/// reservation is kept, as for a larger answer in several frames).
#[tokio::test(start_paused = true)]
async fn a_one_frame_json_answer_is_bounded_too() {
    let layer = TokenBudgetLayer::builder()
        .tokens_per_minute(10_000)
        .max_usage_body(64)
        .reject()
        .build()
        .unwrap();
    let big = format!(
        r#"{{"pad":"{}","usage":{{"prompt_tokens":1,"completion_tokens":1}}}}"#,
        "x".repeat(100)
    );
    let svc = layer.layer(Provider::new(move |_| {
        Ok(Response::builder()
            .header("content-type", "application/json")
            .body(Chunks::of(&[&big]))
            .unwrap())
    }));
    drain(send(&svc, chat(100, Some(500))).await.unwrap()).await;
    assert_eq!(
        snapshot(&layer).tokens,
        Some(600),
        "over the bound: not read, the reservation stands"
    );
}
