//! Several replicas of a service sharing one provider limit: the harness of
//! `tests/replicas.rs` and `examples/replicas.rs`.
//!
//! Each replica is an independent stack (its own [`TokenBudgetLayer`] and, when shared,
//! its own [`RedisStore`] connection) in front of one simulated provider whose limits are
//! those of one account. A generator offers a multiple of the limit, round-robin over the
//! replicas, in real time (Redis is a real server: its clock cannot be paused), and the
//! run reports what the provider saw.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_ai::budget::{
    BudgetStore, PriceTable, Spent, StoreAdmit, StoreDecision, StoreLease, StoreLimits,
    StoreRequest, TokenBudgetLayer,
};
use tower_ai::core::{AiBody, AiError, BoxError};
use tower_ai_redis::testing::RedisServer;
use tower_ai_redis::{RedisBudget, RedisStore};
use tower_ai_sim::{Latency, ModelSpec, Scenario, Simulator};

/// How the replicas share the limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sharing {
    /// Each replica's in-process budget holds the whole limit (the default without Redis).
    InProcess,
    /// [`RedisBudget`] strict mode.
    Strict,
    /// [`RedisBudget`] leased mode, chunks of this fraction of each limit.
    Leased(f64),
}

impl Sharing {
    fn name(&self) -> String {
        match self {
            Sharing::InProcess => "in-process (no Redis)".to_owned(),
            Sharing::Strict => "Redis, strict".to_owned(),
            Sharing::Leased(f) => format!("Redis, leased {:.0}%", f * 100.0),
        }
    }
}

/// Something done to Redis during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Kill the server (a crash).
    Kill,
    /// Start it again, empty, on the same port.
    Restart,
    /// `SCRIPT FLUSH`: the server forgets every script.
    ScriptFlush,
}

/// One run.
#[derive(Debug, Clone)]
pub struct Run {
    /// How the limits are shared.
    pub sharing: Sharing,
    /// Replicas (independent stacks).
    pub replicas: usize,
    /// The provider's requests per window (and the budget's).
    pub requests: u64,
    /// The provider's tokens per window (and the budget's).
    pub tokens: u64,
    /// The window: the simulator's and the budget's "minute" when shared (the in-process
    /// budget's minute is always 60 s, so with it the simulator's window is 60 s too).
    pub window: Duration,
    /// How long requests are offered.
    pub duration: Duration,
    /// Offered load, as a multiple of the limit.
    pub load: f64,
    /// Request and token burst of the shared budget.
    pub burst: (u64, u64),
    /// Faults, at their time from the start.
    pub faults: Vec<(Duration, Fault)>,
    /// The stores' response timeout: past it a replica decides in-process (at its share
    /// of the limit) while the others still share Redis's count.
    pub response_timeout: Duration,
    /// A spend cap per hour (USD) on top of the limits, at [`PRICE`].
    pub spend_per_hour: Option<f64>,
    /// How long after Redis's window boundaries the simulator's windows start (zero: on
    /// them, to within half a `TIME` round trip). Off the boundaries, the provider counts
    /// the first requests of one budget window in the window before.
    pub sim_lag: Duration,
    /// Where in a budget window the load starts (once every replica counts the others);
    /// `None`: at once. By default on a boundary, so that faults at given times fall in
    /// the same place of their windows from run to run.
    pub load_offset: Option<Duration>,
}

/// The price of the runs' model, USD per million input and output tokens.
pub const PRICE: (f64, f64) = (10.0, 30.0);

impl Run {
    /// 4 replicas sharing 100 requests and 3,000 tokens a 1 s window, offered `load` times
    /// the limit for 3 s.
    pub fn new(sharing: Sharing, load: f64) -> Self {
        Run {
            sharing,
            replicas: 4,
            requests: 100,
            tokens: 3_000,
            window: Duration::from_secs(1),
            duration: Duration::from_secs(3),
            load,
            burst: (5, 150),
            faults: Vec::new(),
            response_timeout: RedisStore::DEFAULT_RESPONSE_TIMEOUT,
            spend_per_hour: None,
            sim_lag: Duration::ZERO,
            load_offset: Some(Duration::ZERO),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The run's name (sharing and load).
    pub name: String,
    /// Requests offered.
    pub offered: u64,
    /// Requests the budgets let through (each reached the provider).
    pub admitted: u64,
    /// Requests the budgets refused (`BudgetExceeded`).
    pub refused: u64,
    /// Requests that failed otherwise (none should: Redis's faults must not fail any).
    pub failed: u64,
    /// Provider answers 200.
    pub served: u64,
    /// Provider answers 429.
    pub upstream_429: u64,
    /// The most requests the provider received in one of its windows.
    pub max_per_window: u64,
    /// Leased mode: the most requests admitted from chunks of one budget window (Redis's
    /// fixed window; never above the limit).
    pub max_per_budget_window: u64,
    /// Leased mode: requests admitted per budget window, in order.
    pub per_budget_window: Vec<u64>,
    /// Requests the provider received per window, in order.
    pub per_window: Vec<u64>,
    /// The provider's limit per window.
    pub limit: u64,
    /// Whole windows offered.
    pub windows: u64,
    /// served / (limit × windows).
    pub goodput: f64,
    /// Tokens the provider counted (prompt + completion of its 200s).
    pub provider_tokens: u64,
    /// Tokens the budgets settled (what they were told each admitted request used).
    pub settled_tokens: u64,
    /// The longest time a request waited for its admission (or refusal).
    pub max_admission: Duration,
    /// Shared-state replicas that ended degraded.
    pub degraded_at_end: usize,
    /// What the provider's answers cost at [`PRICE`], USD.
    pub spend: f64,
}

/// Requests admitted per budget window (leased mode's window index on Redis's clock).
type PerWindow = Arc<Mutex<std::collections::BTreeMap<u64, u64>>>;

/// Counts what the shared budget is told each request used, and in which of its windows
/// leased mode admitted each.
struct Counting {
    inner: RedisBudget,
    settled: Arc<AtomicU64>,
    admitted: PerWindow,
}

fn count_window(per_window: &PerWindow, decision: &StoreDecision) {
    if let StoreDecision::Admitted(lease) = decision {
        if let Some(w) = tower_ai_redis::testing::leased_window(lease) {
            *per_window
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(w)
                .or_default() += 1;
        }
    }
}

impl BudgetStore for Counting {
    fn admit(&self, limits: &StoreLimits, request: &StoreRequest<'_>) -> StoreAdmit {
        match self.inner.admit(limits, request) {
            StoreAdmit::Ready(d) => {
                count_window(&self.admitted, &d);
                StoreAdmit::Ready(d)
            }
            StoreAdmit::Pending(f) => {
                let admitted = self.admitted.clone();
                StoreAdmit::Pending(Box::pin(async move {
                    let d = f.await;
                    count_window(&admitted, &d);
                    d
                }))
            }
        }
    }
    fn settle(&self, limits: &StoreLimits, lease: StoreLease, spent: Spent) {
        self.settled.fetch_add(spent.tokens, Ordering::Relaxed);
        self.inner.settle(limits, lease, spent);
    }
}

/// When a request reached the provider.
#[derive(Clone)]
struct Arrived(Arc<OnceLock<Instant>>);

/// A chat request of 10 prompt tokens (40 bytes of text, the simulator's bytes / 4) that
/// may produce 50 (so it reserves 60) and produces 20.
pub fn request() -> Request<AiBody> {
    let body = r#"{"model":"gpt-4o","max_tokens":50,"messages":[{"role":"user","content":"0123456789012345678901234567890123456789"}]}"#;
    Request::post("http://provider.test/v1/chat/completions")
        .header("content-type", "application/json")
        .body(AiBody::from(Bytes::from_static(body.as_bytes())))
        .expect("a valid request")
}

/// Runs `run` (against `server` when the sharing needs Redis) and reports.
pub async fn run(run: &Run, mut server: Option<&mut RedisServer>) -> Report {
    let shared = run.sharing != Sharing::InProcess;
    let sim_window = if shared {
        run.window
    } else {
        Duration::from_secs(60)
    };
    // The simulator's windows start with its clock: start it when Redis's fixed windows
    // (leased mode's) start, so both count the same windows. (A simulator made just after
    // the wait for a boundary starts a millisecond or two late, as much as a TIME answer
    // takes to come back and a timer to fire: the provider then counted the first requests
    // of each budget window in the window before, up to 102 against the limit of 100 at
    // 10x.)
    let mut sim_start = Instant::now();
    if let (true, Some(server)) = (shared, server.as_deref()) {
        tokio::time::sleep(server.to_next_window(run.window).await).await;
        if let Some(at) = server.window_started(run.window).await {
            sim_start = at + run.sim_lag;
        }
    }
    let sim = Simulator::starting_at(
        Scenario::builder()
            .seed(17)
            .model(ModelSpec::new("gpt-4o").completion_tokens(20))
            .rpm_limit(run.requests)
            .tpm_limit(run.tokens)
            .rate_window(sim_window)
            .latency(Latency::Fixed(Duration::from_millis(5)))
            .build()
            .expect("a valid scenario"),
        sim_start,
    );
    let settled = Arc::new(AtomicU64::new(0));
    let admitted_per_window = PerWindow::default();
    let mut stores = Vec::new();
    let mut replicas = Vec::new();
    for _ in 0..run.replicas {
        let mut builder = TokenBudgetLayer::builder()
            .requests_per_minute(run.requests)
            .tokens_per_minute(run.tokens)
            .reject();
        if let Some(cap) = run.spend_per_hour {
            builder = builder
                .spend_per_hour(cap)
                .prices(PriceTable::new().model("gpt-4o", PRICE.0, PRICE.1));
        }
        let layer = match (run.sharing, server.as_deref()) {
            (Sharing::InProcess, _) | (_, None) => builder.build(),
            (sharing, Some(server)) => {
                let store = RedisStore::builder()
                    .heartbeat(Duration::from_millis(100))
                    .retry_after_outage(Duration::from_millis(200))
                    .response_timeout(run.response_timeout)
                    .build(server.client());
                stores.push(store.clone());
                let mut budget = RedisBudget::builder(store)
                    .minute(run.window)
                    .burst(run.burst.0, run.burst.1);
                if let Sharing::Leased(f) = sharing {
                    budget = budget.leased(f);
                }
                builder
                    .store(Counting {
                        inner: budget.build(),
                        settled: settled.clone(),
                        admitted: admitted_per_window.clone(),
                    })
                    .build()
            }
        }
        .expect("a valid budget");
        let provider = sim.service();
        let provider = tower::service_fn(move |req: Request<AiBody>| {
            if let Some(a) = req.extensions().get::<Arrived>() {
                let _ = a.0.set(Instant::now());
            }
            provider.clone().oneshot(req)
        });
        replicas.push(tower::ServiceBuilder::new().layer(layer).service(provider));
    }
    // Every replica counted by the others' heartbeats before the load starts (the
    // fall-back divides by it).
    // (Every store's count is read each time: the first read starts its heartbeat. With
    // `any`, which stops at the first store short of the count, only the first store's
    // heartbeat ran, it counted itself alone, and the wait always took its 5 s.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while stores
        .iter()
        .map(RedisStore::replicas)
        .min()
        .is_some_and(|n| n < run.replicas as u32)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let (Some(offset), Some(server)) = (run.load_offset, server.as_deref()) {
        tokio::time::sleep(server.to_next_window(run.window).await + offset).await;
    }

    // `load` times the limit in every window of the simulator's the run covers (at least
    // one: the in-process budget's 60 s minute is offered in `duration`).
    let windows = (run.duration.as_secs_f64() / sim_window.as_secs_f64()).max(1.0);
    let offered_total = ((run.load * run.requests as f64 * windows).round() as u64).max(1);
    let interval = run.duration / offered_total as u32;
    let outcomes: Arc<Mutex<(u64, u64, u64, Duration)>> = Arc::default();
    let mut faults = run.faults.clone();
    faults.sort_by_key(|f| f.0);
    let mut faults = faults.into_iter().peekable();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(interval.max(Duration::from_micros(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..offered_total {
        tick.tick().await;
        while let Some((_, fault)) = faults.next_if(|(at, _)| started.elapsed() >= *at) {
            if let Some(server) = server.as_deref_mut() {
                apply(server, fault).await;
            }
        }
        let svc = replicas[(i as usize) % replicas.len()].clone();
        let outcomes = outcomes.clone();
        tasks.spawn(async move {
            let arrived = Arrived(Arc::default());
            let mut req = request();
            req.extensions_mut().insert(arrived.clone());
            let t0 = Instant::now();
            let res = svc.oneshot(req).await;
            let end = Instant::now();
            let admission = arrived.0.get().map_or(end, |a| *a) - t0;
            let res = match res {
                Ok(res) => {
                    // Read the body to its end: the budget settles on the usage in it.
                    let _ = http_body_util::BodyExt::collect(res.into_body()).await;
                    Ok(())
                }
                Err(e) => Err(e),
            };
            let mut o = outcomes.lock().unwrap_or_else(|e| e.into_inner());
            match res {
                Ok(()) => o.0 += 1,
                Err(e) if is_budget(&e) => o.1 += 1,
                Err(_) => o.2 += 1,
            }
            o.3 = o.3.max(admission);
        });
    }
    while tasks.join_next().await.is_some() {}
    // Settlements are sent in the background: let them land.
    tokio::time::sleep(Duration::from_millis(50)).await;

    let (admitted, refused, failed, max_admission) =
        *outcomes.lock().unwrap_or_else(|e| e.into_inner());
    let calls = sim.calls();
    let mut per_window = std::collections::BTreeMap::<u64, u64>::new();
    for c in &calls {
        *per_window
            .entry((c.at.as_micros() / sim_window.as_micros().max(1)) as u64)
            .or_default() += 1;
    }
    let stats = sim.stats();
    let windows = windows.round() as u64;
    let per_budget_window: Vec<u64> = admitted_per_window
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .copied()
        .collect();
    Report {
        name: format!("{}, {}x", run.sharing.name(), run.load),
        offered: offered_total,
        admitted,
        refused,
        failed,
        served: stats.successes,
        upstream_429: stats.count(429),
        max_per_window: per_window.values().copied().max().unwrap_or(0),
        per_window: per_window.values().copied().collect(),
        max_per_budget_window: per_budget_window.iter().copied().max().unwrap_or(0),
        per_budget_window,
        limit: run.requests,
        windows,
        goodput: stats.successes as f64 / (run.requests * windows) as f64,
        provider_tokens: stats.prompt_tokens + stats.completion_tokens,
        settled_tokens: settled.load(Ordering::Relaxed),
        max_admission,
        degraded_at_end: stores.iter().filter(|s| s.is_degraded()).count(),
        spend: (stats.prompt_tokens as f64 * PRICE.0 + stats.completion_tokens as f64 * PRICE.1)
            / 1e6,
    }
}

fn is_budget(e: &BoxError) -> bool {
    matches!(
        e.downcast_ref::<AiError>(),
        Some(AiError::BudgetExceeded { .. })
    )
}

async fn apply(server: &mut RedisServer, fault: Fault) {
    match fault {
        Fault::Kill => server.kill(),
        Fault::Restart => {
            // Blocking, but short: the port is free again at once after a kill.
            let _ = server.restart();
        }
        Fault::ScriptFlush => {
            let _ = server.script_flush().await;
        }
    }
}

/// The reports as a Markdown table.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::from(
        "| replicas share | offered | admitted | provider 429s | most in one window (limit) | goodput | tokens settled / provider's | slowest admission |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in reports {
        let tokens = if r.settled_tokens == 0 {
            "-".to_owned()
        } else {
            format!("{} / {}", r.settled_tokens, r.provider_tokens)
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} ({}) | {:.1}% | {} | {:.1} ms |\n",
            r.name,
            r.offered,
            r.admitted,
            r.upstream_429,
            r.max_per_window,
            r.limit,
            100.0 * r.goodput,
            tokens,
            r.max_admission.as_secs_f64() * 1e3,
        ));
    }
    out
}
