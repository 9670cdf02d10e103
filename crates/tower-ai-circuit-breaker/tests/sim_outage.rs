//! Against the simulator, in process, on a paused clock: model A answers only overload
//! errors for its first 60 virtual seconds, then recovers; model B is healthy. Offered
//! load: 10 requests/s to each model for 120 s.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_ai_circuit_breaker::{CircuitBreakerLayer, CircuitEvent, CircuitState};
use tower_ai_core::{AiBody, AiError, ClassifyLayer};
use tower_ai_sim::{Latency, ModelSpec, Scenario, Simulator};

fn req(model: &str) -> http::Request<AiBody> {
    let body = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":16}}"#
    );
    http::Request::post("http://sim.local/v1/chat/completions")
        .header("content-type", "application/json")
        .body(AiBody::from(body))
        .unwrap()
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    ok: u64,
    failed: u64,
    refused: u64,
}

#[tokio::test(start_paused = true)]
async fn model_a_down_for_60_virtual_seconds_then_recovers() {
    const DOWN: Duration = Duration::from_secs(60);
    let sim = Simulator::new(
        Scenario::builder()
            .seed(5)
            .model(ModelSpec::new("model-a"))
            .model(ModelSpec::new("model-b"))
            .outage("model-a", Duration::ZERO, DOWN)
            .latency(Latency::fixed(Duration::from_millis(300)))
            .error_latency(Latency::fixed(Duration::from_millis(50)))
            .build()
            .unwrap(),
    );
    let t0 = Instant::now();
    let changes = Arc::new(Mutex::new(Vec::new()));
    let c = changes.clone();
    let layer = CircuitBreakerLayer::builder()
        .count_window(20)
        .minimum_calls(10)
        .failure_rate(0.5)
        .open_duration(Duration::from_secs(2))
        .open_backoff(2.0, Duration::from_secs(16))
        .half_open_probes(1)
        .half_open_successes(2)
        .listener(move |e: &CircuitEvent| {
            if let CircuitEvent::StateChanged { label, to, at, .. } = e {
                c.lock().unwrap().push((label.to_string(), *to, *at - t0));
            }
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(ClassifyLayer::new())
        .service(sim.service());

    let tally = Arc::new(Mutex::new([Tally::default(); 2]));
    let mut tasks = Vec::new();
    for _ in 0..1200u32 {
        for (i, model) in ["model-a", "model-b"].into_iter().enumerate() {
            let (svc, tally) = (svc.clone(), tally.clone());
            tasks.push(tokio::spawn(async move {
                let res = svc.oneshot(req(model)).await;
                let mut t = tally.lock().unwrap();
                match res {
                    Ok(r) if r.status() == 200 => t[i].ok += 1,
                    Ok(_) => t[i].failed += 1,
                    Err(e) => match e.downcast_ref::<AiError>() {
                        Some(AiError::CircuitOpen { .. }) => t[i].refused += 1,
                        _ => t[i].failed += 1,
                    },
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }

    let calls = sim.calls();
    let reached_a_down = calls
        .iter()
        .filter(|c| c.model.as_deref() == Some("model-a") && c.at < DOWN)
        .count();
    let reached_b = calls
        .iter()
        .filter(|c| c.model.as_deref() == Some("model-b"))
        .count();
    let changes = changes.lock().unwrap().clone();
    let closed_after_recovery = changes
        .iter()
        .find(|(l, to, at)| l.ends_with("model-a") && *to == CircuitState::Closed && *at >= DOWN)
        .map(|c| c.2 - DOWN)
        .expect("model-a's breaker closes after the recovery");
    let tally = *tally.lock().unwrap();
    println!(
        "model-a offered {} calls while down, {} reached it; closed {:?} after recovery; \
         model-a {:?}; model-b {:?}; transitions {:?}",
        600,
        reached_a_down,
        closed_after_recovery,
        tally[0],
        tally[1],
        changes
            .iter()
            .map(|c| (c.1, c.2.as_secs_f64()))
            .collect::<Vec<_>>()
    );
    // The breaker opens after the minimum of 10 calls, then only probes reach A: one per
    // opening, with open durations 2, 4, 8, 16, 16, … s.
    assert!(
        reached_a_down <= 10 + 8,
        "{reached_a_down} calls reached model-a while down"
    );
    assert!(reached_a_down >= 10);
    // Recovery is noticed by the first probe after it (at most the 16 s cap), then two
    // successes (each 300 ms, sent 100 ms apart) close it.
    assert!(
        closed_after_recovery <= Duration::from_secs(17),
        "{closed_after_recovery:?}"
    );
    // Model B never noticed.
    assert_eq!(tally[1].ok, 1200);
    assert_eq!(reached_b, 1200);
    assert_eq!(handle.state_for(&req("model-b")), CircuitState::Closed);
    assert_eq!(handle.state_for(&req("model-a")), CircuitState::Closed);
    assert!(tally[0].refused > 500, "{:?}", tally[0]);
}
