//! The stores on a real Redis Cluster of three primaries (started by the test; skipped
//! locally without `redis-server`, a failure in CI): every script's keys in one slot (a
//! script whose keys were not would be refused `CROSSSLOT`), tenants' keys on different
//! nodes, limits, cooldowns and breakers shared by four replicas, and a node killed.
//! Real time, in short windows.
#![cfg(feature = "cluster")]

use std::time::{Duration, Instant};

mod support;
use support::cluster::{
    a_second_of_calls, on_two_nodes, quick_to_fall_back, tenants_on_two_nodes,
    two_tenants_answered, Run,
};
use support::{admit, ask, commands, connection, limits, MS, NO_HANG};

use tower_ai_budget::{BudgetStore, Spent, StoreDecision};
use tower_ai_circuit_breaker::store::SharedState;
use tower_ai_redis::testing::{RedisCluster, RedisServer};
use tower_ai_redis::{RedisBreakers, RedisBudget, RedisCooldowns, RedisStore};
use tower_ai_retry_after::store::{Check, CooldownStore, SharedCooldown};

fn is_admitted(d: &StoreDecision) -> bool {
    matches!(d, StoreDecision::Admitted(_))
}

/// Whether node `node` holds `key` (asked of that node alone: the key must be in its slots).
async fn holds(cluster: &RedisCluster, node: usize, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<u32>(&mut connection(cluster.node(node)).await)
        .await
        .unwrap()
        == 1
}

/// A store that waits for the cluster long enough for a loaded machine (see
/// `support::patient`), with a fast heartbeat.
fn patient(cluster: &RedisCluster) -> RedisStore {
    support::patient()
        .heartbeat(50 * MS)
        .build_cluster(cluster.client())
}

#[tokio::test]
async fn every_script_runs_on_the_cluster_and_tenants_land_on_different_nodes() {
    let Some(cluster) = RedisCluster::start_or_skip("cluster scripts") else {
        return;
    };
    let store = patient(&cluster);
    let [(ta, na), (tb, nb)] = tenants_on_two_nodes(&cluster, &store);
    assert_ne!(na, nb);

    // Strict budgets, every limit on, so that the admission and settlement scripts touch
    // all five keys of a decision (and the spend windows' derived keys).
    let l = limits(|l| {
        l.requests_per_minute = Some(1_000);
        l.tokens_per_minute = Some(100_000);
        l.max_concurrent = Some(10);
        l.spend_per_hour = Some(1_000_000_000);
        l.spend_per_day = Some(10_000_000_000);
    });
    for (tag, node) in [(&ta, na), (&tb, nb)] {
        let b = RedisBudget::builder(store.clone()).hash_tag(tag).build();
        let (decision, _) = admit(&b, &l, "k", 100, 5_000_000).await;
        let StoreDecision::Admitted(lease) = decision else {
            panic!("{tag}: {decision:?}");
        };
        b.settle(&l, lease, Spent::new(80, 4_000_000));
        tokio::time::sleep(100 * MS).await;
        assert_eq!(b.fallbacks(), 0, "{tag}: decided in Redis");
        // The settlement was sent on its own (no admission followed) and landed.
        assert_eq!(b.settlements_pending(), 0, "{tag}: settled");
        assert_eq!(b.settlements_dropped(), 0, "{tag}: settled");
        assert!(!store.is_degraded());
        // Sharded: each tenant's keys on the node of its tag's slot.
        let keys = b.keys_of("k");
        assert!(holds(&cluster, node, &keys[0]).await, "{}", keys[0]);
    }

    // Leased: the lease script (two keys).
    let leased = RedisBudget::builder(store.clone())
        .hash_tag(&ta)
        .leased(0.1)
        .build();
    let l = limits(|l| l.requests_per_minute = Some(100));
    assert!(is_admitted(&ask(&leased, &l, "L", 0).await));
    assert_eq!(leased.fallbacks(), 0);
    assert!(leased.round_trips() >= 1);

    // Cooldowns: extend (cooldown and index), remaining, running.
    let cooldowns = RedisCooldowns::strict(store.clone()).tag(&tb);
    let held = cooldowns
        .extend("h/m", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(held > Duration::from_secs(4), "{held:?}");
    assert!(cooldowns.remaining("h/m").await.unwrap() > Duration::from_secs(4));
    assert_eq!(cooldowns.running().await.unwrap().len(), 1);

    // Breakers: open (state, probes, index), probe permits, the open ones.
    let breakers = RedisBreakers::new(store.clone()).tag(&ta);
    breakers.open("h/m", 50 * MS).await.unwrap();
    assert_eq!(breakers.open_breakers().await.unwrap().len(), 1);
    tokio::time::sleep(60 * MS).await;
    assert_eq!(
        breakers.take_permit("h/m", 1).await.unwrap(),
        SharedState::Granted
    );
    assert_eq!(
        breakers.return_permit("h/m", true, 1).await.unwrap(),
        SharedState::Closed
    );

    // The heartbeat: four stores (four replicas) counted on the cluster.
    let mut stores: Vec<RedisStore> = (0..3).map(|_| patient(&cluster)).collect();
    stores.push(store.clone());
    let deadline = Instant::now() + Duration::from_secs(5);
    // (Each store's heartbeat starts at its first `replicas()`.)
    loop {
        let counts: Vec<u32> = stores.iter().map(RedisStore::replicas).collect();
        if counts.iter().all(|&n| n == 4) {
            break;
        }
        assert!(Instant::now() < deadline, "replicas: {counts:?}");
        tokio::time::sleep(20 * MS).await;
    }
    assert!(!store.is_degraded());
}

#[tokio::test]
async fn budget_limits_hold_across_four_replicas_on_a_cluster() {
    let Some(cluster) = RedisCluster::start_or_skip("cluster budget") else {
        return;
    };
    // Four replicas, each with its own cluster connection: 10 per 2 s window (one per
    // 200 ms), burst 3, shared.
    let replicas: Vec<RedisBudget> = (0..4)
        .map(|_| {
            RedisBudget::builder(patient(&cluster))
                .hash_tag("account-1")
                .minute(Duration::from_secs(2))
                .burst(3, 0)
                .build()
        })
        .collect();
    let l = limits(|l| l.requests_per_minute = Some(10));
    let mut ok = 0;
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(2) {
        if is_admitted(&ask(&replicas[i % 4], &l, "shared", 0).await) {
            ok += 1;
        }
        i += 1;
        tokio::time::sleep(5 * MS).await;
    }
    for (n, r) in replicas.iter().enumerate() {
        assert_eq!(r.fallbacks(), 0, "replica {n} decided in-process");
    }
    // In-process, four replicas would have admitted 4 × (10 + 3) in the window.
    assert!(ok <= 10 + 3, "{ok} admitted in one window of 10 + burst 3");
    assert!(ok >= 11, "{ok}: the pace admits one per 200 ms");
    println!("{i} asked by 4 replicas in 2 s, {ok} admitted (limit 10, burst 3)");
}

#[tokio::test]
async fn a_cooldown_seen_by_one_replica_holds_the_three_others() {
    let Some(cluster) = RedisCluster::start_or_skip("cluster cooldown") else {
        return;
    };
    let replicas: Vec<RedisCooldowns> = (0..4)
        .map(|_| RedisCooldowns::strict(patient(&cluster)).tag("account-1"))
        .collect();
    let leased = RedisCooldowns::leased(patient(&cluster))
        .tag("account-1")
        .refresh(50 * MS);
    for r in &replicas {
        assert_eq!(
            r.remaining("api.openai.com/gpt-4o").await.unwrap(),
            Duration::ZERO
        );
    }
    // Replica 0 meets a 429 with retry-after: 5.
    if let Some(publish) = replicas[0].publish("api.openai.com/gpt-4o", Duration::from_secs(5)) {
        publish.await;
    }
    for (n, r) in replicas.iter().enumerate().skip(1) {
        let Check::Later(check) = r.check("api.openai.com/gpt-4o") else {
            panic!("strict mode asks Redis");
        };
        match check.await {
            SharedCooldown::Cooling(left) => {
                assert!(left > Duration::from_secs(4), "replica {n}: {left:?}")
            }
            other => panic!("replica {n}: {other:?}"),
        }
        let Check::Later(other) = r.check("api.openai.com/gpt-4o-mini") else {
            panic!("strict mode asks Redis");
        };
        assert_eq!(
            other.await,
            SharedCooldown::Clear,
            "another model is not held"
        );
    }
    // A leased replica within its refresh period.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if let Check::Now(SharedCooldown::Cooling(_)) = leased.check("api.openai.com/gpt-4o") {
            break;
        }
        assert!(Instant::now() < deadline, "the leased copy never held it");
        tokio::time::sleep(10 * MS).await;
    }
    assert!(replicas.iter().all(|r| !r.is_degraded()));
}

#[tokio::test]
async fn a_breaker_opened_by_one_replica_is_open_for_all_and_probes_are_shared() {
    let Some(cluster) = RedisCluster::start_or_skip("cluster breakers") else {
        return;
    };
    let replicas: Vec<RedisBreakers> = (0..4)
        .map(|_| RedisBreakers::new(patient(&cluster)).tag("account-1"))
        .collect();
    replicas[0]
        .open("h/m", Duration::from_secs(1))
        .await
        .unwrap();
    for (n, r) in replicas.iter().enumerate().skip(1) {
        assert!(
            matches!(r.take_permit("h/m", 2).await.unwrap(), SharedState::Open(d) if d > 500 * MS),
            "replica {n}"
        );
        let open = r.open_breakers().await.unwrap();
        assert_eq!(open.len(), 1, "replica {n}");
        assert_eq!(open[0].0, "h/m");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Half-open: two probe permits among the four replicas.
    let mut granted = 0;
    for r in &replicas {
        if r.take_permit("h/m", 2).await.unwrap() == SharedState::Granted {
            granted += 1;
        }
    }
    assert_eq!(granted, 2, "probes across all replicas");
}

#[tokio::test]
async fn a_node_killed_falls_back_in_process_without_failing_calls() {
    let Some(mut cluster) = RedisCluster::start_or_skip("cluster node killed") else {
        return;
    };
    let store = quick_to_fall_back(&cluster);
    let l = limits(|l| l.requests_per_minute = Some(60_000));
    // Both answered by the cluster first.
    let [a, b] = two_tenants_answered(&cluster, &store, &l).await;
    let (na, a, b) = (a.node, a.budget, b.budget);

    cluster.kill(na);
    let Run {
        calls,
        slowest,
        a_local,
        b_local,
    } = a_second_of_calls(&a, &b, &l).await;
    println!(
        "node {na} killed: {calls} calls, 0 failed, slowest {slowest:?}; decided in-process: \
         {a_local} of tenant A's {}, {b_local} of tenant B's {} (its node alive)",
        calls / 2,
        calls / 2
    );
    assert!(slowest < NO_HANG, "a call waited {slowest:?}");
    assert!(a_local > 0, "tenant A's node is gone: decided in-process");
    assert!(store.is_degraded());
    // The breaker on Redis is per hash tag: tenant B's calls still go to its node (all of
    // them but those a loaded machine answers later than the 20 ms response timeout).
    assert!(
        b_local * 4 < calls / 2,
        "{b_local} of tenant B's {} calls decided in-process",
        calls / 2
    );

    // The node back (same identity and slots): shared again, without a new store.
    cluster.restart(na).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        tokio::time::sleep(100 * MS).await;
        let before = a.fallbacks();
        assert!(is_admitted(&ask(&a, &l, "k", 0).await));
        if a.fallbacks() == before && !store.is_degraded() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted node not used again"
        );
    }
}

/// The median and 99th percentile of `times`.
fn percentiles(mut times: Vec<Duration>) -> (Duration, Duration) {
    times.sort();
    (times[times.len() / 2], times[times.len() * 99 / 100])
}

#[tokio::test]
async fn a_call_on_the_cluster_is_one_command_on_the_node_of_its_tag() {
    let Some(cluster) = RedisCluster::start_or_skip("cluster round trip") else {
        return;
    };
    let Some(server) = RedisServer::start_or_skip("cluster round trip") else {
        return;
    };
    // No heartbeat (a configured replica count): the calls below are all there is.
    let on_cluster = RedisCooldowns::strict(
        RedisStore::builder()
            .response_timeout(Duration::from_millis(500))
            .replicas(4)
            .build_cluster(cluster.client()),
    )
    .tag("account-1");
    let on_server = RedisCooldowns::strict(server.store());
    // Connected and the script loaded on both.
    on_cluster.remaining("h/m").await.unwrap();
    on_server.remaining("h/m").await.unwrap();
    let home = cluster
        .node_of(&on_cluster.store().key("cooldown", "account-1", "h/m"))
        .unwrap();
    for i in 0..3 {
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async::<()>(&mut connection(cluster.node(i)).await)
            .await
            .unwrap();
    }
    // Interleaved, so that the machine's load falls on both alike.
    const CALLS: u64 = 2_000;
    let (mut cluster_times, mut server_times) = (Vec::new(), Vec::new());
    for _ in 0..CALLS {
        let t = Instant::now();
        on_cluster.remaining("h/m").await.unwrap();
        cluster_times.push(t.elapsed());
        let t = Instant::now();
        on_server.remaining("h/m").await.unwrap();
        server_times.push(t.elapsed());
    }
    let (c50, c99) = percentiles(cluster_times);
    let (s50, s99) = percentiles(server_times);
    // Shown, not asserted (timing depends on the machine's load): a release build on an
    // idle machine gives about 17 us on the cluster and 15 us on one server.
    println!(
        "a script's round trip ({CALLS} each, interleaved): cluster p50 {c50:?} p99 {c99:?}; \
         one server p50 {s50:?} p99 {s99:?}"
    );
    // Each call was one EVALSHA, on the node of its tag, and nothing else ran: no slot map
    // fetched, no script loaded, no redirection followed.
    for node in 0..3 {
        let mut ran: Vec<(String, u64)> = commands(cluster.node(node))
            .await
            .into_iter()
            .filter(|(name, _)| name != "info" && name != "config|resetstat")
            .collect();
        ran.sort();
        // (The script's own PTTL is counted too.)
        let expected = if node == home {
            vec![("evalsha".to_owned(), CALLS), ("pttl".to_owned(), CALLS)]
        } else {
            Vec::new()
        };
        assert_eq!(ran, expected, "node {node} (the tag's: {home})");
    }
}

#[tokio::test]
async fn script_flush_on_every_node_reloads_the_scripts() {
    let Some(cluster) = RedisCluster::start_or_skip("cluster script flush") else {
        return;
    };
    let store = patient(&cluster);
    let l = limits(|l| l.requests_per_minute = Some(60_000));
    let budgets = two_tenants_answered(&cluster, &store, &l)
        .await
        .map(|t| t.budget);
    for i in 0..3 {
        cluster.node(i).script_flush().await.unwrap();
        assert!(!admit_loaded(&cluster, i).await);
    }
    for b in &budgets {
        let before = b.round_trips();
        assert!(is_admitted(&ask(b, &l, "k", 0).await));
        assert_eq!(b.round_trips(), before + 1);
        assert_eq!(b.fallbacks(), 0, "answered by Redis after the flush");
    }
    for i in 0..3 {
        assert!(admit_loaded(&cluster, i).await, "node {i}: loaded again");
    }
    assert!(!store.is_degraded());
}

/// redis-rs loads a script on every primary after a `NOSCRIPT`: with one of them down, the
/// others still get it.
#[tokio::test]
async fn a_flushed_node_gets_its_scripts_again_while_another_node_is_down() {
    let Some(mut cluster) = RedisCluster::start_or_skip("cluster script flush, node down") else {
        return;
    };
    let store = patient(&cluster);
    let l = limits(|l| l.requests_per_minute = Some(60_000));
    let [a, b] = two_tenants_answered(&cluster, &store, &l).await;
    let (na, nb) = (a.node, b.node);
    cluster.kill(na);
    cluster.node(nb).script_flush().await.unwrap();
    assert!(!admit_loaded(&cluster, nb).await);
    let b = &b.budget;
    let before = (b.round_trips(), b.fallbacks());
    for _ in 0..3 {
        assert!(is_admitted(&ask(b, &l, "k", 0).await));
    }
    assert_eq!(
        (b.round_trips(), b.fallbacks()),
        (before.0 + 3, before.1),
        "tenant B answered by its node"
    );
    assert!(admit_loaded(&cluster, nb).await, "loaded again");
}

/// Whether node `node` has the budget's admission script (`SCRIPT EXISTS`).
async fn admit_loaded(cluster: &RedisCluster, node: usize) -> bool {
    // The admission script is the settle function followed by the admission.
    let sha = redis::Script::new(concat!(
        include_str!("../src/scripts/budget_settle.lua"),
        include_str!("../src/scripts/budget_admit.lua")
    ))
    .get_hash()
    .to_owned();
    let exists: Vec<u8> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(sha)
        .query_async(&mut connection(cluster.node(node)).await)
        .await
        .unwrap();
    exists == [1]
}

#[tokio::test]
async fn a_paused_node_falls_back_for_its_tags_instead_of_hanging() {
    let Some(cluster) = RedisCluster::start_or_skip("cluster client pause") else {
        return;
    };
    let store = quick_to_fall_back(&cluster);
    let l = limits(|l| l.requests_per_minute = Some(60_000));
    let [a, b] = two_tenants_answered(&cluster, &store, &l).await;
    let (na, a, b) = (a.node, a.budget, b.budget);
    cluster
        .node(na)
        .pause_clients(Duration::from_secs(2))
        .await
        .unwrap();
    let Run {
        calls,
        slowest,
        a_local,
        b_local,
    } = a_second_of_calls(&a, &b, &l).await;
    println!(
        "node {na} paused: {calls} calls, slowest {slowest:?}; in-process: {a_local} of tenant \
         A's, {b_local} of tenant B's"
    );
    assert!(slowest < NO_HANG, "a call waited {slowest:?}");
    assert!(a_local > 0);
    assert!(b_local * 4 < calls / 2, "{b_local} of B's {}", calls / 2);
}

/// A cluster store kept across Tokio runtimes: the cluster connection's task ends with the
/// runtime it was made in (redis-rs does not make it again: every call would fail "broken
/// pipe"); the store makes a new connection in the next runtime, and no call fails.
#[test]
fn a_cluster_store_goes_on_in_the_next_runtime_when_its_first_is_gone() {
    let Some(cluster) = RedisCluster::start_or_skip("cluster runtime change") else {
        return;
    };
    let store = patient(&cluster);
    let script = redis::Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
    let key = store.key("test", "tenant-1", "n");
    for (round, multi_thread) in [(0, false), (1, true), (2, false)] {
        let mut builder = if multi_thread {
            tokio::runtime::Builder::new_multi_thread()
        } else {
            tokio::runtime::Builder::new_current_thread()
        };
        let runtime = builder.enable_all().build().unwrap();
        runtime.block_on(async {
            for i in 1..=10 {
                let n = store.run::<i64>(&script, &[&key], &[&1]).await;
                assert_eq!(
                    n.unwrap(),
                    round * 10 + i,
                    "round {round}: answered by Redis"
                );
            }
        });
    }
    assert_eq!(store.skipped(), 0);
    assert!(!store.is_degraded());
}

/// With a hash tag per key, one budget's keys spread over the nodes (each name's keys on
/// the node of its own slot), limits hold per key, and settlements of interleaved keys
/// land: an admission carries only its own key's (another's would be refused
/// `CROSSSLOT`), the flusher sends one key's per script.
#[tokio::test]
async fn a_budget_with_a_hash_tag_per_key_spreads_its_keys_over_the_nodes() {
    let Some(cluster) = RedisCluster::start_or_skip("cluster tag per key") else {
        return;
    };
    let budget = RedisBudget::builder(patient(&cluster))
        .hash_tag_per_key()
        .build();
    // Two names whose keys are on two nodes.
    let [(a, na), (b, nb)] = on_two_nodes(
        &cluster,
        (0..64).map(|i| format!("tenant-{i}/gpt-4o")),
        |name| budget.keys_of(name)[0].clone(),
    );
    assert_ne!(na, nb);
    for name in [&a, &b] {
        let keys = budget.keys_of(name);
        assert!(keys
            .iter()
            .all(|k| cluster.node_of(k).unwrap() == cluster.node_of(&keys[0]).unwrap()));
    }

    let l = limits(|l| {
        l.requests_per_minute = Some(1_000);
        l.tokens_per_minute = Some(1_000_000);
        l.max_concurrent = Some(2);
    });
    let take = |name: &str| {
        let (budget, l, name) = (&budget, &l, name.to_owned());
        async move {
            match ask(budget, l, &name, 100).await {
                StoreDecision::Admitted(lease) => Some(lease),
                StoreDecision::Refused { .. } => None,
            }
        }
    };
    // Two places per key, interleaved; the third of each refused.
    let a1 = take(&a).await.expect("a1");
    let b1 = take(&b).await.expect("b1");
    let a2 = take(&a).await.expect("a2");
    let b2 = take(&b).await.expect("b2");
    assert!(take(&a).await.is_none(), "a: over its concurrency");
    assert!(take(&b).await.is_none(), "b: over its concurrency");
    // Both on their own nodes.
    assert!(holds(&cluster, na, &budget.keys_of(&a)[3]).await);
    assert!(holds(&cluster, nb, &budget.keys_of(&b)[3]).await);

    // a's settlement queued first, then b's: b's next admission carries b1's (its place
    // back, so admitted) and not a1's.
    budget.settle(&l, a1, Spent::new(80, 0));
    budget.settle(&l, b1, Spent::new(80, 0));
    let b3 = take(&b).await.expect("b3: b1's place back");
    // a1's settlement goes on its own (the flusher), then a has a place again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while budget.settlements_pending() != 0 {
        assert!(Instant::now() < deadline, "not flushed");
        tokio::time::sleep(5 * MS).await;
    }
    let a3 = take(&a).await.expect("a3: a1's place back");
    for lease in [a2, a3, b2, b3] {
        budget.settle(&l, lease, Spent::new(80, 0));
    }
    budget.flush().await.unwrap();
    assert_eq!(budget.settlements_pending(), 0);
    assert_eq!(budget.settlements_dropped(), 0);
    assert_eq!(budget.fallbacks(), 0, "every decision made in Redis");
}
