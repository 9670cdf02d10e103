//! What the Redis tests share.
// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tower_ai_budget::{
    BudgetStore, StoreAdmit, StoreDecision, StoreLease, StoreLimits, StoreRequest,
};
use tower_ai_core::keys::Key;
use tower_ai_core::BudgetLimit;
use tower_ai_redis::testing::RedisServer;
use tower_ai_redis::{RedisBudget, RedisStore, RedisStoreBuilder};

#[cfg(feature = "cluster")]
pub(crate) mod cluster;

/// The most a call may take while Redis is down or paused, in these tests: enough to tell a
/// call that fell back (Redis's faults here last seconds) from one that waited on Redis,
/// on a machine busy with the rest of the suite. The fall-back itself takes the store's
/// 20 ms response timeout at most; the tests print what they measured.
pub(crate) const NO_HANG: Duration = Duration::from_millis(500);

pub(crate) const MS: Duration = Duration::from_millis(1);

/// The default limits (none set) with `f` applied.
pub(crate) fn limits(f: impl FnOnce(&mut StoreLimits)) -> StoreLimits {
    let mut l = StoreLimits::default();
    f(&mut l);
    l
}

/// Asks the budget for one request of `name` reserving `tokens` and `spend`; `true` in the
/// answer when it needed a round trip.
pub(crate) async fn admit(
    b: &RedisBudget,
    l: &StoreLimits,
    name: &str,
    tokens: u64,
    spend: u64,
) -> (StoreDecision, bool) {
    let label = || name.to_owned();
    // (The request, which is not `Send`, dropped before the await: the tests spawn this.)
    let admit = b.admit(l, &StoreRequest::new(Key::of(name), tokens, spend, &label));
    match admit {
        StoreAdmit::Ready(d) => (d, false),
        StoreAdmit::Pending(f) => (f.await, true),
    }
}

/// Asks the budget for one request of `name` reserving `tokens` (no spend).
pub(crate) async fn ask(
    b: &RedisBudget,
    l: &StoreLimits,
    name: &str,
    tokens: u64,
) -> StoreDecision {
    admit(b, l, name, tokens, 0).await.0
}

pub(crate) fn admitted(d: StoreDecision) -> StoreLease {
    match d {
        StoreDecision::Admitted(lease) => lease,
        other => panic!("expected admitted, got {other:?}"),
    }
}

pub(crate) fn refused(d: StoreDecision) -> (BudgetLimit, Option<Duration>) {
    match d {
        StoreDecision::Refused { limit, retry_after } => (limit, retry_after),
        other => panic!("expected refused, got {other:?}"),
    }
}

/// A store that waits for Redis long enough for a loaded machine (the tests not about
/// outages must not fall back in-process because a debug build answered late).
pub(crate) fn patient() -> RedisStoreBuilder {
    RedisStore::builder()
        .response_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_secs(2))
}

/// Asks each of `budgets` for one request of `name` (each admitted) until Redis has
/// answered them all (none decided in-process, `store` not skipping Redis), 600 ms apart
/// for up to 5 s: a loaded machine's first connection may take longer than the store's
/// response timeout.
pub(crate) async fn answered(
    store: &RedisStore,
    budgets: &[&RedisBudget],
    l: &StoreLimits,
    name: &str,
) {
    let fallbacks = || budgets.iter().map(|b| b.fallbacks()).sum::<u64>();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = fallbacks();
        for b in budgets {
            admitted(ask(b, l, name, 0).await);
        }
        if fallbacks() == before && !store.is_degraded() {
            break;
        }
        assert!(Instant::now() < deadline, "redis never answered");
        tokio::time::sleep(600 * MS).await;
    }
}

/// A connection of its own to `server`, for a test's own commands.
pub(crate) async fn connection(server: &RedisServer) -> MultiplexedConnection {
    server
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The commands `server` has run (since its statistics were last reset), by name, with
/// their calls (`INFO commandstats`: `cmdstat_evalsha:calls=500,…`).
pub(crate) async fn commands(server: &RedisServer) -> Vec<(String, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection(server).await)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(":calls=")?;
            let calls = rest.split(',').next()?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Every key of `server` that matches `pattern`, with what `command` (`GET`, `ZCARD`, …)
/// answers for it.
pub(crate) async fn each_key(
    server: &RedisServer,
    pattern: &str,
    command: &str,
) -> Vec<(String, u64)> {
    let mut conn = connection(server).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut answers = Vec::with_capacity(keys.len());
    for key in keys {
        let n: u64 = redis::cmd(command)
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        answers.push((key, n));
    }
    answers
}
