//! The store seam: a budget built with `.store(…)` asks the store about every request,
//! settles each with what the response says it cost, and waits (wait mode) or refuses as
//! the store says. A counting store in memory; paused clock.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::time::advance;
use tokio_test::{assert_pending, assert_ready, task};
use tower::Layer;
use tower_ai_budget::{
    BudgetStore, PriceTable, Spent, StoreAdmit, StoreDecision, StoreLease, StoreLimits,
    StoreRequest, TokenBudgetLayer,
};
use tower_ai_core::BudgetLimit;

const S: Duration = Duration::from_secs(1);

/// Admits `allow` requests, then refuses for `retry` (RPM); records what it sees.
#[derive(Default)]
struct Counting {
    allow: Mutex<u64>,
    retry: Option<Duration>,
    pending: bool,
    asked: Mutex<Vec<(u64, u64, String)>>,
    settled: Mutex<Vec<(u64, u64, Spent)>>,
    limits: Mutex<Option<StoreLimits>>,
}

impl BudgetStore for Counting {
    fn admit(&self, limits: &StoreLimits, r: &StoreRequest<'_>) -> StoreAdmit {
        *self.limits.lock().unwrap() = Some(*limits);
        self.asked
            .lock()
            .unwrap()
            .push((r.tokens, r.spend, r.label()));
        let mut allow = self.allow.lock().unwrap();
        let d = if *allow > 0 {
            *allow -= 1;
            StoreDecision::Admitted(StoreLease {
                key: r.key,
                tokens: r.tokens,
                spend: r.spend,
                name: r.label(),
                state: [7, 0, 0],
            })
        } else {
            StoreDecision::Refused {
                limit: BudgetLimit::RequestsPerMinute,
                retry_after: self.retry,
            }
        };
        if self.pending {
            StoreAdmit::Pending(Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                d
            }))
        } else {
            StoreAdmit::Ready(d)
        }
    }
    fn settle(&self, _: &StoreLimits, lease: StoreLease, spent: Spent) {
        assert_eq!(lease.state, [7, 0, 0]);
        self.settled
            .lock()
            .unwrap()
            .push((lease.tokens, lease.spend, spent));
    }
}

fn ok(input: u64, output: u64) -> Provider {
    Provider::new(move |_| Ok(json_usage(input, output)))
}

#[tokio::test(start_paused = true)]
async fn the_store_decides_and_is_settled_with_the_usage() {
    for pending in [false, true] {
        let store = Arc::new(Counting {
            allow: Mutex::new(2),
            pending,
            ..Default::default()
        });
        let layer = TokenBudgetLayer::builder()
            .tokens_per_minute(10_000)
            .spend_per_day(5.0)
            .prices(PriceTable::new().model("gpt-4o", 2.5, 10.0))
            .reject()
            .store(store.clone())
            .build()
            .unwrap();
        let provider = ok(10, 3);
        let svc = layer.layer(provider.clone());
        for _ in 0..2 {
            let res = send(&svc, chat(10, Some(100))).await.unwrap();
            drain(res).await;
        }
        let err = send(&svc, chat(10, Some(100))).await.unwrap_err();
        assert_eq!(exceeded(&err), (BudgetLimit::RequestsPerMinute, None));
        assert_eq!(provider.calls(), 2, "the refused request was not sent");

        let asked = store.asked.lock().unwrap().clone();
        assert_eq!(asked.len(), 3);
        // 10 input + 100 output reserved; $2.5/M in, $10/M out in nano-units.
        assert_eq!(
            asked[0],
            (110, 10 * 2_500 + 100 * 10_000, "global".to_owned())
        );
        let settled = store.settled.lock().unwrap().clone();
        assert_eq!(settled.len(), 2);
        assert_eq!(settled[0].2, Spent::new(13, 10 * 2_500 + 3 * 10_000));
        let limits = store.limits.lock().unwrap().unwrap();
        assert_eq!(limits.tokens_per_minute, Some(10_000));
        assert_eq!(limits.spend_per_day, Some(5_000_000_000));
        assert_eq!(limits.max_wait, None);
    }
}

#[tokio::test(start_paused = true)]
async fn an_error_response_refunds_and_a_dropped_body_keeps_the_reservation() {
    let store = Arc::new(Counting {
        allow: Mutex::new(10),
        ..Default::default()
    });
    let layer = TokenBudgetLayer::builder()
        .tokens_per_minute(10_000)
        .store(store.clone())
        .build()
        .unwrap();
    let failing = Provider::new(|_| {
        let mut res = json_usage(10, 3);
        *res.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
        Ok(res)
    });
    drain(
        send(&layer.layer(failing), chat(10, Some(100)))
            .await
            .unwrap(),
    )
    .await;
    drop(
        send(&layer.layer(ok(10, 3)), chat(10, Some(100)))
            .await
            .unwrap(),
    );
    let settled = store.settled.lock().unwrap().clone();
    assert_eq!(settled[0].2, Spent::new(0, 0), "an error is refunded");
    assert_eq!(
        settled[1].2,
        Spent::new(110, 0),
        "a body dropped unread keeps it"
    );
}

#[tokio::test(start_paused = true)]
async fn in_wait_mode_a_refused_request_asks_again_when_the_store_says() {
    let store = Arc::new(Counting {
        allow: Mutex::new(1),
        retry: Some(2 * S),
        ..Default::default()
    });
    let layer = TokenBudgetLayer::builder()
        .requests_per_minute(1)
        .wait(5 * S)
        .store(store.clone())
        .build()
        .unwrap();
    let provider = ok(1, 1);
    let svc = layer.layer(provider.clone());
    send(&svc, chat(10, None)).await.unwrap();
    let mut waiting = task::spawn(send(&svc, chat(10, None)));
    assert_pending!(waiting.poll());
    assert_eq!(store.asked.lock().unwrap().len(), 2);
    *store.allow.lock().unwrap() = 1;
    advance(2 * S).await;
    assert_ready!(waiting.poll()).unwrap();
    assert_eq!(store.asked.lock().unwrap().len(), 3, "asked again at 2 s");
    assert_eq!(provider.calls(), 2);
    // Nothing over the budget: no token limit, so no estimate was made.
    assert_eq!(store.asked.lock().unwrap()[0].0, 0);

    // A retry past the wait is refused at once.
    let store = Arc::new(Counting {
        retry: Some(60 * S),
        ..Default::default()
    });
    let svc = TokenBudgetLayer::builder()
        .requests_per_minute(1)
        .wait(5 * S)
        .store(store)
        .build()
        .unwrap()
        .layer(ok(1, 1));
    let err = send(&svc, chat(10, None)).await.unwrap_err();
    assert_eq!(
        exceeded(&err),
        (BudgetLimit::RequestsPerMinute, Some(60 * S))
    );
}

#[tokio::test(start_paused = true)]
async fn a_refusal_with_no_known_time_is_asked_again_every_10_ms() {
    let store = Arc::new(Counting {
        retry: Some(Duration::ZERO),
        ..Default::default()
    });
    let svc = TokenBudgetLayer::builder()
        .max_concurrent(1)
        .wait(S)
        .store(store.clone())
        .build()
        .unwrap()
        .layer(ok(1, 1));
    let mut waiting = task::spawn(send(&svc, chat(10, None)));
    assert_pending!(waiting.poll());
    for _ in 0..95 {
        advance(Duration::from_millis(1)).await;
        assert_pending!(waiting.poll());
    }
    // Polled every millisecond, asked at 0 and then every 10 ms: 10 times in 95 ms.
    assert_eq!(store.asked.lock().unwrap().len(), 10);
    *store.allow.lock().unwrap() = 1;
    advance(Duration::from_millis(10)).await;
    assert_ready!(waiting.poll()).unwrap();
}
