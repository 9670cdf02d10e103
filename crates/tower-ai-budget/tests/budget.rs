//! TokenBudget on a paused clock: limits, reconciliation, waiting, fairness, exits.

mod support;

use std::time::Duration;

use http::{Request, Response};
use support::*;
use tokio::time::advance;
use tokio_test::{assert_pending, assert_ready, task};
use tower::{Layer, Service, ServiceExt};
use tower_ai_budget::{BudgetEvent, PriceTable, TokenBudgetLayer, UnknownModel};
use tower_ai_core::BudgetLimit;

fn ok_provider() -> Provider {
    Provider::new(|_| Ok(no_usage()))
}

#[tokio::test(start_paused = true)]
async fn rpm_holds_over_sliding_minutes() {
    let layer = TokenBudgetLayer::builder()
        .requests_per_minute(3)
        .reject()
        .build()
        .unwrap();
    let p = ok_provider();
    let svc = layer.layer(p.clone());
    send(&svc, chat(10, Some(1))).await.unwrap();
    advance(Duration::from_secs(30)).await;
    send(&svc, chat(10, Some(1))).await.unwrap();
    send(&svc, chat(10, Some(1))).await.unwrap();
    let err = send(&svc, chat(10, Some(1))).await.unwrap_err();
    let (limit, retry) = exceeded(&err);
    assert_eq!(limit, BudgetLimit::RequestsPerMinute);
    // The t = 0 request leaves the (61-slot) window at t = 61 s.
    assert_eq!(retry, Some(Duration::from_secs(31)));
    advance(Duration::from_secs(30)).await; // t = 60
    assert!(
        send(&svc, chat(10, Some(1))).await.is_err(),
        "still inside the window"
    );
    advance(Duration::from_secs(1)).await; // t = 61: one slot freed
    send(&svc, chat(10, Some(1))).await.unwrap();
    assert!(
        send(&svc, chat(10, Some(1))).await.is_err(),
        "only one freed"
    );
    advance(Duration::from_secs(30)).await; // t = 91: the t = 30 pair left
    send(&svc, chat(10, Some(1))).await.unwrap();
    send(&svc, chat(10, Some(1))).await.unwrap();
    assert!(send(&svc, chat(10, Some(1))).await.is_err());
    assert_eq!(p.calls(), 6);
}

#[tokio::test(start_paused = true)]
async fn tpm_holds_and_reconciles_with_json_usage() {
    let layer = TokenBudgetLayer::builder()
        .tokens_per_minute(1000)
        .reject()
        .build()
        .unwrap();
    // Reserves 100 + 500 = 600; actually uses 100 + 50.
    let p = Provider::new(|_| Ok(json_usage(100, 50)));
    let svc = layer.layer(p.clone());
    let res = send(&svc, chat(100, Some(500))).await.unwrap();
    assert_eq!(
        snapshot(&layer).tokens,
        Some(600),
        "reserved before the call"
    );
    let (limit, _) = exceeded(&send(&svc, chat(100, Some(500))).await.unwrap_err());
    assert_eq!(limit, BudgetLimit::TokensPerMinute);
    drain(res).await;
    assert_eq!(snapshot(&layer).tokens, Some(150), "replaced by the usage");
    // Corrections do not accumulate: four more reserving 300 each, each settled to 150.
    for _ in 0..4 {
        let res = send(&svc, chat(100, Some(200))).await.unwrap();
        drain(res).await;
    }
    assert_eq!(snapshot(&layer).tokens, Some(750));
    assert!(send(&svc, chat(100, Some(200))).await.is_err(), "750 + 300");
    drain(send(&svc, chat(100, Some(150))).await.unwrap()).await; // 750 + 250 fits
    assert_eq!(snapshot(&layer).tokens, Some(900));
    advance(Duration::from_secs(61)).await;
    drain(send(&svc, chat(100, Some(500))).await.unwrap()).await;
    assert_eq!(snapshot(&layer).tokens, Some(150));
    assert_eq!(snapshot(&layer).held, 0);
}

#[tokio::test(start_paused = true)]
async fn underestimates_are_charged() {
    let layer = TokenBudgetLayer::builder()
        .tokens_per_minute(1000)
        .reject()
        .build()
        .unwrap();
    let svc = layer.layer(Provider::new(|_| Ok(json_usage(300, 600))));
    drain(send(&svc, chat(100, Some(100))).await.unwrap()).await;
    assert_eq!(snapshot(&layer).tokens, Some(900));
    assert!(send(&svc, chat(100, Some(100))).await.is_err());
}

fn sse(parts: &[&str]) -> Response<Chunks> {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Chunks::of(parts))
        .unwrap()
}

async fn settled_tokens(req: Request<String>, res: Response<Chunks>) -> u64 {
    let layer = TokenBudgetLayer::builder()
        .tokens_per_minute(100_000)
        .default_output_tokens(1000)
        .build()
        .unwrap();
    let res = std::sync::Mutex::new(Some(res));
    let svc = layer.layer(Provider::new(move |_| {
        Ok(res.lock().unwrap().take().unwrap())
    }));
    let out = send(&svc, req).await.unwrap();
    assert_eq!(snapshot(&layer).tokens, Some(10 + 1000), "reserved");
    drain(out).await;
    assert_eq!(snapshot(&layer).held, 0);
    snapshot(&layer).tokens.unwrap()
}

fn req_to(uri: &str, body: &str) -> Request<String> {
    Request::post(uri).body(body.to_owned()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn reconciles_each_sse_dialect_without_buffering() {
    // "user" + 36 bytes = 40 bytes = 10 tokens; no max_tokens: 1000 reserved for output.
    let content = "y".repeat(36);
    let body = format!(
        r#"{{"model":"m","stream":true,"messages":[{{"role":"user","content":"{content}"}}]}}"#
    );

    // OpenAI: the include_usage chunk (choices: []) before [DONE], split mid-event.
    let openai = sse(&[
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: {\"id\":\"c\",\"choices\":[],\"usa",
        "ge\":{\"prompt_tokens\":11,\"completion_tokens\":7,\"total_tokens\":18}}\n\n",
        "data: [DONE]\n\n",
    ]);
    let req = req_to("https://api.openai.com/v1/chat/completions", &body);
    assert_eq!(settled_tokens(req, openai).await, 18);

    // Anthropic: message_start has the input, message_delta the cumulative output.
    let anthropic = sse(&[
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":8}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ]);
    let req = req_to("https://api.anthropic.com/v1/messages", &body);
    assert_eq!(settled_tokens(req, anthropic).await, 40);

    // Gemini: usageMetadata repeated; the last one wins.
    let gemini = sse(&[
        "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"a\"}]}}],\"usageMetadata\":{\"promptTokenCount\":10,\"candidatesTokenCount\":1}}\r\n\r\n",
        "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"b\"}]},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":10,\"candidatesTokenCount\":5,\"totalTokenCount\":15}}\r\n\r\n",
    ]);
    let req = req_to(
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        &body,
    );
    assert_eq!(settled_tokens(req, gemini).await, 15);

    // OpenAI without include_usage: no usage, the reservation stands.
    let bare = sse(&[
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        "data: [DONE]\n\n",
    ]);
    let req = req_to("https://api.openai.com/v1/chat/completions", &body);
    assert_eq!(settled_tokens(req, bare).await, 1010);

    // A stream cut before its usage: the reservation stands.
    let cut = sse(&[
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
    ]);
    let req = req_to("https://api.openai.com/v1/chat/completions", &body);
    assert_eq!(settled_tokens(req, cut).await, 1010);
}

#[tokio::test(start_paused = true)]
async fn concurrency_is_held_until_the_body_ends_or_drops() {
    let layer = TokenBudgetLayer::builder()
        .max_concurrent(2)
        .wait(Duration::from_secs(30))
        .build()
        .unwrap();
    let p = Provider::new(|_| Ok(json_usage(1, 1)));
    let svc = layer.layer(p.clone());
    let a = send(&svc, chat(10, None)).await.unwrap();
    let b = send(&svc, chat(10, None)).await.unwrap();
    assert_eq!(
        snapshot(&layer).in_flight,
        2,
        "heads arrived, bodies not read"
    );
    let mut third = task::spawn(send(&svc, chat(10, None)));
    assert_pending!(third.poll());
    assert_eq!(p.calls(), 2);
    advance(Duration::from_secs(10)).await;
    assert_pending!(third.poll());
    drain(a).await; // ends: permit released, the waiter is woken
    assert!(third.is_woken());
    let c = assert_ready!(third.poll()).unwrap();
    assert_eq!(p.calls(), 3);
    drop(b); // dropped unread: released too
    drop(c);
    assert_eq!(snapshot(&layer).in_flight, 0);
    assert_eq!(snapshot(&layer).held, 0);
}

#[tokio::test(start_paused = true)]
async fn wait_times_out_with_the_limit_that_blocked() {
    let layer = TokenBudgetLayer::builder()
        .max_concurrent(1)
        .wait(Duration::from_secs(10))
        .build()
        .unwrap();
    let svc = layer.layer(ok_provider());
    let held = send(&svc, chat(10, None)).await.unwrap();
    let mut waiter = task::spawn(send(&svc, chat(10, None)));
    assert_pending!(waiter.poll());
    advance(Duration::from_millis(9_999)).await;
    assert_pending!(waiter.poll());
    advance(Duration::from_millis(1)).await;
    let err = assert_ready!(waiter.poll()).unwrap_err();
    assert_eq!(
        exceeded(&err),
        (BudgetLimit::Concurrency, Some(Duration::ZERO))
    );
    assert_eq!(snapshot(&layer).waiting, 0);
    drop(held);
    assert_eq!(snapshot(&layer).in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn waits_until_the_window_slides() {
    let layer = TokenBudgetLayer::builder()
        .requests_per_minute(1)
        .wait(Duration::from_secs(120))
        .build()
        .unwrap();
    let p = ok_provider();
    let svc = layer.layer(p.clone());
    send(&svc, chat(10, None)).await.unwrap();
    let mut second = task::spawn(send(&svc, chat(10, None)));
    assert_pending!(second.poll());
    advance(Duration::from_secs(60)).await;
    assert_pending!(second.poll());
    assert_eq!(p.calls(), 1, "not sent before it fits");
    advance(Duration::from_secs(1)).await;
    assert!(second.is_woken());
    assert_ready!(second.poll()).unwrap();
    assert_eq!(p.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_wait_longer_than_max_wait_is_refused_at_once() {
    let layer = TokenBudgetLayer::builder()
        .requests_per_minute(1)
        .wait(Duration::from_secs(10))
        .build()
        .unwrap();
    let svc = layer.layer(ok_provider());
    send(&svc, chat(10, None)).await.unwrap();
    let mut second = task::spawn(send(&svc, chat(10, None)));
    let err = assert_ready!(second.poll()).unwrap_err();
    assert_eq!(
        exceeded(&err),
        (
            BudgetLimit::RequestsPerMinute,
            Some(Duration::from_secs(61))
        )
    );
}

#[tokio::test(start_paused = true)]
async fn reject_mode_says_when_it_fits() {
    let layer = TokenBudgetLayer::builder()
        .tokens_per_minute(1000)
        .reject()
        .build()
        .unwrap();
    let p = ok_provider();
    let svc = layer.layer(p.clone());
    drain(send(&svc, chat(100, Some(500))).await.unwrap()).await; // 600 kept (no usage)
    advance(Duration::from_secs(20)).await;
    let mut t = task::spawn(send(&svc, chat(100, Some(400))));
    let err = assert_ready!(t.poll()).unwrap_err();
    assert_eq!(
        exceeded(&err),
        (BudgetLimit::TokensPerMinute, Some(Duration::from_secs(41)))
    );
    assert_eq!(p.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn oversize_requests_are_refused_at_once_in_both_modes() {
    for layer in [
        TokenBudgetLayer::builder()
            .tokens_per_minute(1000)
            .build()
            .unwrap(),
        TokenBudgetLayer::builder()
            .tokens_per_minute(1000)
            .reject()
            .build()
            .unwrap(),
    ] {
        let p = ok_provider();
        let svc = layer.layer(p.clone());
        for req in [
            chat(100, Some(901)),
            chat(100, Some(u64::MAX)),
            chat(2000, None),
        ] {
            let mut t = task::spawn(send(&svc, req));
            let err = assert_ready!(t.poll()).unwrap_err();
            assert_eq!(exceeded(&err), (BudgetLimit::TokensPerMinute, None));
        }
        // Exactly the limit fits.
        send(&svc, chat(100, Some(900))).await.unwrap();
        assert_eq!(p.calls(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn fifo_a_large_request_is_not_starved() {
    let layer = TokenBudgetLayer::builder()
        .tokens_per_minute(1000)
        .wait(Duration::from_secs(120))
        .build()
        .unwrap();
    let p = ok_provider();
    let svc = layer.layer(p.clone());
    drain(send(&svc, chat(100, Some(800))).await.unwrap()).await; // 900 kept
    let mut large = task::spawn(send(&svc, chat(100, Some(700)))); // 800: waits for t = 61
    assert_pending!(large.poll());
    let mut small = task::spawn(send(&svc, chat(10, Some(10)))); // 20 would fit now...
    assert_pending!(small.poll()); // ...but waits its turn
    assert_eq!(snapshot(&layer).waiting, 2);
    assert_eq!(p.calls(), 1);
    advance(Duration::from_secs(61)).await;
    assert!(large.is_woken());
    drop(assert_ready!(large.poll()).unwrap());
    assert!(small.is_woken(), "the next in line is woken");
    drop(assert_ready!(small.poll()).unwrap());
    let order = p.order.lock().unwrap().clone();
    assert!(order[1] > order[2], "large first, then small: {order:?}");
}

#[tokio::test(start_paused = true)]
async fn fifo_holds_on_the_fast_path_too() {
    // No token limit: requests are admitted without the lock while nobody waits.
    let layer = TokenBudgetLayer::builder()
        .max_concurrent(2)
        .wait(Duration::from_secs(60))
        .build()
        .unwrap();
    let p = ok_provider();
    let svc = layer.layer(p.clone());
    let a = send(&svc, chat(10, None)).await.unwrap();
    let b = send(&svc, chat(10, None)).await.unwrap();
    let mut third = task::spawn(send(&svc, chat(10, None)));
    assert_pending!(third.poll());
    drop(a); // a place is free, and the waiter is woken...
    assert!(third.is_woken());
    let mut fourth = task::spawn(send(&svc, chat(10, None)));
    assert_pending!(fourth.poll()); // ...but a newcomer does not take it before the waiter
    assert_eq!(snapshot(&layer).waiting, 2);
    let c = assert_ready!(third.poll()).unwrap();
    assert_pending!(fourth.poll());
    assert_eq!(p.calls(), 3);
    drop(b);
    assert!(fourth.is_woken());
    let d = assert_ready!(fourth.poll()).unwrap();
    drop((c, d));
    // Nobody waits any more: the fast path admits again.
    let e = send(&svc, chat(10, None)).await.unwrap();
    assert_eq!(snapshot(&layer).in_flight, 1);
    drop(e);
    let s = snapshot(&layer);
    assert_eq!((s.in_flight, s.held, s.waiting), (0, 0, 0));
}

/// A request limit of 320 gets batches of 10 fast permits (admitted without the lock or the
/// clock, counted when the batch ends). Bursts at uneven virtual times, ending batches at
/// any moment, keep the documented promise: never more than the limit in any 60 s, and a
/// refusal only when an exact count (the window's 61 one-second slots) holds at least the
/// limit minus one batch.
#[tokio::test(start_paused = true)]
async fn fast_batches_keep_the_minute_limit() {
    const LIMIT: usize = 320;
    const BATCH: usize = LIMIT / 32;
    let layer = TokenBudgetLayer::builder()
        .requests_per_minute(LIMIT as u64)
        .reject()
        .build()
        .unwrap();
    let svc = layer.layer(ok_provider());
    let start = tokio::time::Instant::now();
    let (mut admitted, mut refused) = (Vec::<Duration>::new(), 0);
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..1500 {
        for _ in 0..next() % 25 {
            let t = start.elapsed();
            match send(&svc, chat(10, None)).await {
                Ok(_) => admitted.push(t),
                Err(e) => {
                    assert_eq!(exceeded(&e).0, BudgetLimit::RequestsPerMinute);
                    let exact = admitted
                        .iter()
                        .filter(|a| a.as_secs() + 61 > t.as_secs())
                        .count();
                    assert!(
                        exact + BATCH >= LIMIT,
                        "refused at {t:?} with {exact} in the last 61 slots"
                    );
                    refused += 1;
                }
            }
        }
        advance(Duration::from_millis(next() % 3000)).await;
    }
    for (i, a) in admitted.iter().enumerate() {
        let n = admitted[i..]
            .iter()
            .take_while(|b| **b < *a + Duration::from_secs(60))
            .count();
        assert!(n <= LIMIT, "{n} admitted in the minute from {a:?}");
    }
    // The load (about 480 a minute) kept reaching the limit, and the limit was used.
    assert!(refused > 1000, "{refused} refused");
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    let per_minute = admitted.len() as f64 / minutes;
    assert!(
        per_minute > 0.95 * LIMIT as f64 * 60.0 / 61.0,
        "{per_minute:.0} a minute"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_gives_its_place_to_the_next() {
    let layer = TokenBudgetLayer::builder()
        .max_concurrent(1)
        .wait(Duration::from_secs(60))
        .build()
        .unwrap();
    let svc = layer.layer(ok_provider());
    let held = send(&svc, chat(10, None)).await.unwrap();
    let mut first = task::spawn(send(&svc, chat(10, None)));
    let mut second = task::spawn(send(&svc, chat(10, None)));
    assert_pending!(first.poll());
    assert_pending!(second.poll());
    assert_eq!(snapshot(&layer).waiting, 2);
    drop(first);
    assert_eq!(snapshot(&layer).waiting, 1);
    drop(held);
    assert!(second.is_woken());
    drop(assert_ready!(second.poll()).unwrap());
    let s = snapshot(&layer);
    assert_eq!((s.in_flight, s.held, s.waiting), (0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn error_responses_and_errors_refund_tokens_and_permits() {
    let layer = TokenBudgetLayer::builder()
        .requests_per_minute(100)
        .tokens_per_minute(10_000)
        .max_concurrent(4)
        .build()
        .unwrap();
    let svc = layer.layer(Provider::new(|req| {
        if req.body().contains("fail") {
            return Err("connection reset".into());
        }
        Ok(Response::builder()
            .status(500)
            .body(Chunks::of(&[r#"{"error":{"type":"server_error"}}"#]))
            .unwrap())
    }));
    let res = send(&svc, chat(100, Some(100))).await.unwrap();
    assert_eq!(res.status(), 500);
    assert_eq!(snapshot(&layer).in_flight, 1, "held until the body ends");
    drain(res).await;
    let mut req = chat(100, Some(100));
    *req.body_mut() = req.body().replace("gpt-4o", "fail");
    let err = send(&svc, req).await.unwrap_err();
    assert_eq!(err.to_string(), "connection reset");
    let s = snapshot(&layer);
    assert_eq!(
        (s.in_flight, s.held, s.tokens, s.requests),
        (0, 0, Some(0), Some(2))
    );
}

#[tokio::test(start_paused = true)]
async fn a_future_dropped_in_flight_releases_its_permit_and_keeps_its_tokens() {
    let layer = TokenBudgetLayer::builder()
        .tokens_per_minute(10_000)
        .max_concurrent(1)
        .build()
        .unwrap();
    let (mock, mut handle) = tower_test::mock::pair::<Request<String>, Response<Chunks>>();
    let mut svc = layer.layer(mock);
    handle.allow(1);
    svc.ready().await.unwrap();
    let mut fut = task::spawn(svc.call(chat(100, Some(100))));
    assert_pending!(fut.poll());
    let (_req, _send) = handle.next_request().await.unwrap();
    assert_eq!(snapshot(&layer).in_flight, 1);
    drop(fut);
    let s = snapshot(&layer);
    assert_eq!((s.in_flight, s.held, s.tokens), (0, 0, Some(200)));
}

#[tokio::test(start_paused = true)]
async fn every_exit_of_the_fast_path_gives_its_permit_back() {
    // No token limit: admitted without the lock, the permit held by the future, then the
    // body.
    let layer = TokenBudgetLayer::builder()
        .requests_per_minute(1000)
        .max_concurrent(1)
        .reject()
        .build()
        .unwrap();
    let (mock, mut handle) = tower_test::mock::pair::<Request<String>, Response<Chunks>>();
    let mut svc = layer.layer(mock);
    handle.allow(10);
    // The first call creates the key on the locked path; the next ones take the fast path.
    for _ in 0..3 {
        svc.ready().await.unwrap();
        let mut fut = task::spawn(svc.call(chat(10, None)));
        assert_pending!(fut.poll());
        let (_req, reply) = handle.next_request().await.unwrap();
        assert_eq!(snapshot(&layer).in_flight, 1);
        assert!(send(&svc, chat(10, None)).await.is_err(), "one at a time");
        drop(fut); // dropped in flight
        assert_eq!(snapshot(&layer).in_flight, 0);
        drop(reply);
    }
    // An inner error gives it back too.
    svc.ready().await.unwrap();
    let mut fut = task::spawn(svc.call(chat(10, None)));
    assert_pending!(fut.poll());
    let (_req, reply) = handle.next_request().await.unwrap();
    reply.send_error("connection reset");
    assert!(assert_ready!(fut.poll()).is_err());
    let s = snapshot(&layer);
    assert_eq!((s.in_flight, s.held, s.requests), (0, 0, Some(4)));
}

#[tokio::test(start_paused = true)]
async fn spend_cap_with_a_price_table() {
    // 0.01 per input token, 0.02 per output token.
    let layer = TokenBudgetLayer::builder()
        .spend_per_hour(10.0)
        .prices(PriceTable::new().model("gpt-4o", 10_000.0, 20_000.0))
        .reject()
        .build()
        .unwrap();
    let svc = layer.layer(Provider::new(|_| Ok(json_usage(100, 50))));
    // Reserves 100 × 0.01 + 200 × 0.02 = 5.00; uses 1.00 + 1.00 = 2.00.
    let a = send(&svc, chat(100, Some(200))).await.unwrap();
    let b = send(&svc, chat(100, Some(200))).await.unwrap();
    assert_eq!(snapshot(&layer).spend_hour, Some(10_000_000_000));
    let (limit, retry) = exceeded(&send(&svc, chat(100, Some(200))).await.unwrap_err());
    assert_eq!(limit, BudgetLimit::SpendPerHour);
    assert_eq!(retry, Some(Duration::from_secs(61 * 60)));
    drain(a).await;
    drain(b).await;
    assert_eq!(snapshot(&layer).spend_hour, Some(4_000_000_000));
    drain(send(&svc, chat(100, Some(200))).await.unwrap()).await;
    // A request costing more than the cap never fits.
    let (limit, retry) = exceeded(&send(&svc, chat(100, Some(600))).await.unwrap_err());
    assert_eq!((limit, retry), (BudgetLimit::SpendPerHour, None));
    // Unknown models: rejected by default.
    let (limit, retry) = exceeded(
        &send(&svc, chat_for("mystery", 10, Some(10)))
            .await
            .unwrap_err(),
    );
    assert_eq!((limit, retry), (BudgetLimit::SpendPerHour, None));
}

#[tokio::test(start_paused = true)]
async fn unknown_model_policies() {
    let free = TokenBudgetLayer::builder()
        .spend_per_day(1.0)
        .prices(PriceTable::new().unknown(UnknownModel::Free))
        .reject()
        .build()
        .unwrap();
    let svc = free.layer(ok_provider());
    for _ in 0..5 {
        send(&svc, chat_for("mystery", 1000, Some(1000)))
            .await
            .unwrap();
    }
    let assume = TokenBudgetLayer::builder()
        .spend_per_day(1.0)
        .prices(PriceTable::new().unknown(UnknownModel::Assume(
            tower_ai_budget::ModelPrice::per_million(100_000.0, 0.0),
        )))
        .reject()
        .build()
        .unwrap();
    let svc = assume.layer(ok_provider());
    send(&svc, chat_for("mystery", 5, Some(1))).await.unwrap(); // 0.5
    send(&svc, chat_for("mystery", 5, Some(1))).await.unwrap(); // 1.0
    assert!(send(&svc, chat_for("mystery", 5, Some(1))).await.is_err());
    // No model at all: priced as unknown.
    send(
        &svc,
        Request::post("/v1/chat/completions")
            .body("{}".to_owned())
            .unwrap(),
    )
    .await
    .unwrap_err();
}

#[tokio::test(start_paused = true)]
async fn hour_and_day_windows_roll_over() {
    let layer = TokenBudgetLayer::builder()
        .spend_per_hour(10.0)
        .spend_per_day(15.0)
        .prices(PriceTable::new().model("gpt-4o", 10_000.0, 20_000.0))
        .reject()
        .build()
        .unwrap();
    let svc = layer.layer(ok_provider()); // no usage: 5.00 kept per request
    let go = || async { send(&svc, chat(100, Some(200))).await.map(drop) };
    go().await.unwrap();
    go().await.unwrap();
    let (limit, _) = exceeded(&go().await.unwrap_err());
    assert_eq!(limit, BudgetLimit::SpendPerHour);
    advance(Duration::from_secs(61 * 60 - 1)).await;
    assert!(go().await.is_err(), "the hour has not rolled over yet");
    advance(Duration::from_secs(1)).await;
    go().await.unwrap(); // 15.00 today
    let (limit, retry) = exceeded(&go().await.unwrap_err());
    assert_eq!(limit, BudgetLimit::SpendPerDay);
    // The first two left the day window at 97 × 15 min.
    assert_eq!(retry, Some(Duration::from_secs(97 * 900 - 61 * 60)));
    advance(Duration::from_secs(23 * 3600)).await;
    assert_eq!(
        exceeded(&go().await.unwrap_err()).0,
        BudgetLimit::SpendPerDay
    );
    advance(Duration::from_secs(97 * 900 - 61 * 60 - 23 * 3600)).await;
    go().await.unwrap();
    go().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn bad_input_is_handled_as_documented() {
    let layer = TokenBudgetLayer::builder()
        .requests_per_minute(100)
        .tokens_per_minute(100_000)
        .max_concurrent(10)
        .default_output_tokens(1000)
        .build()
        .unwrap();
    let p = Provider::new(|_| {
        Ok(Response::builder()
            .header("content-type", "text/html")
            .body(Chunks::of(&["<html>gateway</html>"]))
            .unwrap())
    });
    let svc = layer.layer(p.clone());
    // Not JSON: 40 bytes / 4 = 10 tokens + 1000 default output; no usage: kept.
    let req = Request::post("/v1/chat/completions")
        .body("x".repeat(40))
        .unwrap();
    drain(send(&svc, req).await.unwrap()).await;
    assert_eq!(snapshot(&layer).tokens, Some(1010));
    // No model, empty body: 1 token + 1000.
    drain(
        send(&svc, Request::post("/").body(String::new()).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(snapshot(&layer).tokens, Some(2011));
    // Absurd max_tokens: saturates, larger than any limit: refused, never sent.
    let err = send(&svc, chat(10, Some(u64::MAX))).await.unwrap_err();
    assert_eq!(exceeded(&err), (BudgetLimit::TokensPerMinute, None));
    // A JSON body with garbage usage.
    let layer2 = TokenBudgetLayer::builder()
        .tokens_per_minute(100_000)
        .build()
        .unwrap();
    let svc2 = layer2.layer(Provider::new(|_| {
        Ok(Response::new(Chunks::of(&[
            r#"{"usage":{"prompt_tokens":"many"}}"#,
        ])))
    }));
    drain(send(&svc2, chat(10, Some(10))).await.unwrap()).await;
    assert_eq!(snapshot(&layer2).tokens, Some(20));
    assert_eq!(p.calls(), 2);
    let s = snapshot(&layer);
    assert_eq!((s.in_flight, s.held), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn soft_limit_warns_once_per_crossing() {
    let log = tower_ai_sim::testing::TraceLog::default();
    let _guard = log.install();
    let (events, listener) = recorder();
    let layer = TokenBudgetLayer::builder()
        .requests_per_minute(10)
        .soft_limit(0.8)
        .listener(listener)
        .reject()
        .build()
        .unwrap();
    let svc = layer.layer(ok_provider());
    for _ in 0..10 {
        send(&svc, chat(10, None)).await.unwrap();
    }
    assert!(send(&svc, chat(10, None)).await.is_err());
    let events = events.lock().unwrap().clone();
    let soft: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            BudgetEvent::SoftLimit {
                used, max, limit, ..
            } => Some((*limit, *used, *max)),
            _ => None,
        })
        .collect();
    assert_eq!(soft, vec![(BudgetLimit::RequestsPerMinute, 8, 10)]);
    assert!(matches!(
        events.last(),
        Some(BudgetEvent::Rejected {
            limit: BudgetLimit::RequestsPerMinute,
            ..
        })
    ));
    // The same, as `tracing` sees it: one warning at the crossing, one refusal.
    let traced = log.events();
    let warned: Vec<_> = traced
        .iter()
        .filter(|e| e.message() == Some("token budget past its soft limit"))
        .collect();
    assert_eq!(warned.len(), 1, "{traced:#?}");
    assert_eq!(warned[0].level, tracing::Level::WARN);
    assert_eq!(warned[0].field("budget.used"), Some("8"));
    assert_eq!(warned[0].field("budget.max"), Some("10"));
    let refused = traced
        .iter()
        .filter(|e| e.message() == Some("request refused by the token budget"))
        .count();
    assert_eq!(refused, 1);
}

#[tokio::test(start_paused = true)]
async fn provider_headers_only_tighten() {
    let layer = TokenBudgetLayer::builder()
        .requests_per_minute(100)
        .tokens_per_minute(10_000)
        .sync_from_headers(true)
        .reject()
        .build()
        .unwrap();
    let svc = layer.layer(Provider::new(|req| {
        let remaining = if req.body().contains("tight") {
            "1000"
        } else {
            "999999"
        };
        Ok(Response::builder()
            .header("x-ratelimit-remaining-tokens", remaining)
            .header("x-ratelimit-remaining-requests", "5")
            .body(Chunks::of(&[
                r#"{"usage":{"prompt_tokens":10,"completion_tokens":10}}"#,
            ]))
            .unwrap())
    }));
    drain(send(&svc, chat(10, Some(10))).await.unwrap()).await;
    assert_eq!(
        snapshot(&layer).tokens,
        Some(20),
        "looser headers change nothing"
    );
    assert_eq!(
        snapshot(&layer).requests,
        Some(95),
        "5 requests remaining at the provider"
    );
    let mut req = chat(10, Some(10));
    *req.body_mut() = req.body().replace("gpt-4o", "tight");
    drain(send(&svc, req).await.unwrap()).await;
    // The provider says 1000 remain: the budget counts at least 9000.
    assert!(snapshot(&layer).tokens.unwrap() >= 9000);
    let err = send(&svc, chat(600, Some(500))).await.unwrap_err();
    assert_eq!(exceeded(&err).0, BudgetLimit::TokensPerMinute);
}

#[tokio::test(start_paused = true)]
async fn keys_separate_budgets_and_none_exempts() {
    let layer = TokenBudgetLayer::builder()
        .key_fn(|req: &Request<String>| {
            let t = req.headers().get("x-tenant")?;
            Some(tower_ai_core::keys::Key::of(t.as_bytes()))
        })
        .requests_per_minute(1)
        .reject()
        .build()
        .unwrap();
    let p = ok_provider();
    let svc = layer.layer(p.clone());
    let tenant = |t: &str| {
        let mut r = chat(10, None);
        r.headers_mut().insert("x-tenant", t.parse().unwrap());
        r
    };
    send(&svc, tenant("a")).await.unwrap();
    send(&svc, tenant("b")).await.unwrap();
    let err = send(&svc, tenant("a")).await.unwrap_err();
    assert!(
        err.to_string().starts_with("budget exceeded for key-"),
        "{err}"
    );
    for _ in 0..5 {
        send(&svc, chat(10, None)).await.unwrap(); // no tenant: exempt
    }
    assert_eq!(p.calls(), 7);
    assert_eq!(layer.key_count(), 2);
}

#[test]
fn auto_traits() {
    fn send_sync<T: Send + Sync + 'static>() {}
    fn send_static<T: Send + 'static>() {}
    type Svc = tower_ai_budget::TokenBudget<tower_ai_sim::SimService>;
    send_sync::<Svc>();
    send_sync::<TokenBudgetLayer>();
    send_sync::<tower_ai_budget::BudgetBody<tower_ai_sim::SimBody>>();
    send_static::<<Svc as Service<Request<tower_ai_core::AiBody>>>::Future>();
}
