#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use tower::ServiceExt;
use tower_ai_budget::{BudgetBody, BudgetEvent, KeySnapshot, TokenBudgetLayer};
use tower_ai_core::keys::{Global, KeyFn};
use tower_ai_core::{AiError, BoxError, BudgetLimit};

/// A response body delivered in the given chunks.
#[derive(Debug, Default)]
pub struct Chunks(pub VecDeque<Bytes>);

impl Chunks {
    pub fn of(parts: &[&str]) -> Self {
        Chunks(
            parts
                .iter()
                .map(|p| Bytes::copy_from_slice(p.as_bytes()))
                .collect(),
        )
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// A chat request whose input estimate is exactly `input` tokens (≥ 2).
pub fn chat(input: u64, max_tokens: Option<u64>) -> Request<String> {
    chat_for("gpt-4o", input, max_tokens)
}

pub fn chat_for(model: &str, input: u64, max_tokens: Option<u64>) -> Request<String> {
    // "user" (4 bytes) + content: input × 4 bytes of text in all.
    let content = "x".repeat((input * 4 - 4) as usize);
    let max = max_tokens.map_or(String::new(), |m| format!(r#","max_tokens":{m}"#));
    let body = format!(
        r#"{{"model":"{model}"{max},"messages":[{{"role":"user","content":"{content}"}}]}}"#
    );
    Request::post("https://api.openai.com/v1/chat/completions")
        .body(body)
        .unwrap()
}

pub fn json_usage(input: u64, output: u64) -> Response<Chunks> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Chunks::of(&[&format!(
            r#"{{"id":"x","choices":[],"usage":{{"prompt_tokens":{input},"completion_tokens":{output}}}}}"#
        )]))
        .unwrap()
}

pub fn no_usage() -> Response<Chunks> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Chunks::of(&[r#"{"id":"x","choices":[]}"#]))
        .unwrap()
}

type Answer = dyn Fn(&Request<String>) -> Result<Response<Chunks>, BoxError> + Send + Sync;

/// A provider answering every request with `f(&req)`, counting calls.
#[derive(Clone)]
pub struct Provider {
    pub calls: Arc<AtomicUsize>,
    pub order: Arc<Mutex<Vec<usize>>>,
    f: Arc<Answer>,
}

impl Provider {
    pub fn new(
        f: impl Fn(&Request<String>) -> Result<Response<Chunks>, BoxError> + Send + Sync + 'static,
    ) -> Self {
        Provider {
            calls: Arc::default(),
            order: Arc::default(),
            f: Arc::new(f),
        }
    }
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl tower::Service<Request<String>> for Provider {
    type Response = Response<Chunks>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Chunks>, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<String>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.order.lock().unwrap().push(req.body().len());
        std::future::ready((self.f)(&req))
    }
}

pub fn snapshot<K, L>(layer: &TokenBudgetLayer<K, L>) -> KeySnapshot {
    let key = KeyFn::<String>::key(&Global, &Request::new(String::new())).unwrap();
    layer.snapshot(key).expect("the global key is held")
}

/// The `BudgetExceeded` inside an error, as (limit, retry_after).
pub fn exceeded(err: &BoxError) -> (BudgetLimit, Option<std::time::Duration>) {
    match err.downcast_ref::<AiError>() {
        Some(AiError::BudgetExceeded {
            limit, retry_after, ..
        }) => (*limit, *retry_after),
        other => panic!("expected BudgetExceeded, got {other:?} ({err})"),
    }
}

/// Reads a response body to its end.
pub async fn drain<B: Body + Unpin>(res: Response<BudgetBody<B>>) -> usize
where
    B::Data: AsRef<[u8]>,
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    let mut body = res.into_body();
    let mut n = 0;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            n += d.as_ref().len();
        }
    }
    n
}

/// Sends one request through a fresh clone of `svc`.
pub async fn send<S>(svc: &S, req: Request<String>) -> Result<S::Response, S::Error>
where
    S: tower::Service<Request<String>> + Clone,
{
    svc.clone().oneshot(req).await
}

pub fn recorder() -> (
    Arc<Mutex<Vec<BudgetEvent>>>,
    impl Fn(&BudgetEvent) + Send + Sync + 'static,
) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    (events, move |ev: &BudgetEvent| e.lock().unwrap().push(*ev))
}
