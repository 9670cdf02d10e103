//! Overhead of StallDetector.
//!
//! - `per_call/*`: one call through a bare service, through `tower::timeout::Timeout`,
//!   and through `StallDetector` (default config), answer body read to its end. `ready`
//!   answers at once; `yield` answers on the second poll, so every timer that is created
//!   lazily is created.
//! - `per_chunk/openai/*`: a 1,000-event OpenAI chat SSE stream (plus finish, usage and
//!   `[DONE]`), one event per frame, read from the bare body, through `StallBody`, through
//!   `StallBody` with the same frames labelled JSON (the wrapper without the SSE scan),
//!   and through `StreamScanner` alone (core's per-event cost).
//! - `per_chunk/anthropic/*`: 1,000 `content_block_delta` events, bare and through
//!   `StallBody`.
//!
//! Also prints heap allocations per call (allocation-counter).
//!
//! Run: `cargo bench -p tower-ai-stall --bench overhead -- --warm-up-time 1 --measurement-time 3`
#![allow(missing_docs)]

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, Criterion, Throughput};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_ai_core::stream::{StreamDialect, StreamScanner};
use tower_ai_core::BoxError;
use tower_ai_stall::StallDetectorLayer;

const EVENTS: usize = 1000;

/// A body of prepared frames.
struct VecBody(VecDeque<Bytes>);

impl Body for VecBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// Ready on the second poll.
struct YieldOnce<T>(Option<T>, bool);

impl<T: Unpin> Future for YieldOnce<T> {
    type Output = Result<T, BoxError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.1 {
            self.1 = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(self.0.take().expect("polled after completion")))
    }
}

fn sse_frames() -> Vec<Bytes> {
    let mut frames: Vec<Bytes> = (0..EVENTS)
        .map(|i| {
            Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL\",\"object\":\"chat.completion.chunk\",\"created\":1727346168,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_5050236cbd\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i}\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
            ))
        })
        .collect();
    frames.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL\",\"object\":\"chat.completion.chunk\",\"created\":1727346168,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_5050236cbd\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}]}\n\n"));
    frames.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL\",\"object\":\"chat.completion.chunk\",\"created\":1727346168,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_5050236cbd\",\"choices\":[],\"usage\":{\"prompt_tokens\":14,\"completion_tokens\":1000,\"total_tokens\":1014}}\n\n"));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

fn anthropic_frames() -> Vec<Bytes> {
    let mut frames = vec![Bytes::from_static(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4\",\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n")];
    frames.extend((0..EVENTS).map(|i| {
        Bytes::from(format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"tok{i}\"}}}}\n\n"
        ))
    }));
    frames.push(Bytes::from_static(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":1000}}\n\n"));
    frames.push(Bytes::from_static(
        b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ));
    frames
}

const JSON: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#;

fn json_response() -> Response<VecBody> {
    Response::builder()
        .header("content-type", "application/json")
        .body(VecBody(VecDeque::from([Bytes::from_static(JSON)])))
        .unwrap()
}

const OPENAI: &str = "https://api.openai.com/v1/chat/completions";
const ANTHROPIC: &str = "https://api.anthropic.com/v1/messages";

fn request_to(uri: &'static str) -> Request<&'static str> {
    Request::post(uri)
        .body(r#"{"model":"gpt-4o","messages":[]}"#)
        .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// Calls `svc` once and reads the body to its end.
async fn one<S, B>(svc: &mut S) -> usize
where
    S: Service<Request<&'static str>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    one_to(svc, OPENAI).await
}

/// Calls `svc` once at `uri` and reads the body to its end.
async fn one_to<S, B>(svc: &mut S, uri: &'static str) -> usize
where
    S: Service<Request<&'static str>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(request_to(uri))
        .await
        .unwrap();
    let body = std::pin::pin!(res.into_body());
    body.collect().await.unwrap().to_bytes().len()
}

fn per_call(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("per_call");
    for pending in [false, true] {
        let label = if pending { "yield" } else { "ready" };
        let inner = tower::service_fn(move |_req: Request<&'static str>| {
            YieldOnce(Some(json_response()), !pending)
        });
        let mut bare = inner;
        let mut timeout = ServiceBuilder::new()
            .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(600)))
            .service(inner);
        let mut stall = ServiceBuilder::new()
            .layer(StallDetectorLayer::new())
            .service(inner);
        g.bench_function(format!("bare/{label}"), |b| {
            b.iter_custom(|n| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..n {
                        std::hint::black_box(one(&mut bare).await);
                    }
                    t.elapsed()
                })
            })
        });
        g.bench_function(format!("tower_timeout/{label}"), |b| {
            b.iter_custom(|n| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..n {
                        std::hint::black_box(one(&mut timeout).await);
                    }
                    t.elapsed()
                })
            })
        });
        g.bench_function(format!("stall_detector/{label}"), |b| {
            b.iter_custom(|n| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..n {
                        std::hint::black_box(one(&mut stall).await);
                    }
                    t.elapsed()
                })
            })
        });
    }
    g.finish();
}

fn sse_service(
    frames: Vec<Bytes>,
) -> impl Service<
    Request<&'static str>,
    Response = Response<VecBody>,
    Error = BoxError,
    Future = YieldOnce<Response<VecBody>>,
> + Clone {
    stream_service(frames, "text/event-stream")
}

fn stream_service(
    frames: Vec<Bytes>,
    content_type: &'static str,
) -> impl Service<
    Request<&'static str>,
    Response = Response<VecBody>,
    Error = BoxError,
    Future = YieldOnce<Response<VecBody>>,
> + Clone {
    tower::service_fn(move |_req: Request<&'static str>| {
        let res = Response::builder()
            .header("content-type", content_type)
            .body(VecBody(frames.iter().cloned().collect()))
            .unwrap();
        YieldOnce(Some(res), true)
    })
}

fn bench_service<S>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    name: &str,
    uri: &'static str,
    mut svc: S,
) where
    S: Service<Request<&'static str>>,
    S::Response: IntoBody,
    S::Error: std::fmt::Debug,
{
    g.bench_function(name, |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..n {
                    let res = svc
                        .ready()
                        .await
                        .unwrap()
                        .call(request_to(uri))
                        .await
                        .unwrap();
                    std::hint::black_box(res.read().await);
                }
                t.elapsed()
            })
        })
    });
}

/// Reads a response body to its end.
trait IntoBody {
    fn read(self) -> impl Future<Output = usize>;
}

impl<B> IntoBody for Response<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    async fn read(self) -> usize {
        let body = std::pin::pin!(self.into_body());
        body.collect().await.unwrap().to_bytes().len()
    }
}

fn per_chunk(c: &mut Criterion) {
    let rt = runtime();
    let openai = sse_frames();
    let anthropic = anthropic_frames();
    let mut g = c.benchmark_group("per_chunk");
    g.throughput(Throughput::Elements(openai.len() as u64));
    let stall = || ServiceBuilder::new().layer(StallDetectorLayer::new());
    bench_service(
        &mut g,
        &rt,
        "openai/bare_body",
        OPENAI,
        sse_service(openai.clone()),
    );
    bench_service(
        &mut g,
        &rt,
        "openai/stall_body",
        OPENAI,
        stall().service(sse_service(openai.clone())),
    );
    // The same frames not labelled as SSE: the wrapper without the scanner.
    bench_service(
        &mut g,
        &rt,
        "openai/stall_body_unscanned",
        OPENAI,
        stall().service(stream_service(openai.clone(), "application/json")),
    );
    g.bench_function("openai/scanner_only", |b| {
        b.iter(|| {
            let mut scanner = StreamScanner::new(StreamDialect::OpenAiChat);
            for f in &openai {
                std::hint::black_box(scanner.feed(f));
            }
            scanner.terminal_seen()
        })
    });
    bench_service(
        &mut g,
        &rt,
        "anthropic/bare_body",
        ANTHROPIC,
        sse_service(anthropic.clone()),
    );
    bench_service(
        &mut g,
        &rt,
        "anthropic/stall_body",
        ANTHROPIC,
        stall().service(sse_service(anthropic.clone())),
    );
    g.finish();
}

fn allocations() {
    let rt = runtime();
    let inner =
        tower::service_fn(|_req: Request<&'static str>| YieldOnce(Some(json_response()), false));
    let mut bare = inner;
    let mut timeout = ServiceBuilder::new()
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(600)))
        .service(inner);
    let mut stall = ServiceBuilder::new()
        .layer(StallDetectorLayer::new())
        .service(inner);
    let mut sse_bare = sse_service(sse_frames());
    let mut sse_stall = ServiceBuilder::new()
        .layer(StallDetectorLayer::new())
        .service(sse_service(sse_frames()));
    let mut ant_bare = sse_service(anthropic_frames());
    let mut ant_stall = ServiceBuilder::new()
        .layer(StallDetectorLayer::new())
        .service(sse_service(anthropic_frames()));
    rt.block_on(async {
        // Warm up (the timer wheel, lazily allocated runtime structures).
        one(&mut timeout).await;
        one(&mut stall).await;
        one(&mut sse_stall).await;
        one_to(&mut ant_stall, ANTHROPIC).await;
    });
    let count = |name: &str, f: &mut dyn FnMut()| {
        let info = allocation_counter::measure(f);
        println!(
            "allocations {name}: {} ({} bytes)",
            info.count_total, info.bytes_total
        );
    };
    count("per_call/bare", &mut || {
        rt.block_on(one(&mut bare));
    });
    count("per_call/tower_timeout", &mut || {
        rt.block_on(one(&mut timeout));
    });
    count("per_call/stall_detector", &mut || {
        rt.block_on(one(&mut stall));
    });
    count("sse_1000/bare", &mut || {
        rt.block_on(one(&mut sse_bare));
    });
    count("sse_1000/stall_detector", &mut || {
        rt.block_on(one(&mut sse_stall));
    });
    count("anthropic_1000/bare", &mut || {
        rt.block_on(one_to(&mut ant_bare, ANTHROPIC));
    });
    count("anthropic_1000/stall_detector", &mut || {
        rt.block_on(one_to(&mut ant_stall, ANTHROPIC));
    });
}

/// Per-call cost of the three services measured in alternation (rounds of 20,000 calls,
/// median and minimum of 25 rounds), so that the load of a shared machine hits all three
/// alike; then the per-chunk cost of each dialect's stream, bare and through StallBody,
/// the same way (rounds of 20 streams).
fn interleaved() {
    let rt = runtime();
    for pending in [false, true] {
        let inner = tower::service_fn(move |_req: Request<&'static str>| {
            YieldOnce(Some(json_response()), !pending)
        });
        let mut bare = inner;
        let mut timeout = ServiceBuilder::new()
            .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(600)))
            .service(inner);
        let mut stall = ServiceBuilder::new()
            .layer(StallDetectorLayer::new())
            .service(inner);
        const CALLS: u32 = 20_000;
        let mut samples: [Vec<f64>; 3] = Default::default();
        rt.block_on(async {
            for _ in 0..25 {
                let t = Instant::now();
                for _ in 0..CALLS {
                    std::hint::black_box(one(&mut bare).await);
                }
                samples[0].push(t.elapsed().as_nanos() as f64 / f64::from(CALLS));
                let t = Instant::now();
                for _ in 0..CALLS {
                    std::hint::black_box(one(&mut timeout).await);
                }
                samples[1].push(t.elapsed().as_nanos() as f64 / f64::from(CALLS));
                let t = Instant::now();
                for _ in 0..CALLS {
                    std::hint::black_box(one(&mut stall).await);
                }
                samples[2].push(t.elapsed().as_nanos() as f64 / f64::from(CALLS));
            }
        });
        let label = if pending { "yield" } else { "ready" };
        for (stat, pick) in [("median", 0usize), ("min", 1)] {
            let [bare, timeout, stall] = samples.clone().map(|mut v| {
                v.sort_by(f64::total_cmp);
                if pick == 0 {
                    v[v.len() / 2]
                } else {
                    v[0]
                }
            });
            println!(
                "interleaved per_call/{label} ({stat} of 25 rounds): bare {bare:.0} ns, tower_timeout {timeout:.0} ns, \
                 stall_detector {stall:.0} ns; overhead over bare: timeout {:.0} ns, stall {:.0} ns; \
                 stall/timeout {:.2}, stall/bare {:.2}",
                timeout - bare,
                stall - bare,
                stall / timeout,
                stall / bare
            );
        }
    }
    // Per chunk: a 1,000-event stream read bare and through StallBody, in alternation.
    for (dialect, uri, frames) in [
        ("openai", OPENAI, sse_frames()),
        ("anthropic", ANTHROPIC, anthropic_frames()),
    ] {
        let mut bare = sse_service(frames.clone());
        let mut stall = ServiceBuilder::new()
            .layer(StallDetectorLayer::new())
            .service(sse_service(frames.clone()));
        const STREAMS: u32 = 20;
        let mut samples: [Vec<f64>; 2] = Default::default();
        rt.block_on(async {
            for _ in 0..25 {
                let t = Instant::now();
                for _ in 0..STREAMS {
                    std::hint::black_box(one_to(&mut bare, uri).await);
                }
                samples[0].push(t.elapsed().as_nanos() as f64 / f64::from(STREAMS) / 1e3);
                let t = Instant::now();
                for _ in 0..STREAMS {
                    std::hint::black_box(one_to(&mut stall, uri).await);
                }
                samples[1].push(t.elapsed().as_nanos() as f64 / f64::from(STREAMS) / 1e3);
            }
        });
        for (stat, pick) in [("median", 0usize), ("min", 1)] {
            let [bare, stall] = samples.clone().map(|mut v| {
                v.sort_by(f64::total_cmp);
                if pick == 0 {
                    v[v.len() / 2]
                } else {
                    v[0]
                }
            });
            println!(
                "interleaved per_chunk/{dialect} ({stat} of 25 rounds, {} events): bare_body {bare:.1} µs, \
                 stall_body {stall:.1} µs; stall/bare {:.2}",
                frames.len(),
                stall / bare
            );
        }
    }
}

criterion_group!(benches, per_call, per_chunk);

fn main() {
    // Profiling one benchmark (`--profile-time`) skips the printed measurements.
    if !std::env::args().any(|a| a == "--profile-time") {
        allocations();
        interleaved();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
