//! TokenBudget refuses at once, with `BudgetExceeded { retry_after }`, a request that
//! cannot fit before its `Deadline`, and a waiter gives up at it. Paused clock.

mod support;

use std::time::Duration;

use support::*;
use tokio::time::{advance, Instant};
use tokio_test::{assert_pending, assert_ready, task};
use tower::Layer;
use tower_ai_budget::TokenBudgetLayer;
use tower_ai_core::{BudgetLimit, Deadline};

const S: Duration = Duration::from_secs(1);

fn ok_provider() -> Provider {
    Provider::new(|_| Ok(no_usage()))
}

fn tokens_with_deadline(max_tokens: u64, after: Duration) -> http::Request<String> {
    let mut req = chat(100, Some(max_tokens));
    Deadline::set(&mut req, Deadline::after(after));
    req
}

fn with_deadline(after: Duration) -> http::Request<String> {
    let mut req = chat(10, None);
    Deadline::set(&mut req, Deadline::after(after));
    req
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_fit_before_its_deadline_is_refused_at_once() {
    let layer = TokenBudgetLayer::builder()
        .requests_per_minute(1)
        .wait(300 * S)
        .build()
        .unwrap();
    let svc = layer.layer(ok_provider());
    send(&svc, chat(10, None)).await.unwrap();

    // The next slot is a minute away; 10 s left: refused now, saying when it would fit.
    let mut short = task::spawn(send(&svc, with_deadline(10 * S)));
    let err = assert_ready!(short.poll()).unwrap_err();
    let (limit, retry_after) = exceeded(&err);
    assert_eq!(limit, BudgetLimit::RequestsPerMinute);
    assert!(retry_after.unwrap() > 10 * S, "{retry_after:?}");

    // 120 s left: it waits for the slot and goes.
    let t0 = Instant::now();
    let mut long = task::spawn(send(&svc, with_deadline(120 * S)));
    assert_pending!(long.poll());
    advance(62 * S).await;
    assert_ready!(long.poll()).unwrap();
    assert!(t0.elapsed() <= 62 * S);
    drop(long);
}

/// Admission by predicted wait: a request behind a queue is refused at once when the
/// budget will not have room for it (and for everyone queued before it) until after its
/// deadline less the expected service time; those that can still be answered in time
/// wait and are served, each as its slot comes.
#[tokio::test(start_paused = true)]
async fn a_request_behind_a_queue_is_refused_at_once_when_its_turn_comes_too_late() {
    let layer = TokenBudgetLayer::builder()
        .requests_per_minute(2)
        .wait(300 * S)
        .expected_service(5 * S)
        .build()
        .unwrap();
    let provider = ok_provider();
    let svc = layer.layer(provider.clone());
    send(&svc, chat(10, None)).await.unwrap();
    send(&svc, chat(10, None)).await.unwrap();

    // With 64 s left, the slot at 61 s leaves less than the 5 s it takes to answer:
    // refused at once, its retry_after not before its deadline (a retry before it could
    // not be answered in time, so AiRetry, which never waits past a deadline, stops).
    let mut tight = task::spawn(send(&svc, with_deadline(64 * S)));
    let (_, retry_after) = exceeded(&assert_ready!(tight.poll()).unwrap_err());
    assert_eq!(retry_after, Some(64 * S));

    // The window is full until 61 s, when both of its slots come back: two requests with
    // 70 s left queue for them.
    let mut first = task::spawn(send(&svc, with_deadline(70 * S)));
    let mut second = task::spawn(send(&svc, with_deadline(70 * S)));
    assert_pending!(first.poll());
    assert_pending!(second.poll());

    // A third would go at 122 s, after its 70 s: refused now, not after waiting 65 s,
    // saying when the budget will have room for it.
    let mut third = task::spawn(send(&svc, with_deadline(70 * S)));
    let err = assert_ready!(third.poll()).unwrap_err();
    let (limit, retry_after) = exceeded(&err);
    assert_eq!(limit, BudgetLimit::RequestsPerMinute);
    assert_eq!(retry_after, Some(122 * S));

    // 130 s left: its turn at 122 s comes in time; it waits.
    let mut patient = task::spawn(send(&svc, with_deadline(130 * S)));
    assert_pending!(patient.poll());
    assert_eq!(snapshot(&layer).waiting, 3);

    // Every slot goes to a request that waits for it, as soon as it comes back.
    advance(61 * S).await;
    assert!(first.is_woken());
    assert_ready!(first.poll()).unwrap();
    assert_ready!(second.poll()).unwrap();
    assert_pending!(patient.poll());
    advance(61 * S).await;
    assert_ready!(patient.poll()).unwrap();
    assert_eq!(provider.calls(), 5);
}

/// The prediction counts what the queue will take of a tokens-per-minute window, not
/// only how many wait.
#[tokio::test(start_paused = true)]
async fn the_predicted_start_counts_the_tokens_of_those_queued_before() {
    let layer = TokenBudgetLayer::builder()
        .tokens_per_minute(1000)
        .wait(300 * S)
        .build()
        .unwrap();
    let svc = layer.layer(Provider::new(|_| Ok(json_usage(100, 800))));
    // 900 tokens used at 0 s.
    drain(send(&svc, chat(100, Some(800))).await.unwrap()).await;
    // 900 more: they fit when the first 900 leave, at 61 s.
    let mut big = task::spawn(send(&svc, tokens_with_deadline(800, 100 * S)));
    assert_pending!(big.poll());
    // Alone, 200 tokens would fit at 61 s too; behind `big` they fit only once its 900
    // leave the window: 122 s, after its 100 s.
    let mut small = task::spawn(send(&svc, tokens_with_deadline(100, 100 * S)));
    let (limit, retry_after) = exceeded(&assert_ready!(small.poll()).unwrap_err());
    assert_eq!(limit, BudgetLimit::TokensPerMinute);
    assert_eq!(retry_after, Some(122 * S));
    drop(big);
}

/// The budget key as a per-request override: with the key function wrapped in
/// `WithOverride`, a request's `BudgetKey` decides the budget it is counted under.
#[tokio::test(start_paused = true)]
async fn a_requests_budget_key_overrides_the_key_function() {
    use tower_ai_core::keys::{Global, Key};
    use tower_ai_core::overrides::{BudgetKey, WithOverride};
    let layer = TokenBudgetLayer::builder()
        .key_fn(WithOverride(Global))
        .requests_per_minute(1)
        .reject()
        .build()
        .unwrap();
    let svc = layer.layer(ok_provider());
    let keyed = |k: &str| {
        let mut req = chat(10, None);
        req.extensions_mut().insert(BudgetKey(Key::of(k)));
        req
    };
    send(&svc, keyed("tenant-a")).await.unwrap();
    send(&svc, keyed("tenant-b")).await.unwrap();
    send(&svc, chat(10, None)).await.unwrap();
    let err = send(&svc, keyed("tenant-a")).await.unwrap_err();
    assert_eq!(exceeded(&err).0, BudgetLimit::RequestsPerMinute);
    let err = send(&svc, chat(10, None)).await.unwrap_err();
    assert_eq!(exceeded(&err).0, BudgetLimit::RequestsPerMinute);
}
