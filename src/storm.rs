//! The storm: one scripted bad afternoon at an AI provider, and a workload that measures
//! how a client gets through it. Shared by `examples/chaos_demo.rs`, the full-stack tests
//! and the scenario benches, so all three tell the same story.
//!
//! Everything runs on tokio's clock: call [`run`] on a paused runtime and five minutes of
//! provider time take well under a second.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_ai::fallback::{rewrite_model, FallbackChain, Route};
use tower_ai::prelude::*;
use tower_ai_core::{try_clone_request, ClassifiedBody};
use tower_ai_sim::SimBody;
use tower_ai_sim::{Fault, Latency, ModelSpec, Scenario, Simulator, StreamFault, StreamFaultKind};

/// The primary provider's main model.
pub const PRIMARY_MODEL: &str = "gpt-4o";
/// A cheaper model on the same endpoint.
pub const SECONDARY_MODEL: &str = "gpt-4o-mini";
/// The backup provider's model (an OpenAI-compatible server).
pub const BACKUP_MODEL: &str = "llama-3.1-70b";

/// What the storm throws at a client, second by second (all times from the start):
///
/// - the primary account allows 100 requests per minute, and the workload offers 120;
/// - 20–35 s: a burst of 503 `server_is_overloaded` on every model;
/// - 120–180 s: the primary model is down (503), its sibling on the same endpoint is fine;
/// - streamed answers: 8 % stall before the first token, 2 % after a few tokens;
/// - after 420 answers, the primary account's quota is gone (429 `insufficient_quota`)
///   for the rest of the run: only the backup provider can serve.
#[derive(Debug, Clone, Copy)]
pub struct StormConfig {
    /// Seed of the simulators and the workload.
    pub seed: u64,
    /// Requests offered.
    pub requests: u32,
    /// Time between two new requests.
    pub interval: Duration,
    /// Share of streamed requests.
    pub stream_share: f64,
    /// End-to-end deadline of one request (the user gives up after it).
    pub deadline: Duration,
}

impl Default for StormConfig {
    fn default() -> Self {
        StormConfig {
            seed: 7,
            requests: 600,
            interval: Duration::from_millis(500),
            stream_share: 0.3,
            deadline: Duration::from_secs(60),
        }
    }
}

/// The two simulated providers of one run.
#[derive(Debug, Clone)]
pub struct Storm {
    /// The primary provider (models [`PRIMARY_MODEL`] and [`SECONDARY_MODEL`]).
    pub primary: Simulator,
    /// The backup provider ([`BACKUP_MODEL`]), healthy but slower.
    pub backup: Simulator,
    /// The run's settings.
    pub config: StormConfig,
}

impl Storm {
    /// Builds the storm's providers. Call inside the runtime that drives them: their
    /// clocks start now.
    pub fn new(config: StormConfig) -> Storm {
        let primary = Scenario::builder()
            .seed(config.seed)
            .model(ModelSpec::new(PRIMARY_MODEL).completion_tokens(40))
            .model(ModelSpec::new(SECONDARY_MODEL).completion_tokens(40))
            .rpm_limit(100)
            .quota_exhausted_after(420)
            .fault(Fault::status(503).between(Duration::from_secs(20), Duration::from_secs(35)))
            .outage(
                PRIMARY_MODEL,
                Duration::from_secs(120),
                Duration::from_secs(180),
            )
            .latency(Latency::uniform(
                Duration::from_millis(400),
                Duration::from_millis(1200),
            ))
            .error_latency(Latency::fixed(Duration::from_millis(60)))
            .token_interval(Latency::fixed(Duration::from_millis(25)))
            .stream_fault(StreamFault::StallBeforeFirstToken { probability: 0.08 })
            .stream_fault(StreamFault::StallAfterTokens {
                tokens: 5,
                probability: 0.02,
            })
            .build()
            .expect("the storm scenario is valid");
        let backup = Scenario::builder()
            .seed(config.seed.wrapping_add(1))
            .model(ModelSpec::new(BACKUP_MODEL).completion_tokens(40))
            .latency(Latency::uniform(
                Duration::from_millis(900),
                Duration::from_millis(2000),
            ))
            .token_interval(Latency::fixed(Duration::from_millis(40)))
            .build()
            .expect("the backup scenario is valid");
        Storm {
            primary: Simulator::new(primary),
            backup: Simulator::new(backup),
            config,
        }
    }
}

/// One request of the workload: an OpenAI chat completion for [`PRIMARY_MODEL`].
pub fn request(i: u32, stream: bool) -> Request<AiBody> {
    let body = format!(
        r#"{{"model":"{PRIMARY_MODEL}","stream":{stream},"stream_options":{{"include_usage":{stream}}},"max_tokens":200,"messages":[{{"role":"user","content":"Question {i}: explain in one paragraph why the sky is blue."}}]}}"#
    );
    Request::post("http://primary.test/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-demo")
        .body(AiBody::from(body))
        .expect("a valid request")
}

/// The requests of a run, in order: which are streamed is drawn from the seed.
pub fn workload(cfg: &StormConfig) -> impl Iterator<Item = Request<AiBody>> {
    let mut rng = fastrand::Rng::with_seed(cfg.seed);
    let share = cfg.stream_share;
    (0..cfg.requests).map(move |i| request(i, rng.f64() < share))
}

/// How one request ended, from the user's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The whole answer arrived.
    Served,
    /// An error response, an error, or a broken stream reached the user.
    Failed,
    /// The stack caught a stall and said so (an `AiError::Stalled`), instead of hanging.
    StallCaught,
    /// Nothing arrived before the user's deadline.
    TimedOut,
}

/// What a client reports about one request besides its verdict.
#[derive(Debug, Clone, Copy, Default)]
pub struct Served {
    /// The request was served by a fallback route.
    pub fallback: bool,
}

/// Reads a response to the end: the verdict of a finished exchange.
pub async fn consume<B>(res: Response<B>) -> Verdict
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if !res.status().is_success() {
        return Verdict::Failed;
    }
    let body = res.into_body();
    let mut body = std::pin::pin!(body);
    while let Some(frame) = body.frame().await {
        if let Err(e) = frame {
            let e: BoxError = e.into();
            return match AiError::find(&*e) {
                Some(AiError::Stalled { .. }) => Verdict::StallCaught,
                _ => Verdict::Failed,
            };
        }
    }
    Verdict::Served
}

/// The table row of one client's run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The client's name.
    pub name: &'static str,
    /// Requests offered.
    pub offered: u32,
    /// Requests whose whole answer arrived.
    pub served: u32,
    /// Requests that ended in an error the user saw.
    pub failed: u32,
    /// Requests still waiting at the user's deadline.
    pub timed_out: u32,
    /// Stalls the user saw as an `AiError::Stalled` (instead of a hang or a retry).
    pub stalls_caught: u32,
    /// Requests served by a fallback route.
    pub fallbacks: u32,
    /// Calls that reached a provider.
    pub upstream_calls: u64,
    /// Calls answered 429.
    pub rate_limited: u64,
    /// Calls answered with an error, or whose stream stalled: work that served nobody.
    pub wasted: u64,
    /// Upstream streams that stalled (before or after their first token).
    pub stalled_upstream: u64,
    /// Of those, the streams that stalled before their first byte (where a retry is safe).
    pub stalled_before_first_byte: u64,
    /// Median latency of served requests.
    pub p50: Duration,
    /// 99th-percentile latency of served requests.
    pub p99: Duration,
}

impl Report {
    /// Served share of offered requests.
    pub fn served_share(&self) -> f64 {
        f64::from(self.served) / f64::from(self.offered.max(1))
    }
}

/// Runs the storm's workload through a client and reports. `client` sends one request and
/// returns its verdict (having read the answer to the end) and what it knows of how it was
/// served. `progress` is called every 30 virtual seconds with (seconds, served, finished).
pub async fn run<C, Fut>(
    name: &'static str,
    storm: &Storm,
    client: C,
    mut progress: impl FnMut(u64, u32, u32),
) -> Report
where
    C: Fn(Request<AiBody>) -> Fut,
    Fut: Future<Output = (Verdict, Served)> + Send + 'static,
{
    let cfg = storm.config;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut next_report = 30;
    let mut results: Vec<(Verdict, Served, Duration)> = Vec::with_capacity(cfg.requests as usize);
    for (i, req) in (0u32..).zip(workload(&cfg)) {
        tokio::time::sleep_until(start + cfg.interval * i).await;
        let fut = client(req);
        let deadline = cfg.deadline;
        tasks.spawn(async move {
            let t0 = Instant::now();
            match tokio::time::timeout(deadline, fut).await {
                Ok((v, s)) => (v, s, t0.elapsed()),
                Err(_) => (Verdict::TimedOut, Served::default(), deadline),
            }
        });
        while let Some(done) = tasks.try_join_next() {
            results.push(done.expect("a workload task panicked"));
        }
        let secs = start.elapsed().as_secs();
        if secs >= next_report {
            let served = results.iter().filter(|r| r.0 == Verdict::Served).count() as u32;
            progress(secs, served, results.len() as u32);
            next_report += 30;
        }
    }
    while let Some(done) = tasks.join_next().await {
        results.push(done.expect("a workload task panicked"));
    }
    let count = |v: Verdict| results.iter().filter(|r| r.0 == v).count() as u32;
    let mut lat: Vec<Duration> = results
        .iter()
        .filter(|r| r.0 == Verdict::Served)
        .map(|r| r.2)
        .collect();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    let calls: Vec<_> = storm
        .primary
        .calls()
        .into_iter()
        .chain(storm.backup.calls())
        .collect();
    Report {
        name,
        offered: cfg.requests,
        served: count(Verdict::Served),
        failed: count(Verdict::Failed) + count(Verdict::StallCaught),
        timed_out: count(Verdict::TimedOut),
        stalls_caught: count(Verdict::StallCaught),
        fallbacks: results
            .iter()
            .filter(|r| r.0 == Verdict::Served && r.1.fallback)
            .count() as u32,
        upstream_calls: calls.len() as u64,
        rate_limited: calls.iter().filter(|c| c.status == 429).count() as u64,
        wasted: calls
            .iter()
            .filter(|c| c.status != 200 || c.stream_fault.is_some())
            .count() as u64,
        stalled_upstream: calls.iter().filter(|c| c.stream_fault.is_some()).count() as u64,
        stalled_before_first_byte: calls
            .iter()
            .filter(|c| c.stream_fault == Some(StreamFaultKind::StallBeforeFirstToken))
            .count() as u64,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

/// The side-by-side table of several runs.
pub fn table(reports: &[Report]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    type Cell = fn(&Report) -> String;
    let rows: [(&str, Cell); 12] = [
        ("served", |r| {
            format!("{} ({:.1}%)", r.served, 100.0 * r.served_share())
        }),
        ("failed", |r| r.failed.to_string()),
        ("timed out", |r| r.timed_out.to_string()),
        ("upstream calls", |r| r.upstream_calls.to_string()),
        ("429s received", |r| r.rate_limited.to_string()),
        ("wasted calls", |r| r.wasted.to_string()),
        ("calls per request", |r| {
            format!(
                "{:.2}",
                r.upstream_calls as f64 / f64::from(r.offered.max(1))
            )
        }),
        ("p50 latency", |r| format!("{:.1} s", r.p50.as_secs_f64())),
        ("p99 latency", |r| format!("{:.1} s", r.p99.as_secs_f64())),
        ("fallbacks used", |r| r.fallbacks.to_string()),
        ("streams stalled", |r| r.stalled_upstream.to_string()),
        ("stall errors seen", |r| r.stalls_caught.to_string()),
    ];
    let _ = write!(out, "| {:<18} |", "");
    for r in reports {
        let _ = write!(out, " {:>16} |", r.name);
    }
    out.push('\n');
    let _ = write!(out, "|{}|", "-".repeat(20));
    for _ in reports {
        let _ = write!(out, "{}|", "-".repeat(18));
    }
    out.push('\n');
    for (label, f) in rows.iter() {
        let _ = write!(out, "| {label:<18} |");
        for r in reports {
            let _ = write!(out, " {:>16} |", f(r));
        }
        out.push('\n');
    }
    out
}

/// What the demo's table shows, in words: the sentences under the table in the README,
/// written from the reports of the `bare`, `naive retry` and `tower-ai` runs (empty if one
/// is missing), so that they cannot disagree with the figures.
pub fn summary(reports: &[Report]) -> String {
    let by_name = |name: &str| reports.iter().find(|r| r.name == name);
    let (Some(bare), Some(naive), Some(ai)) =
        (by_name("bare"), by_name("naive retry"), by_name("tower-ai"))
    else {
        return String::new();
    };
    let n = |count: u64, one: &str, many: &str| {
        if count == 1 {
            format!("{count} {one}")
        } else {
            format!("{count} {many}")
        }
    };
    let mut out = String::new();
    if naive.served < bare.served {
        out.push_str(&format!(
            "The naive loop serves *fewer* requests than no retry at all ({} against {}): its \
             retries spend the rate limit ({} 429s received), and it retries the quota errors \
             that can never succeed. ",
            naive.served, bare.served, naive.rate_limited
        ));
    } else {
        out.push_str(&format!(
            "The naive loop serves {} requests against the bare client's {}, for {:.2} calls \
             per request. ",
            naive.served,
            bare.served,
            naive.upstream_calls as f64 / f64::from(naive.offered.max(1))
        ));
    }
    let before = ai.stalled_before_first_byte;
    let after = ai.stalled_upstream - before;
    let other_failures = u64::from(ai.failed - ai.stalls_caught);
    out.push_str(&format!(
        "Behind tower-ai, {} upstream: {} before the first byte, where a retry is safe, and {} \
         after the first tokens, when no layer may send the request again behind the caller's \
         back. The caller saw {} (instead of a silently truncated answer), {}, and {}. ",
        n(ai.stalled_upstream, "stream stalled", "streams stalled"),
        before,
        after,
        n(
            u64::from(ai.stalls_caught),
            "`AiError::Stalled`",
            "`AiError::Stalled`s"
        ),
        n(other_failures, "other error", "other errors"),
        n(u64::from(ai.timed_out), "timeout", "timeouts"),
    ));
    let secs = |d: Duration| format!("{:.1} s", d.as_secs_f64());
    if ai.p99 > bare.p99 {
        out.push_str(&format!(
            "tower-ai's p99 ({}) is above the bare client's ({}): the requests a bare client \
             fails fast are the ones tower-ai serves late, by waiting out rate limits and \
             falling back.",
            secs(ai.p99),
            secs(bare.p99)
        ));
    } else {
        out.push_str(&format!(
            "tower-ai's p99 is {}, the bare client's {}.",
            secs(ai.p99),
            secs(bare.p99)
        ));
    }
    wrap(&out, 90)
}

/// `text` as lines of at most `width` characters (a word longer than that stands alone).
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            out.push_str(&line);
            out.push('\n');
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The outcome of one client call, as [`run`] wants it.
pub type Outcome = (Verdict, Served);

/// A bare client: one call through `Classify`, whatever comes back.
pub fn bare(
    storm: &Storm,
) -> impl Fn(Request<AiBody>) -> std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>> {
    let client = ClassifyLayer::new().layer(storm.primary.service());
    move |req| {
        let client = client.clone();
        Box::pin(async move {
            match client.oneshot(req).await {
                Ok(res) => (consume(res).await, Served::default()),
                Err(_) => (Verdict::Failed, Served::default()),
            }
        })
    }
}

/// The retry loop most tutorials show: 3 retries on any failure, 1/2/4 s backoff plus up
/// to 250 ms of jitter, `Retry-After` ignored, no fallback, no stall detection.
pub fn naive(
    storm: &Storm,
) -> impl Fn(Request<AiBody>) -> std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>> {
    let client = ClassifyLayer::new().layer(storm.primary.service());
    let seeds = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(storm.config.seed));
    move |req| {
        let client = client.clone();
        let seed = seeds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::pin(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            for attempt in 0..=3u32 {
                let again = try_clone_request(&req).expect("an in-memory body");
                if let Ok(res) = client.clone().oneshot(again).await {
                    if res.status().is_success() {
                        return (consume(res).await, Served::default());
                    }
                }
                if attempt < 3 {
                    let backoff =
                        Duration::from_secs(1 << attempt) + Duration::from_millis(rng.u64(0..250));
                    tokio::time::sleep(backoff).await;
                }
            }
            (Verdict::Failed, Served::default())
        })
    }
}

/// The response body of the tower-ai stack over the simulator.
pub type StackBody = tower_ai::telemetry::TelemetryBody<
    tower_ai::circuit_breaker::BreakerBody<
        tower_ai::budget::BudgetBody<tower_ai::stall::StallBody<ClassifiedBody<SimBody>>>,
    >,
>;

/// The tower-ai stack: [`AiStack`] with a requests-per-minute budget at the primary
/// account's own limit (so excess traffic moves on before the provider says no), and a
/// fallback chain: the request as sent, the same request for [`SECONDARY_MODEL`], then the
/// backup provider (its own stack and budget) with the model rewritten to [`BACKUP_MODEL`].
pub fn tower_ai_service(
    storm: &Storm,
) -> impl tower::Service<
    Request<AiBody>,
    Response = Response<StackBody>,
    Error = BoxError,
    Future: Send,
> + Clone
       + Send
       + 'static {
    let budget = |rpm| {
        TokenBudgetLayer::builder()
            .requests_per_minute(rpm)
            .reject()
            .build()
            .expect("a valid budget")
    };
    // Jitter and release spreads drawn from the storm's seed: one seed, one table.
    let seed = storm.config.seed;
    // A chat application's stall deadlines: 10 s to the first byte, 10 s between chunks
    // (the defaults, 30 s and 60 s, leave room for long reasoning pauses).
    let stall = || {
        StallDetectorLayer::builder()
            .first_byte(Duration::from_secs(10))
            .idle(Duration::from_secs(10))
            .build()
            .expect("valid deadlines")
    };
    // The same stack on both providers: seeded, with those deadlines.
    let stack = || AiStack::seeded(seed).stall(stall());
    // The backup's stack is inside the primary's GenAI span: no span of its own.
    let backup = stack()
        .no_telemetry()
        .budget(budget(1000))
        .layer(storm.backup.service());
    let chain = FallbackChain::builder()
        .route(Route::primary("primary"))
        .route(Route::model(SECONDARY_MODEL))
        .route(
            Route::service("backup", backup)
                .model_name(BACKUP_MODEL)
                .rewrite(|req: &mut Request<AiBody>| {
                    let body = req
                        .body()
                        .as_bytes()
                        .and_then(|b| rewrite_model(b, BACKUP_MODEL));
                    *req.body_mut() = AiBody::from(body.ok_or("request without a model")?);
                    Ok(())
                }),
        )
        .build()
        .expect("a valid chain");
    stack()
        .budget(budget(100))
        .fallback(ModelFallbackLayer::new(chain))
        .layer(storm.primary.service())
}

/// The tower-ai stack as a [`run`] client.
pub fn tower_ai(
    storm: &Storm,
) -> impl Fn(Request<AiBody>) -> std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>> {
    stack_client(tower_ai_service(storm))
}

/// Any tower-ai stack as a [`run`] client: reads each answer to the end, notes whether a
/// fallback route served it, and tells a caught stall from other errors.
pub fn stack_client<S, B>(
    svc: S,
) -> impl Fn(Request<AiBody>) -> std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>>
where
    S: tower::Service<Request<AiBody>, Response = Response<B>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    move |req| {
        let svc = svc.clone();
        Box::pin(async move {
            match svc.oneshot(req).await {
                Ok(res) => {
                    let fallback = res
                        .extensions()
                        .get::<tower_ai::fallback::Served>()
                        .is_some_and(|s| s.index > 0);
                    (consume(res).await, Served { fallback })
                }
                Err(e) => match AiError::find(&*e) {
                    Some(AiError::Stalled { .. }) => (Verdict::StallCaught, Served::default()),
                    _ => (Verdict::Failed, Served::default()),
                },
            }
        })
    }
}
