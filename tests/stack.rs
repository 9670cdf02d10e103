//! The whole recommended stack against the simulator: in-process on a paused clock for
//! timing (the storm of the chaos demo), over loopback HTTP for the wire.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt};
use tower_ai::fallback::rewrite_model;
use tower_ai::prelude::*;
use tower_ai_sim::{digest, ModelSpec, Scenario, Simulator};
use tower_ai_workspace::storm::{self, Storm, StormConfig, BACKUP_MODEL, SECONDARY_MODEL};

#[tokio::test(start_paused = true)]
async fn the_storm_is_served_with_fewer_calls_than_the_naive_loop() {
    let config = StormConfig::default();
    let s = Storm::new(config);
    let naive = storm::run("naive", &s, storm::naive(&s), |_, _, _| {}).await;
    let s = Storm::new(config);
    let ai = storm::run("tower-ai", &s, storm::tower_ai(&s), |_, _, _| {}).await;
    print!("{}", storm::table(&[naive.clone(), ai.clone()]));

    assert!(
        ai.served_share() >= 0.99,
        "served {:.1}%",
        100.0 * ai.served_share()
    );
    assert!(
        ai.upstream_calls < naive.upstream_calls,
        "{} calls vs the naive loop's {}",
        ai.upstream_calls,
        naive.upstream_calls
    );
    assert!(
        ai.rate_limited * 100 <= ai.upstream_calls,
        "{} of {} calls answered 429",
        ai.rate_limited,
        ai.upstream_calls
    );
    assert!(
        ai.fallbacks > 0,
        "the quota runs out: the backup must have served"
    );
    assert_eq!(
        ai.served + ai.failed + ai.timed_out,
        ai.offered,
        "every request accounted for"
    );

    // Every body that reached a provider is one the client sent, byte for byte: the
    // original, or the original with only its model rewritten by the fallback chain.
    let mut expected = HashSet::new();
    for req in storm::workload(&config) {
        let body = req.body().as_bytes().unwrap().clone();
        expected.insert(digest(&body));
        for model in [SECONDARY_MODEL, BACKUP_MODEL] {
            expected.insert(digest(&rewrite_model(&body, model).unwrap()));
        }
    }
    for call in s.primary.calls().iter().chain(s.backup.calls().iter()) {
        assert!(
            expected.contains(&call.body_digest),
            "call {} to {:?} carried a body nobody sent",
            call.seq,
            call.model
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_storm_is_deterministic_for_a_seed() {
    let run = || async {
        let s = Storm::new(StormConfig {
            requests: 200,
            ..StormConfig::default()
        });
        let r = storm::run("tower-ai", &s, storm::tower_ai(&s), |_, _, _| {}).await;
        (r.served, r.upstream_calls, r.fallbacks, r.wasted)
    };
    assert_eq!(run().await, run().await);
}

fn chat(stream: bool) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"gpt-4o","stream":{stream},"messages":[{{"role":"user","content":"Tell me about the sea."}}]}}"#
    ))
}

/// The whole stack over a real hyper-util client and a real socket (real clock: the
/// simulator's rate window is two seconds, so the test waits up to that long).
///
/// The first answer's `x-ratelimit-remaining-requests: 0` and its reset teach the
/// cooldown gate that the next request cannot fit, so the gate holds it until the window
/// resets: the provider is never asked in vain (no 429), and the caller still gets the
/// whole answer.
#[tokio::test]
async fn over_loopback_a_request_that_cannot_fit_waits_for_the_reset_and_is_answered_whole() {
    let sim = Simulator::new(
        Scenario::builder()
            .model(ModelSpec::new("gpt-4o").completion_tokens(12))
            .rpm_limit(1)
            .rate_window(Duration::from_secs(2))
            .latency(tower_ai_sim::Latency::fixed(Duration::from_millis(5)))
            .token_interval(tower_ai_sim::Latency::fixed(Duration::from_millis(2)))
            .build()
            .unwrap(),
    );
    let server = sim.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<AiBody>();
    let ai = AiStack::new().layer(client);
    let url = format!("http://{}/v1/chat/completions", server.addr());
    let ask = |body: Bytes| {
        Request::post(url.as_str())
            .header("content-type", "application/json")
            .body(AiBody::from(body))
            .unwrap()
    };

    let first = ai.clone().oneshot(ask(chat(false))).await.unwrap();
    assert_eq!(first.status(), 200);
    let _ = first.into_body().collect().await.unwrap();

    // The second request would find the window full. (A real socket, so the real clock:
    // a generous bound that only a hang reaches, however loaded the machine.)
    let res = tokio::time::timeout(Duration::from_secs(60), ai.clone().oneshot(ask(chat(true))))
        .await
        .expect("answered, not hung")
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.into_body().collect().await.unwrap().to_bytes();
    let text = std::str::from_utf8(&text).unwrap();
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the stream arrived whole: {text}"
    );

    let calls = sim.calls();
    let statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
    // The gate held the second request until the reset it learned instead of sending it
    // into the full window at once. It measures the reset from when the first request was
    // sent, so on a real socket it may release a few ms before the provider's window
    // turns: then one 429 follows, retried after its retry-after. Nothing else may happen.
    assert!(
        statuses == [200, 200] || statuses == [200, 429, 200],
        "{statuses:?}"
    );
    // The simulator's rate windows are 2 s long from its start: the answered second
    // request went out in a later window than the first (it was held for the reset), and
    // in the very next one (it was held for the reset, not for a fixed or much longer
    // wait). Event times on the simulator's own clock, whatever the machine's load.
    let window = |at: Duration| at.as_millis() / 2000;
    let (first, last) = (calls[0].at, calls.last().unwrap().at);
    assert_eq!(
        window(last),
        window(first) + 1,
        "first sent at {first:?}, the answered second at {last:?}: not held for the reset"
    );
    // Each call carried the exact bytes the client gave the stack.
    let sent = [digest(&chat(false)), digest(&chat(true))];
    assert!(calls.iter().all(|c| sent.contains(&c.body_digest)));
    assert_eq!(calls.last().unwrap().body_digest, sent[1]);
    server.shutdown().await;
}
