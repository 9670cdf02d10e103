//! What the cluster tests share: tenants whose keys are on different nodes.

use std::time::{Duration, Instant};

use tower_ai_budget::{StoreDecision, StoreLimits};
use tower_ai_redis::testing::RedisCluster;
use tower_ai_redis::{RedisBudget, RedisStore};

use super::{answered, ask, MS};

/// Two of `names` whose keys (`key_of` each) the cluster puts on two different nodes:
/// `(name, node)` each.
pub(crate) fn on_two_nodes(
    cluster: &RedisCluster,
    names: impl IntoIterator<Item = String>,
    key_of: impl Fn(&str) -> String,
) -> [(String, usize); 2] {
    let mut first: Option<(String, usize)> = None;
    let mut tried = 0;
    for name in names {
        tried += 1;
        let node = cluster.node_of(&key_of(&name)).unwrap();
        match &first {
            None => first = Some((name, node)),
            Some((_, n)) if *n != node => return [first.unwrap(), (name, node)],
            Some(_) => {}
        }
    }
    panic!("{tried} names in one node's slots");
}

/// Two hash tags whose keys the cluster puts on two different nodes: `(tag, node)` each.
pub(crate) fn tenants_on_two_nodes(
    cluster: &RedisCluster,
    store: &RedisStore,
) -> [(String, usize); 2] {
    on_two_nodes(cluster, (0..64).map(|i| format!("tenant-{i}")), |tag| {
        store.key("budget:tat", tag, "k")
    })
}

/// A budget under a hash tag of its own, and the node of its keys.
pub(crate) struct Tenant {
    pub(crate) tag: String,
    pub(crate) node: usize,
    pub(crate) budget: RedisBudget,
}

/// Two tenants whose keys are on two different nodes, each a budget on `store`, once the
/// cluster has answered both (see [`answered`]: each asked for one request of `k`).
pub(crate) async fn two_tenants_answered(
    cluster: &RedisCluster,
    store: &RedisStore,
    l: &StoreLimits,
) -> [Tenant; 2] {
    let tenants = tenants_on_two_nodes(cluster, store).map(|(tag, node)| Tenant {
        budget: RedisBudget::builder(store.clone()).hash_tag(&tag).build(),
        tag,
        node,
    });
    answered(store, &[&tenants[0].budget, &tenants[1].budget], l, "k").await;
    tenants
}

/// A store of four replicas for the tests of a node's faults: the default 20 ms response
/// timeout, since the fall-back is what they are about. A tag's breaker skips its node for
/// 100 ms after a failure (default 500 ms), so that an answer a loaded machine gives late
/// holds the tenant of a live node back for a tenth of a run only.
pub(crate) fn quick_to_fall_back(cluster: &RedisCluster) -> RedisStore {
    RedisStore::builder()
        .replicas(4)
        .connect_timeout(Duration::from_secs(2))
        .retry_after_outage(100 * MS)
        .build_cluster(cluster.client())
}

/// What a second of calls by two tenants came to (see [`a_second_of_calls`]).
pub(crate) struct Run {
    /// Calls made, half of them each tenant's.
    pub(crate) calls: u64,
    /// The longest a call took.
    pub(crate) slowest: Duration,
    /// Tenant A's and tenant B's calls decided in-process.
    pub(crate) a_local: u64,
    pub(crate) b_local: u64,
}

/// A second of calls by tenants `a` and `b`, one each every 10 ms, each admitted.
pub(crate) async fn a_second_of_calls(a: &RedisBudget, b: &RedisBudget, l: &StoreLimits) -> Run {
    let (a_before, b_before) = (a.fallbacks(), b.fallbacks());
    let mut slowest = Duration::ZERO;
    let mut calls = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        for budget in [a, b] {
            let t = Instant::now();
            let d = ask(budget, l, "k", 0).await;
            slowest = slowest.max(t.elapsed());
            assert!(
                matches!(d, StoreDecision::Admitted(_)),
                "call {calls}: {d:?}"
            );
            calls += 1;
        }
        tokio::time::sleep(10 * MS).await;
    }
    Run {
        calls,
        slowest,
        a_local: a.fallbacks() - a_before,
        b_local: b.fallbacks() - b_before,
    }
}
