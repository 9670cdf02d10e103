//! Closed-state overhead per call: `cargo bench -p tower-ai-circuit-breaker --bench overhead`.
//!
//! The same always-ready service, bare and behind: this crate's breaker (default key
//! function, host + model read from the body; and one global key), tower-resilience's
//! circuit breaker, failsafe's. Each call is `poll_ready`, `call`, one poll of the future
//! (which is ready) with a no-op waker: no runtime, so the figure is the layer's own cost.
//! Measured on one thread, and on two threads at once through clones of one service
//! (per-call time as each thread sees it). Allocations per call are counted after
//! warm-up and printed before the timings.

use std::future::{ready, Future, Ready};
use std::hint::black_box;
use std::pin::pin;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use failsafe::futures::CircuitBreaker as _;
use http::{Request, Response};
use tower::{Layer, Service};
use tower_ai_circuit_breaker::CircuitBreakerLayer;
use tower_ai_core::keys::{Global, HostModel, KeyFn};
use tower_ai_core::BoxError;

const BODY: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}],"max_tokens":16}"#;

/// The provider: always ready, answers 200 at once.
#[derive(Clone, Copy, Debug)]
struct Bare;

impl Service<Request<&'static str>> for Bare {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Ready<Result<Response<()>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<&'static str>) -> Self::Future {
        black_box(&req);
        ready(Ok(Response::new(())))
    }
}

/// failsafe's breaker as a Tower service (it has none of its own).
#[derive(Clone)]
struct Failsafe<S> {
    cb: failsafe::StateMachine<
        failsafe::failure_policy::OrElse<
            failsafe::failure_policy::SuccessRateOverTimeWindow<failsafe::backoff::EqualJittered>,
            failsafe::failure_policy::ConsecutiveFailures<failsafe::backoff::EqualJittered>,
        >,
        (),
    >,
    inner: S,
}

impl<S> Service<Request<&'static str>> for Failsafe<S>
where
    S: Service<Request<&'static str>>,
{
    type Response = S::Response;
    type Error = failsafe::Error<S::Error>;
    type Future = failsafe::futures::ResponseFuture<
        S::Future,
        failsafe::failure_policy::OrElse<
            failsafe::failure_policy::SuccessRateOverTimeWindow<failsafe::backoff::EqualJittered>,
            failsafe::failure_policy::ConsecutiveFailures<failsafe::backoff::EqualJittered>,
        >,
        (),
        failsafe::Any,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(failsafe::Error::Inner)
    }

    fn call(&mut self, req: Request<&'static str>) -> Self::Future {
        self.cb.call(self.inner.call(req))
    }
}

/// One call, start to finish.
#[inline]
fn one<S>(svc: &mut S, cx: &mut Context<'_>)
where
    S: Service<Request<&'static str>>,
{
    assert!(svc.poll_ready(cx).is_ready());
    let mut fut = pin!(svc.call(Request::new(BODY)));
    loop {
        match fut.as_mut().poll(cx) {
            Poll::Ready(Ok(r)) => {
                black_box(r);
                return;
            }
            Poll::Ready(Err(_)) => panic!("the bare service does not fail"),
            // Only tower-resilience's future waits: for its tokio Mutex, when the other
            // thread holds it. Poll again, as a runtime would once woken.
            Poll::Pending => std::hint::spin_loop(),
        }
    }
}

fn allocations_per_call<S>(mut svc: S) -> f64
where
    S: Service<Request<&'static str>>,
{
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..100 {
        one(&mut svc, &mut cx); // warm up: keys, lanes, caches
    }
    const N: u64 = 1_000;
    let info = allocation_counter::measure(|| {
        for _ in 0..N {
            one(&mut svc, &mut cx);
        }
    });
    info.count_total as f64 / N as f64
}

/// Per-call time as each of two threads sees it, running at once through clones of `svc`.
fn two_threads<S>(svc: &S, iters: u64) -> Duration
where
    S: Service<Request<&'static str>> + Clone + Send,
{
    let start = Arc::new(Barrier::new(2));
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let mut svc = svc.clone();
                let start = start.clone();
                scope.spawn(move || {
                    let mut cx = Context::from_waker(Waker::noop());
                    for _ in 0..100 {
                        one(&mut svc, &mut cx);
                    }
                    start.wait();
                    let t = Instant::now();
                    for _ in 0..iters {
                        one(&mut svc, &mut cx);
                    }
                    t.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    })
}

fn tower_resilience_layer() -> tower_resilience::circuitbreaker::CircuitBreakerLayer {
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .build()
        .unwrap()
}

fn failsafe_layer<S>(inner: S) -> Failsafe<S> {
    Failsafe {
        cb: failsafe::Config::new().build(),
        inner,
    }
}

fn bench(c: &mut Criterion) {
    println!(
        "allocations per call: bare {:.2}, tower-ai {:.2}, tower-ai (global key) {:.2}, \
         tower-resilience {:.2}, failsafe {:.2}",
        allocations_per_call(Bare),
        allocations_per_call(CircuitBreakerLayer::new().layer(Bare)),
        allocations_per_call(
            CircuitBreakerLayer::builder()
                .key_fn(Global)
                .build()
                .unwrap()
                .layer(Bare)
        ),
        allocations_per_call(tower_resilience_layer().layer(Bare)),
        allocations_per_call(failsafe_layer(Bare)),
    );

    let mut g = c.benchmark_group("closed_1_task");
    macro_rules! single {
        ($name:literal, $svc:expr) => {
            g.bench_function($name, |b| {
                let mut svc = $svc;
                let mut cx = Context::from_waker(Waker::noop());
                b.iter(|| one(&mut svc, &mut cx))
            });
        };
    }
    single!("bare", Bare);
    // what the default key function costs by itself (tower-ai-core's HostModel)
    g.bench_function("host_model_key_only", |b| {
        b.iter(|| black_box(HostModel.key(&Request::new(black_box(BODY)))))
    });
    single!("tower_ai", CircuitBreakerLayer::new().layer(Bare));
    single!(
        "tower_ai_global_key",
        CircuitBreakerLayer::builder()
            .key_fn(Global)
            .build()
            .unwrap()
            .layer(Bare)
    );
    single!("tower_resilience", tower_resilience_layer().layer(Bare));
    single!("failsafe", failsafe_layer(Bare));
    g.finish();

    let mut g = c.benchmark_group("closed_2_tasks");
    macro_rules! double {
        ($name:literal, $svc:expr) => {
            g.bench_function($name, |b| {
                let svc = $svc;
                b.iter_custom(|iters| two_threads(&svc, iters))
            });
        };
    }
    double!("bare", Bare);
    double!("tower_ai", CircuitBreakerLayer::new().layer(Bare));
    double!(
        "tower_ai_global_key",
        CircuitBreakerLayer::builder()
            .key_fn(Global)
            .build()
            .unwrap()
            .layer(Bare)
    );
    double!("tower_resilience", tower_resilience_layer().layer(Bare));
    double!("failsafe", failsafe_layer(Bare));
    g.finish();
}

/// The per-call cost of every service measured in alternation, on one thread and on two
/// at once (rounds of `CALLS` calls; minimum and median of `ROUNDS` rounds), so that the
/// load of a shared machine hits them all alike; then the issue's ratios.
fn interleaved() {
    const CALLS: u64 = 20_000;
    const ROUNDS: usize = 25;
    fn per_call_1<S: Service<Request<&'static str>>>(svc: &mut S) -> f64 {
        let mut cx = Context::from_waker(Waker::noop());
        let t = Instant::now();
        for _ in 0..CALLS {
            one(svc, &mut cx);
        }
        t.elapsed().as_nanos() as f64 / CALLS as f64
    }
    fn per_call_2<S>(svc: &S) -> f64
    where
        S: Service<Request<&'static str>> + Clone + Send,
    {
        two_threads(svc, CALLS).as_nanos() as f64 / CALLS as f64
    }
    macro_rules! services {
        () => {
            (
                Bare,
                CircuitBreakerLayer::new().layer(Bare),
                CircuitBreakerLayer::builder()
                    .key_fn(Global)
                    .build()
                    .unwrap()
                    .layer(Bare),
                tower_resilience_layer().layer(Bare),
                failsafe_layer(Bare),
            )
        };
    }
    const NAMES: [&str; 5] = [
        "bare",
        "tower_ai",
        "global_key",
        "tower_resilience",
        "failsafe",
    ];
    let (mut a, mut b, mut c, mut d, mut e) = services!();
    let (a2, b2, c2, d2, e2) = services!();
    let mut one_task: [Vec<f64>; 5] = Default::default();
    let mut two_tasks: [Vec<f64>; 5] = Default::default();
    for _ in 0..ROUNDS {
        one_task[0].push(per_call_1(&mut a));
        one_task[1].push(per_call_1(&mut b));
        one_task[2].push(per_call_1(&mut c));
        one_task[3].push(per_call_1(&mut d));
        one_task[4].push(per_call_1(&mut e));
        two_tasks[0].push(per_call_2(&a2));
        two_tasks[1].push(per_call_2(&b2));
        two_tasks[2].push(per_call_2(&c2));
        two_tasks[3].push(per_call_2(&d2));
        two_tasks[4].push(per_call_2(&e2));
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
        let one = one_task.each_ref().map(|v| stat(v, median));
        let two = two_tasks.each_ref().map(|v| stat(v, median));
        for (tasks, t) in [("1_task", &one), ("2_tasks", &two)] {
            let figures: Vec<String> = NAMES
                .iter()
                .zip(t.iter())
                .map(|(n, ns)| format!("{n} {ns:.1}"))
                .collect();
            println!(
                "interleaved closed_{tasks} ({label} of {ROUNDS} rounds, ns/call): {}; \
                 tower_ai / tower_resilience {:.3}, tower_ai / failsafe {:.3}",
                figures.join(", "),
                t[1] / t[3],
                t[1] / t[4],
            );
        }
        println!(
            "interleaved ({label}): tower_ai 2 tasks / 1 task {:.2}, global key {:.2}",
            two[1] / one[1],
            two[2] / one[2],
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    // Only for a real measurement: not under `cargo test` (no `--bench`), a profile or a list.
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    if has("--bench") && !has("--profile-time") && !has("--list") {
        interleaved();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
