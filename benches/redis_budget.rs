//! TokenBudget's admission + settlement per call, in-process and through Redis: the
//! in-memory provider of `overhead.rs` behind a budget of requests and tokens per minute
//! (limits never reached), with its state in this process, in a strict `RedisBudget` (one
//! round trip per call over loopback to a `redis-server` the bench starts: each admission
//! carries the previous call's settlement) and in a leased one (chunks of 1% of each
//! limit, spent locally). The shared budgets get a burst of a second's worth of the limit,
//! as a service taking concurrent calls would (with none, calls less than `minute / limit`
//! apart are paced).
//!
//! A call is `ready`, `call`, and reading the response body to its end, so the budget
//! settles the reservation with the usage (15 tokens for 80 reserved: a refund, which in
//! strict mode is queued and carried to Redis by the next call's admission script). First
//! each variant's per-call latencies over 20,000 calls (p50, p99, p99.9, printed), then
//! criterion's estimates.
//!
//! ```text
//! cargo bench --bench redis_budget -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! Goals: strict p50 <= 100 us and p99 <= 250 us over loopback; leased <= 1.3x the
//! in-process layer's time per call. Without `redis-server` (Debian's package, or
//! `$REDIS_SERVER`) only the in-process variant runs.

mod common;

use std::time::{Duration, Instant};

use criterion::Criterion;
use http::Request;
use http_body_util::BodyExt;
use tower::{Layer, Service, ServiceExt};
use tower_ai::budget::TokenBudgetLayer;
use tower_ai::AiBody;
use tower_ai_redis::testing::RedisServer;
use tower_ai_redis::{RedisBudget, RedisStore};

use common::{request, Bare};

/// Limits far above anything a bench reaches.
const HUGE: u64 = 1 << 40;
const SAMPLES: usize = 20_000;

type Svc = tower::util::BoxCloneService<Request<AiBody>, (), tower_ai::core::BoxError>;

fn stack(layer: TokenBudgetLayer) -> Svc {
    let svc = layer.layer(Bare);
    type Res = http::Response<tower_ai::budget::BudgetBody<common::Body>>;
    tower::util::BoxCloneService::new(svc.and_then(|res: Res| async move {
        // The body to its end: the budget settles on the usage in it.
        let _ = res.into_body().collect().await;
        Ok(())
    }))
}

fn budget() -> tower_ai::budget::TokenBudgetBuilder {
    TokenBudgetLayer::builder()
        .requests_per_minute(HUGE)
        .tokens_per_minute(HUGE)
        .reject()
}

async fn call(svc: &mut Svc) {
    let svc = svc.ready().await.expect("always ready");
    svc.call(request()).await.expect("never refused");
}

/// Per-call latencies of `SAMPLES` calls after a warm-up: (p50, p99, p99.9, mean).
async fn latencies(svc: &mut Svc) -> (Duration, Duration, Duration, Duration) {
    for _ in 0..2_000 {
        call(svc).await;
    }
    let mut samples = Vec::with_capacity(SAMPLES);
    let start = Instant::now();
    for _ in 0..SAMPLES {
        let t = Instant::now();
        call(svc).await;
        samples.push(t.elapsed());
    }
    let mean = start.elapsed() / SAMPLES as u32;
    samples.sort();
    let at = |q: f64| samples[((SAMPLES as f64 * q) as usize).min(SAMPLES - 1)];
    (at(0.5), at(0.99), at(0.999), mean)
}

/// CPU time of this thread so far (Linux: `/proc/thread-self/schedstat`; zero elsewhere).
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// Redis's own counters: scripts run (`EVALSHA`), reads and writes of its event loop, CPU
/// seconds (user + system).
async fn server_counts(server: &RedisServer) -> [f64; 4] {
    let Ok(mut conn) = server.client().get_multiplexed_async_connection().await else {
        return [0.0; 4];
    };
    let info: String = redis::cmd("INFO")
        .arg("all")
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    let field = |key: &str| -> f64 {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0.0)
    };
    [
        field("cmdstat_evalsha:calls="),
        field("total_reads_processed:"),
        field("total_writes_processed:"),
        field("used_cpu_user:") + field("used_cpu_sys:"),
    ]
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let server = match RedisServer::start() {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("redis-server could not start ({e}): only the in-process variant runs");
            None
        }
    };
    let mut shared: Vec<(&str, RedisBudget)> = Vec::new();
    let mut variants: Vec<(&str, Svc)> = vec![(
        "in_process",
        stack(budget().build().expect("a valid budget")),
    )];
    if let Some(server) = &server {
        // A generous response timeout: the figures are Redis's, not the fall-back's (the
        // counts printed below say how many calls fell back).
        let store = rt.block_on(async {
            RedisStore::builder()
                .response_timeout(Duration::from_secs(1))
                .build(server.client())
        });
        let strict = RedisBudget::builder(store.clone())
            .burst(HUGE / 60, HUGE / 60)
            .build();
        let leased = RedisBudget::builder(store)
            .burst(HUGE / 60, HUGE / 60)
            .leased(0.01)
            .build();
        shared = vec![
            ("redis_strict", strict.clone()),
            ("redis_leased", leased.clone()),
        ];
        variants.push((
            "redis_strict",
            stack(budget().store(strict).build().expect("a valid budget")),
        ));
        variants.push((
            "redis_leased",
            stack(budget().store(leased).build().expect("a valid budget")),
        ));
    }

    println!("per call, {SAMPLES} calls after 2,000 of warm-up:");
    println!("| variant | p50 | p99 | p99.9 | mean | mean / in-process |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut base = None;
    let mut server_side = Vec::new();
    for (name, svc) in &mut variants {
        let before = server.as_ref().map(|s| rt.block_on(server_counts(s)));
        let cpu = thread_cpu();
        let (p50, p99, p999, mean) = rt.block_on(latencies(svc));
        let cpu = thread_cpu().saturating_sub(cpu);
        if let (Some(server), Some(before)) = (&server, before) {
            let after = rt.block_on(server_counts(server));
            server_side.push((*name, before, after, cpu));
        }
        let base = *base.get_or_insert(mean);
        println!(
            "| {name} | {p50:.1?} | {p99:.1?} | {p999:.1?} | {mean:.1?} | {:.2} |",
            mean.as_secs_f64() / base.as_secs_f64()
        );
    }
    // What Redis did per call: figures that do not depend on how busy the machine is.
    let calls = (SAMPLES + 2_000) as f64;
    for (name, before, after, cpu) in server_side.iter().filter(|(n, ..)| *n != "in_process") {
        let per = |i: usize| (after[i] - before[i]) / calls;
        println!(
            "{name}, per call: in redis-server {:.2} scripts, {:.2} reads and {:.2} writes of its event loop, {:.1} us of CPU; in the bench's thread {:.1} us of CPU",
            per(0),
            per(1),
            per(2),
            per(3) * 1e6,
            cpu.as_secs_f64() * 1e6 / calls
        );
    }
    for (name, b) in &shared {
        println!(
            "{name}: {} round trips, {} calls decided in-process (Redis did not answer in time), {} settlements given up",
            b.round_trips(),
            b.fallbacks(),
            b.settlements_dropped()
        );
    }

    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("token_budget_per_call");
    for (name, svc) in &mut variants {
        group.bench_function(*name, |b| b.iter(|| rt.block_on(call(svc))));
    }
    group.finish();
    c.final_summary();
}
