//! 4 replicas (4 independent stacks, each with its own Redis connection) share one
//! provider limit of the simulator: 100 requests and 3,000 tokens a 1 s window, offered 2x
//! and 10x the limit for 3 s. In-process budgets let 4 times the limit through; strict
//! and leased RedisBudgets hold it. Then Redis's faults: killed mid-run, restarted, its
//! scripts flushed. Real time (Redis's clock cannot be paused), a few seconds a run;
//! skipped locally without `redis-server`, a failure in CI.

use std::time::Duration;

use tower_ai_redis::testing::RedisServer;
use tower_ai_workspace::replicas::{run, table, Fault, Report, Run, Sharing};

/// One run at a time: each measures real time, which runs side by side would share.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn check_strict(r: &Report, burst: u64) {
    // Every request either went through or was refused by its budget.
    assert_eq!(r.failed, 0, "{r:?}");
    assert_eq!(r.admitted + r.refused, r.offered, "{r:?}");
    // GCRA: at most the limit plus the burst in any window; the provider's fixed windows
    // may see the burst once, at the start, and a request on each boundary.
    assert!(
        r.max_per_window <= r.limit + burst + 1,
        "{} in one window: {r:?}",
        r.max_per_window
    );
    assert!(r.upstream_429 <= burst + r.windows, "{r:?}");
    // Every token the provider counted was settled, and nothing more.
    assert_eq!(r.settled_tokens, r.provider_tokens, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_holds_one_limit_across_four_replicas() {
    let _serial = SERIAL.lock().await;
    let Some(mut server) = RedisServer::start_or_skip("replicas, strict") else {
        return;
    };
    let mut reports = Vec::new();
    for load in [2.0, 10.0] {
        let mut cfg = Run::new(Sharing::Strict, load);
        // A debug build on a loaded machine can take longer than the default 20 ms to get an
        // answer at 1,000 requests a second: a replica that falls back decides at its share
        // while the others still count in Redis (the fault test keeps the default).
        cfg.response_timeout = Duration::from_millis(250);
        let r = run(&cfg, Some(&mut server)).await;
        check_strict(&r, cfg.burst.0);
        // The goal is 98% at 2x (`cargo run --release --example replicas` reports it);
        // a debug build sharing the machine with other tests measured 98.3%, so the test
        // keeps a margin that still fails a budget that leaves capacity unused.
        if load == 2.0 {
            assert!(r.goodput >= 0.95, "goodput {:.3}: {r:?}", r.goodput);
        }
        reports.push(r);
    }
    print!("{}", table(&reports));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_mode_never_passes_the_limit_and_loses_at_most_a_chunk_per_replica() {
    let _serial = SERIAL.lock().await;
    let Some(mut server) = RedisServer::start_or_skip("replicas, leased") else {
        return;
    };
    let fraction = 0.05;
    let mut reports = Vec::new();
    for load in [2.0, 10.0] {
        let mut cfg = Run::new(Sharing::Leased(fraction), load);
        cfg.response_timeout = Duration::from_millis(250);
        let r = run(&cfg, Some(&mut server)).await;
        assert_eq!(r.failed, 0, "{r:?}");
        assert_eq!(r.admitted + r.refused, r.offered, "{r:?}");
        // Chunks of one fixed window never add up to more than its limit, counted by the
        // window each request was admitted in; the provider's windows, lined up with
        // Redis's, may see a request admitted at a window's very end in the next.
        assert!(r.max_per_budget_window <= r.limit, "{r:?}");
        assert!(r.max_per_window <= r.limit + 1, "{r:?}");
        assert!(r.upstream_429 <= r.windows, "{r:?}");
        // At most one chunk per replica left unused in a window.
        let chunk = (r.limit as f64 * fraction).ceil() as u64;
        assert!(
            r.served + 4 * chunk * r.windows + r.windows >= r.limit * r.windows,
            "served {}: {r:?}",
            r.served
        );
        assert_eq!(r.settled_tokens, r.provider_tokens, "{r:?}");
        println!(
            "{}x: per provider window {:?}, per budget window {:?}",
            load, r.per_window, r.per_budget_window
        );
        if load == 2.0 {
            // Chunks shrink in a window's last tenth: 98.3-99.3% measured at load average
            // 10 (98 or 99 a window: each request reserves 60 tokens and uses 30); the
            // bound, strict's, allows for a more loaded machine.
            assert!(r.goodput >= 0.95, "goodput {:.3}: {r:?}", r.goodput);
        }
        reports.push(r);
    }
    print!("{}", table(&reports));
}

/// Why the provider once counted 102 in a window at 10x against a bound of 101: its windows
/// started when the simulator was made, a millisecond or two after Redis's boundary (the
/// `TIME` answer's way back, a timer's tick), so the first requests admitted in each budget
/// window were counted in the provider's window before. Here the lag is made 150 ms and the
/// load starts 600 ms into a window (which it fills): the provider's first window also
/// counts what the next budget window admitted in its first 150 ms, and answers it 429,
/// while no budget window admitted more than the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_window_lagging_redis_counts_the_next_windows_first_requests() {
    let _serial = SERIAL.lock().await;
    let Some(mut server) = RedisServer::start_or_skip("replicas, lagging provider") else {
        return;
    };
    let mut cfg = Run::new(Sharing::Leased(0.05), 10.0);
    cfg.response_timeout = Duration::from_millis(250);
    cfg.sim_lag = Duration::from_millis(150);
    cfg.load_offset = Some(Duration::from_millis(600));
    let r = run(&cfg, Some(&mut server)).await;
    print!("{}", table(std::slice::from_ref(&r)));
    println!(
        "per provider window {:?}, per budget window {:?}",
        r.per_window, r.per_budget_window
    );
    assert!(r.max_per_budget_window <= r.limit, "{r:?}");
    assert!(r.max_per_window > r.limit + 1, "{r:?}");
    assert!(r.upstream_429 > r.windows, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_four_replicas_let_four_times_the_limit_through() {
    let _serial = SERIAL.lock().await;
    let mut reports = Vec::new();
    for load in [2.0, 10.0] {
        let r = run(&Run::new(Sharing::InProcess, load), None).await;
        assert_eq!(r.failed, 0, "{r:?}");
        reports.push(r);
    }
    print!("{}", table(&reports));
    let (two, ten) = (&reports[0], &reports[1]);
    // 2x: every replica's budget holds the whole limit, so all 200 go; the provider
    // refuses half.
    assert_eq!(two.admitted, two.offered, "{two:?}");
    assert!(two.upstream_429 >= two.limit * 9 / 10, "{two:?}");
    // 10x: 4 budgets of 100 each: 4x the limit reaches the provider, 3x refused there.
    assert!(ten.max_per_window >= 4 * ten.limit * 9 / 10, "{ten:?}");
    assert!(ten.upstream_429 >= 3 * ten.limit * 9 / 10, "{ten:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_fails_nothing_and_holds_the_limit_per_replica() {
    let _serial = SERIAL.lock().await;
    let Some(mut server) = RedisServer::start_or_skip("replicas, redis killed") else {
        return;
    };
    let mut cfg = Run::new(Sharing::Strict, 2.0);
    cfg.duration = Duration::from_secs(4);
    cfg.faults = vec![
        (Duration::from_millis(1_000), Fault::Kill),
        (Duration::from_millis(2_500), Fault::Restart),
    ];
    let r = run(&cfg, Some(&mut server)).await;
    print!("{}", table(std::slice::from_ref(&r)));
    // Not one request failed because of Redis: each was admitted or refused by a budget.
    assert_eq!(r.failed, 0, "{r:?}");
    assert_eq!(r.admitted + r.refused, r.offered, "{r:?}");
    // The fall-back takes at most the store's response timeout (20 ms), and then no round
    // trip at all until a probe: `cargo run --release --example replicas` measures it
    // (and fails above 25 ms). Here, on a machine running the rest of the suite, the
    // bound only tells a fall-back from a wait on Redis, which is down for 1.5 s.
    assert!(
        r.max_admission <= Duration::from_millis(500),
        "a request waited {:?}",
        r.max_admission
    );
    // In-process at limit / 4 per replica while Redis was down: still the limit (plus the
    // bursts) in every window.
    assert!(r.max_per_window <= r.limit + cfg.burst.0 + 1, "{r:?}");
    assert!(r.upstream_429 <= cfg.burst.0 + r.windows, "{r:?}");
    // Back to shared state after the restart, without restarting the replicas.
    assert_eq!(r.degraded_at_end, 0, "{r:?}");
    // Paced at a quarter of the limit (and of the burst) per replica while Redis was down.
    assert!(r.goodput >= 0.8, "goodput {:.3}: {r:?}", r.goodput);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_mid_run_reloads_the_scripts() {
    let _serial = SERIAL.lock().await;
    let Some(mut server) = RedisServer::start_or_skip("replicas, script flush") else {
        return;
    };
    let mut cfg = Run::new(Sharing::Strict, 2.0);
    cfg.duration = Duration::from_secs(2);
    cfg.faults = vec![(Duration::from_millis(700), Fault::ScriptFlush)];
    // As in the load runs: no fall-back because a loaded machine answered late.
    cfg.response_timeout = Duration::from_millis(250);
    let r = run(&cfg, Some(&mut server)).await;
    assert_eq!(r.failed, 0, "{r:?}");
    assert_eq!(r.degraded_at_end, 0, "{r:?}");
    check_strict(&r, cfg.burst.0);
    // The reload costs a round trip or two; the rest is the machine's load (98-100% on a
    // quiet one, 90% seen while other test suites ran).
    assert!(r.goodput >= 0.8, "goodput {:.3}: {r:?}", r.goodput);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_across_four_replicas_never_passes_the_cap() {
    let _serial = SERIAL.lock().await;
    let Some(mut server) = RedisServer::start_or_skip("replicas, spend cap") else {
        return;
    };
    // $0.05 an hour; a request reserves $0.0016 (10 input + 50 output tokens) and costs
    // $0.0007 (10 + 20): the cap holds ~71 answers, 5 times fewer than the rate limits.
    let mut cfg = Run::new(Sharing::Strict, 2.0);
    cfg.duration = Duration::from_secs(2);
    cfg.spend_per_hour = Some(0.05);
    cfg.response_timeout = Duration::from_millis(250);
    let r = run(&cfg, Some(&mut server)).await;
    print!("{}", table(std::slice::from_ref(&r)));
    println!("spent ${:.4} of $0.05", r.spend);
    assert_eq!(r.failed, 0, "{r:?}");
    assert!(r.spend <= 0.05 + 1e-9, "spent ${}: {r:?}", r.spend);
    // Refunds of the unused output let the cap be spent, not just reserved.
    assert!(r.spend >= 0.05 - 2.0 * 0.0016, "spent ${}: {r:?}", r.spend);
    assert_eq!(r.settled_tokens, r.provider_tokens, "{r:?}");

    // Without Redis each replica holds the whole cap: 4 times it can be spent.
    let mut cfg = Run::new(Sharing::InProcess, 2.0);
    cfg.spend_per_hour = Some(0.05);
    let r = run(&cfg, None).await;
    println!("in-process: spent ${:.4} of $0.05", r.spend);
    assert!(r.spend > 0.05, "spent ${}: {r:?}", r.spend);
}
