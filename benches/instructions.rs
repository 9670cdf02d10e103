//! Instructions per call, counted by callgrind: every layer beside its anchor, as ratios,
//! against a checked-in baseline. Unlike a timing, the count is the same from run to run on
//! the same build, whatever else the machine is doing, so a change that makes a hot path
//! cheaper or dearer shows as a number, not as noise.
//!
//! ```text
//! cargo bench --bench instructions                          # the table, against the baseline
//! cargo bench --bench instructions -- --save-baseline       # rewrite benches/instructions.baseline
//! cargo bench --bench instructions -- --only ai_stack_full  # one workload (and its anchor)
//! ```
//!
//! Each workload runs twice under `valgrind --tool=callgrind`, with `W` and `W + N` calls
//! (`W` warms keys, lanes and caches up); the difference divided by `N` is the cost of one
//! call, without the process's start and the stacks' construction. Streams are counted the
//! same way, per stream of about 1,000 SSE events (OpenAI Chat and Anthropic Messages).
//! The workloads with a Prometheus recorder (`*_rec`) are the exception to "the same from
//! run to run": the recorder hashes with a seed chosen per process, so they are measured
//! five times and the median is shown.
//!
//! A workload whose count rose more than 5% over the baseline is marked `REGRESSED`; with
//! `--fail-on-regression` the command then exits non-zero. The baseline belongs to one
//! toolchain: after a compiler upgrade, save a new one.
#![allow(missing_docs, missing_debug_implementations, unreachable_pub)]

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{noop_cx, once, request, Bare, TowerPolicy};
use http::{Request, Response};
use http_body::Frame;
use tower::retry::budget::TpsBudget;
use tower::{Layer, Service, ServiceBuilder};
use tower_ai::prelude::*;

/// How much worse than the baseline a count may get before it is called a regression.
const TOLERANCE: f64 = 0.05;

/// Runs of a workload with a Prometheus recorder (`*_rec`), whose median is shown: the
/// recorder's maps hash with a random seed per process, so one run's count moves by up to
/// ~5% from the next (22,068 to 24,353 for `ai_stack_default_rec` in four runs of one
/// build), as much as the regression tolerance.
const SEEDED_RUNS: usize = 5;

/// A workload: its name, its anchor (the workload it is compared with) and how many
/// iterations one measured unit is (a call, or a stream).
struct Workload {
    name: &'static str,
    anchor: Option<&'static str>,
    what: &'static str,
    kind: Kind,
}

#[derive(Clone, Copy)]
enum Kind {
    /// One call through a service, answered at once (`warm-up`, `measured` calls).
    Call,
    /// One 1,003-event OpenAI SSE stream read to its end.
    Stream,
}

impl Kind {
    const fn counts(self) -> (u64, u64) {
        match self {
            Kind::Call => (200, 4_000),
            Kind::Stream => (2, 20),
        }
    }
}

const fn call(name: &'static str, anchor: Option<&'static str>, what: &'static str) -> Workload {
    Workload {
        name,
        anchor,
        what,
        kind: Kind::Call,
    }
}

const fn stream(name: &'static str, anchor: Option<&'static str>, what: &'static str) -> Workload {
    Workload {
        name,
        anchor,
        what,
        kind: Kind::Stream,
    }
}

const WORKLOADS: &[Workload] = &[
    call("bare", None, "the in-memory provider alone"),
    call("classify", Some("bare"), "Classify"),
    call("tower_retry", Some("bare"), "tower Retry + TpsBudget"),
    call("ai_retry", Some("tower_retry"), "AiRetry (defaults)"),
    call("retry_after", Some("bare"), "RetryAfterAware"),
    call("failsafe", Some("bare"), "failsafe's breaker"),
    call("circuit_breaker", Some("failsafe"), "CircuitBreaker"),
    call("governor", Some("bare"), "governor check + bare"),
    call(
        "token_budget_rpm",
        Some("governor"),
        "TokenBudget, request limit",
    ),
    call(
        "token_budget",
        Some("tower_resilience"),
        "TokenBudget, request + token limit",
    ),
    call("tower_timeout", Some("bare"), "tower Timeout"),
    call("stall_detector", Some("tower_timeout"), "StallDetector"),
    call("model_fallback", Some("bare"), "ModelFallback"),
    call(
        "tower_stack",
        Some("tower_resilience"),
        "tower RateLimit + Retry + Timeout",
    ),
    call(
        "tower_resilience",
        Some("bare"),
        "tower-resilience retry + breaker + rate limiter",
    ),
    call(
        "ai_stack_default",
        Some("tower_resilience"),
        "AiStack::new()",
    ),
    call(
        "ai_stack_full",
        Some("tower_resilience"),
        "AiStack with budget and fallback",
    ),
    // With the `metrics` feature (the workspace's default): the same stacks with a
    // Prometheus recorder installed and `describe_metrics()` called, so every metric of
    // every layer and the GenAI client metrics are recorded.
    #[cfg(feature = "metrics")]
    call(
        "ai_stack_default_rec",
        Some("ai_stack_default"),
        "AiStack::new(), metrics recorded (Prometheus recorder)",
    ),
    #[cfg(feature = "metrics")]
    call(
        "ai_stack_full_rec",
        Some("ai_stack_full"),
        "AiStack full, metrics recorded (Prometheus recorder)",
    ),
    stream("stream_bare", None, "1,003-event OpenAI stream, bare body"),
    stream(
        "stream_stall",
        Some("stream_bare"),
        "the same through StallDetector",
    ),
    stream(
        "stream_budget",
        Some("stream_bare"),
        "the same through TokenBudget (token limit)",
    ),
    stream(
        "anthropic_bare",
        None,
        "1,002-event Anthropic Messages stream, bare body",
    ),
    stream(
        "anthropic_stall",
        Some("anthropic_bare"),
        "the same through StallDetector",
    ),
    stream(
        "anthropic_budget",
        Some("anthropic_bare"),
        "the same through TokenBudget (token limit)",
    ),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--run") {
        let name = args.get(i + 1).expect("--run NAME COUNT");
        let n: u64 = args
            .get(i + 2)
            .and_then(|n| n.parse().ok())
            .expect("--run NAME COUNT");
        run(name, n);
        return;
    }
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    drive(
        only.as_deref(),
        args.iter().any(|a| a == "--save-baseline"),
        args.iter().any(|a| a == "--fail-on-regression"),
    );
}

fn baseline_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/instructions.baseline")
}

fn read_baseline() -> BTreeMap<String, f64> {
    let Ok(text) = std::fs::read_to_string(baseline_path()) else {
        return BTreeMap::new();
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// Instructions of one run of this binary with `--run name n` under callgrind.
fn instructions(exe: &std::path::Path, name: &str, n: u64) -> Result<u64, String> {
    let out = Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .arg(exe)
        .args(["--run", name, &n.to_string()])
        .output()
        .map_err(|e| format!("valgrind could not be started: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("{name} failed under valgrind:\n{stderr}"));
    }
    stderr
        .lines()
        .find_map(|l| l.split("Collected : ").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("no instruction count in valgrind's output:\n{stderr}"))
}

fn drive(only: Option<&str>, save: bool, fail_on_regression: bool) {
    let exe = std::env::current_exe().expect("the bench's own path");
    let chosen: Vec<&Workload> = WORKLOADS
        .iter()
        .filter(|w| match only {
            None => true,
            Some(o) => {
                w.name == o
                    || WORKLOADS
                        .iter()
                        .any(|x| x.name == o && x.anchor == Some(w.name))
            }
        })
        .collect();
    let baseline = read_baseline();
    let mut measured: BTreeMap<&str, f64> = BTreeMap::new();
    for w in &chosen {
        let (warm, n) = w.kind.counts();
        let runs = if w.name.ends_with("_rec") {
            SEEDED_RUNS
        } else {
            1
        };
        let mut per_unit = Vec::with_capacity(runs);
        for _ in 0..runs {
            let one = instructions(&exe, w.name, warm)
                .and_then(|a| instructions(&exe, w.name, warm + n).map(|b| (a, b)))
                .map(|(a, b)| b.saturating_sub(a) as f64 / n as f64);
            match one {
                Ok(v) => per_unit.push(v),
                Err(e) => {
                    eprintln!("instructions: {e}");
                    std::process::exit(2);
                }
            }
        }
        per_unit.sort_by(f64::total_cmp);
        measured.insert(w.name, per_unit[per_unit.len() / 2]);
    }

    println!(
        "{:<18} {:>10} {:>10} {:<18} {:>6} {:>10} {:>8}  what",
        "workload", "instr/unit", "over bare", "anchor", "ratio", "baseline", "change"
    );
    let mut regressed = Vec::new();
    for w in &chosen {
        let v = measured[w.name];
        let (anchor, ratio) = match w.anchor.and_then(|a| measured.get(a).map(|x| (a, x))) {
            Some((a, x)) if *x > 0.0 => (a, format!("{:.2}", v / x)),
            _ => (w.anchor.unwrap_or("-"), "-".to_owned()),
        };
        let (base, change) = match baseline.get(w.name) {
            Some(b) if *b > 0.0 => {
                let c = v / b - 1.0;
                let mark = if c > TOLERANCE {
                    regressed.push(w.name);
                    " REGRESSED"
                } else {
                    ""
                };
                (format!("{b:.0}"), format!("{:+.1}%{mark}", c * 100.0))
            }
            _ => ("-".to_owned(), "new".to_owned()),
        };
        let (unit, bare) = match w.kind {
            Kind::Call => ("per call", measured.get("bare")),
            Kind::Stream if w.name.starts_with("anthropic") => {
                ("per stream", measured.get("anthropic_bare"))
            }
            Kind::Stream => ("per stream", measured.get("stream_bare")),
        };
        let over = bare.map_or("-".to_owned(), |b| format!("{:.0}", v - b));
        println!(
            "{:<18} {:>10.0} {:>10} {:<18} {:>6} {:>10} {:>8}  {} ({unit})",
            w.name, v, over, anchor, ratio, base, change, w.what
        );
    }
    if save {
        let mut all = baseline.clone();
        for (k, v) in &measured {
            all.insert((*k).to_owned(), *v);
        }
        let mut text = String::from(
            "# Instructions per call (per stream for stream_*), callgrind, from\n\
             # `cargo bench --bench instructions -- --save-baseline`. One toolchain's figures:\n\
             # re-save after a compiler upgrade.\n",
        );
        for (k, v) in &all {
            text.push_str(&format!("{k} {v:.0}\n"));
        }
        std::fs::write(baseline_path(), text).expect("the baseline file is writable");
        println!("saved {}", baseline_path().display());
    }
    if !regressed.is_empty() {
        println!(
            "{} workload(s) more than {:.0}% over the baseline: {}",
            regressed.len(),
            TOLERANCE * 100.0,
            regressed.join(", ")
        );
        if fail_on_regression {
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The workloads, run by `--run NAME COUNT` (under valgrind).

/// Installs a Prometheus recorder (what the gateway example serves on `/metrics`) and turns
/// on every metric of the layers and of the telemetry.
#[cfg(feature = "metrics")]
fn record_metrics() {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the only recorder of this process");
    tower_ai::describe_metrics();
}

fn run(name: &str, n: u64) {
    // The runtime's timer is there for the layers that create one; nothing waits.
    let rt = common::runtime();
    let _guard = rt.enter();
    match name {
        "bare" => calls(Bare, n),
        "classify" => calls(common::classify(), n),
        "tower_retry" => calls(
            tower::retry::RetryLayer::new(TowerPolicy(Arc::new(TpsBudget::new(
                Duration::from_secs(10),
                10,
                0.2,
            ))))
            .layer(Bare),
            n,
        ),
        "ai_retry" => calls(common::ai_retry(), n),
        "retry_after" => calls(common::retry_after(), n),
        "failsafe" => calls(Failsafe::new(Bare), n),
        "circuit_breaker" => calls(common::circuit_breaker(), n),
        "governor" => calls(Governor::new(Bare), n),
        "token_budget_rpm" => calls(
            TokenBudgetLayer::builder()
                .requests_per_minute(u64::MAX / 2)
                .build()
                .expect("a valid budget")
                .layer(Bare),
            n,
        ),
        "token_budget" => calls(common::token_budget(), n),
        "tower_timeout" => calls(
            tower::timeout::TimeoutLayer::new(Duration::from_secs(600)).layer(Bare),
            n,
        ),
        "stall_detector" => calls(common::stall_detector(), n),
        "model_fallback" => calls(common::model_fallback(), n),
        "tower_stack" => calls(common::tower_layer().layer(Bare), n),
        "tower_resilience" => calls(common::tower_resilience(), n),
        "ai_stack_default" => calls(common::ai_stack_default(), n),
        "ai_stack_full" => calls(common::ai_stack_full(), n),
        #[cfg(feature = "metrics")]
        "ai_stack_default_rec" => {
            record_metrics();
            calls(common::ai_stack_default(), n)
        }
        #[cfg(feature = "metrics")]
        "ai_stack_full_rec" => {
            record_metrics();
            calls(common::ai_stack_full(), n)
        }
        "stream_bare" => streams(&rt, Sse::openai(), OPENAI_STREAM, n),
        "stream_stall" => streams(
            &rt,
            ServiceBuilder::new()
                .layer(StallDetectorLayer::new())
                .service(Sse::openai()),
            OPENAI_STREAM,
            n,
        ),
        "stream_budget" => streams(
            &rt,
            ServiceBuilder::new()
                .layer(TokenBudgetLayer::new(1 << 40, 1 << 50))
                .service(Sse::openai()),
            OPENAI_STREAM,
            n,
        ),
        "anthropic_bare" => streams(&rt, Sse::anthropic(), ANTHROPIC_STREAM, n),
        "anthropic_stall" => streams(
            &rt,
            ServiceBuilder::new()
                .layer(StallDetectorLayer::new())
                .service(Sse::anthropic()),
            ANTHROPIC_STREAM,
            n,
        ),
        "anthropic_budget" => streams(
            &rt,
            ServiceBuilder::new()
                .layer(TokenBudgetLayer::new(1 << 40, 1 << 50))
                .service(Sse::anthropic()),
            ANTHROPIC_STREAM,
            n,
        ),
        other => panic!("no workload named {other}"),
    }
}

fn calls<S>(mut svc: S, n: u64)
where
    S: Service<Request<AiBody>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = noop_cx();
    for _ in 0..n {
        once(&mut svc, &mut cx, request());
    }
}

/// failsafe's breaker as a Tower service (it has none of its own).
#[derive(Clone)]
struct Failsafe<S> {
    cb: failsafe::StateMachine<FailsafePolicy, ()>,
    inner: S,
}

type FailsafePolicy = failsafe::failure_policy::OrElse<
    failsafe::failure_policy::SuccessRateOverTimeWindow<failsafe::backoff::EqualJittered>,
    failsafe::failure_policy::ConsecutiveFailures<failsafe::backoff::EqualJittered>,
>;

impl<S> Failsafe<S> {
    fn new(inner: S) -> Self {
        Failsafe {
            cb: failsafe::Config::new().build(),
            inner,
        }
    }
}

impl<S: Service<Request<AiBody>>> Service<Request<AiBody>> for Failsafe<S> {
    type Response = S::Response;
    type Error = failsafe::Error<S::Error>;
    type Future = failsafe::futures::ResponseFuture<S::Future, FailsafePolicy, (), failsafe::Any>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(failsafe::Error::Inner)
    }

    fn call(&mut self, req: Request<AiBody>) -> Self::Future {
        use failsafe::futures::CircuitBreaker as _;
        self.cb.call(self.inner.call(req))
    }
}

/// governor on `std::time::Instant` (its `MonotonicClock`): its default clock, quanta's,
/// counts a varying number of instructions per read under valgrind (3,400 to 5,200 per call
/// across runs of one build), which would make the anchor useless here.
type Gov = governor::RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    governor::clock::MonotonicClock,
    governor::middleware::NoOpMiddleware<std::time::Instant>,
>;

/// governor's lock-free `check` in front of a service: what a plain request limit costs.
struct Governor<S> {
    lim: Arc<Gov>,
    inner: S,
}

impl<S> Governor<S> {
    fn new(inner: S) -> Self {
        let q = governor::Quota::per_second(std::num::NonZeroU32::MAX);
        Governor {
            lim: Arc::new(governor::RateLimiter::direct_with_clock(
                q,
                governor::clock::MonotonicClock,
            )),
            inner,
        }
    }
}

impl<S: Service<Request<AiBody>, Error = BoxError>> Service<Request<AiBody>> for Governor<S> {
    type Response = S::Response;
    type Error = BoxError;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<AiBody>) -> Self::Future {
        assert!(self.lim.check().is_ok(), "the quota is far away");
        self.inner.call(req)
    }
}

// ---------------------------------------------------------------------------------------
// Streams: 1,000 content events, the finish, the usage and [DONE], one event per frame.

/// A body of prepared frames.
struct Frames(VecDeque<Bytes>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// An in-memory provider that answers every request with the same SSE stream.
#[derive(Clone)]
struct Sse(Arc<[Bytes]>);

impl Sse {
    fn openai() -> Self {
        const CHUNK: &str = r#""id":"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL","object":"chat.completion.chunk","created":1727346168,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd""#;
        let mut frames: Vec<Bytes> = (0..1000)
            .map(|i| {
                Bytes::from(format!(
                    "data: {{{CHUNK},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i}\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
                ))
            })
            .collect();
        frames.push(Bytes::from(format!("data: {{{CHUNK},\"choices\":[{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"stop\"}}]}}\n\n")));
        frames.push(Bytes::from(format!("data: {{{CHUNK},\"choices\":[],\"usage\":{{\"prompt_tokens\":14,\"completion_tokens\":1000,\"total_tokens\":1014}}}}\n\n")));
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
        Sse(frames.into())
    }

    fn anthropic() -> Self {
        let mut frames = vec![Bytes::from_static(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4\",\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n")];
        frames.extend((0..1000).map(|i| {
            Bytes::from(format!(
                "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"tok{i}\"}}}}\n\n"
            ))
        }));
        frames.push(Bytes::from_static(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":1000}}\n\n"));
        frames.push(Bytes::from_static(
            b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ));
        Sse(frames.into())
    }
}

impl Service<Request<AiBody>> for Sse {
    type Response = Response<Frames>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Frames>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<AiBody>) -> Self::Future {
        drop(req);
        std::future::ready(Ok(Response::builder()
            .header("content-type", "text/event-stream")
            .body(Frames(self.0.iter().cloned().collect()))
            .expect("a valid response")))
    }
}

const OPENAI_STREAM: (&str, &str) = (
    "https://api.openai.com/v1/chat/completions",
    r#"{"model":"gpt-4o","stream":true,"max_tokens":1000,"messages":[{"role":"user","content":"Hi"}]}"#,
);

const ANTHROPIC_STREAM: (&str, &str) = (
    "https://api.anthropic.com/v1/messages",
    r#"{"model":"claude-sonnet-4","stream":true,"max_tokens":1000,"messages":[{"role":"user","content":"Hi"}]}"#,
);

/// A streamed request to `(uri, body)` (the budget reserves for its `max_tokens`).
fn stream_request((uri, body): (&'static str, &'static str)) -> Request<AiBody> {
    Request::post(uri)
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .body(AiBody::from(body))
        .expect("a valid request")
}

fn streams<S, B>(rt: &tokio::runtime::Runtime, mut svc: S, to: (&'static str, &'static str), n: u64)
where
    S: Service<Request<AiBody>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    rt.block_on(async {
        for _ in 0..n {
            let res = svc
                .ready()
                .await
                .expect("always ready")
                .call(stream_request(to))
                .await
                .expect("an answer");
            let body = res.into_body().collect().await.expect("a whole stream");
            std::hint::black_box(body.to_bytes().len());
        }
    });
}
