//! Four replicas of the axum gateway example, as four OS processes on four loopback ports,
//! in front of one simulated provider account, with and without shared state in Redis.
//!
//! ```text
//! cargo build --example axum_gateway
//! cargo run --example replicas_gateways -- target/debug/examples/axum_gateway
//! ```
//!
//! (`.ci/replicas-test.sh` runs both; `--release` builds for its figures.) Starts a
//! `redis-server` of its own on a free loopback port (Debian's `redis-server` package, or
//! `$REDIS_SERVER`; nothing is saved) and the tower-ai simulator over loopback HTTP with an
//! account limit of 100 requests and 3,000 tokens a 4 s window. For each way of sharing —
//! none (each gateway's in-process budget holds the whole limit), Redis strict, Redis
//! leased 5% — it starts four gateways (`--serve-for-test`) pointed at the simulator, each
//! given the account's limits (`GATEWAY_UPSTREAM_RPM`/`_TPM`) and, with Redis,
//! `TOWER_AI_REDIS_URL`, one `TOWER_AI_KEY_SEED` and a 4 s "minute"; then offers 2x and 10x
//! the limit for 8 s, round-robin over the four ports, as clients with a 10 s timeout
//! (`x-stainless-timeout`) and no retries of their own would. It prints what the clients
//! and the provider saw as a Markdown table and exits non-zero when a run is not what the
//! in-process replicas test (`tests/replicas.rs`) asserts: with Redis, nothing failed,
//! the provider never saw more than the limit (plus the burst, strict) in one window and
//! at most one 429 a window (plus the burst, strict), goodput at 2x at least 95% (the
//! test's bound for a debug build on a busy machine); without it,
//! more than the limit reached the provider and every gateway met the 429 itself. About
//! 85 s.
//!
//! `REPLICAS_ONLY=strict` (or `leased`, `in-process`) runs one way of sharing;
//! `REPLICAS_WINDOW_MS` and `REPLICAS_CLIENT_TIMEOUT_S` change the window and the clients'
//! timeout.
//!
//! Without Redis the budgets use their 60 s minute (the in-process budget's minute is not
//! configurable), so those runs use a simulator with a 60 s window and offer one minute's
//! load in 8 s, as `examples/replicas.rs` does (in 3 s).

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower_ai_redis::testing::RedisServer;
use tower_ai_sim::{Latency, ModelSpec, Scenario, Simulator};

/// Gateway processes.
const REPLICAS: usize = 4;
/// The account's requests and tokens per window, as in `tests/replicas.rs` (each request
/// uses 30 tokens).
const REQUESTS: u64 = 100;
const TOKENS: u64 = 3_000;
/// The shared budget's burst (requests, tokens), as in `tests/replicas.rs`.
const BURST: (u64, u64) = (5, 150);
/// Leased mode's chunk: the gateway takes 5% of each limit at a time.
const CHUNK: f64 = 0.05;
/// The window of the shared runs (the Redis budget's "minute", the simulator's window):
/// 4 s, where `tests/replicas.rs` has 1 s, so that 10x is 250 requests a second over HTTP
/// through four debug-built gateways on 2 cores: at 1,000 and 500 a second, on a machine
/// whose load average was 12-16, their Redis answers took longer than 1 s and requests ran
/// out of their clients' time. Limits, bursts and chunks are the test's.
/// `REPLICAS_WINDOW_MS` tries another.
fn shared_window() -> Duration {
    static WINDOW: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *WINDOW.get_or_init(|| {
        let ms = std::env::var("REPLICAS_WINDOW_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4_000);
        Duration::from_millis(ms)
    })
}
/// How long load is offered per run: two windows.
fn duration() -> Duration {
    2 * shared_window()
}
/// The clients' timeout, sent as `x-stainless-timeout`: the gateway's deadline. Longer
/// than a window: a refused request waits in the gateway's AiRetry for the window's end
/// when its deadline allows. With a 3 s timeout and a 4 s window
/// (`REPLICAS_CLIENT_TIMEOUT_S=3 REPLICAS_ONLY=leased`) some come back with no time left:
/// StallDetector does not send those, and answers them and calls cut at the deadline
/// with 504 `deadline_exceeded`, which the breaker does not count (before, each was cut as
/// stalled and counted, ten opened gpt-4o-mini's circuit on every gateway through Redis,
/// and 788 of 2,000 requests failed with 502). Such runs report a token mismatch: the
/// provider counts a call cut after it was sent, the budgets settle it as unused.
fn client_timeout_s() -> u64 {
    static TIMEOUT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TIMEOUT.get_or_init(|| {
        std::env::var("REPLICAS_CLIENT_TIMEOUT_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10)
    })
}
/// What the driver waits for an answer before it counts the request as failed: far past
/// the clients' timeout, so it tells a slow answer from a hung gateway.
const HANG: Duration = Duration::from_secs(30);
/// Client keys, round-robin (each gets its own per-client budget in the gateways).
const CLIENT_KEYS: [&str; 8] = [
    "sk-r0", "sk-r1", "sk-r2", "sk-r3", "sk-r4", "sk-r5", "sk-r6", "sk-r7",
];
/// The request: 10 prompt tokens (40 bytes, the simulator's bytes / 4), up to 50 more
/// (60 reserved), 20 produced — `tests/replicas.rs`'s.
const BODY: &str = r#"{"model":"gpt-4o","max_tokens":50,"messages":[{"role":"user","content":"0123456789012345678901234567890123456789"}]}"#;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sharing {
    InProcess,
    Strict,
    Leased,
}

impl Sharing {
    fn name(self) -> &'static str {
        match self {
            Sharing::InProcess => "in-process (no Redis)",
            Sharing::Strict => "Redis, strict",
            Sharing::Leased => "Redis, leased 5%",
        }
    }
}

/// One gateway process; closing its stdin stops it (it serves until then).
struct Gateway {
    child: Child,
    stdin: Option<ChildStdin>,
    base: String,
}

impl Gateway {
    /// Starts `bin`; `outages` counts the warnings it logs when Redis did not answer in
    /// time (it then decided in-process until Redis answered again).
    fn spawn(
        bin: &Path,
        env: &[(&str, String)],
        outages: Arc<AtomicU64>,
    ) -> Result<Gateway, String> {
        let mut cmd = Command::new(bin);
        cmd.arg("--serve-for-test")
            .env_remove("TOWER_AI_REDIS_URL")
            .env_remove("GATEWAY_CLIENT_KEYS_FILE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", bin.display()))?;
        let stdin = child.stdin.take();
        if let Some(stderr) = child.stderr.take() {
            // Passed on, and Redis's outages counted.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("redis unreachable") {
                        outages.fetch_add(1, Ordering::Relaxed);
                    }
                    eprintln!("{line}");
                }
            });
        }
        let stdout = child.stdout.take().ok_or("no stdout")?;
        // The first line is the base URL; the rest (nothing, normally) is drained.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut out = BufReader::new(stdout);
            let mut line = String::new();
            let _ = out.read_line(&mut line);
            let _ = tx.send(line);
            let _ = out.read_to_end(&mut Vec::new());
        });
        let mut gw = Gateway {
            child,
            stdin,
            base: String::new(),
        };
        // A debug gateway on a busy machine starts in well under a second; 60 s tells a
        // slow start from one that never comes.
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.starts_with("http://") => gw.base = line.trim().to_owned(),
            Ok(line) => return Err(format!("the gateway printed {line:?}, not its URL")),
            Err(_) => return Err("the gateway printed no URL within 60 s".to_owned()),
        }
        Ok(gw)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        drop(self.stdin.take()); // end of its stdin: it shuts down
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a run measured.
#[derive(Debug, Default)]
struct Report {
    name: String,
    offered: u64,
    /// Clients' answers: 200, 429 (refused by a gateway, or the provider's 429 passed on),
    /// 504 (the client's timeout passed: admitted, after a wait, too late to finish),
    /// anything else (a transport error, another status, no answer within `HANG`).
    ok: u64,
    refused: u64,
    late: u64,
    failed: u64,
    /// What the provider saw: calls, and the 200s of the windows the load was offered in
    /// (requests that waited in a gateway may be served in a later window).
    calls: u64,
    served: u64,
    upstream_429: u64,
    max_per_window: u64,
    windows: u64,
    goodput: f64,
    slowest: Duration,
    /// The provider's calls per window, in order.
    per_window: Vec<u64>,
    /// Why requests failed (a status, or what went wrong), and how many.
    failures: std::collections::BTreeMap<String, u64>,
    /// Tokens the gateways' budgets settled (each answer's usage counted by the client's
    /// budget and the account's), and tokens the provider counted for its answers.
    settled_tokens: u64,
    provider_tokens: u64,
    /// Times a gateway found Redis slower than its response timeout and decided in-process
    /// (at the limit ÷ 4) until it answered again.
    redis_outages: u64,
}

/// The clients' answers so far (see [`Report`]).
#[derive(Debug, Default)]
struct Outcomes {
    ok: u64,
    refused: u64,
    late: u64,
    failed: u64,
    slowest: Duration,
    failures: std::collections::BTreeMap<String, u64>,
}

/// The tokens the gateways' budgets settled so far, from their /metrics (the series of
/// both budgets of a gateway, the client's and the account's: each settles every answer's
/// usage).
async fn settled(
    client: &Client<HttpConnector, Full<Bytes>>,
    gateways: &[Gateway],
) -> Result<u64, String> {
    let mut total = 0;
    for g in gateways {
        let url = format!("{}/metrics", g.base.trim_end_matches("/v1"));
        let req = Request::get(url)
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let text = match tokio::time::timeout(HANG, client.request(req)).await {
            Ok(Ok(res)) => res
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .map_err(|e| e.to_string())?,
            _ => return Err(format!("no /metrics from {}", g.base)),
        };
        total += text
            .lines()
            .find_map(|l| l.strip_prefix(r#"tower_ai_budget_tokens_total{stage="settled"} "#))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// A chat request to `url` from the client with `key`.
fn request(url: &str, key: &str) -> Result<Request<Full<Bytes>>, String> {
    Request::post(url)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-stainless-timeout", client_timeout_s().to_string())
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .map_err(|e| e.to_string())
}

async fn flush(server: &RedisServer) -> Result<(), String> {
    let mut conn = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| e.to_string())
}

async fn run(
    bin: &Path,
    sharing: Sharing,
    load: f64,
    server: &RedisServer,
) -> Result<Report, String> {
    let shared = sharing != Sharing::InProcess;
    let window = if shared {
        shared_window()
    } else {
        Duration::from_secs(60)
    };
    // Nothing left from the previous run; the simulator's windows start on Redis's (to
    // within half a TIME round trip: one made after the wait for a boundary started a
    // millisecond or two late, and counted the first requests of each window of the
    // budgets' in the window before).
    let mut sim_start = Instant::now();
    if shared {
        flush(server).await?;
        tokio::time::sleep(server.to_next_window(shared_window()).await).await;
        if let Some(at) = server.window_started(shared_window()).await {
            sim_start = at;
        }
    }
    let sim = Simulator::starting_at(
        Scenario::builder()
            .seed(17)
            .model(ModelSpec::new("gpt-4o").completion_tokens(20))
            // The gateway's fallback route, on the same account.
            .model(ModelSpec::new("gpt-4o-mini").completion_tokens(20))
            .rpm_limit(REQUESTS)
            .tpm_limit(TOKENS)
            .rate_window(window)
            .latency(Latency::Fixed(Duration::from_millis(5)))
            .build()
            .map_err(|e| e.to_string())?,
        sim_start,
    );
    let sim_server = sim
        .serve(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| e.to_string())?;

    let mut env = vec![
        ("OPENAI_BASE_URL", format!("{}/v1", sim_server.url())),
        ("OPENAI_API_KEY", "sk-upstream".to_owned()),
        ("GATEWAY_CLIENT_KEYS", CLIENT_KEYS.join(",")),
        // The clients' own budgets out of the way: the account's limit is measured.
        ("GATEWAY_CLIENT_RPM", "1000000".to_owned()),
        ("GATEWAY_CLIENT_CONCURRENT", "100000".to_owned()),
        ("GATEWAY_UPSTREAM_RPM", REQUESTS.to_string()),
        ("GATEWAY_UPSTREAM_TPM", TOKENS.to_string()),
    ];
    if shared {
        env.extend([
            ("TOWER_AI_REDIS_URL", server.url()),
            ("TOWER_AI_KEY_SEED", "5eed0f4e11a7e5a1".to_owned()),
            (
                "TOWER_AI_REDIS_MODE",
                if sharing == Sharing::Leased {
                    "leased"
                } else {
                    "strict"
                }
                .to_owned(),
            ),
            // Not a test of Redis's faults (tests/replicas.rs has them): four debug gateways
            // on a loaded machine took longer than 250 ms (the in-process test's) to get
            // answers at 10x, and a gateway that falls back decides at its share while the
            // others still count in Redis. 1 s, as the Redis tests not about slowness use.
            ("TOWER_AI_REDIS_TIMEOUT_MS", "1000".to_owned()),
            (
                "GATEWAY_UPSTREAM_MINUTE_MS",
                shared_window().as_millis().to_string(),
            ),
            ("GATEWAY_UPSTREAM_BURST", format!("{},{}", BURST.0, BURST.1)),
        ]);
    }
    let bin = bin.to_owned();
    let outages = Arc::new(AtomicU64::new(0));
    let counted = outages.clone();
    let gateways = tokio::task::spawn_blocking(move || {
        (0..REPLICAS)
            .map(|_| Gateway::spawn(&bin, &env, counted.clone()))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| e.to_string())??;
    let urls: Vec<String> = gateways
        .iter()
        .map(|g| format!("{}/chat/completions", g.base))
        .collect();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    // One request through each gateway first: its connections (to Redis, to the
    // simulator) are made and its scripts loaded before the measured load. Then the
    // simulator forgets it (its windows and limits stay).
    for url in &urls {
        let req = request(url, CLIENT_KEYS[0])?;
        let answered = tokio::time::timeout(HANG, client.request(req)).await;
        if let Ok(Ok(res)) = answered {
            let _ = res.into_body().collect().await;
        }
    }
    if shared {
        // Start on a window boundary of Redis's clock, which is the simulator's too.
        tokio::time::sleep(server.to_next_window(shared_window()).await).await;
    }
    sim.clear_calls();
    let settled_before = settled(&client, &gateways).await?;
    // The simulator's window the load starts in (it started on a boundary of Redis's clock,
    // the load starts on a later one).
    let w_us = window.as_micros().max(1);
    let first_window = if shared {
        (sim.elapsed().as_micros() + w_us / 2) / w_us
    } else {
        sim.elapsed().as_micros() / w_us
    };

    let windows = (duration().as_secs_f64() / window.as_secs_f64()).max(1.0);
    let offered = (load * REQUESTS as f64 * windows).round() as u64;
    let interval = duration() / offered as u32;
    let outcomes: Arc<Mutex<Outcomes>> = Arc::default();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..offered as usize {
        tick.tick().await;
        let req = request(&urls[i % urls.len()], CLIENT_KEYS[i % CLIENT_KEYS.len()])?;
        let client = client.clone();
        let outcomes = outcomes.clone();
        tasks.spawn(async move {
            let t0 = Instant::now();
            let answer = tokio::time::timeout(HANG, async {
                let res = client.request(req).await.map_err(|e| format!("{e:?}"))?;
                let status = res.status();
                let body = res.into_body().collect().await.map_err(|e| e.to_string())?;
                Ok::<_, String>((status, body.to_bytes()))
            })
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {HANG:?}")));
            let took = t0.elapsed();
            let mut o = outcomes.lock().unwrap_or_else(|e| e.into_inner());
            let cause = match answer {
                Ok((StatusCode::OK, _)) => {
                    o.ok += 1;
                    None
                }
                Ok((StatusCode::TOO_MANY_REQUESTS, _)) => {
                    o.refused += 1;
                    None
                }
                Ok((StatusCode::GATEWAY_TIMEOUT, _)) => {
                    o.late += 1;
                    None
                }
                Ok((status, body)) => {
                    o.failed += 1;
                    let code = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    Some(format!("{} {code}", status.as_u16()))
                }
                Err(e) => {
                    o.failed += 1;
                    Some(e)
                }
            };
            o.slowest = o.slowest.max(took);
            if let Some(cause) = cause {
                *o.failures.entry(cause).or_default() += 1;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let settled_tokens = settled(&client, &gateways)
        .await?
        .saturating_sub(settled_before);
    drop(gateways);
    sim_server.shutdown_with_grace(Duration::from_secs(1)).await;

    let Outcomes {
        ok,
        refused,
        late,
        failed,
        slowest,
        failures,
    } = std::mem::take(&mut *outcomes.lock().unwrap_or_else(|e| e.into_inner()));
    let calls = sim.calls();
    let mut per_window = std::collections::BTreeMap::<u128, u64>::new();
    for c in &calls {
        *per_window
            .entry(c.at.as_micros() / window.as_micros().max(1))
            .or_default() += 1;
    }
    let stats = sim.stats();
    let windows = windows.round() as u64;
    let served = calls
        .iter()
        .filter(|c| c.status == 200 && c.at.as_micros() / w_us < first_window + windows as u128)
        .count() as u64;
    Ok(Report {
        name: format!("{}, {load}x", sharing.name()),
        offered,
        ok,
        refused,
        late,
        failed,
        calls: calls.len() as u64,
        served,
        upstream_429: stats.count(429),
        max_per_window: per_window.values().copied().max().unwrap_or(0),
        windows,
        goodput: served as f64 / (REQUESTS * windows) as f64,
        slowest,
        per_window: per_window.values().copied().collect(),
        failures,
        redis_outages: outages.load(Ordering::Relaxed),
        settled_tokens,
        provider_tokens: stats.prompt_tokens + stats.completion_tokens,
    })
}

/// Whether leased mode's efficiency (goodput, chunks left unused) fails the run. Behind
/// the gateway, refused requests wait in AiRetry until the window's end and come back
/// together: each of a replica's concurrent misses took its own chunk (one replica could
/// take most of a window it could not spend), and the tokens the requests gave back at
/// settlement stayed in the chunks of replicas whose refusal was cached until the window's
/// end (83-86% at 2x in debug runs). With single-flight refills and refunds that end a
/// refusal for tokens, debug runs on the loaded 2-core machine measured 98.0% at 2x and
/// 10x, 98 in each window: the most the budget can admit there (each request reserves 61
/// tokens and uses 30; after 98 the window's 3,000 tokens have 60 left). The bound at 2x
/// is strict's, 95%, for a debug build on a busy machine. The limits are checked either
/// way.
const LEASED_EFFICIENCY_ENFORCED: bool = true;

/// What `tests/replicas.rs` asserts of the same sharing, for the gateways' run: the
/// problems found, and the known ones reported without failing the run.
fn check(sharing: Sharing, load: f64, r: &Report) -> (Vec<String>, Vec<String>) {
    let mut bad = Vec::new();
    let mut known = Vec::new();
    let mut want = |ok: bool, what: String| {
        if !ok {
            bad.push(format!("{}: {what}", r.name));
        }
    };
    let mut known_issue = |ok: bool, what: String| {
        if !ok {
            known.push(format!("{}: {what}", r.name));
        }
    };
    // Every request was answered: a 200, a 429 with retry-after, or (a few, on a busy
    // machine) a 504 when a request that waited for the budget could not finish before
    // its client's timeout; none failed otherwise or hung.
    want(
        r.failed == 0,
        format!("{} requests failed: {:?}", r.failed, r.failures),
    );
    want(
        r.ok + r.refused + r.late == r.offered,
        format!(
            "{} + {} + {} answered of {}",
            r.ok, r.refused, r.late, r.offered
        ),
    );
    // Every token the provider counted was settled by both budgets of a gateway.
    want(
        r.settled_tokens == 2 * r.provider_tokens,
        format!(
            "{} tokens settled by the gateways' two budgets, the provider counted {}",
            r.settled_tokens, r.provider_tokens
        ),
    );
    want(
        r.late * 50 <= r.offered,
        format!("{} answers past the clients' timeout", r.late),
    );
    match sharing {
        Sharing::Strict => {
            // GCRA: at most the limit plus the burst in any window; the provider's fixed
            // windows may see the burst once, at the start, and a request on each boundary.
            want(
                r.max_per_window <= REQUESTS + BURST.0 + 1,
                format!("{} in one window", r.max_per_window),
            );
            want(
                r.upstream_429 <= BURST.0 + r.windows,
                format!("{} provider 429s", r.upstream_429),
            );
            // The test's bound for a debug build on a loaded machine (its goal is 98%).
            if load == 2.0 {
                want(r.goodput >= 0.95, format!("goodput {:.3}", r.goodput));
            }
        }
        Sharing::Leased => {
            // Chunks of one fixed window never add up to more than its limit.
            want(
                r.max_per_window <= REQUESTS + 1,
                format!("{} in one window", r.max_per_window),
            );
            want(
                r.upstream_429 <= r.windows,
                format!("{} provider 429s", r.upstream_429),
            );
            // At most one chunk per replica left unused in a window.
            let chunk = (REQUESTS as f64 * CHUNK).ceil() as u64;
            let efficiency: &mut dyn FnMut(bool, String) = if LEASED_EFFICIENCY_ENFORCED {
                &mut want
            } else {
                &mut known_issue
            };
            efficiency(
                r.served + REPLICAS as u64 * chunk * r.windows + r.windows >= REQUESTS * r.windows,
                format!("served {} in {} windows", r.served, r.windows),
            );
            if load == 2.0 {
                efficiency(r.goodput >= 0.95, format!("goodput {:.3}", r.goodput));
            }
        }
        Sharing::InProcess => {
            // Each gateway's budget holds the whole limit: more than the limit reaches the
            // provider, and each gateway meets the provider's 429 itself before its own
            // cooldown holds it back (not 4x the limit, as budgets alone let through: the
            // gateway's RetryAfterAware stops a replica at its first 429).
            want(
                r.calls > REQUESTS,
                format!("only {} reached the provider", r.calls),
            );
            want(
                r.upstream_429 >= REPLICAS as u64,
                format!("{} provider 429s", r.upstream_429),
            );
        }
    }
    (bad, known)
}

fn table(reports: &[Report]) -> String {
    let mut out = String::from(
        "| 4 gateway processes share | offered | answered 200 | 429 | 504 | failed | provider calls | provider 429s | most in one window (limit) | per window | goodput | tokens settled ÷ 2 / provider's | slowest answer | Redis timeouts |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in reports {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {:.1}% | {} / {} | {:.0} ms | {} |\n",
            r.name,
            r.offered,
            r.ok,
            r.refused,
            r.late,
            r.failed,
            r.calls,
            r.upstream_429,
            r.max_per_window,
            REQUESTS,
            r.per_window
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            100.0 * r.goodput,
            r.settled_tokens / 2,
            r.provider_tokens,
            r.slowest.as_secs_f64() * 1e3,
            r.redis_outages,
        ));
    }
    out
}

/// Runs `bin` (no arguments: its self-test) with its state in Redis at `redis_url`; a hang
/// past 2 minutes is a failure.
fn self_test(bin: &Path, redis_url: &str) -> Result<(), String> {
    let mut child = Command::new(bin)
        .env("TOWER_AI_REDIS_URL", redis_url)
        .env("TOWER_AI_KEY_SEED", "5eed0f4e11a7e5a1")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("GATEWAY_CLIENT_KEYS")
        .env_remove("GATEWAY_CLIENT_KEYS_FILE")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("it exited with {status}")),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("it did not finish within 2 minutes".to_owned());
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let Some(bin) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: replicas_gateways PATH-OF-axum_gateway (cargo build --example axum_gateway first)");
        std::process::exit(2);
    };
    if !bin.is_file() {
        eprintln!(
            "{}: no such file (cargo build --example axum_gateway first)",
            bin.display()
        );
        std::process::exit(2);
    }
    let server = match RedisServer::start() {
        Ok(server) => server,
        Err(e) => {
            eprintln!("redis-server could not start ({e}): install it (apt-get install redis-server) or set REDIS_SERVER");
            std::process::exit(1);
        }
    };
    // Ctrl-C or SIGTERM (`timeout` in CI) drops the runs, so their gateways are stopped,
    // and then the server: nothing is left running.
    let code = tokio::select! {
        code = measure(&bin, &server) => code,
        () = stop_signal() => {
            eprintln!("stopped by a signal");
            130
        }
    };
    drop(server);
    std::process::exit(code);
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => drop(s.recv().await),
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// Every run, its table, and the exit code: 1 when a run is not as expected.
async fn measure(bin: &Path, server: &RedisServer) -> i32 {
    let mut reports = Vec::new();
    let mut problems = Vec::new();
    let mut known_issues = Vec::new();
    // The gateway's own self-test (answers, a stream, the fallback, a client at its
    // concurrency limit, its refusals, /metrics, /health), in Redis mode.
    eprintln!("running: the gateway's self-test with its state in Redis");
    let (test_bin, url) = (bin.to_owned(), server.url());
    let tested = tokio::task::spawn_blocking(move || self_test(&test_bin, &url))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    if let Err(e) = tested {
        problems.push(format!("the gateway's self-test in Redis mode: {e}"));
    }
    // REPLICAS_ONLY=strict (or in-process, leased) runs one sharing only.
    let only = std::env::var("REPLICAS_ONLY").ok();
    for sharing in [Sharing::InProcess, Sharing::Strict, Sharing::Leased] {
        if only
            .as_deref()
            .is_some_and(|o| !sharing.name().to_lowercase().contains(o))
        {
            continue;
        }
        for load in [2.0, 10.0] {
            eprintln!("running: {sharing:?}, {load}x the limit");
            match run(bin, sharing, load, server).await {
                Ok(r) => {
                    let (bad, known) = check(sharing, load, &r);
                    problems.extend(bad);
                    known_issues.extend(known);
                    reports.push(r);
                }
                Err(e) => problems.push(format!("{}, {load}x: {e}", sharing.name())),
            }
        }
    }
    println!(
        "4 gateway processes, one provider account of {REQUESTS} requests and {TOKENS} tokens a {} s window (60 s without Redis), {} s a run:\n",
        shared_window().as_secs(),
        duration().as_secs()
    );
    print!("{}", table(&reports));
    for k in &known_issues {
        println!("known issue, not failing the run: {k}");
    }
    if !problems.is_empty() {
        eprintln!("not as expected:");
        for p in &problems {
            eprintln!("  {p}");
        }
        eprintln!("{reports:#?}");
        return 1;
    }
    0
}
