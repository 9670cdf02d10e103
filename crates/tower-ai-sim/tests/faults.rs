//! Scripted faults, outages, stream faults and latencies: each happens when
//! scripted and not otherwise.

mod support;

use std::time::Duration;

use http_body_util::BodyExt;
use serde_json::{json, Value};
use support::*;
use tokio::time::{sleep, timeout, Instant};
use tower_ai_sim::{
    Fault, Latency, ModelSpec, Outcome, Scenario, SimBody, Simulator, StreamFault, StreamFaultKind,
};

fn anthropic(model: &str, stream: bool) -> Value {
    let mut b = chat(model, "hi");
    b["max_tokens"] = json!(100);
    b["stream"] = json!(stream);
    b
}

fn openai_stream(model: &str) -> Value {
    let mut b = chat(model, "hi");
    b["stream"] = json!(true);
    b
}

async fn statuses(sim: &Simulator, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            send_json(sim, OPENAI, &chat("m", "hi"))
                .await
                .status()
                .as_u16(),
        );
    }
    out
}

#[tokio::test]
async fn random_faults_follow_probability_and_seed() {
    let make = |seed| {
        Simulator::new(
            Scenario::builder()
                .seed(seed)
                .fault(Fault::status(529).probability(0.3))
                .build()
                .unwrap(),
        )
    };
    let a = statuses(&make(7), 1000).await;
    let b = statuses(&make(7), 1000).await;
    let c = statuses(&make(8), 1000).await;
    assert_eq!(a, b, "same seed, same faults");
    assert_ne!(a, c, "another seed, other faults");
    let failed = a.iter().filter(|s| **s == 529).count();
    assert!((240..=360).contains(&failed), "{failed} of 1000 at p = 0.3");
    assert!(a.iter().all(|s| *s == 529 || *s == 200));

    let never = Simulator::new(
        Scenario::builder()
            .fault(Fault::status(500).probability(0.0))
            .build()
            .unwrap(),
    );
    assert!(statuses(&never, 200).await.iter().all(|s| *s == 200));
}

#[tokio::test(start_paused = true)]
async fn burst_window_is_exact() {
    let sim = Simulator::new(
        Scenario::builder()
            .fault(Fault::status(503).between(Duration::from_secs(10), Duration::from_secs(20)))
            .build()
            .unwrap(),
    );
    let mut got = Vec::new();
    for _ in 0..30 {
        got.push(
            send_json(&sim, OPENAI, &chat("m", "hi"))
                .await
                .status()
                .as_u16(),
        );
        sleep(Duration::from_secs(1)).await;
    }
    let expected: Vec<u16> = (0..30)
        .map(|s| if (10..20).contains(&s) { 503 } else { 200 })
        .collect();
    assert_eq!(got, expected);
    assert_eq!(sim.stats().outcome(Outcome::Fault), 10);
}

#[tokio::test(start_paused = true)]
async fn outage_hits_one_model_for_its_window() {
    let sim = Simulator::new(
        Scenario::builder()
            .outage("model-a", Duration::ZERO, Duration::from_secs(60))
            .build()
            .unwrap(),
    );
    // Anthropic: 529 overloaded_error.
    let (parts, v) =
        read_json(send_json(&sim, ANTHROPIC, &anthropic("model-a", false)).await).await;
    assert_eq!(parts.status, 529);
    assert_eq!(v["error"]["type"], "overloaded_error");
    assert_eq!(header(&parts, "x-should-retry"), Some("true"));
    // OpenAI: 503 server_is_overloaded.
    let (parts, v) = read_json(send_json(&sim, OPENAI, &chat("model-a", "hi")).await).await;
    assert_eq!(parts.status, 503);
    assert_eq!(v["error"]["type"], "service_unavailable_error");
    assert_eq!(v["error"]["code"], "server_is_overloaded");
    // Gemini: 503 UNAVAILABLE.
    let (parts, v) =
        read_json(send_json(&sim, &gemini("model-a", false, false), &gemini_body("hi")).await)
            .await;
    assert_eq!(parts.status, 503);
    assert_eq!(v["error"]["status"], "UNAVAILABLE");
    // Model B is fine meanwhile.
    assert_eq!(
        send_json(&sim, OPENAI, &chat("model-b", "hi"))
            .await
            .status(),
        200
    );
    // Model A is back after the window.
    sleep(Duration::from_secs(60)).await;
    assert_eq!(
        send_json(&sim, OPENAI, &chat("model-a", "hi"))
            .await
            .status(),
        200
    );
    assert_eq!(sim.stats().outcome(Outcome::Outage), 3);
}

#[tokio::test]
async fn server_error_bodies_per_dialect() {
    for status in [500u16, 502, 503, 504, 529] {
        let sim = Simulator::new(
            Scenario::builder()
                .fault(Fault::status(status))
                .build()
                .unwrap(),
        );
        let (parts, v) = read_json(send_json(&sim, OPENAI, &chat("m", "hi")).await).await;
        assert_eq!(parts.status, status);
        let expected = if matches!(status, 503 | 529) {
            "service_unavailable_error"
        } else {
            "server_error"
        };
        assert_eq!(v["error"]["type"], expected, "openai {status}");
        assert!(v["error"]["message"].is_string());

        let (parts, v) = read_json(send_json(&sim, ANTHROPIC, &anthropic("c", false)).await).await;
        assert_eq!(parts.status, status);
        let expected = match status {
            504 => "timeout_error",
            529 => "overloaded_error",
            _ => "api_error",
        };
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], expected, "anthropic {status}");

        let (parts, v) =
            read_json(send_json(&sim, &gemini("g", false, false), &gemini_body("hi")).await).await;
        assert_eq!(parts.status, status);
        let expected = match status {
            500 => "INTERNAL",
            504 => "DEADLINE_EXCEEDED",
            _ => "UNAVAILABLE",
        };
        assert_eq!(v["error"]["status"], expected, "gemini {status}");
        assert_eq!(v["error"]["code"], status);
    }
}

#[tokio::test]
async fn scripted_fault_retry_after_and_model_filter() {
    let sim = Simulator::new(
        Scenario::builder()
            .fault(
                Fault::status(503)
                    .model("a")
                    .retry_after(Duration::from_millis(2500)),
            )
            .build()
            .unwrap(),
    );
    let (parts, _) = read(send_json(&sim, OPENAI, &chat("a", "hi")).await).await;
    assert_eq!(parts.status, 503);
    assert_eq!(header(&parts, "retry-after"), Some("3"));
    let (parts, v) =
        read_json(send_json(&sim, &gemini("a", false, false), &gemini_body("hi")).await).await;
    assert_eq!(parts.status, 503);
    assert_eq!(v["error"]["details"][0]["retryDelay"], "3s");
    assert_eq!(
        send_json(&sim, OPENAI, &chat("b", "hi")).await.status(),
        200
    );
}

/// Collect frames until the body ends, errors, or stays pending for `wait`.
async fn frames(body: &mut SimBody, wait: Duration) -> (Vec<String>, &'static str) {
    let mut out = Vec::new();
    loop {
        match timeout(wait, body.frame()).await {
            Err(_) => return (out, "pending"),
            Ok(None) => return (out, "end"),
            Ok(Some(Err(_))) => return (out, "error"),
            Ok(Some(Ok(f))) => {
                out.push(String::from_utf8(f.into_data().unwrap().to_vec()).unwrap())
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn stall_before_first_token() {
    let sim = Simulator::new(
        Scenario::builder()
            .stream_fault(StreamFault::StallBeforeFirstToken { probability: 1.0 })
            .stall_duration(Duration::from_secs(600))
            .build()
            .unwrap(),
    );
    let resp = send_json(&sim, OPENAI, &openai_stream("m")).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let t0 = Instant::now();
    let (got, how) = frames(&mut body, Duration::from_secs(599)).await;
    assert!(got.is_empty());
    assert_eq!(how, "pending", "nothing for 599 s");
    // After the stall duration the body ends with an error, not a clean end.
    let (got, how) = frames(&mut body, Duration::from_secs(2)).await;
    assert!(got.is_empty());
    assert_eq!(how, "error");
    assert_eq!(t0.elapsed(), Duration::from_secs(600));
    assert_eq!(
        sim.calls()[0].stream_fault,
        Some(StreamFaultKind::StallBeforeFirstToken)
    );
    // Non-streamed requests are not affected by stream faults.
    let (parts, _) = read(send_json(&sim, OPENAI, &chat("m", "hi")).await).await;
    assert_eq!(parts.status, 200);
}

#[tokio::test(start_paused = true)]
async fn stall_after_tokens_per_dialect() {
    let sim = Simulator::new(
        Scenario::builder()
            .default_model(ModelSpec::new("*").completion_tokens(10))
            .stream_fault(StreamFault::StallAfterTokens {
                tokens: 3,
                probability: 1.0,
            })
            .build()
            .unwrap(),
    );
    let wait = Duration::from_secs(60);

    let mut body = send_json(&sim, OPENAI, &openai_stream("m"))
        .await
        .into_body();
    let (got, how) = frames(&mut body, wait).await;
    assert_eq!(how, "pending");
    assert_eq!(got.len(), 4, "role chunk + 3 tokens: {got:?}");
    assert!(got
        .iter()
        .all(|f| !f.contains("[DONE]") && !f.contains("finish_reason\":\"stop")));

    let mut body = send_json(&sim, ANTHROPIC, &anthropic("c", true))
        .await
        .into_body();
    let (got, how) = frames(&mut body, wait).await;
    assert_eq!(how, "pending");
    let deltas = got
        .iter()
        .filter(|f| f.starts_with("event: content_block_delta"))
        .count();
    assert_eq!(deltas, 3);
    assert!(!got.iter().any(|f| f.contains("message_stop")));

    let mut body = send_json(&sim, &gemini("g", true, true), &gemini_body("hi"))
        .await
        .into_body();
    let (got, how) = frames(&mut body, wait).await;
    assert_eq!(how, "pending");
    assert_eq!(got.len(), 3);
    assert!(!got.iter().any(|f| f.contains("finishReason")));

    for call in sim.calls() {
        assert_eq!(
            call.stream_fault,
            Some(StreamFaultKind::StallAfterTokens(3))
        );
        assert_eq!(call.completion_tokens, 3);
    }
}

#[tokio::test(start_paused = true)]
async fn error_event_after_tokens_per_dialect() {
    let sim = Simulator::new(
        Scenario::builder()
            .default_model(ModelSpec::new("*").completion_tokens(10))
            .stream_fault(StreamFault::ErrorEventAfterTokens {
                tokens: 2,
                probability: 1.0,
            })
            .build()
            .unwrap(),
    );
    let wait = Duration::from_secs(60);

    let mut body = send_json(&sim, OPENAI, &openai_stream("m"))
        .await
        .into_body();
    let (got, how) = frames(&mut body, wait).await;
    assert_eq!(how, "end");
    assert_eq!(got.len(), 4, "{got:?}");
    let last = parse(got[3].strip_prefix("data: ").unwrap().trim_end());
    assert!(last["error"]["message"].is_string());
    assert_eq!(last["error"]["type"], "server_error");
    assert!(!got.iter().any(|f| f.contains("[DONE]")));

    let mut body = send_json(&sim, ANTHROPIC, &anthropic("c", true))
        .await
        .into_body();
    let (got, how) = frames(&mut body, wait).await;
    assert_eq!(how, "end");
    let last = got.last().unwrap();
    assert!(last.starts_with("event: error\ndata: "), "{last:?}");
    let v = parse(last.trim_end().split_once("data: ").unwrap().1);
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "overloaded_error");
    assert!(!got.iter().any(|f| f.contains("message_stop")));

    let mut body = send_json(&sim, &gemini("g", true, true), &gemini_body("hi"))
        .await
        .into_body();
    let (got, how) = frames(&mut body, wait).await;
    assert_eq!(how, "end");
    assert_eq!(got.len(), 3);
    assert!(got[2].starts_with("data: {\"error\":") && got[2].ends_with("\r\n\r\n"));
    let v = parse(got[2].strip_prefix("data: ").unwrap().trim_end());
    assert_eq!(v["error"]["status"], "UNAVAILABLE");
}

#[tokio::test(start_paused = true)]
async fn stream_faults_per_model_and_probability_zero() {
    let sim = Simulator::new(
        Scenario::builder()
            .stream_fault_for(
                "flaky",
                StreamFault::StallBeforeFirstToken { probability: 1.0 },
            )
            .stream_fault(StreamFault::ErrorEventAfterTokens {
                tokens: 1,
                probability: 0.0,
            })
            .build()
            .unwrap(),
    );
    let (parts, text) = read(send_json(&sim, OPENAI, &openai_stream("steady")).await).await;
    assert_eq!(parts.status, 200);
    assert!(text.ends_with("data: [DONE]\n\n"));
    let mut body = send_json(&sim, OPENAI, &openai_stream("flaky"))
        .await
        .into_body();
    assert_eq!(
        frames(&mut body, Duration::from_secs(30)).await.1,
        "pending"
    );
}

#[tokio::test(start_paused = true)]
async fn latencies_are_on_tokio_time() {
    let sim = Simulator::new(
        Scenario::builder()
            .default_model(ModelSpec::new("*").completion_tokens(5))
            .latency(Latency::fixed(Duration::from_secs(1)))
            .error_latency(Latency::fixed(Duration::from_millis(50)))
            .token_interval(Latency::fixed(Duration::from_millis(20)))
            .fault(Fault::status(500).model("broken"))
            .build()
            .unwrap(),
    );
    // Non-streamed: latency + 5 token intervals before the head.
    let t0 = Instant::now();
    let resp = send_json(&sim, OPENAI, &chat("m", "hi")).await;
    assert_eq!(t0.elapsed(), Duration::from_millis(1100));
    assert_eq!(resp.headers()["openai-processing-ms"], "1100");
    // Errors: the error latency.
    let t0 = Instant::now();
    let resp = send_json(&sim, OPENAI, &chat("broken", "hi")).await;
    assert_eq!(resp.status(), 500);
    assert_eq!(t0.elapsed(), Duration::from_millis(50));
    // Streamed: head after the latency, then one token every 20 ms.
    let t0 = Instant::now();
    let mut body = send_json(&sim, OPENAI, &openai_stream("m"))
        .await
        .into_body();
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        arrivals.push((
            t0.elapsed().as_millis(),
            String::from_utf8(data.to_vec()).unwrap(),
        ));
    }
    let times: Vec<u128> = arrivals.iter().map(|(t, _)| *t).collect();
    // role chunk at once, 5 tokens 20 ms apart, finish and [DONE] right after the last.
    assert_eq!(times, [1000, 1020, 1040, 1060, 1080, 1100, 1100, 1100]);
}

#[tokio::test(start_paused = true)]
async fn uniform_latency_is_within_bounds() {
    let sim = Simulator::new(
        Scenario::builder()
            .seed(3)
            .latency(Latency::uniform(
                Duration::from_millis(100),
                Duration::from_millis(300),
            ))
            .build()
            .unwrap(),
    );
    let mut seen = Vec::new();
    for _ in 0..50 {
        let t0 = Instant::now();
        send_json(&sim, OPENAI, &chat("m", "hi")).await;
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(100) && took <= Duration::from_millis(300));
        seen.push(took);
    }
    seen.dedup();
    assert!(seen.len() > 10, "latencies vary");
}

#[tokio::test(start_paused = true)]
async fn per_model_latency_overrides_and_clear_calls() {
    let sim = Simulator::new(
        Scenario::builder()
            .model(
                ModelSpec::new("slow")
                    .completion_tokens(2)
                    .latency(Latency::fixed(Duration::from_secs(30)))
                    .token_interval(Latency::fixed(Duration::from_secs(1))),
            )
            .default_model(ModelSpec::new("*").completion_tokens(2))
            .latency(Latency::fixed(Duration::from_millis(100)))
            .build()
            .unwrap(),
    );
    let t0 = Instant::now();
    send_json(&sim, OPENAI, &chat("slow", "hi")).await;
    assert_eq!(t0.elapsed(), Duration::from_secs(32));
    let t0 = Instant::now();
    send_json(&sim, OPENAI, &chat("fast", "hi")).await;
    assert_eq!(t0.elapsed(), Duration::from_millis(100));
    assert_eq!(sim.stats().total, 2);
    assert_eq!(sim.calls()[0].at, Duration::ZERO);
    assert_eq!(sim.calls()[1].at, Duration::from_secs(32));
    sim.clear_calls();
    assert!(sim.calls().is_empty());
    assert_eq!(sim.stats().total, 0);
}
