//! The store seam on a paused clock, with an in-memory shared state standing in for Redis:
//! two layers (two replicas) share a cooldown; a store that is down is decided around.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::ServiceExt;
use tower_ai_core::AiError;
use tower_ai_retry_after::store::{Check, CooldownStore, SharedCooldown, StoreFuture};
use tower_ai_retry_after::RetryAfterAwareLayer;

use support::{request, resp, stack};

/// Ends of cooldowns by label, shared by the layers given a clone; a round trip takes
/// `rtt`; `down` makes every call fail.
#[derive(Debug, Clone, Default)]
struct Memory {
    ends: Arc<Mutex<HashMap<String, Instant>>>,
    checks: Arc<Mutex<u32>>,
    down: Arc<Mutex<bool>>,
}

const RTT: Duration = Duration::from_millis(1);

impl CooldownStore for Memory {
    fn consult(&self) -> bool {
        true
    }

    fn check(&self, label: &str) -> Check {
        *self.checks.lock().unwrap() += 1;
        let this = self.clone();
        let label = label.to_owned();
        Check::Later(Box::pin(async move {
            tokio::time::sleep(RTT).await;
            if *this.down.lock().unwrap() {
                return SharedCooldown::Unavailable;
            }
            let now = Instant::now();
            match this.ends.lock().unwrap().get(&label) {
                Some(&end) if end > now => SharedCooldown::Cooling(end - now),
                _ => SharedCooldown::Clear,
            }
        }))
    }

    fn publish(&self, label: &str, wait: Duration) -> Option<StoreFuture<()>> {
        let this = self.clone();
        let label = label.to_owned();
        Some(Box::pin(async move {
            tokio::time::sleep(RTT).await;
            if *this.down.lock().unwrap() {
                return;
            }
            let end = Instant::now() + wait;
            let mut ends = this.ends.lock().unwrap();
            let e = ends.entry(label).or_insert(end);
            *e = (*e).max(end);
        }))
    }
}

fn layer(store: &Memory) -> RetryAfterAwareLayer {
    RetryAfterAwareLayer::builder()
        .store(store.clone())
        .release_spread(Duration::ZERO)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_cooldown_learned_by_one_layer_holds_the_other_until_its_end() {
    let shared = Memory::default();
    let (one, two) = (layer(&shared), layer(&shared));
    let (svc1, mut h1) = stack(&one);
    let (svc2, mut h2) = stack(&two);

    let t = tokio::spawn(svc1.oneshot(request("gpt-4o")));
    let (_, send) = h1.next_request().await.unwrap();
    send.send_response(resp(429, &[("retry-after", "5")]));
    assert_eq!(t.await.unwrap().unwrap().status(), 429);
    // The answer came back once the cooldown was published.
    assert!(shared
        .ends
        .lock()
        .unwrap()
        .contains_key("api.openai.com/gpt-4o"));

    let start = Instant::now();
    let t = tokio::spawn(svc2.clone().oneshot(request("gpt-4o")));
    let (_, send) = h2.next_request().await.unwrap();
    let held = start.elapsed();
    send.send_response(resp(200, &[]));
    assert_eq!(t.await.unwrap().unwrap().status(), 200);
    // Held until the end of the other layer's cooldown (5 s from its 429), then looked
    // again (one more round trip) and sent.
    assert!(
        held >= Duration::from_millis(4_990) && held <= Duration::from_millis(5_010),
        "{held:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_known_cooldown_costs_no_round_trip() {
    let shared = Memory::default();
    shared.ends.lock().unwrap().insert(
        "api.openai.com/gpt-4o".into(),
        Instant::now() + Duration::from_secs(30),
    );
    let gate = RetryAfterAwareLayer::builder()
        .store(shared.clone())
        .fail_fast()
        .build()
        .unwrap();
    let (svc, _h) = stack(&gate);
    for _ in 0..5 {
        let err = svc.clone().oneshot(request("gpt-4o")).await.unwrap_err();
        assert!(matches!(
            err.downcast_ref::<AiError>(),
            Some(AiError::CoolingDown { .. })
        ));
    }
    assert_eq!(*shared.checks.lock().unwrap(), 1, "asked once, then known");
}

#[tokio::test(start_paused = true)]
async fn a_store_that_is_down_is_decided_around() {
    let shared = Memory::default();
    *shared.down.lock().unwrap() = true;
    let gate = layer(&shared);
    let (svc, mut h) = stack(&gate);
    let t = tokio::spawn(svc.clone().oneshot(request("gpt-4o")));
    let (_, send) = h.next_request().await.unwrap();
    send.send_response(resp(429, &[("retry-after", "5")]));
    assert_eq!(t.await.unwrap().unwrap().status(), 429);
    // The cooldown is still held in-process.
    let start = Instant::now();
    let t = tokio::spawn(svc.clone().oneshot(request("gpt-4o")));
    let (_, send) = h.next_request().await.unwrap();
    assert!(start.elapsed() >= Duration::from_secs(5));
    send.send_response(resp(200, &[]));
    assert_eq!(t.await.unwrap().unwrap().status(), 200);
}
