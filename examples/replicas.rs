//! Four replicas of a service on one provider account, with and without shared limits.
//!
//! ```text
//! cargo run --release --example replicas
//! ```
//!
//! Starts a `redis-server` of its own on a free loopback port (Debian's `redis-server`
//! package, or `$REDIS_SERVER`; nothing is saved), and a simulated provider allowing 100
//! requests and 3,000 tokens a 1 s window. Four independent stacks, each with its own
//! TokenBudget (and, when shared, its own Redis connection), are offered 2x and 10x that
//! limit for 3 s each: with in-process budgets, then with a strict and a leased
//! `RedisBudget`. Prints what the provider saw, as a Markdown table, and exits non-zero
//! if the shared budgets let more than the limit (and their burst) through or the
//! in-process ones did not. Takes about 40 s.

use std::time::Duration;
use tower_ai_redis::testing::RedisServer;

use tower_ai_workspace::replicas::{run, table, Fault, Run, Sharing};

#[tokio::main]
async fn main() {
    let mut server = match RedisServer::start() {
        Ok(server) => server,
        Err(e) => {
            eprintln!("redis-server could not start ({e}): install it (apt-get install redis-server) or set REDIS_SERVER");
            std::process::exit(1);
        }
    };
    let mut reports = Vec::new();
    for sharing in [Sharing::InProcess, Sharing::Strict, Sharing::Leased(0.05)] {
        for load in [2.0, 10.0] {
            eprintln!("running: {sharing:?}, {load}x the limit");
            let cfg = Run::new(sharing, load);
            let server = (sharing != Sharing::InProcess).then_some(&mut server);
            reports.push(run(&cfg, server).await);
        }
    }
    // Redis killed 1 s into a strict run and started again 1.5 s later, with the default
    // 20 ms response timeout: no request fails, each waits for the fall-back at most that.
    eprintln!("running: Strict, 2x the limit, Redis killed at 1 s and restarted at 2.5 s");
    let mut cfg = Run::new(Sharing::Strict, 2.0);
    cfg.faults = vec![
        (Duration::from_millis(1_000), Fault::Kill),
        (Duration::from_millis(2_500), Fault::Restart),
    ];
    let mut faulted = run(&cfg, Some(&mut server)).await;
    faulted.name = format!("{}, Redis killed and restarted", faulted.name);
    reports.push(faulted);
    println!(
        "4 replicas, one provider limit of 100 requests and 3,000 tokens a 1 s window, 3 s a run:\n"
    );
    print!("{}", table(&reports));
    // What it shows, checked: the shared budgets fail nothing and hold the limit (plus the
    // burst of 5 and a request on a window's boundary); the in-process ones do not.
    let shared_ok = reports[2..]
        .iter()
        .all(|r| r.failed == 0 && r.max_per_window <= r.limit + 5 + 1);
    let fall_back_ok = reports[6].max_admission <= Duration::from_millis(25);
    let overshoot = reports[1].max_per_window >= 3 * reports[1].limit;
    if !shared_ok || !overshoot || !fall_back_ok {
        eprintln!("not as expected: {reports:#?}");
        std::process::exit(1);
    }
}
