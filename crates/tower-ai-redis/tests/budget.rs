//! RedisBudget's scripts against a real `redis-server` (started by the test; skipped
//! locally without one, a failure in CI): the arithmetic of each limit, the denial cache,
//! the fall-back while Redis is down, fail-closed limits and leased chunks. Real time, in
//! short windows.

use std::time::{Duration, Instant};

mod support;
use support::{admit, admitted, answered, each_key, limits, refused, MS, NO_HANG};

use tower_ai_budget::{BudgetStore, Spent, StoreAdmit, StoreDecision, StoreLimits, StoreRequest};
use tower_ai_core::keys::Key;
use tower_ai_core::BudgetLimit;
use tower_ai_redis::testing::RedisServer;
use tower_ai_redis::{RedisBudget, RedisStore};

/// Waits for the start of a window of `window` on Redis's clock (leased chunks shrink in
/// a window's last tenth).
async fn window_start(server: &RedisServer, window: Duration) {
    tokio::time::sleep(server.to_next_window(window).await + MS).await;
}

/// A store that waits for Redis long enough for a loaded machine (see `support::patient`).
fn patient(server: &RedisServer) -> RedisStore {
    support::patient().build(server.client())
}

/// A leased budget of its own store on `server`: windows of `window`, chunks of
/// `fraction` of a limit.
fn leased(server: &RedisServer, window: Duration, fraction: f64) -> RedisBudget {
    RedisBudget::builder(patient(server))
        .minute(window)
        .leased(fraction)
        .build()
}

/// Waits until the background settlement has reached Redis.
async fn settled() {
    tokio::time::sleep(20 * MS).await;
}

#[tokio::test]
async fn requests_per_minute_admit_the_burst_then_the_pace_and_cache_the_denial() {
    let Some(server) = RedisServer::start_or_skip("rpm gcra") else {
        return;
    };
    // 10 per 2 s window (one per 200 ms), burst 3.
    let b = RedisBudget::builder(patient(&server))
        .minute(Duration::from_secs(2))
        .burst(3, 0)
        .build();
    let l = limits(|l| l.requests_per_minute = Some(10));
    let mut ok = 0;
    for _ in 0..3 {
        admitted(admit(&b, &l, "k", 0, 0).await.0);
        ok += 1;
    }
    let (d, trip) = admit(&b, &l, "k", 0, 0).await;
    assert!(trip);
    let (limit, retry) = refused(d);
    assert_eq!(limit, BudgetLimit::RequestsPerMinute);
    let retry = retry.unwrap();
    assert!(retry > Duration::ZERO && retry <= 200 * MS, "{retry:?}");
    // Known now: refused again without a round trip.
    let (d, trip) = admit(&b, &l, "k", 0, 0).await;
    assert!(!trip, "a cached denial costs no round trip");
    refused(d);
    // Over the next window: the pace, so at most limit + burst in any 2 s.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        if let StoreDecision::Admitted(_) = admit(&b, &l, "k", 0, 0).await.0 {
            ok += 1;
        }
        tokio::time::sleep(5 * MS).await;
    }
    assert!(ok <= 10 + 3, "{ok} in one window");
    assert!(ok >= 11, "{ok}: the pace admits one per 200 ms");
    // Another key is not held back.
    admitted(admit(&b, &l, "other", 0, 0).await.0);
}

#[tokio::test]
async fn tokens_are_reserved_then_refunded_or_charged_at_settlement() {
    let Some(server) = RedisServer::start_or_skip("tpm gcra") else {
        return;
    };
    let b = RedisBudget::builder(patient(&server))
        .minute(Duration::from_secs(60))
        .burst(0, 1000)
        .build();
    let l = limits(|l| l.tokens_per_minute = Some(1000));
    let first = admitted(admit(&b, &l, "t", 600, 0).await.0);
    let (limit, retry) = refused(admit(&b, &l, "t", 600, 0).await.0);
    assert_eq!(limit, BudgetLimit::TokensPerMinute);
    // 200 tokens over the room of 1000, at 60 ms a token: 12 s.
    let retry = retry.unwrap();
    assert!(
        retry > Duration::from_millis(11_900) && retry <= Duration::from_secs(12),
        "{retry:?}"
    );
    // A smaller request is not held by the cached denial of the larger one.
    admitted(admit(&b, &l, "t", 100, 0).await.0);
    // The first used 100 of its 600: 500 refunded, and 600 fits again (700 of 1000).
    b.settle(&l, first, Spent::new(100, 0));
    settled().await;
    let b2 = RedisBudget::builder(patient(&server))
        .minute(Duration::from_secs(60))
        .burst(0, 1000)
        .build();
    let second = admitted(admit(&b2, &l, "t", 250, 0).await.0);
    // A request that used more than it reserved is charged the difference: 250 + 100.
    b2.settle(&l, second, Spent::new(350, 0));
    settled().await;
    // Used: 100 + 100 + 350 = 550 of 1000.
    admitted(admit(&b2, &l, "t", 400, 0).await.0);
    let (limit, _) = refused(admit(&b2, &l, "t", 100, 0).await.0);
    assert_eq!(limit, BudgetLimit::TokensPerMinute, "950 of 1000 used");
    // Larger than the whole limit: never.
    assert_eq!(
        refused(admit(&b2, &l, "t", 1001, 0).await.0),
        (BudgetLimit::TokensPerMinute, None)
    );
}

#[tokio::test]
async fn spend_is_counted_in_calendar_windows_of_micro_units() {
    let Some(server) = RedisServer::start_or_skip("spend windows") else {
        return;
    };
    let b = RedisBudget::builder(patient(&server)).build();
    // $0.001 an hour = 1,000,000 nano-units = 1,000 micro-units.
    let l = limits(|l| l.spend_per_hour = Some(1_000_000));
    let first = admitted(admit(&b, &l, "s", 0, 600_000).await.0);
    let (limit, retry) = refused(admit(&b, &l, "s", 0, 400_001).await.0);
    assert_eq!(limit, BudgetLimit::SpendPerHour);
    // The rest of the calendar hour on Redis's clock.
    let retry = retry.unwrap();
    assert!(
        retry <= Duration::from_secs(3600) && retry > Duration::ZERO,
        "{retry:?}"
    );
    b.settle(&l, first, Spent::new(0, 100_000));
    settled().await;
    // 100 used: 900 more fit (the cached denial was for a larger request).
    let b = RedisBudget::builder(patient(&server)).build();
    admitted(admit(&b, &l, "s", 0, 900_000).await.0);
    assert_eq!(
        refused(admit(&b, &l, "s", 0, 1_000).await.0).0,
        BudgetLimit::SpendPerHour
    );
    assert_eq!(
        refused(admit(&b, &l, "s", 0, 1_000_001).await.0),
        (BudgetLimit::SpendPerHour, None)
    );

    // A short "hour" for the window's end: the cap comes back with the next window.
    let b = RedisBudget::builder(patient(&server))
        .spend_windows(Duration::from_millis(300), Duration::from_secs(86_400))
        .build();
    admitted(admit(&b, &l, "w", 0, 1_000_000).await.0);
    let (_, retry) = refused(admit(&b, &l, "w", 0, 1_000).await.0);
    tokio::time::sleep(retry.unwrap() + 5 * MS).await;
    admitted(admit(&b, &l, "w", 0, 1_000).await.0);
}

#[tokio::test]
async fn concurrency_is_an_expiring_semaphore() {
    let Some(server) = RedisServer::start_or_skip("semaphore") else {
        return;
    };
    let b = RedisBudget::builder(patient(&server))
        .hold(Duration::from_millis(300))
        .build();
    let l = limits(|l| l.max_concurrent = Some(2));
    let one = admitted(admit(&b, &l, "c", 0, 0).await.0);
    let _two = admitted(admit(&b, &l, "c", 0, 0).await.0);
    assert_eq!(
        refused(admit(&b, &l, "c", 0, 0).await.0).0,
        BudgetLimit::Concurrency
    );
    // Concurrency denials are not cached: a settlement frees a place at once.
    b.settle(&l, one, Spent::default());
    settled().await;
    let _three = admitted(admit(&b, &l, "c", 0, 0).await.0);
    assert_eq!(
        refused(admit(&b, &l, "c", 0, 0).await.0).0,
        BudgetLimit::Concurrency
    );
    // Never settled (their replica died): the places come back after the hold.
    tokio::time::sleep(Duration::from_millis(320)).await;
    admitted(admit(&b, &l, "c", 0, 0).await.0);
    admitted(admit(&b, &l, "c", 0, 0).await.0);
}

#[tokio::test]
async fn with_redis_down_each_replica_decides_at_its_share_and_fail_closed_limits_refuse() {
    let Some(mut server) = RedisServer::start_or_skip("fall-back") else {
        return;
    };
    let store = RedisStore::builder().replicas(4).build(server.client());
    let b = RedisBudget::builder(store.clone())
        .minute(Duration::from_secs(60))
        .build();
    let l = limits(|l| l.requests_per_minute = Some(40));
    // Connected and answering first (asked under another key, so "f" starts untouched
    // even if a loaded machine's first connection timed out).
    answered(&store, &[&b], &l, "warm-up").await;
    server.kill();
    // 40 a minute over 4 replicas: 10 here, burst 0: one at once, then one per 6 s.
    let started = Instant::now();
    admitted(admit(&b, &l, "f", 0, 0).await.0);
    assert!(
        started.elapsed() < NO_HANG,
        "the fall-back took {:?}",
        started.elapsed()
    );
    assert!(store.is_degraded());
    let (limit, retry) = refused(admit(&b, &l, "f", 0, 0).await.0);
    assert_eq!(limit, BudgetLimit::RequestsPerMinute);
    assert!(retry.unwrap() > Duration::from_secs(5), "{retry:?}");

    // A fail-closed cap refuses while Redis is down.
    let closed = RedisBudget::builder(store.clone())
        .fail_closed(BudgetLimit::SpendPerDay)
        .build();
    let l = limits(|l| l.spend_per_day = Some(1_000_000_000));
    let started = Instant::now();
    assert_eq!(
        refused(admit(&closed, &l, "d", 0, 1_000).await.0).0,
        BudgetLimit::SpendPerDay
    );
    assert!(started.elapsed() < NO_HANG, "{:?}", started.elapsed());

    // Back: shared again, without a new budget or store.
    server.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::sleep(50 * MS).await;
        if let StoreDecision::Admitted(_) = admit(&closed, &l, "d", 0, 1_000).await.0 {
            if !store.is_degraded() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "redis not used again");
    }
}

#[tokio::test]
async fn back_from_an_outage_redis_counts_what_the_fall_back_admitted() {
    let Some(mut server) = RedisServer::start_or_skip("lead carried back") else {
        return;
    };
    let store = support::patient().replicas(4).build(server.client());
    // 100 a 60 s minute (one per 600 ms), burst 8; in-process 25 (one per 2.4 s), burst 2.
    // Tokens: 1,000 a minute, burst 200; in-process 250, burst 50.
    let b = RedisBudget::builder(store.clone())
        .minute(Duration::from_secs(60))
        .burst(8, 200)
        .build();
    let l = limits(|l| l.requests_per_minute = Some(100));
    let lt = limits(|l| l.tokens_per_minute = Some(1_000));
    let warm = limits(|l| l.requests_per_minute = Some(1_000_000));
    answered(&store, &[&b], &warm, "warm-up").await;
    server.kill();
    let mut local = 0;
    while let StoreDecision::Admitted(_) = admit(&b, &l, "k", 0, 0).await.0 {
        local += 1;
        assert!(local <= 8, "the fall-back admitted {local}");
    }
    assert_eq!(local, 2, "the fall-back's burst");
    // 50 tokens a request: the fall-back's burst of 50 takes one.
    admitted(admit(&b, &lt, "t", 50, 0).await.0);
    refused(admit(&b, &lt, "t", 50, 0).await.0);
    assert!(store.is_degraded());
    // Restarted empty (`--save ""`): the key is gone from Redis. Back on Redis (asked
    // under another key, so the first script of "k" is the one after the outage).
    server.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::sleep(50 * MS).await;
        let before = b.fallbacks();
        admitted(admit(&b, &warm, "warm-up-2", 0, 0).await.0);
        if b.fallbacks() == before && !store.is_degraded() {
            break;
        }
        assert!(Instant::now() < deadline, "redis not used again");
    }
    let fallbacks = b.fallbacks();
    let mut shared = 0;
    while let StoreDecision::Admitted(_) = admit(&b, &l, "k", 0, 0).await.0 {
        shared += 1;
        assert!(shared <= 20, "redis admitted {shared}");
    }
    assert_eq!(b.fallbacks(), fallbacks, "decided by redis");
    // One GCRA, continued: within a few seconds the key admits its burst, not the
    // fall-back's and then Redis's whole burst again (2 + 8: each replica's fall-back
    // share on top of a fresh key's burst, in the window where replicas go back).
    assert!(
        local + shared <= 8,
        "{local} in-process, then {shared} by redis: more than the burst of 8"
    );
    // The fall-back's lead is counted at its own pace (a quarter of the limit), so a
    // restart within 2.4 s leaves exactly the rest of the burst.
    assert!(shared >= 6, "{shared} by redis");
    // Tokens likewise: 50 in-process, then 150 of the burst of 200 (not 200 more).
    let mut tokens = 0;
    while let StoreDecision::Admitted(_) = admit(&b, &lt, "t", 50, 0).await.0 {
        tokens += 50;
        assert!(tokens <= 1_000, "redis admitted {tokens} tokens");
    }
    assert_eq!(b.fallbacks(), fallbacks, "decided by redis");
    assert_eq!(tokens, 150, "50 tokens in-process, then {tokens} by redis");
}

#[tokio::test]
async fn leased_chunks_are_spent_locally_and_never_exceed_the_window() {
    let Some(server) = RedisServer::start_or_skip("leases") else {
        return;
    };
    // Two replicas, 100 a 2 s window in chunks of 10.
    let window = Duration::from_secs(2);
    let a = leased(&server, window, 0.1);
    let b = leased(&server, window, 0.1);
    let l = limits(|l| l.requests_per_minute = Some(100));
    window_start(&server, window).await;
    let (d, trip) = admit(&a, &l, "L", 0, 0).await;
    admitted(d);
    assert!(trip, "the first request takes a chunk");
    for _ in 0..9 {
        let (d, trip) = admit(&a, &l, "L", 0, 0).await;
        admitted(d);
        assert!(!trip, "spent from the chunk");
    }
    assert!(
        admit(&a, &l, "L", 0, 0).await.1,
        "the chunk is spent: another one"
    );
    let mut total = 11;
    for i in 0..200 {
        let replica = if i % 2 == 0 { &a } else { &b };
        if let StoreDecision::Admitted(_) = admit(replica, &l, "L", 0, 0).await.0 {
            total += 1;
        }
    }
    assert!(total <= 100, "{total} admitted in one window of 100");
    assert!(
        total >= 100 - 2 * 10,
        "{total}: at most one chunk per replica unused"
    );
    // The window's count in Redis never passes the limit.
    for (k, used) in each_key(&server, "*lease:rpm*", "GET").await {
        assert!(used <= 100, "{k}: {used}");
    }
}

#[tokio::test]
async fn leased_tokens_are_reconciled_in_the_chunk_and_given_back() {
    let Some(server) = RedisServer::start_or_skip("lease tokens") else {
        return;
    };
    let window = Duration::from_secs(2);
    let a = leased(&server, window, 0.1);
    let l = limits(|l| l.tokens_per_minute = Some(10_000));
    window_start(&server, window).await;
    // A chunk of 1,000 tokens: 5 requests of 200.
    let first = admitted(admit(&a, &l, "T", 200, 0).await.0);
    for _ in 0..4 {
        assert!(!admit(&a, &l, "T", 200, 0).await.1);
    }
    assert!(admit(&a, &l, "T", 200, 0).await.1, "chunk spent");
    // The first used 50: 150 back into the chunk, so 150 more without a round trip.
    a.settle(&l, first, Spent::new(50, 0));
    let (d, trip) = admit(&a, &l, "T", 150, 0).await;
    admitted(d);
    assert!(!trip);
    a.give_back().await;
    let used = each_key(&server, "*lease:tpm*", "GET").await[0].1;
    // Two chunks of 1,000 taken, 1,000 + 200 + 150 - 150 refund... what is left given back.
    assert!(used < 2_000, "{used}: the unused part came back");
}

#[tokio::test]
async fn a_paused_redis_costs_one_timeout_then_the_fall_back_decides() {
    let Some(server) = RedisServer::start_or_skip("client pause") else {
        return;
    };
    let store = RedisStore::builder().replicas(2).build(server.client());
    let b = RedisBudget::builder(store.clone())
        .minute(Duration::from_secs(60))
        .burst(5, 0)
        .build();
    let l = limits(|l| l.requests_per_minute = Some(100));
    // Connected and answering (on a loaded machine the first connection can take longer
    // than its timeout: asked under another key, so "p" starts untouched).
    answered(&store, &[&b], &l, "warm-up").await;
    let before = b.fallbacks();
    server.pause_clients(Duration::from_secs(2)).await.unwrap();
    // The first call waits for the response timeout, then decides in-process; the next
    // ones do not wait at all while Redis is skipped.
    let started = Instant::now();
    let (_, asked) = admit(&b, &l, "p", 0, 0).await;
    let first = started.elapsed();
    assert!(first < NO_HANG, "{first:?}");
    assert!(asked, "the first call asked Redis, and timed out");
    let skipped = store.skipped();
    let started = Instant::now();
    admitted(admit(&b, &l, "p", 0, 0).await.0);
    println!(
        "client pause: first call {first:?}, then {:?}",
        started.elapsed()
    );
    assert_eq!(store.skipped(), skipped + 1, "the next call skips Redis");
    assert!(store.is_degraded());
    assert_eq!(b.fallbacks() - before, 2);
    // At its share: 100 / 2 replicas, burst 5 / 2 = 2: the two above took it.
    assert_eq!(
        refused(admit(&b, &l, "p", 0, 0).await.0).0,
        BudgetLimit::RequestsPerMinute
    );
}

/// A replica's concurrent misses each bring in a chunk; the one the window had no room
/// for is refused and its refusal cached until the window's end. The chunks the others
/// brought in still have room, and are spent before that refusal is read: a request is
/// admitted from them, not refused until the window ends.
#[tokio::test]
async fn a_cached_refusal_does_not_hide_a_chunk_with_room() {
    let Some(server) = RedisServer::start_or_skip("lease denial") else {
        return;
    };
    // 20 a 2 s window in chunks of 10: two chunks fill the window.
    let window = Duration::from_secs(2);
    let a = leased(&server, window, 0.5);
    let l = limits(|l| l.requests_per_minute = Some(20));
    window_start(&server, window).await;
    let label = || "C".to_owned();
    let request = StoreRequest::new(Key::of("C"), 0, 0, &label);
    // Three misses at once: none finds a chunk; one goes to Redis, the other two wait for
    // its chunk (before single flight each took a chunk, the third was refused and its
    // refusal cached while the other two chunks had room).
    let miss = || match a.admit(&l, &request) {
        StoreAdmit::Pending(f) => f,
        StoreAdmit::Ready(d) => panic!("no chunk yet, but {d:?}"),
    };
    let before = a.round_trips();
    let (x, y, z) = tokio::join!(miss(), miss(), miss());
    let outcomes = [x, y, z];
    let refusals = outcomes
        .iter()
        .filter(|d| matches!(d, StoreDecision::Refused { .. }))
        .count();
    assert_eq!(refusals, 0, "one chunk of 10 for three: {outcomes:?}");
    assert_eq!(a.round_trips() - before, 1, "{outcomes:?}");
    // 7 left in the chunk: spent from it.
    let (d, trip) = admit(&a, &l, "C", 0, 0).await;
    assert!(
        matches!(d, StoreDecision::Admitted(_)),
        "refused with room in a chunk: {d:?}"
    );
    assert!(!trip, "spent from a chunk, no round trip");
}

#[tokio::test]
async fn concurrent_misses_on_one_key_share_one_chunk_round_trip() {
    let Some(server) = RedisServer::start_or_skip("single-flight") else {
        return;
    };
    // 100 a 2 s window in chunks of 10; 8 requests miss at once on one replica.
    let window = Duration::from_secs(2);
    let b = leased(&server, window, 0.1);
    let l = limits(|l| l.requests_per_minute = Some(100));
    window_start(&server, window).await;
    // Connected (and the script loaded) before the misses.
    admitted(admit(&b, &l, "warm", 0, 0).await.0);
    let before = b.round_trips();
    let label = || "K".to_owned();
    let mut misses = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let request = StoreRequest::new(Key::of("K"), 0, 0, &label);
        match b.admit(&l, &request) {
            StoreAdmit::Pending(f) => {
                misses.spawn(f);
            }
            StoreAdmit::Ready(d) => panic!("no chunk held yet, got {d:?}"),
        }
    }
    let mut admitted_n = 0;
    while let Some(d) = tokio::time::timeout(Duration::from_secs(5), misses.join_next())
        .await
        .expect("the misses are answered")
    {
        admitted(d.unwrap());
        admitted_n += 1;
    }
    assert_eq!(admitted_n, 8);
    assert_eq!(
        b.round_trips() - before,
        1,
        "8 concurrent misses on one key take one chunk"
    );
    // The chunk of 10 has 2 left, spent locally; then another chunk.
    for _ in 0..2 {
        let (d, trip) = admit(&b, &l, "K", 0, 0).await;
        admitted(d);
        assert!(!trip, "spent from the shared chunk");
    }
    let (d, trip) = admit(&b, &l, "K", 0, 0).await;
    admitted(d);
    assert!(trip, "the chunk is used up: the next one");
    assert_eq!(b.round_trips() - before, 2);
}

/// A leased budget of 10 requests and 120 tokens a 2 s window, in chunks of 5 and 60 (two
/// requests reserving 60 each take the window's tokens), at the start of a window.
async fn two_token_chunks_a_window(server: &RedisServer) -> (RedisBudget, StoreLimits) {
    let window = Duration::from_secs(2);
    let b = leased(server, window, 0.5);
    let l = limits(|l| {
        l.requests_per_minute = Some(10);
        l.tokens_per_minute = Some(120);
    });
    window_start(server, window).await;
    (b, l)
}

/// A refusal for tokens is cached until the window's end, but a window's tokens are held as
/// reservations: those that come back at settlement (requests that used less than they
/// reserved) end it, and the replica asks again, giving them back with its chunk. Before,
/// it refused until the window's end while its refunds sat in its chunk (behind the
/// gateway, replicas that took the window's first chunks held their refunds while every
/// replica refused: 70 of 100 served in such a window).
#[tokio::test]
async fn refunded_tokens_end_a_cached_refusal_for_tokens() {
    let Some(server) = RedisServer::start_or_skip("lease refunds") else {
        return;
    };
    let (b, l) = two_token_chunks_a_window(&server).await;
    let first = admitted(admit(&b, &l, "R", 60, 0).await.0);
    let second = admitted(admit(&b, &l, "R", 60, 0).await.0);
    let (limit, _) = refused(admit(&b, &l, "R", 60, 0).await.0);
    assert_eq!(limit, BudgetLimit::TokensPerMinute);
    let (d, trip) = admit(&b, &l, "R", 60, 0).await;
    refused(d);
    assert!(!trip, "the refusal is cached");
    // Each used 30: 60 come back.
    b.settle(&l, first, Spent::new(30, 0));
    b.settle(&l, second, Spent::new(30, 0));
    let (d, trip) = admit(&b, &l, "R", 60, 0).await;
    admitted(d);
    assert!(trip, "the refunds given back for a new chunk");
}

/// A refund that comes back while a refusal for tokens is on its way is not hidden behind
/// that refusal until the window's end: the next request gives it back and is admitted.
#[tokio::test]
async fn a_refund_during_a_refused_refill_is_not_held_to_the_windows_end() {
    let Some(server) = RedisServer::start_or_skip("lease refund in flight") else {
        return;
    };
    let (b, l) = two_token_chunks_a_window(&server).await;
    let first = admitted(admit(&b, &l, "F", 60, 0).await.0);
    admitted(admit(&b, &l, "F", 60, 0).await.0);
    // A third asks for a chunk (the window's tokens are all reserved) ...
    let label = || "F".to_owned();
    let third = match b.admit(&l, &StoreRequest::new(Key::of("F"), 60, 0, &label)) {
        StoreAdmit::Pending(f) => f,
        StoreAdmit::Ready(d) => panic!("no tokens held, but {d:?}"),
    };
    let mut third = std::pin::pin!(third);
    std::future::poll_fn(|cx| {
        assert!(std::future::Future::poll(third.as_mut(), cx).is_pending());
        std::task::Poll::Ready(())
    })
    .await;
    // ... and while it is out, the first request settles having used nothing.
    b.settle(&l, first, Spent::new(0, 0));
    let (limit, _) = refused(third.await);
    assert_eq!(limit, BudgetLimit::TokensPerMinute);
    let (d, trip) = admit(&b, &l, "F", 60, 0).await;
    admitted(d);
    assert!(trip, "the refund given back for a new chunk");
}

/// A loopback proxy in front of `server` that passes requests at once and holds each
/// answer back `delay` (a slow way back from Redis); its URL.
async fn slow_answers(server: &RedisServer, delay: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = server
        .url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(redis) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (mut client_rx, mut client_tx) = client.into_split();
            let (mut redis_rx, mut redis_tx) = redis.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_rx, &mut redis_tx).await;
            });
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut buf = vec![0; 64 * 1024];
                while let Ok(n @ 1..) = redis_rx.read(&mut buf).await {
                    let _ = tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec()));
                }
            });
            tokio::spawn(async move {
                while let Some((at, bytes)) = rx.recv().await {
                    tokio::time::sleep_until(at).await;
                    if client_tx.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    format!("redis://{addr}/")
}

/// A chunk whose answer comes back after its window has ended was counted in that window;
/// its request would reach the provider in the next one, on top of everything that window
/// hands out. It is asked for again, in the window the request goes out in. (Before, it was
/// spent: a request counted in window k sent in window k + 1.)
#[tokio::test]
async fn a_chunk_that_comes_back_after_its_window_is_not_spent_in_the_next() {
    let Some(server) = RedisServer::start_or_skip("late chunk") else {
        return;
    };
    // Answers 600 ms late; a 2 s window.
    let slow =
        redis::Client::open(slow_answers(&server, Duration::from_millis(600)).await).unwrap();
    let window = Duration::from_secs(2);
    let b = RedisBudget::builder(
        RedisStore::builder()
            .response_timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(5))
            .build(slow),
    )
    .minute(window)
    .leased(0.1)
    .build();
    let l = limits(|l| l.requests_per_minute = Some(100));
    // Connected and the script loaded first.
    admitted(admit(&b, &l, "warm", 0, 0).await.0);
    // 400 ms before a window ends on Redis's clock: the script runs in that window, its
    // answer comes back in the next.
    tokio::time::sleep(server.to_next_window(window).await + window - 400 * MS).await;
    let asked_in = window_index(&server, window).await;
    let (d, trip) = admit(&b, &l, "K", 0, 0).await;
    assert!(trip);
    let answered_in = window_index(&server, window).await;
    assert_eq!(
        answered_in,
        asked_in + 1,
        "the answer came back in the next window"
    );
    assert_eq!(
        tower_ai_redis::testing::leased_window(&admitted(d)),
        Some(answered_in),
        "counted in the window it is sent in"
    );
}

/// The index of the window of `window` Redis's clock is in.
async fn window_index(server: &RedisServer, window: Duration) -> u64 {
    let mut conn = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    (secs * 1_000_000 + micros) / window.as_micros() as u64
}

#[tokio::test]
async fn an_idle_key_takes_a_request_its_whole_tolerance_fits() {
    let Some(server) = RedisServer::start_or_skip("gcra exact fit") else {
        return;
    };
    // 7 requests and 7,000 tokens a 1 s window, no burst: a request of one unit, or of a
    // thousand tokens, takes the whole tolerance of an idle key (T = 1/7 s, not a whole
    // number of microseconds, so `now + T - now` computed on Redis's clock may round
    // above T).
    let b = RedisBudget::builder(patient(&server))
        .minute(Duration::from_secs(1))
        .burst(0, 0)
        .build();
    let rpm = limits(|l| l.requests_per_minute = Some(7));
    let tpm = limits(|l| l.tokens_per_minute = Some(7_000));
    for i in 0..20 {
        admitted(admit(&b, &rpm, &format!("r{i}"), 0, 0).await.0);
        admitted(admit(&b, &tpm, &format!("t{i}"), 1_000, 0).await.0);
    }
}

#[tokio::test]
async fn both_tats_share_one_key_and_a_value_of_another_shape_reads_as_no_tat() {
    let Some(server) = RedisServer::start_or_skip("one tat key") else {
        return;
    };
    let b = RedisBudget::builder(patient(&server))
        .minute(Duration::from_secs(60))
        .burst(0, 1000)
        .build();
    let l = limits(|l| {
        l.requests_per_minute = Some(1);
        l.tokens_per_minute = Some(1000);
    });
    let mut conn = support::connection(&server).await;
    let reader = conn.clone();
    let get = move |key: String| {
        let mut conn = reader.clone();
        async move {
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<String>>(&mut conn)
                .await
                .unwrap()
        }
    };
    // A value from before (a bare TAT), or none that parses: no TAT, no crash.
    for (name, old) in [("a", "1000"), ("b", "junk"), ("c", "1:x:2"), ("d", ":")] {
        let key = b.keys_of(name)[0].clone();
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(old)
            .query_async(&mut conn)
            .await
            .unwrap();
        admitted(admit(&b, &l, name, 600, 0).await.0);
    }
    // One key holds both TATs, "requests:tokens", and no other GCRA key exists.
    let first = admitted(admit(&b, &l, "k", 600, 0).await.0);
    let key = b.keys_of("k")[0].clone();
    let both = get(key.clone()).await.unwrap();
    let (r, t) = both.split_once(':').unwrap();
    let (r, t): (u64, u64) = (r.parse().unwrap(), t.parse().unwrap());
    // T = 60 s a request, 60 ms a token: the tokens TAT 36 s short of the requests'.
    assert_eq!(r - t, 60_000_000 - 36_000_000, "{both}");
    let all: Vec<String> = redis::cmd("KEYS")
        .arg("*k")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(all, std::slice::from_ref(&key));
    // A refusal (requests) changes neither.
    let (limit, _) = refused(admit(&b, &l, "k", 100, 0).await.0);
    assert_eq!(limit, BudgetLimit::RequestsPerMinute);
    assert_eq!(get(key.clone()).await.unwrap(), both);
    // A settlement moves only the tokens TAT: 500 of 600 refunded, 30 s back.
    b.settle(&l, first, Spent::new(100, 0));
    settled().await;
    let after = get(key).await.unwrap();
    let (r2, t2) = after.split_once(':').unwrap();
    assert_eq!(r2.parse::<u64>().unwrap(), r, "{after}");
    assert_eq!(t - t2.parse::<u64>().unwrap(), 30_000_000, "{after}");
}
