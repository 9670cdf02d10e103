//! Strict mode's settlements against a real `redis-server` (started by the test; skipped
//! locally without one, a failure in CI): carried by the next admission (one round trip
//! per call), flushed when no admission comes, kept while Redis is skipped, refunds never
//! applied twice, and a concurrency limit held across four replicas whose places come back
//! through the queue. Real time, in short runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;
use support::{admitted, ask, commands, each_key, limits, MS};

use tower_ai_budget::{BudgetStore, Spent, StoreDecision, StoreLease, StoreLimits};
use tower_ai_core::BudgetLimit;
use tower_ai_redis::testing::RedisServer;
use tower_ai_redis::{RedisBudget, RedisStore};

/// The token limits' window here: long enough that nothing drains during a test.
const HOUR: Duration = Duration::from_secs(3600);

fn refused(d: StoreDecision) -> BudgetLimit {
    support::refused(d).0
}

/// A store for tests not about outages (see `support::patient`), with a fixed replica
/// count so no heartbeat script runs beside the budget's.
fn patient(server: &RedisServer) -> RedisStore {
    support::patient().replicas(1).build(server.client())
}

/// A budget on `store` whose token windows are an hour long (nothing drains during a
/// test), with a token burst of 1,000.
fn hourly(store: RedisStore) -> RedisBudget {
    RedisBudget::builder(store)
        .burst(0, 1000)
        .minute(HOUR)
        .build()
}

/// `EVALSHA` calls Redis has served so far.
async fn evalsha_calls(server: &RedisServer) -> u64 {
    commands(server)
        .await
        .into_iter()
        .find_map(|(name, calls)| (name == "evalsha").then_some(calls))
        .unwrap_or(0)
}

/// A budget on a store quick to skip Redis (20 ms response timeout, then none tried for
/// `retry_after_outage`), its limits (1,000 tokens an hour, one request at once), and a
/// place of 600 tokens of `name` that Redis granted: asked again once the store tries
/// Redis again while a loaded machine's first connection times out.
async fn held_in_redis(
    server: &RedisServer,
    retry_after_outage: Duration,
    name: &str,
) -> (RedisStore, RedisBudget, StoreLimits, StoreLease) {
    let store = RedisStore::builder()
        .replicas(1)
        .response_timeout(20 * MS)
        .retry_after_outage(retry_after_outage)
        .build(server.client());
    let b = hourly(store.clone());
    let l = limits(|l| {
        l.tokens_per_minute = Some(1000);
        l.max_concurrent = Some(1);
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let lease = loop {
        let before = b.fallbacks();
        let d = ask(&b, &l, name, 600).await;
        if b.fallbacks() == before {
            break admitted(d);
        }
        assert!(Instant::now() < deadline, "redis never answered");
        tokio::time::sleep(retry_after_outage + 100 * MS).await;
    };
    (store, b, l, lease)
}

/// Polls `f` every 10 ms for up to 5 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(10 * MS).await;
    }
}

#[tokio::test]
async fn a_settlement_rides_with_the_next_admission_one_round_trip_per_call() {
    let Some(server) = RedisServer::start_or_skip("settlements carried") else {
        return;
    };
    let b = RedisBudget::builder(patient(&server)).build();
    let l = limits(|l| {
        l.requests_per_minute = Some(1 << 40);
        l.tokens_per_minute = Some(1 << 40);
    });
    // Connected, scripts loaded.
    let lease = admitted(ask(&b, &l, "k", 80).await);
    b.settle(&l, lease, Spent::new(15, 0));
    b.flush().await.unwrap();
    let before = evalsha_calls(&server).await;
    let trips = b.round_trips();
    for _ in 0..50 {
        let lease = admitted(ask(&b, &l, "k", 80).await);
        // A refund of 65: queued, not sent.
        b.settle(&l, lease, Spent::new(15, 0));
        assert_eq!(b.settlements_pending(), 1);
    }
    assert_eq!(b.round_trips() - trips, 50);
    // The last one is flushed after the delay, on its own.
    eventually("the last settlement flushed", || {
        b.settlements_pending() == 0
    })
    .await;
    let calls = evalsha_calls(&server).await - before;
    assert_eq!(calls, 51, "50 admissions carried 49 settlements, one flush");
    assert_eq!(b.settlements_dropped(), 0);
}

#[tokio::test]
async fn carried_refunds_and_charges_land_before_the_admission_is_decided() {
    let Some(server) = RedisServer::start_or_skip("settle then admit") else {
        return;
    };
    // A long delay: only an admission can carry the settlements here.
    let b = RedisBudget::builder(patient(&server))
        .burst(0, 1000)
        .minute(HOUR)
        .settle_delay(Duration::from_secs(60))
        .build();
    let l = limits(|l| l.tokens_per_minute = Some(1000));
    let first = admitted(ask(&b, &l, "t", 600).await);
    assert_eq!(
        refused(ask(&b, &l, "t", 1000).await),
        BudgetLimit::TokensPerMinute
    );
    // The first used 100: 500 refunded by the next admission, which then fits.
    b.settle(&l, first, Spent::new(100, 0));
    assert_eq!(b.settlements_pending(), 1);
    let second = admitted(ask(&b, &l, "t", 800).await);
    assert_eq!(b.settlements_pending(), 0);
    // 900 used; the second used 850: a charge of 50, carried by the next asking, which
    // then finds 950 used.
    b.settle(&l, second, Spent::new(850, 0));
    admitted(ask(&b, &l, "t", 50).await);
    let other = hourly(patient(&server));
    assert_eq!(
        refused(ask(&other, &l, "t", 1).await),
        BudgetLimit::TokensPerMinute,
        "1000 of 1000 used"
    );
}

/// Every part of a settlement (tokens, spend in both windows, a place) lands before the
/// admission that carries it is decided, whether that admission is of another name (the
/// settlement names its own keys) or of the same name (it uses the admission's), and after
/// `SCRIPT FLUSH` (the script is loaded again), and when that admission is refused.
#[tokio::test]
async fn every_part_of_a_carried_settlement_lands_with_its_own_keys_or_the_admissions() {
    let Some(server) = RedisServer::start_or_skip("settlement parts") else {
        return;
    };
    let budget = || {
        RedisBudget::builder(patient(&server))
            .burst(0, 1000)
            .minute(HOUR)
            .settle_delay(Duration::from_secs(60))
            .build()
    };
    let b = budget();
    // 1000 tokens, one place, 1,000 micro-units an hour and a day.
    let l = limits(|l| {
        l.tokens_per_minute = Some(1000);
        l.max_concurrent = Some(1);
        l.spend_per_hour = Some(1_000_000);
        l.spend_per_day = Some(1_000_000);
    });
    let ask = |b: &RedisBudget, name: &'static str, tokens: u64, spend: u64| {
        let b = b.clone();
        async move { support::admit(&b, &l, name, tokens, spend).await.0 }
    };

    // Another name's admission carries it: its own keys.
    let a = admitted(ask(&b, "a", 600, 600_000).await);
    b.settle(&l, a, Spent::new(100, 100_000));
    server.script_flush().await.unwrap();
    admitted(ask(&b, "b", 0, 0).await);
    assert_eq!((b.settlements_pending(), b.fallbacks()), (0, 0));
    // 100 tokens and 100 micro-units used, the place given back: 900 more fit, not 901.
    let other = budget();
    assert_eq!(
        refused(ask(&other, "a", 901, 0).await),
        BudgetLimit::TokensPerMinute
    );
    assert_eq!(
        refused(ask(&other, "a", 1, 900_001).await),
        BudgetLimit::SpendPerHour
    );
    let full = admitted(ask(&other, "a", 900, 900_000).await);
    other.settle(&l, full, Spent::new(900, 900_000));
    other.flush().await.unwrap();

    // The same name's admission carries it: the admission's keys.
    let c = admitted(ask(&b, "c", 600, 600_000).await);
    b.settle(&l, c, Spent::new(100, 100_000));
    // Admitted only if the place came back first; 400 tokens and micro-units used after.
    let c = admitted(ask(&b, "c", 300, 300_000).await);
    assert_eq!((b.settlements_pending(), b.fallbacks()), (0, 0));
    b.settle(&l, c, Spent::new(300, 300_000));
    b.flush().await.unwrap();
    assert_eq!(
        refused(ask(&other, "c", 601, 0).await),
        BudgetLimit::TokensPerMinute
    );
    assert_eq!(
        refused(ask(&other, "c", 1, 600_001).await),
        BudgetLimit::SpendPerHour
    );
    admitted(ask(&other, "c", 600, 600_000).await);

    // A refund carried by an admission that is refused still lands (the script keeps the
    // key's TAT and writes it on the way out).
    let l = limits(|l| l.tokens_per_minute = Some(1000));
    let r = admitted(support::ask(&b, &l, "r", 600).await);
    b.settle(&l, r, Spent::new(100, 0));
    assert_eq!(
        refused(support::ask(&b, &l, "r", 1000).await),
        BudgetLimit::TokensPerMinute
    );
    assert_eq!((b.settlements_pending(), b.fallbacks()), (0, 0));
    admitted(support::ask(&other, &l, "r", 900).await);
}

#[tokio::test]
async fn settlements_wait_while_redis_is_skipped_and_land_when_it_is_back() {
    let Some(server) = RedisServer::start_or_skip("settlements kept") else {
        return;
    };
    let (store, b, l, lease) = held_in_redis(&server, Duration::from_secs(2), "q").await;
    // Redis stops answering: one admission times out and the store skips Redis for 2 s.
    server.pause_clients(Duration::from_secs(1)).await.unwrap();
    ask(&b, &l, "other", 0).await;
    assert!(store.is_degraded());
    // Meanwhile the request ends: 100 of 600 used, its place released. Nothing is sent
    // while Redis is skipped; the settlement waits, whole.
    b.settle(&l, lease, Spent::new(100, 0));
    tokio::time::sleep(300 * MS).await;
    assert_eq!(b.settlements_pending(), 1, "kept while redis is skipped");
    assert_eq!(b.settlements_dropped(), 0);
    // Back: the flusher's next try lands it.
    eventually("the settlement landed", || b.settlements_pending() == 0).await;
    assert_eq!(b.settlements_dropped(), 0);
    // The place is free and 500 tokens came back: 900 fit, one more does not.
    let fresh = hourly(patient(&server));
    admitted(ask(&fresh, &l, "q", 900).await);
    assert_eq!(
        refused(ask(&fresh, &l, "q", 1).await),
        BudgetLimit::TokensPerMinute,
        "the refund applied once: 1000 of 1000 used"
    );
}

/// Keeps Redis busy with a script for `busy` (a slow server: what it has read it runs
/// afterwards, even for a client that has given up and closed its connection).
fn keep_busy(server: &RedisServer, busy: Duration) -> tokio::task::JoinHandle<()> {
    let client = server.client();
    tokio::spawn(async move {
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap();
        let _: redis::RedisResult<i64> = redis::cmd("EVAL")
            .arg(
                "local t = redis.call('TIME') \
                 local start = t[1] * 1000000 + t[2] \
                 repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start > tonumber(ARGV[1]) \
                 return 1",
            )
            .arg(0)
            .arg(busy.as_micros() as u64)
            .query_async(&mut conn)
            .await;
    })
}

#[tokio::test]
async fn a_refund_sent_without_an_answer_is_never_applied_twice() {
    let Some(server) = RedisServer::start_or_skip("refund once") else {
        return;
    };
    let (_, b, l, lease) = held_in_redis(&server, 30 * MS, "r").await;
    // Redis busy for 600 ms: the flush carrying the refund and the release gets no answer
    // in time, and Redis runs it when it is free again. The refund is given up here (Redis
    // may have it); the release is sent again until one answers.
    let busy = keep_busy(&server, Duration::from_millis(600));
    tokio::time::sleep(100 * MS).await;
    b.settle(&l, lease, Spent::new(100, 0));
    eventually("the refund given up", || b.settlements_dropped() == 1).await;
    busy.await.unwrap();
    eventually("the release landed", || b.settlements_pending() == 0).await;
    assert_eq!(b.settlements_dropped(), 1);
    // Applied once (Redis ran the late script: 100 used) or not at all (600 used, the
    // safe side); twice would leave none used and let 901 in.
    let fresh = hourly(patient(&server));
    let landed = matches!(ask(&fresh, &l, "r", 900).await, StoreDecision::Admitted(_));
    println!("the refund sent without an answer landed once: {landed}");
    if !landed {
        admitted(ask(&fresh, &l, "r", 400).await);
    }
    assert_eq!(
        refused(ask(&fresh, &l, "r", 1).await),
        BudgetLimit::TokensPerMinute,
        "1000 of 1000 used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_never_pass_a_concurrency_limit_and_their_places_come_back() {
    let Some(server) = RedisServer::start_or_skip("concurrency, 4 replicas") else {
        return;
    };
    const LIMIT: u64 = 3;
    let l = limits(|l| {
        l.max_concurrent = Some(LIMIT as u32);
        l.tokens_per_minute = Some(1 << 40);
    });
    let in_flight = Arc::new(AtomicU64::new(0));
    let most = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut budgets = Vec::new();
    for _ in 0..4 {
        // Each replica its own connection; places held 10 min unless settled.
        let b = RedisBudget::builder(patient(&server)).build();
        budgets.push(b.clone());
        for _ in 0..3 {
            let (b, in_flight, most, served) =
                (b.clone(), in_flight.clone(), most.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                let until = Instant::now() + Duration::from_millis(1500);
                while Instant::now() < until {
                    match ask(&b, &l, "c", 50).await {
                        StoreDecision::Admitted(lease) => {
                            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(2 * MS).await;
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            served.fetch_add(1, Ordering::SeqCst);
                            b.settle(&l, lease, Spent::new(20, 0));
                        }
                        StoreDecision::Refused { .. } => tokio::time::sleep(MS).await,
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let most = most.load(Ordering::SeqCst);
    let served = served.load(Ordering::SeqCst);
    println!("4 replicas, limit {LIMIT}: most in flight {most}, served {served}");
    assert!(most <= LIMIT, "{most} in flight at once, limit {LIMIT}");
    // Places come back through the settlements (their hold is 10 min): far more than
    // the limit are served.
    assert!(served >= 10 * LIMIT, "{served} served");
    for b in &budgets {
        b.flush().await.unwrap();
        // (The flusher may be sending its last batch.)
        eventually("settlements landed", || b.settlements_pending() == 0).await;
        assert_eq!(b.settlements_dropped(), 0);
    }
    // Every place given back.
    for (k, n) in each_key(&server, "*budget:conc*", "ZCARD").await {
        assert_eq!(n, 0, "{k}: places never given back");
    }
}
