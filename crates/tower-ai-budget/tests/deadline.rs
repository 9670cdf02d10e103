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
