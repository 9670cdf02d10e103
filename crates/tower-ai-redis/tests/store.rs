//! The store against a real `redis-server` (started by the test; skipped locally without
//! one, a failure in CI): scripts, outages, recovery and the replica count.

use std::time::{Duration, Instant};

mod support;
use support::NO_HANG;

use redis::Script;
use tower_ai_redis::testing::RedisServer;
use tower_ai_redis::{RedisStore, StoreError};

const INCR: &str = "return redis.call('INCRBY', KEYS[1], ARGV[1])";

#[tokio::test]
async fn a_script_runs_and_is_loaded_again_after_script_flush() {
    let Some(server) = RedisServer::start_or_skip("script reload") else {
        return;
    };
    let store = server.store();
    let script = Script::new(INCR);
    let key = store.key("test", "acct", "n");
    assert_eq!(store.run::<i64>(&script, &[&key], &[&2]).await.unwrap(), 2);
    server.script_flush().await.unwrap();
    assert_eq!(store.run::<i64>(&script, &[&key], &[&3]).await.unwrap(), 5);
    assert!(!store.is_degraded());
}

#[tokio::test]
async fn a_script_error_is_not_an_outage() {
    let Some(server) = RedisServer::start_or_skip("script error") else {
        return;
    };
    let store = server.store();
    let bad = Script::new("return redis.call('NO_SUCH_COMMAND')");
    let err = store.run::<i64>(&bad, &[], &[]).await.unwrap_err();
    assert!(matches!(err, StoreError::Script(_)), "{err:?}");
    assert!(!err.is_outage());
    assert!(!store.is_degraded());
}

#[tokio::test]
async fn a_killed_server_is_skipped_fast_and_found_again_after_restart() {
    let Some(mut server) = RedisServer::start_or_skip("kill and restart") else {
        return;
    };
    let store = RedisStore::builder()
        .retry_after_outage(Duration::from_millis(200))
        .build(server.client());
    let script = Script::new(INCR);
    let key = store.key("test", "acct", "n");
    assert_eq!(store.run::<i64>(&script, &[&key], &[&1]).await.unwrap(), 1);

    server.kill();
    let started = Instant::now();
    let err = store.run::<i64>(&script, &[&key], &[&1]).await.unwrap_err();
    assert!(err.is_outage(), "{err:?}");
    assert!(store.is_degraded());
    // Within the skip period, no round trip at all.
    let skipped = Instant::now();
    let err = store.run::<i64>(&script, &[&key], &[&1]).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    // `Unavailable` is the answer given without a round trip.
    println!(
        "outage seen in {:?}, then skipped in {:?}",
        skipped - started,
        skipped.elapsed()
    );
    assert!(started.elapsed() < NO_HANG, "{:?}", started.elapsed());

    server.restart().unwrap();
    // The restarted server is empty and has none of our scripts: the store reconnects and
    // loads the script again by itself.
    let deadline = Instant::now() + Duration::from_secs(5);
    let n = loop {
        match store.run::<i64>(&script, &[&key], &[&7]).await {
            Ok(n) => break n,
            Err(e) if Instant::now() < deadline => {
                assert!(e.is_outage(), "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("redis not found again after restart: {e}"),
        }
    };
    assert_eq!(n, 7);
    assert!(!store.is_degraded());
}

#[tokio::test]
async fn a_paused_server_costs_one_timeout_not_a_hang() {
    let Some(server) = RedisServer::start_or_skip("client pause") else {
        return;
    };
    // The default settings: the 20 ms response timeout is what this test is about.
    let store = server.try_store().unwrap();
    let script = Script::new(INCR);
    let key = store.key("test", "acct", "n");
    store.run::<i64>(&script, &[&key], &[&1]).await.unwrap();
    server.pause_clients(Duration::from_secs(2)).await.unwrap();
    let started = Instant::now();
    let err = store.run::<i64>(&script, &[&key], &[&1]).await.unwrap_err();
    assert!(matches!(err, StoreError::Timeout(_)), "{err:?}");
    assert!(started.elapsed() < NO_HANG, "{:?}", started.elapsed());
    assert!(store.is_degraded());
}

#[tokio::test]
async fn the_heartbeat_counts_live_replicas() {
    let Some(server) = RedisServer::start_or_skip("replica count") else {
        return;
    };
    let build = || {
        RedisStore::builder()
            .heartbeat(Duration::from_millis(50))
            .build(server.client())
    };
    let stores = [build(), build(), build()];
    let deadline = Instant::now() + Duration::from_secs(5);
    // Every replica beats from its first use, whether or not it asks the count.
    for store in &stores {
        store.replicas();
    }
    while stores.iter().any(|s| s.replicas() != 3) {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            stores.iter().map(|s| s.replicas()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A replica that stops beating is no longer counted after three periods.
    let [a, b, c] = stores;
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.replicas() != 2 || b.replicas() != 2 {
        assert!(
            Instant::now() < deadline,
            "{} {}",
            a.replicas(),
            b.replicas()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let configured = RedisStore::builder().replicas(4).build(server.client());
    assert_eq!(configured.replicas(), 4);
}

#[test]
fn keys_share_one_hash_tag_and_a_tag_cannot_escape_it() {
    let store = RedisStore::open("redis://127.0.0.1:1/").unwrap();
    assert_eq!(
        store.key("rpm", "acct-1", "gpt-4o"),
        "tower-ai:rpm:{acct-1}:gpt-4o"
    );
    assert_eq!(store.key("rpm", "a}b{", "m"), "tower-ai:rpm:{a_b_}:m");
}

/// Runs `f` to completion in a new runtime (a current-thread one, or a multi-thread one),
/// which is dropped at the end with all its tasks.
fn in_new_runtime<T>(multi_thread: bool, f: impl std::future::Future<Output = T>) -> T {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = builder.enable_all().build().unwrap();
    runtime.block_on(f)
}

/// A store kept across Tokio runtimes (in a `static` shared by several `#[tokio::test]`s,
/// or by an application that builds a new runtime) goes on talking to Redis from the next
/// runtime once the one it first ran in is gone, and with it the connection's task, the
/// heartbeat and a budget's flusher: every call answered by Redis, none failed or skipped.
#[test]
fn a_store_goes_on_in_the_next_runtime_when_its_first_is_gone() {
    use tower_ai_budget::StoreRequest;
    use tower_ai_budget::{BudgetStore, Spent, StoreAdmit, StoreDecision, StoreLimits};
    use tower_ai_core::keys::Key;
    use tower_ai_redis::RedisBudget;

    let Some(server) = RedisServer::start_or_skip("runtime change") else {
        return;
    };
    let build = || {
        RedisStore::builder()
            .heartbeat(Duration::from_millis(50))
            .build(server.client())
    };
    let store = build();
    let script = Script::new(INCR);
    let key = store.key("test", "acct", "n");
    let budget = RedisBudget::builder(store.clone()).build();
    let mut l = StoreLimits::default();
    l.requests_per_minute = Some(1_000);
    l.tokens_per_minute = Some(1_000_000);
    // Calls through the store, then an admission and its settlement (queued, and sent by
    // the budget's flusher since no admission follows).
    let calls = |first: i64| {
        let (store, script, key, budget, l) = (&store, &script, &key, &budget, &l);
        async move {
            for i in 1..=10 {
                let n = store.run::<i64>(script, &[key], &[&1]).await;
                assert_eq!(n.unwrap(), first + i, "answered by Redis");
            }
            let label = || "m".to_owned();
            let request = StoreRequest::new(Key::of("m"), 100, 0, &label);
            let decision = match budget.admit(l, &request) {
                StoreAdmit::Ready(d) => d,
                StoreAdmit::Pending(f) => f.await,
            };
            let StoreDecision::Admitted(lease) = decision else {
                panic!("{decision:?}");
            };
            budget.settle(l, lease, Spent::new(80, 0));
            let deadline = Instant::now() + Duration::from_secs(5);
            while budget.settlements_pending() != 0 {
                assert!(Instant::now() < deadline, "the settlement was not flushed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    in_new_runtime(false, calls(0));
    assert_eq!(store.replicas(), 1);

    // The first runtime is gone. Another replica beats in the next one: this store counts
    // it only if its own heartbeat runs again.
    in_new_runtime(true, async {
        calls(10).await;
        let other = build();
        let deadline = Instant::now() + Duration::from_secs(5);
        // (Each store's heartbeat starts, or starts again, at its first `replicas()`.)
        loop {
            let counts = [store.replicas(), other.replicas()];
            if counts == [2, 2] {
                break;
            }
            assert!(Instant::now() < deadline, "replicas: {counts:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // And a third runtime, current-thread again.
    in_new_runtime(false, calls(20));
    assert_eq!(budget.fallbacks(), 0, "every admission decided in Redis");
    assert_eq!(budget.settlements_dropped(), 0);
    assert_eq!(store.skipped(), 0);
    assert!(!store.is_degraded());
}
