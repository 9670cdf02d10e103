//! Overhead of StallDetector.
//!
//! - `per_call/*`: one call through a bare service, through `tower::timeout::Timeout`,
//!   and through `StallDetector` (default config), answer body read to its end. `ready`
//!   answers at once; `yield` answers on the second poll, so every timer that is created
//!   lazily is created.
//! - `per_chunk/*`: a 1,000-event OpenAI chat SSE stream (plus finish, usage and
//!   `[DONE]`), read frame by frame from the bare body and through `StallBody`.
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

const JSON: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#;

fn json_response() -> Response<VecBody> {
    Response::builder()
        .header("content-type", "application/json")
        .body(VecBody(VecDeque::from([Bytes::from_static(JSON)])))
        .unwrap()
}

fn request() -> Request<&'static str> {
    Request::post("https://api.openai.com/v1/chat/completions")
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
    let res = svc.ready().await.unwrap().call(request()).await.unwrap();
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
    tower::service_fn(move |_req: Request<&'static str>| {
        let res = Response::builder()
            .header("content-type", "text/event-stream")
            .body(VecBody(frames.iter().cloned().collect()))
            .unwrap();
        YieldOnce(Some(res), true)
    })
}

fn per_chunk(c: &mut Criterion) {
    let rt = runtime();
    let frames = sse_frames();
    let mut g = c.benchmark_group("per_chunk");
    g.throughput(Throughput::Elements(frames.len() as u64));
    let mut bare = sse_service(frames.clone());
    let mut stall = ServiceBuilder::new()
        .layer(StallDetectorLayer::new())
        .service(sse_service(frames.clone()));
    g.bench_function("bare_body/1000_events", |b| {
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
    g.bench_function("stall_body/1000_events", |b| {
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
    rt.block_on(async {
        // Warm up (the timer wheel, lazily allocated runtime structures).
        one(&mut timeout).await;
        one(&mut stall).await;
        one(&mut sse_stall).await;
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
}

criterion_group!(benches, per_call, per_chunk);

fn main() {
    allocations();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
