//! The `Classify` layer: verdicts in the extensions, error bodies delivered whole.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Layer, ServiceExt};
use tower_ai_core::{AiError, Classification, ClassifyConfig, ClassifyLayer, ErrorKind};
use tower_ai_sim::testing::body_channel;

/// A body of `len` bytes made of 64 KiB chunks, counting how many bytes were pulled.
struct Generated {
    left: usize,
    pulled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(64 * 1024);
        self.left -= n;
        self.pulled
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; n])))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left as u64)
    }
}

fn req() -> Request<String> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .body(String::new())
        .unwrap()
}

#[tokio::test]
async fn error_body_reaches_the_caller_byte_for_byte() {
    let body = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    let svc = ClassifyLayer::new().layer(service_fn(move |_req: Request<String>| async move {
        Ok::<_, Infallible>(
            Response::builder()
                .status(429)
                .header("x-request-id", "req_9")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap(),
        )
    }));
    let res = svc.oneshot(req()).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["x-request-id"], "req_9");
    let c = res.extensions().get::<Classification>().unwrap().clone();
    assert_eq!(c.kind, Some(ErrorKind::QuotaExhausted));
    assert_eq!(
        Classification::of(&res).kind,
        Some(ErrorKind::QuotaExhausted)
    );
    let got = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got, body.as_bytes());
}

#[tokio::test]
async fn success_passes_untouched_without_reading() {
    let svc = ClassifyLayer::new().layer(service_fn(|_req: Request<String>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
            b"data: {}\n\n",
        ))))
    }));
    let res = svc.oneshot(req()).await.unwrap();
    assert!(res.extensions().get::<Classification>().is_none());
    assert!(Classification::of(&res).is_success());
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "data: {}\n\n"
    );
}

#[tokio::test]
async fn ten_megabyte_error_body_is_read_only_to_the_limit_and_delivered_whole() {
    let pulled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let p = pulled.clone();
    let cfg = ClassifyConfig {
        max_error_body: 100 * 1024,
        ..Default::default()
    };
    let svc = ClassifyLayer::with_config(cfg).layer(service_fn(move |_req: Request<String>| {
        let p = p.clone();
        async move {
            let body = Generated {
                left: 10 * 1024 * 1024,
                pulled: p,
            };
            Ok::<_, Infallible>(Response::builder().status(502).body(body).unwrap())
        }
    }));
    let res = svc.oneshot(req()).await.unwrap();
    assert_eq!(
        res.extensions().get::<Classification>().unwrap().kind,
        Some(ErrorKind::ServerError)
    );
    // Classification pulled the first 100 KiB, at most one 64 KiB chunk beyond: bounded.
    let before = pulled.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        before <= 100 * 1024 + 64 * 1024,
        "read {before} bytes to classify"
    );
    assert_eq!(res.body().size_hint().exact(), Some(10 * 1024 * 1024));
    let all = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(all.len(), 10 * 1024 * 1024);
    assert!(all.iter().all(|&b| b == b'x'));
}

#[tokio::test(start_paused = true)]
async fn a_slow_error_body_is_classified_on_what_arrived_and_nothing_is_lost() {
    let (tx, body) = body_channel();
    let body = std::sync::Mutex::new(Some(body));
    let cfg = ClassifyConfig {
        error_body_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let svc = ClassifyLayer::with_config(cfg).layer(service_fn(move |_req: Request<String>| {
        let body = body.lock().unwrap().take().unwrap();
        async move { Ok::<_, Infallible>(Response::builder().status(529).body(body).unwrap()) }
    }));
    tx.send(br#"{"type":"error","error":{"type":"over"#);
    let fut = tokio::spawn(
        svc.oneshot(
            Request::post("https://api.anthropic.com/v1/messages")
                .body(String::new())
                .unwrap(),
        ),
    );
    tokio::time::sleep(Duration::from_millis(1900)).await;
    assert!(
        !fut.is_finished(),
        "still waiting for the rest of the error body"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let res = fut.await.unwrap().unwrap();
    assert_eq!(
        res.extensions().get::<Classification>().unwrap().kind,
        Some(ErrorKind::Overloaded)
    );
    // The rest arrives later and still reaches the caller, then trailers.
    tx.send(br#"loaded_error","message":"Overloaded"}}"#);
    let mut trailers = HeaderMap::new();
    trailers.insert("x-t", "1".parse().unwrap());
    tx.send_trailers(trailers);
    drop(tx);
    let collected = res.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-t"], "1");
    assert_eq!(
        collected.to_bytes(),
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
    );
}

#[tokio::test]
async fn a_body_error_while_reading_is_delivered_after_the_bytes() {
    let (tx, body) = body_channel();
    tx.send("partial");
    tx.fail("connection reset");
    let body = std::sync::Mutex::new(Some(body));
    let svc = ClassifyLayer::new().layer(service_fn(move |_req: Request<String>| {
        let body = body.lock().unwrap().take().unwrap();
        async move { Ok::<_, Infallible>(Response::builder().status(500).body(body).unwrap()) }
    }));
    let res = svc.oneshot(req()).await.unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "partial");
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "connection reset");
}

#[tokio::test]
async fn transport_errors_become_typed() {
    let svc = ClassifyLayer::new().layer(service_fn(|_req: Request<String>| async {
        Err::<Response<Full<Bytes>>, _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    }));
    let err = svc.oneshot(req()).await.unwrap_err();
    let ai = err.downcast_ref::<AiError>().unwrap();
    assert_eq!(ai.kind(), ErrorKind::Connection);
    assert!(ai.kind().is_retryable());
}
