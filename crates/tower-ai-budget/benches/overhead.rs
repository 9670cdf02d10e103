//! Overhead of TokenBudget on the happy path (every limit far away), against the bare
//! service and against governor's lock-free `check` in front of the same service; one task
//! and two contending tasks; and allocations per call.
//!
//! The fair comparison with governor is `budget_rpm`: a request limit alone, which is all
//! governor's `check` does. `budget_rpm_concurrency` also takes and gives back a place in
//! flight (two more atomic steps, and the `Arc` the response body holds to give it back),
//! which governor does not do at all. On two tasks every service runs one clone per thread
//! (as a server runs one per connection), so a call measures the layer, not `Arc` clones.
//!
//! Before criterion, an interleaved run measures every service in alternation (rounds of
//! calls; minimum and median of the rounds) so the load of a shared machine hits them all
//! alike, and prints the ratios of the issue; then a token budget on two tasks, one layer
//! shared against a layer each.
//!
//! `cargo bench -p tower-ai-budget --bench overhead -- --warm-up-time 1 --measurement-time 3`

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, Criterion};
use governor::{Quota, RateLimiter};
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service};
use tower_ai_budget::TokenBudgetLayer;
use tower_ai_core::{AiBody, RequestMeta};

const BODY: &str = r#"{"model":"gpt-4o","max_tokens":256,"messages":[{"role":"user","content":"Say hello in one short sentence, please."}]}"#;

/// The bare provider: always ready, answers at once with a static body.
#[derive(Clone, Copy)]
struct Bare;

impl Service<Request<AiBody>> for Bare {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<AiBody>) -> Self::Future {
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"{}")))))
    }
}

fn request() -> Request<AiBody> {
    Request::new(AiBody::from(BODY))
}

/// One call: ready, call, poll to completion, drop the response (and its body).
fn once<S>(svc: &mut S, req: Request<AiBody>) -> bool
where
    S: Service<Request<AiBody>>,
{
    let mut cx = Context::from_waker(Waker::noop());
    if svc.poll_ready(&mut cx).is_pending() {
        return false;
    }
    let mut fut = pin!(svc.call(req));
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(res)) => {
            drop(black_box(res));
            true
        }
        _ => false,
    }
}

type Gov = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    governor::clock::DefaultClock,
    governor::middleware::NoOpMiddleware<governor::clock::QuantaInstant>,
>;

fn governor() -> Arc<Gov> {
    Arc::new(RateLimiter::direct(Quota::per_second(
        NonZeroU32::new(u32::MAX).unwrap(),
    )))
}

/// A request limit alone (what governor's `check` does): nothing read from the body.
fn rpm_only_layer() -> TokenBudgetLayer {
    TokenBudgetLayer::builder()
        .requests_per_minute(u64::MAX / 2)
        .build()
        .unwrap()
}

/// RPM + concurrency: nothing read from the body.
fn rpm_layer() -> TokenBudgetLayer {
    TokenBudgetLayer::builder()
        .requests_per_minute(u64::MAX / 2)
        .max_concurrent(u32::MAX)
        .build()
        .unwrap()
}

/// RPM + TPM + concurrency: the token estimate, and the usage read from the response.
fn tpm_layer() -> TokenBudgetLayer {
    TokenBudgetLayer::builder()
        .requests_per_minute(u64::MAX / 2)
        .tokens_per_minute(u64::MAX / 2)
        .max_concurrent(u32::MAX)
        .build()
        .unwrap()
}

fn with_meta() -> Request<AiBody> {
    let mut r = request();
    RequestMeta::get_or_insert(&mut r);
    r
}

/// [`with_meta`] sent where a client sends it: the path names the endpoint, so the layer
/// need not detect the provider from the headers to know the stream dialect.
fn with_meta_to_openai() -> Request<AiBody> {
    let mut r = with_meta();
    *r.uri_mut() = http::Uri::from_static("https://api.openai.com/v1/chat/completions");
    r
}

/// Runs `make()` (one per thread: a service clone, say) on `threads` threads, `iters`
/// times each after a common start; the longest thread's time. Each thread times itself:
/// with as many threads as cores, a timing thread of its own might not run until they end.
fn contended<F>(
    threads: usize,
    iters: u64,
    make: impl Fn() -> F + Send + Sync + Clone + 'static,
) -> Duration
where
    F: FnMut() + 'static,
{
    let barrier = Arc::new(std::sync::Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (make, b) = (make.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut f = make();
                for _ in 0..100 {
                    f();
                }
                b.wait();
                let start = Instant::now();
                for _ in 0..iters {
                    f();
                }
                start.elapsed()
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .max()
        .unwrap_or_default()
}

/// Two tasks calling clones of `svc` (one clone each).
fn two<S>(svc: &S, iters: u64) -> Duration
where
    S: Service<Request<AiBody>> + Clone + Send + Sync + 'static,
{
    let svc = svc.clone();
    contended(2, iters, move || {
        let mut svc = svc.clone();
        move || {
            once(&mut svc, request());
        }
    })
}

/// Two tasks checking one governor before the bare service.
fn two_governor(lim: &Arc<Gov>, iters: u64) -> Duration {
    let lim = lim.clone();
    contended(2, iters, move || {
        let lim = lim.clone();
        move || {
            let _ = lim.check().is_ok() && once(&mut Bare, request());
        }
    })
}

/// Every service in alternation, one task and two (rounds of `CALLS` calls; minimum and
/// median of `ROUNDS` rounds), then the issue's ratios.
fn interleaved() {
    const CALLS: u64 = 20_000;
    const ROUNDS: usize = 25;
    fn per_call_1<S: Service<Request<AiBody>>>(svc: &mut S) -> f64 {
        let t = Instant::now();
        for _ in 0..CALLS {
            once(svc, request());
        }
        t.elapsed().as_nanos() as f64 / CALLS as f64
    }
    let per_call_2 = |d: Duration| d.as_nanos() as f64 / CALLS as f64;
    const NAMES: [&str; 4] = [
        "bare",
        "governor_check+bare",
        "budget_rpm",
        "budget_rpm_concurrency",
    ];
    let lim = governor();
    let mut rpm = rpm_only_layer().layer(Bare);
    let mut conc = rpm_layer().layer(Bare);
    let mut one_task: [Vec<f64>; 4] = Default::default();
    let mut two_tasks: [Vec<f64>; 4] = Default::default();
    for _ in 0..ROUNDS {
        one_task[0].push(per_call_1(&mut Bare));
        one_task[1].push({
            let t = Instant::now();
            for _ in 0..CALLS {
                let _ = lim.check().is_ok() && once(&mut Bare, request());
            }
            t.elapsed().as_nanos() as f64 / CALLS as f64
        });
        one_task[2].push(per_call_1(&mut rpm));
        one_task[3].push(per_call_1(&mut conc));
        two_tasks[0].push(per_call_2(two(&Bare, CALLS)));
        two_tasks[1].push(per_call_2(two_governor(&lim, CALLS)));
        two_tasks[2].push(per_call_2(two(&rpm, CALLS)));
        two_tasks[3].push(per_call_2(two(&conc, CALLS)));
    }
    let stat = |v: &[f64], median: bool| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        if median {
            v[v.len() / 2]
        } else {
            v[0]
        }
    };
    for (label, median) in [("min", false), ("median", true)] {
        for (tasks, t) in [("one_task", &one_task), ("two_tasks", &two_tasks)] {
            let t = t.each_ref().map(|v| stat(v, median));
            let figures: Vec<String> = NAMES
                .iter()
                .zip(t.iter())
                .map(|(n, ns)| format!("{n} {ns:.1}"))
                .collect();
            println!(
                "interleaved {tasks} ({label} of {ROUNDS} rounds, ns/call, bare service included): {}",
                figures.join(", ")
            );
            println!(
                "  vs governor_check+bare: budget_rpm {:.3}, budget_rpm_concurrency {:.3}",
                t[2] / t[1],
                t[3] / t[1],
            );
        }
    }
    interleaved_tokens();
}

/// A token limit (RPM + TPM, no concurrency limit: requests admitted from leases) on one task
/// and on two, in alternation: two clones of one layer, against two layers of their own
/// (nothing shared at all, what two tasks cost on this machine with no contention).
fn interleaved_two_tasks_tokens() {
    const CALLS: u64 = 20_000;
    const ROUNDS: usize = 15;
    fn layer() -> TokenBudgetLayer {
        TokenBudgetLayer::builder()
            .requests_per_minute(u64::MAX / 2)
            .tokens_per_minute(u64::MAX / 2)
            .build()
            .unwrap()
    }
    fn one_task<S: Service<Request<AiBody>>>(svc: &mut S) -> f64 {
        let t = Instant::now();
        for _ in 0..CALLS {
            once(svc, request());
        }
        t.elapsed().as_nanos() as f64 / CALLS as f64
    }
    let shared = layer().layer(Bare);
    let mut single = shared.clone();
    let separate = || {
        let mut svc = layer().layer(Bare);
        move || {
            once(&mut svc, request());
        }
    };
    let mut r: [Vec<f64>; 3] = Default::default();
    for _ in 0..ROUNDS {
        r[0].push(one_task(&mut single));
        r[1].push(two(&shared, CALLS).as_nanos() as f64 / CALLS as f64);
        r[2].push(contended(2, CALLS, separate).as_nanos() as f64 / CALLS as f64);
    }
    for v in &mut r {
        v.sort_by(f64::total_cmp);
    }
    for (label, at) in [("min", 0), ("median", ROUNDS / 2)] {
        println!(
            "interleaved budget_tpm ({label} of {ROUNDS} rounds, ns/call, request built in the \
             loop): one task {:.0}, two tasks on one layer {:.0} ({:.2}x), two tasks on a layer \
             each {:.0} ({:.2}x)",
            r[0][at],
            r[1][at],
            r[1][at] / r[0][at],
            r[2][at],
            r[2][at] / r[0][at],
        );
    }
}

/// The token configurations in alternation, on one task, with their requests built before
/// the clock starts (a `RequestMeta` in the extensions, or a body to parse).
fn interleaved_tokens() {
    const CALLS: usize = 5_000;
    const ROUNDS: usize = 25;
    fn per_call<S: Service<Request<AiBody>>>(svc: &mut S, make: fn() -> Request<AiBody>) -> f64 {
        let reqs: Vec<_> = (0..CALLS).map(|_| make()).collect();
        let t = Instant::now();
        for r in reqs {
            once(svc, r);
        }
        t.elapsed().as_nanos() as f64 / CALLS as f64
    }
    const NAMES: [&str; 6] = [
        "bare_meta_in_extensions",
        "budget_tpm_meta_in_extensions",
        "bare",
        "budget_tpm_parses_body",
        "bare_meta_to_openai",
        "budget_tpm_meta_to_openai",
    ];
    let mut tpm = tpm_layer().layer(Bare);
    let mut runs: [Vec<f64>; 6] = Default::default();
    for _ in 0..ROUNDS {
        runs[0].push(per_call(&mut Bare, with_meta));
        runs[1].push(per_call(&mut tpm, with_meta));
        runs[2].push(per_call(&mut Bare, request));
        runs[3].push(per_call(&mut tpm, request));
        runs[4].push(per_call(&mut Bare, with_meta_to_openai));
        runs[5].push(per_call(&mut tpm, with_meta_to_openai));
    }
    for (label, median) in [("min", false), ("median", true)] {
        let t = runs.each_ref().map(|v| {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            if median {
                v[v.len() / 2]
            } else {
                v[0]
            }
        });
        let figures: Vec<String> = NAMES
            .iter()
            .zip(t.iter())
            .map(|(n, ns)| format!("{n} {ns:.1}"))
            .collect();
        println!(
            "interleaved tokens ({label} of {ROUNDS} rounds, ns/call, requests built before): {}",
            figures.join(", ")
        );
        println!(
            "  layer's own cost: meta in extensions +{:.0} ns (to api.openai.com +{:.0} ns), \
             parsing the body +{:.0} ns",
            t[1] - t[0],
            t[5] - t[4],
            t[3] - t[2],
        );
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();

    let mut g = c.benchmark_group("one_task");
    g.bench_function("bare", |b| {
        let mut svc = Bare;
        b.iter(|| once(&mut svc, request()))
    });
    g.bench_function("governor_check+bare", |b| {
        let lim = governor();
        let mut svc = Bare;
        b.iter(|| lim.check().is_ok() && once(&mut svc, request()))
    });
    g.bench_function("budget_rpm", |b| {
        let mut svc = rpm_only_layer().layer(Bare);
        b.iter(|| once(&mut svc, request()))
    });
    g.bench_function("budget_rpm_concurrency", |b| {
        let mut svc = rpm_layer().layer(Bare);
        b.iter(|| once(&mut svc, request()))
    });
    g.bench_function("budget_tpm_meta_in_extensions", |b| {
        let mut svc = tpm_layer().layer(Bare);
        b.iter_batched(
            with_meta,
            |r| once(&mut svc, r),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("bare_meta_in_extensions", |b| {
        let mut svc = Bare;
        b.iter_batched(
            with_meta,
            |r| once(&mut svc, r),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("budget_tpm_parses_body", |b| {
        let mut svc = tpm_layer().layer(Bare);
        b.iter(|| once(&mut svc, request()))
    });
    g.finish();

    let mut g = c.benchmark_group("two_tasks");
    g.bench_function("bare", |b| b.iter_custom(|iters| two(&Bare, iters)));
    g.bench_function("governor_check+bare", |b| {
        let lim = governor();
        b.iter_custom(|iters| two_governor(&lim, iters))
    });
    g.bench_function("budget_rpm", |b| {
        let svc = rpm_only_layer().layer(Bare);
        b.iter_custom(|iters| two(&svc, iters))
    });
    g.bench_function("budget_rpm_concurrency", |b| {
        let svc = rpm_layer().layer(Bare);
        b.iter_custom(|iters| two(&svc, iters))
    });
    g.finish();

    // Allocations per call (the request is built outside the measurement).
    let per_call =
        |name: &str, mut f: Box<dyn FnMut(Request<AiBody>)>, make: fn() -> Request<AiBody>| {
            let reqs: Vec<_> = (0..1000).map(|_| make()).collect();
            let info = allocation_counter::measure(|| {
                for r in reqs {
                    f(r);
                }
            });
            println!(
                "allocations per call, {name}: {:.2} ({} bytes per call)",
                info.count_total as f64 / 1000.0,
                info.bytes_total / 1000
            );
        };
    let mut bare = Bare;
    per_call(
        "bare",
        Box::new(move |r| {
            once(&mut bare, r);
        }),
        request,
    );
    let mut svc = rpm_only_layer().layer(Bare);
    once(&mut svc, request()); // create the key first
    per_call(
        "budget_rpm",
        Box::new(move |r| {
            once(&mut svc, r);
        }),
        request,
    );
    let mut svc = rpm_layer().layer(Bare);
    once(&mut svc, request());
    per_call(
        "budget_rpm_concurrency",
        Box::new(move |r| {
            once(&mut svc, r);
        }),
        request,
    );
    let mut svc = tpm_layer().layer(Bare);
    once(&mut svc, request());
    per_call(
        "budget_tpm_meta_in_extensions",
        Box::new(move |r| {
            once(&mut svc, r);
        }),
        with_meta,
    );
    let mut svc = tpm_layer().layer(Bare);
    once(&mut svc, request());
    per_call(
        "budget_tpm_parses_body",
        Box::new(move |r| {
            once(&mut svc, r);
        }),
        request,
    );
}

criterion_group!(benches, bench);

/// The tenant of a request, from its `x-tenant` header.
fn tenant_key(req: &Request<AiBody>) -> Option<tower_ai_core::keys::Key> {
    let t = req.headers().get("x-tenant")?;
    Some(tower_ai_core::keys::Key::of(t.as_bytes()))
}

fn tenant(t: &str) -> Request<AiBody> {
    let mut r = request();
    r.headers_mut().insert("x-tenant", t.parse().unwrap());
    r
}

/// What a new key costs once the key map is full of busy keys (each with a request in
/// flight, so none may be forgotten): per new key with 200 and with 20,000 busy keys, the
/// least of three rounds of 2,000. Eviction reads a touch log from its front, so the two
/// should be alike; the eviction it replaced walked the whole map for every new key.
fn new_key_cost() {
    fn per_new_key(max_keys: usize) -> Duration {
        let layer = TokenBudgetLayer::builder()
            .key_fn(tenant_key)
            .max_concurrent(1)
            .max_keys(max_keys)
            .reject()
            .build()
            .unwrap();
        let mut svc = layer.layer(Bare);
        let mut cx = Context::from_waker(Waker::noop());
        let mut held = Vec::with_capacity(max_keys);
        for i in 0..max_keys {
            assert!(svc.poll_ready(&mut cx).is_ready());
            let mut fut = pin!(svc.call(tenant(&format!("busy-{i}"))));
            if let Poll::Ready(Ok(res)) = fut.as_mut().poll(&mut cx) {
                held.push(res);
            }
        }
        let mut per_key = Duration::MAX;
        for round in 0..3 {
            let reqs: Vec<_> = (0..2000)
                .map(|i| tenant(&format!("new-{round}-{i}")))
                .collect();
            let start = Instant::now();
            for r in reqs {
                once(&mut svc, r);
            }
            per_key = per_key.min(start.elapsed() / 2000);
        }
        drop(held);
        per_key
    }
    let small = per_new_key(200);
    let large = per_new_key(20_000);
    println!("new_key_cost: {large:?} per new key with 20,000 busy keys, {small:?} with 200");
}

fn main() {
    // Only for a real measurement: not under `cargo test` (no `--bench`), a profile or a list.
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    if has("--bench") && !has("--profile-time") && !has("--list") {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _guard = rt.enter();
        interleaved();
        interleaved_two_tasks_tokens();
        new_key_cost();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
