//! RetryAfterAware's cooldowns shared through Redis: the scripts, propagation between
//! replicas (4 independent stacks, each with its own store, over one simulated provider),
//! and Redis failing under them. Real time (a paused clock cannot wait on a real Redis):
//! cooldowns of 1-2 s, and "held" asserted by the typed refusal and the provider's count.

use std::time::{Duration, Instant};

mod support;
use support::NO_HANG;

use http::Request;
use tower::{ServiceBuilder, ServiceExt};
use tower_ai_core::{AiBody, AiError, BoxError, ClassifyLayer};
use tower_ai_redis::testing::RedisServer;
use tower_ai_redis::{RedisCooldowns, RedisStore};
use tower_ai_retry_after::store::{Check, CooldownStore, SharedCooldown};
use tower_ai_retry_after::RetryAfterAwareLayer;
use tower_ai_sim::{Fault, ModelSpec, Scenario, Simulator};

const LABEL: &str = "api.anthropic.com/claude-sonnet";

/// A simulator whose `claude-sonnet` answers 429 with `retry-after` for its first
/// `fault_for` (every other model, and later calls, 200).
fn provider(retry_after: Duration, fault_for: Duration) -> Simulator {
    let mut scenario = Scenario::builder()
        .seed(7)
        .model(ModelSpec::new("claude-sonnet"))
        .model(ModelSpec::new("claude-haiku"));
    if !fault_for.is_zero() {
        scenario = scenario.fault(
            Fault::status(429)
                .model("claude-sonnet")
                .between(Duration::ZERO, fault_for)
                .retry_after(retry_after),
        );
    }
    Simulator::new(scenario.build().unwrap())
}

fn request(model: &str) -> Request<AiBody> {
    Request::post("https://api.anthropic.com/v1/messages")
        .body(AiBody::from(format!(
            r#"{{"model":"{model}","max_tokens":16,"messages":[{{"role":"user","content":"Hi"}}]}}"#
        )))
        .unwrap()
}

type Replica = tower::util::BoxCloneService<Request<AiBody>, http::Response<AiBody>, BoxError>;

/// One replica: its own store and its own gate, over the shared provider.
fn replica(sim: &Simulator, cooldowns: RedisCooldowns, fail_fast: bool) -> Replica {
    let mut gate = RetryAfterAwareLayer::builder().store(cooldowns);
    if fail_fast {
        gate = gate.fail_fast();
    }
    let svc = ServiceBuilder::new()
        .layer(gate.build().unwrap())
        .layer(ClassifyLayer::new())
        .service(sim.service());
    tower::util::BoxCloneService::new(ServiceExt::<Request<AiBody>>::map_response(
        svc,
        |r: http::Response<_>| r.map(|_| AiBody::empty()),
    ))
}

async fn status(svc: &Replica, model: &str) -> Result<u16, BoxError> {
    svc.clone()
        .oneshot(request(model))
        .await
        .map(|r| r.status().as_u16())
}

fn cooling_down(r: &Result<u16, BoxError>) -> bool {
    matches!(
        r.as_ref().err().and_then(|e| e.downcast_ref::<AiError>()),
        Some(AiError::CoolingDown { .. })
    )
}

#[tokio::test]
async fn extend_only_moves_the_end_later_and_the_key_expires_then() {
    let Some(server) = RedisServer::start_or_skip("cooldown scripts") else {
        return;
    };
    let cooldowns = RedisCooldowns::strict(server.store());
    let left = cooldowns
        .extend("h/m", Duration::from_millis(2_000))
        .await
        .unwrap();
    assert!(left > Duration::from_millis(1_900), "{left:?}");
    // A shorter cooldown does not shorten it; a longer one extends it.
    let left = cooldowns
        .extend("h/m", Duration::from_millis(500))
        .await
        .unwrap();
    assert!(left > Duration::from_millis(1_900), "{left:?}");
    let left = cooldowns
        .extend("h/m", Duration::from_millis(3_000))
        .await
        .unwrap();
    assert!(left > Duration::from_millis(2_900), "{left:?}");
    // The key expires at the end (on Redis's clock).
    let mut conn = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(
            server
                .store()
                .key("cooldown", RedisCooldowns::DEFAULT_TAG, "h/m"),
        )
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((2_900..=3_000).contains(&pttl), "{pttl}");
    let left = cooldowns.remaining("h/m").await.unwrap();
    assert!(left > Duration::from_millis(2_900), "{left:?}");
    assert_eq!(cooldowns.remaining("other").await.unwrap(), Duration::ZERO);
    let running = cooldowns.running().await.unwrap();
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0].0, "h/m");

    // A short one ends: gone from the key and from the index.
    cooldowns
        .extend("short", Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(cooldowns.running().await.unwrap().len(), 2);
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(cooldowns.remaining("short").await.unwrap(), Duration::ZERO);
    assert_eq!(cooldowns.running().await.unwrap().len(), 1);
}

#[tokio::test]
async fn strict_a_429_seen_by_one_replica_holds_the_three_others_at_once() {
    let Some(server) = RedisServer::start_or_skip("strict cooldown propagation") else {
        return;
    };
    let sim = provider(Duration::from_secs(2), Duration::from_secs(30));
    let replicas: Vec<Replica> = (0..4)
        .map(|_| replica(&sim, RedisCooldowns::strict(server.store()), true))
        .collect();
    // Replica 1 meets the 429 (retry-after: 2). Its caller gets the answer once Redis
    // holds the cooldown.
    assert_eq!(status(&replicas[0], "claude-sonnet").await.unwrap(), 429);
    assert_eq!(sim.stats().total, 1);
    // Replicas 2-4, which never saw the 429, refuse at once, without a call.
    for r in &replicas[1..] {
        let res = status(r, "claude-sonnet").await;
        assert!(cooling_down(&res), "{res:?}");
    }
    assert_eq!(
        sim.stats().total,
        1,
        "the provider saw only replica 1's call"
    );
    // Other models are not held.
    assert_eq!(status(&replicas[2], "claude-haiku").await.unwrap(), 200);
    // Learned locally: while it lasts, a replica asks Redis no more.
    let cooldowns = RedisCooldowns::strict(server.store());
    let left = cooldowns.remaining(LABEL).await.unwrap();
    assert!(
        left > Duration::from_millis(1_500) && left <= Duration::from_secs(2),
        "{left:?}"
    );
}

#[tokio::test]
async fn strict_a_waiting_replica_is_held_until_the_shared_end() {
    let Some(server) = RedisServer::start_or_skip("strict cooldown wait") else {
        return;
    };
    // 429s for the first 500 ms, with retry-after: 1.
    let sim = provider(Duration::from_secs(1), Duration::from_millis(500));
    let first = replica(&sim, RedisCooldowns::strict(server.store()), false);
    let second = replica(&sim, RedisCooldowns::strict(server.store()), false);
    let started = Instant::now();
    assert_eq!(status(&first, "claude-sonnet").await.unwrap(), 429);
    // The second replica's request waits for the end of replica 1's cooldown, then goes.
    assert_eq!(status(&second, "claude-sonnet").await.unwrap(), 200);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(950), "{waited:?}");
    assert_eq!(sim.stats().total, 2, "{:?}", sim.stats());
    assert_eq!(sim.stats().count(429), 1);
}

#[tokio::test]
async fn leased_replicas_are_held_within_one_refresh() {
    let Some(server) = RedisServer::start_or_skip("leased cooldown propagation") else {
        return;
    };
    let sim = provider(Duration::from_secs(2), Duration::from_secs(30));
    let refresh = Duration::from_millis(200);
    let replicas: Vec<Replica> = (0..4)
        .map(|_| {
            replica(
                &sim,
                RedisCooldowns::leased(server.store()).refresh(refresh),
                true,
            )
        })
        .collect();
    // Replicas 2-4 have made no request yet: their copies are read from when they were
    // made.
    assert_eq!(status(&replicas[0], "claude-sonnet").await.unwrap(), 429);
    let learned = Instant::now();
    let before = sim.stats().total;
    // Within one refresh period (and a round trip), every replica holds the key from its
    // copy: no round trip per request, and no call to the provider.
    tokio::time::sleep(refresh + Duration::from_millis(100)).await;
    for r in &replicas[1..] {
        let res = status(r, "claude-sonnet").await;
        assert!(cooling_down(&res), "{res:?}");
    }
    assert!(learned.elapsed() < Duration::from_secs(1));
    assert_eq!(sim.stats().total, before);
}

/// A gate whose store answers from a copy never asks Redis per request.
#[tokio::test]
async fn leased_checks_answer_from_the_copy() {
    let Some(server) = RedisServer::start_or_skip("leased copy") else {
        return;
    };
    let leased = RedisCooldowns::leased(server.store()).refresh(Duration::from_millis(20));
    assert!(matches!(
        leased.check(LABEL),
        Check::Now(SharedCooldown::Clear)
    ));
    RedisCooldowns::strict(server.store())
        .extend(LABEL, Duration::from_secs(2))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !leased.consult() {
        assert!(Instant::now() < deadline, "the copy never filled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(matches!(
        leased.check(LABEL),
        Check::Now(SharedCooldown::Cooling(d)) if d > Duration::from_millis(1_500)
    ));
    assert!(matches!(
        leased.check("other"),
        Check::Now(SharedCooldown::Clear)
    ));
}

#[tokio::test]
async fn redis_killed_mid_run_fails_no_call_and_sharing_resumes_after_restart() {
    let Some(mut server) = RedisServer::start_or_skip("cooldowns: kill and restart") else {
        return;
    };
    let sim = provider(Duration::from_secs(1), Duration::ZERO);
    let store = |server: &RedisServer| {
        RedisStore::builder()
            .retry_after_outage(Duration::from_millis(100))
            .build(server.client())
    };
    let stores: Vec<RedisStore> = (0..4).map(|_| store(&server)).collect();
    let replicas: Vec<Replica> = stores
        .iter()
        .map(|s| replica(&sim, RedisCooldowns::strict(s.clone()), true))
        .collect();
    let mut slowest = Duration::ZERO;
    let mut failed = 0;
    let mut calls = 0;
    for round in 0..40 {
        if round == 10 {
            server.kill();
        }
        for r in &replicas {
            let started = Instant::now();
            let res = status(r, "claude-sonnet").await;
            slowest = slowest.max(started.elapsed());
            calls += 1;
            if !matches!(res, Ok(200)) {
                failed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("killed: {calls} calls, {failed} failed, slowest {slowest:?}");
    assert_eq!(failed, 0);
    assert!(stores.iter().all(RedisStore::is_degraded));
    // Each call waited for the fall-back at most the store's response timeout (20 ms),
    // plus the machine's scheduling.
    assert!(slowest < NO_HANG, "{slowest:?}");

    server.restart().unwrap();
    // Back to shared state without restarting the replicas: a cooldown published by one
    // holds the others.
    let sim2 = provider(Duration::from_secs(2), Duration::from_secs(30));
    let replicas: Vec<Replica> = stores
        .iter()
        .map(|s| replica(&sim2, RedisCooldowns::strict(s.clone()), true))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stores.iter().any(RedisStore::is_degraded) {
        assert!(Instant::now() < deadline, "redis not found again");
        for r in &replicas {
            let _ = status(r, "claude-haiku").await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(&replicas[0], "claude-sonnet").await.unwrap(), 429);
    for r in &replicas[1..] {
        let res = status(r, "claude-sonnet").await;
        assert!(cooling_down(&res), "{res:?}");
    }
    assert_eq!(sim2.stats().count(429), 1);
}

#[tokio::test]
async fn script_flush_reloads_the_scripts() {
    let Some(server) = RedisServer::start_or_skip("cooldowns: script flush") else {
        return;
    };
    let sim = provider(Duration::from_secs(2), Duration::from_secs(30));
    let replicas: Vec<Replica> = (0..2)
        .map(|_| replica(&sim, RedisCooldowns::strict(server.store()), true))
        .collect();
    // The scripts are loaded by a first use, then flushed.
    for r in &replicas {
        assert_eq!(status(r, "claude-haiku").await.unwrap(), 200);
    }
    server.script_flush().await.unwrap();
    assert_eq!(status(&replicas[0], "claude-sonnet").await.unwrap(), 429);
    let res = status(&replicas[1], "claude-sonnet").await;
    assert!(cooling_down(&res), "{res:?}");
    assert_eq!(sim.stats().count(429), 1);
}

#[tokio::test]
async fn client_pause_falls_back_instead_of_hanging() {
    let Some(server) = RedisServer::start_or_skip("cooldowns: client pause") else {
        return;
    };
    let sim = provider(Duration::from_secs(1), Duration::ZERO);
    // The default settings: the 20 ms response timeout is what this test is about.
    let store = server.try_store().unwrap();
    let r = replica(&sim, RedisCooldowns::strict(store.clone()), true);
    assert_eq!(status(&r, "claude-sonnet").await.unwrap(), 200);
    server.pause_clients(Duration::from_secs(2)).await.unwrap();
    let started = Instant::now();
    assert_eq!(status(&r, "claude-sonnet").await.unwrap(), 200);
    let first = started.elapsed();
    // The store's breaker is open now: the next calls skip Redis.
    let started = Instant::now();
    for _ in 0..10 {
        assert_eq!(status(&r, "claude-sonnet").await.unwrap(), 200);
    }
    let next = started.elapsed() / 10;
    println!("client pause: first call {first:?}, then {next:?} per call");
    assert!(first < NO_HANG, "{first:?}");
    assert!(next < NO_HANG / 10, "{next:?}");
    assert!(store.is_degraded());
    // Readable from the layer too.
    let gate = RetryAfterAwareLayer::builder()
        .store(RedisCooldowns::strict(store.clone()))
        .build()
        .unwrap();
    assert!(gate.is_degraded());
    assert!(!RetryAfterAwareLayer::new().is_degraded());
}
