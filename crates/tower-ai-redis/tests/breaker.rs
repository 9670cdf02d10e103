//! CircuitBreaker's state shared through Redis: the scripts, a breaker opened by one
//! replica open in all, half-open probes across the replicas within the configured
//! number, and Redis failing under them. 4 independent stacks, each with its own store,
//! over one simulated provider, on the real clock (short durations).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;
use support::NO_HANG;

use http::Request;
use tower::{ServiceBuilder, ServiceExt};
use tower_ai_circuit_breaker::store::SharedState;
use tower_ai_circuit_breaker::{CircuitBreakerHandle, CircuitBreakerLayer, CircuitState};
use tower_ai_core::{AiBody, AiError, BoxError, ClassifyLayer};
use tower_ai_redis::testing::RedisServer;
use tower_ai_redis::{RedisBreakers, RedisStore};
use tower_ai_sim::{Latency, ModelSpec, Scenario, Simulator};

/// `claude-sonnet` overloaded (529) from `from` to `until` since the simulator's start;
/// every answer after `latency`.
fn provider(from: Duration, until: Duration, latency: Duration) -> Simulator {
    Simulator::new(
        Scenario::builder()
            .seed(11)
            .model(ModelSpec::new("claude-sonnet"))
            .outage_with_status("claude-sonnet", from, until, 529)
            .latency(Latency::fixed(latency))
            .error_latency(Latency::fixed(latency))
            .build()
            .unwrap(),
    )
}

fn request() -> Request<AiBody> {
    Request::post("https://api.anthropic.com/v1/messages")
        .body(AiBody::from(
            r#"{"model":"claude-sonnet","max_tokens":16,"messages":[{"role":"user","content":"Hi"}]}"#,
        ))
        .unwrap()
}

/// Calls in flight at the provider, and the most seen at once.
#[derive(Debug, Default)]
struct InFlight {
    now: AtomicUsize,
    max: AtomicUsize,
    total: AtomicUsize,
}

type Replica = tower::util::BoxCloneService<Request<AiBody>, u16, BoxError>;

struct Stack {
    svc: Replica,
    handle: CircuitBreakerHandle,
    sent: Arc<InFlight>,
}

/// One replica: its own store and breaker, over the shared provider; `in_flight` counts
/// the calls of every replica at the provider, `sent` this replica's.
fn replica(
    sim: &Simulator,
    breakers: RedisBreakers,
    in_flight: &Arc<InFlight>,
    open_for: Duration,
    probes: u32,
) -> Stack {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(2)
        .minimum_calls(50)
        .open_duration(open_for)
        .half_open_probes(probes)
        .half_open_successes(2)
        .store(breakers)
        .build()
        .unwrap();
    let handle = layer.handle();
    let sent = Arc::new(InFlight::default());
    let (sim, all, mine) = (sim.service(), in_flight.clone(), sent.clone());
    let provider = tower::service_fn(move |req: Request<AiBody>| {
        let (sim, all, mine) = (sim.clone(), all.clone(), mine.clone());
        async move {
            let n = all.now.fetch_add(1, Ordering::SeqCst) + 1;
            all.max.fetch_max(n, Ordering::SeqCst);
            all.total.fetch_add(1, Ordering::SeqCst);
            mine.total.fetch_add(1, Ordering::SeqCst);
            let res = sim.oneshot(req).await;
            all.now.fetch_sub(1, Ordering::SeqCst);
            res
        }
    });
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(ClassifyLayer::new())
        .service(provider);
    let svc = ServiceExt::<Request<AiBody>>::map_response(svc, |r: http::Response<_>| {
        r.status().as_u16()
    });
    Stack {
        svc: tower::util::BoxCloneService::new(svc),
        handle,
        sent,
    }
}

async fn call(s: &Stack) -> Result<u16, BoxError> {
    s.svc.clone().oneshot(request()).await
}

fn refused(r: &Result<u16, BoxError>) -> bool {
    matches!(
        r.as_ref().err().and_then(|e| e.downcast_ref::<AiError>()),
        Some(AiError::CircuitOpen { .. })
    )
}

fn state(s: &Stack) -> CircuitState {
    s.handle.state_for(&request())
}

#[tokio::test]
async fn scripts_open_take_permits_count_successes_and_close() {
    let Some(server) = RedisServer::start_or_skip("breaker scripts") else {
        return;
    };
    let b = RedisBreakers::new(server.store());
    assert_eq!(b.take_permit("h/m", 2).await.unwrap(), SharedState::Closed);
    let left = b.open("h/m", Duration::from_millis(300)).await.unwrap();
    assert!(left > Duration::from_millis(250), "{left:?}");
    // Open extends, never shortens.
    let left = b.open("h/m", Duration::from_millis(100)).await.unwrap();
    assert!(left > Duration::from_millis(250), "{left:?}");
    let open = b.open_breakers().await.unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].0, "h/m");
    assert!(matches!(
        b.take_permit("h/m", 2).await.unwrap(),
        SharedState::Open(d) if d > Duration::from_millis(200)
    ));
    tokio::time::sleep(Duration::from_millis(320)).await;
    assert!(b.open_breakers().await.unwrap().is_empty());
    // Half-open: two permits among all replicas, then busy.
    let other = RedisBreakers::new(server.store());
    assert_eq!(b.take_permit("h/m", 2).await.unwrap(), SharedState::Granted);
    assert_eq!(
        other.take_permit("h/m", 2).await.unwrap(),
        SharedState::Granted
    );
    assert!(matches!(
        b.take_permit("h/m", 2).await.unwrap(),
        SharedState::Busy(_)
    ));
    // A permit given back without a success frees its place, counting nothing.
    assert_eq!(
        b.return_permit("h/m", false, 2).await.unwrap(),
        SharedState::HalfOpen
    );
    assert_eq!(b.take_permit("h/m", 2).await.unwrap(), SharedState::Granted);
    // Two successes (from two replicas) close it.
    assert_eq!(
        b.return_permit("h/m", true, 2).await.unwrap(),
        SharedState::HalfOpen
    );
    assert_eq!(
        other.return_permit("h/m", true, 2).await.unwrap(),
        SharedState::Closed
    );
    assert_eq!(b.take_permit("h/m", 2).await.unwrap(), SharedState::Closed);
    // A failed probe reopens (its permits are dropped).
    b.open("h/m", Duration::from_millis(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(b.take_permit("h/m", 1).await.unwrap(), SharedState::Granted);
    b.open("h/m", Duration::from_millis(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        other.take_permit("h/m", 1).await.unwrap(),
        SharedState::Granted,
        "the permit of the failed probe went with it"
    );
}

fn breakers(server: &RedisServer) -> RedisBreakers {
    RedisBreakers::new(server.store()).refresh(Duration::from_millis(50))
}

#[tokio::test]
async fn a_breaker_opened_by_one_replica_is_open_for_all() {
    let Some(server) = RedisServer::start_or_skip("breaker propagation") else {
        return;
    };
    let sim = provider(
        Duration::ZERO,
        Duration::from_secs(60),
        Duration::from_millis(5),
    );
    let in_flight = Arc::new(InFlight::default());
    // A response timeout far above the machine's scheduling delays: this test is about
    // the shared bound, not the fall-back to in-process probes when Redis is slow.
    let stores: Vec<RedisStore> = (0..4)
        .map(|_| {
            RedisStore::builder()
                .response_timeout(Duration::from_millis(500))
                .build(server.client())
        })
        .collect();
    let replicas: Vec<Stack> = stores
        .iter()
        .map(|store| {
            replica(
                &sim,
                RedisBreakers::new(store.clone()).refresh(Duration::from_millis(50)),
                &in_flight,
                Duration::from_secs(30),
                1,
            )
        })
        .collect();
    // Each replica meets one overload: not enough to trip (2 in a row needed).
    for r in &replicas {
        assert_eq!(call(r).await.unwrap(), 529);
    }
    // Replica 1 meets a second one and trips.
    assert_eq!(call(&replicas[0]).await.unwrap(), 529);
    assert_eq!(state(&replicas[0]), CircuitState::Open);
    let tripped = Instant::now();
    let sent = in_flight.total.load(Ordering::SeqCst);
    // Within one refresh (50 ms) and a round trip, every replica is open.
    let deadline = tripped + Duration::from_secs(1);
    while replicas.iter().any(|r| state(r) != CircuitState::Open) {
        assert!(Instant::now() < deadline, "not open everywhere after 1 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("open everywhere {:?} after the trip", tripped.elapsed());
    for r in &replicas[1..] {
        let res = call(r).await;
        assert!(refused(&res), "{res:?}");
    }
    assert_eq!(
        in_flight.total.load(Ordering::SeqCst),
        sent,
        "no call reached the provider"
    );
}

#[tokio::test]
async fn half_open_probes_across_replicas_stay_within_the_configured_number() {
    let Some(server) = RedisServer::start_or_skip("breaker probes") else {
        return;
    };
    // Overloaded for the whole test: every probe fails (after 150 ms), so the breakers
    // go open, half-open, open again, and only probes reach the provider.
    let sim = provider(
        Duration::ZERO,
        Duration::from_secs(60),
        Duration::from_millis(150),
    );
    let in_flight = Arc::new(InFlight::default());
    // A response timeout far above the machine's scheduling delays: this test is about
    // the shared bound, not the fall-back to in-process probes when Redis is slow.
    let stores: Vec<RedisStore> = (0..4)
        .map(|_| {
            RedisStore::builder()
                .response_timeout(Duration::from_millis(500))
                .build(server.client())
        })
        .collect();
    let replicas: Vec<Stack> = stores
        .iter()
        .map(|store| {
            replica(
                &sim,
                RedisBreakers::new(store.clone()).refresh(Duration::from_millis(50)),
                &in_flight,
                Duration::from_millis(200),
                2,
            )
        })
        .collect();
    // Every replica tracks the key from its first call (one overload each: no trip);
    // replica 1 trips, and the others open from the shared state.
    for r in &replicas {
        assert_eq!(call(r).await.unwrap(), 529);
    }
    assert_eq!(call(&replicas[0]).await.unwrap(), 529);
    let deadline = Instant::now() + Duration::from_secs(1);
    while replicas.iter().any(|r| state(r) != CircuitState::Open) {
        assert!(Instant::now() < deadline, "not open everywhere after 1 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = in_flight.total.load(Ordering::SeqCst);
    in_flight.max.store(0, Ordering::SeqCst);
    let sent_before: Vec<usize> = replicas
        .iter()
        .map(|r| r.sent.total.load(Ordering::SeqCst))
        .collect();
    // 2.5 s of 4 replicas each sending 4 calls every 10 ms.
    let end = Instant::now() + Duration::from_millis(2_500);
    let mut tasks = Vec::new();
    for r in &replicas {
        for _ in 0..4 {
            let svc = r.svc.clone();
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let _ = svc.clone().oneshot(request()).await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let probes = in_flight.total.load(Ordering::SeqCst) - before;
    let max = in_flight.max.load(Ordering::SeqCst);
    let probing: usize = replicas
        .iter()
        .zip(&sent_before)
        .filter(|(r, b)| r.sent.total.load(Ordering::SeqCst) > **b)
        .count();
    println!("{probes} probes from {probing} replicas, at most {max} at once");
    assert!(!stores.iter().any(RedisStore::is_degraded));
    assert!(probes >= 4, "the breakers probed: {probes}");
    assert!(
        max <= 2,
        "at most 2 probes at once across the replicas: {max}"
    );
}

#[tokio::test]
async fn probes_that_succeed_close_every_replica() {
    let Some(server) = RedisServer::start_or_skip("breaker close") else {
        return;
    };
    // Overloaded for 400 ms, then well.
    let sim = provider(
        Duration::ZERO,
        Duration::from_millis(400),
        Duration::from_millis(5),
    );
    let in_flight = Arc::new(InFlight::default());
    // A response timeout far above the machine's scheduling delays: this test is about
    // the shared bound, not the fall-back to in-process probes when Redis is slow.
    let stores: Vec<RedisStore> = (0..4)
        .map(|_| {
            RedisStore::builder()
                .response_timeout(Duration::from_millis(500))
                .build(server.client())
        })
        .collect();
    let replicas: Vec<Stack> = stores
        .iter()
        .map(|store| {
            replica(
                &sim,
                RedisBreakers::new(store.clone()).refresh(Duration::from_millis(50)),
                &in_flight,
                Duration::from_millis(500),
                1,
            )
        })
        .collect();
    for r in &replicas {
        let _ = call(r).await;
    }
    assert_eq!(call(&replicas[0]).await.unwrap(), 529);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut errors = 0;
    // Callers keep calling; the shared breaker probes (one at a time), two successes
    // close it, and every replica closes.
    while replicas.iter().any(|r| state(r) != CircuitState::Closed) {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            replicas.iter().map(state).collect::<Vec<_>>()
        );
        for r in &replicas {
            let after_outage = sim.elapsed() >= Duration::from_millis(400);
            match call(r).await {
                Ok(200) => {}
                Ok(_) if after_outage => errors += 1,
                Ok(_) => {}
                Err(e) => assert!(refused(&Err(e))),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(errors, 0, "no probe failed after the outage");
    for r in &replicas {
        assert_eq!(call(r).await.unwrap(), 200);
    }
}

#[tokio::test]
async fn redis_down_falls_back_to_in_process_breakers_and_sharing_resumes() {
    let Some(mut server) = RedisServer::start_or_skip("breaker: kill and restart") else {
        return;
    };
    let sim = provider(
        Duration::ZERO,
        Duration::from_millis(600),
        Duration::from_millis(5),
    );
    let in_flight = Arc::new(InFlight::default());
    let stores: Vec<RedisStore> = (0..2)
        .map(|_| {
            RedisStore::builder()
                .retry_after_outage(Duration::from_millis(100))
                .build(server.client())
        })
        .collect();
    let mk = |s: &RedisStore| RedisBreakers::new(s.clone()).refresh(Duration::from_millis(50));
    let replicas: Vec<Stack> = stores
        .iter()
        .map(|s| replica(&sim, mk(s), &in_flight, Duration::from_millis(300), 1))
        .collect();
    assert_eq!(call(&replicas[1]).await.unwrap(), 529);
    assert_eq!(call(&replicas[0]).await.unwrap(), 529);
    assert_eq!(call(&replicas[0]).await.unwrap(), 529);
    let deadline = Instant::now() + Duration::from_secs(1);
    while replicas.iter().any(|r| state(r) != CircuitState::Open) {
        assert!(Instant::now() < deadline, "not open everywhere after 1 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    // Down: the probes are asked of a dead Redis, refused, and taken in-process; no call
    // waits on Redis; each replica closes by its own probes once the provider is well.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut slowest_refusal = Duration::ZERO;
    while replicas.iter().any(|r| state(r) != CircuitState::Closed) {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            replicas.iter().map(state).collect::<Vec<_>>()
        );
        for r in &replicas {
            let started = Instant::now();
            let res = call(r).await;
            if refused(&res) {
                slowest_refusal = slowest_refusal.max(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("down: slowest refusal {slowest_refusal:?}");
    assert!(slowest_refusal < NO_HANG, "{slowest_refusal:?}");
    assert!(stores.iter().any(RedisStore::is_degraded));
    // Readable from the layer's handle too.
    assert!(replicas.iter().any(|r| r.handle.is_degraded()));

    server.restart().unwrap();
    // Shared again without restarting the replicas: the store finds Redis by itself.
    let deadline = Instant::now() + Duration::from_secs(5);
    let probe = mk(&stores[0]);
    while probe.open_breakers().await.is_err() {
        assert!(Instant::now() < deadline, "redis not found again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sim2 = provider(
        Duration::ZERO,
        Duration::from_secs(60),
        Duration::from_millis(5),
    );
    let replicas: Vec<Stack> = stores
        .iter()
        .map(|s| replica(&sim2, mk(s), &in_flight, Duration::from_secs(30), 1))
        .collect();
    assert_eq!(call(&replicas[1]).await.unwrap(), 529);
    assert_eq!(call(&replicas[0]).await.unwrap(), 529);
    assert_eq!(call(&replicas[0]).await.unwrap(), 529);
    let deadline = Instant::now() + Duration::from_secs(2);
    while state(&replicas[1]) != CircuitState::Open {
        assert!(Instant::now() < deadline, "not shared after the restart");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn script_flush_reloads_the_scripts() {
    let Some(server) = RedisServer::start_or_skip("breaker: script flush") else {
        return;
    };
    let sim = provider(
        Duration::ZERO,
        Duration::from_secs(60),
        Duration::from_millis(5),
    );
    let in_flight = Arc::new(InFlight::default());
    let replicas: Vec<Stack> = (0..2)
        .map(|_| {
            replica(
                &sim,
                breakers(&server),
                &in_flight,
                Duration::from_secs(30),
                1,
            )
        })
        .collect();
    assert_eq!(call(&replicas[1]).await.unwrap(), 529);
    // Loaded by a first use, then flushed.
    breakers(&server).open_breakers().await.unwrap();
    server.script_flush().await.unwrap();
    assert_eq!(call(&replicas[0]).await.unwrap(), 529);
    assert_eq!(call(&replicas[0]).await.unwrap(), 529);
    let deadline = Instant::now() + Duration::from_secs(2);
    while state(&replicas[1]) != CircuitState::Open {
        assert!(Instant::now() < deadline, "not shared after SCRIPT FLUSH");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn client_pause_falls_back_instead_of_hanging() {
    let Some(server) = RedisServer::start_or_skip("breaker: client pause") else {
        return;
    };
    let sim = provider(
        Duration::ZERO,
        Duration::from_millis(300),
        Duration::from_millis(5),
    );
    let in_flight = Arc::new(InFlight::default());
    let r = replica(
        &sim,
        // The default settings: the 20 ms response timeout is what this test is about.
        RedisBreakers::new(server.try_store().unwrap()).refresh(Duration::from_millis(50)),
        &in_flight,
        Duration::from_millis(400),
        1,
    );
    assert_eq!(call(&r).await.unwrap(), 529);
    assert_eq!(call(&r).await.unwrap(), 529);
    assert_eq!(state(&r), CircuitState::Open);
    server.pause_clients(Duration::from_secs(2)).await.unwrap();
    // The open period ends during the pause: the permit request times out (20 ms), the
    // breaker probes in-process and closes, while Redis is still paused; no call waits.
    let paused = Instant::now();
    let mut slowest = Duration::ZERO;
    while state(&r) != CircuitState::Closed {
        assert!(
            paused.elapsed() < Duration::from_millis(1_500),
            "{:?}",
            state(&r)
        );
        let started = Instant::now();
        let _ = call(&r).await;
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "client pause: closed after {:?}, slowest call {slowest:?}",
        paused.elapsed()
    );
    // No call waits on Redis (the store's I/O is off the call path): the calls take the
    // provider's 5 ms, plus the scheduling of a machine running the other tests.
    assert!(slowest < NO_HANG, "{slowest:?}");
}
