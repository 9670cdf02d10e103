//! [`StallDetector`]: the service.

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower_ai_core::stream::StreamDialect;
use tower_ai_core::{BoxError, Provider, RequestMeta};
use tower_service::Service;

use crate::body::StallBody;
use crate::config::StallConfig;
use crate::future::ResponseFuture;

/// Puts deadlines on a call and its streamed answer, reads the stream for in-band errors,
/// its terminal marker and truncation: see the [crate docs](crate).
///
/// Built by [`StallDetectorLayer`](crate::StallDetectorLayer). Its response body is
/// [`StallBody`], its error [`BoxError`] (the inner service's error as it is, or an
/// [`AiError`](tower_ai_core::AiError)).
#[derive(Debug, Clone)]
pub struct StallDetector<S> {
    inner: S,
    config: StallConfig,
}

impl<S> StallDetector<S> {
    /// Wraps `inner` with `config`.
    pub const fn new(inner: S, config: StallConfig) -> Self {
        StallDetector { inner, config }
    }

    /// The config.
    pub fn config(&self) -> &StallConfig {
        &self.config
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Whether the answer to `req` is streamed, judged without reading the body: its
/// [`RequestMeta`] if a layer put one in the extensions, Gemini's streaming path, or an
/// `accept: text/event-stream` header.
pub(crate) fn is_streamed<B>(req: &Request<B>) -> bool {
    if let Some(meta) = req.extensions().get::<RequestMeta>() {
        return meta.stream;
    }
    if req.uri().path().contains(":streamGenerateContent") {
        return true;
    }
    req.headers().get_all(header::ACCEPT).iter().any(|v| {
        v.as_bytes()
            .windows(17)
            .any(|w| w.eq_ignore_ascii_case(b"text/event-stream"))
    })
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for StallDetector<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<StallBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let provider = Provider::of(&req);
        let dialect = StreamDialect::of(provider, req.uri().path());
        let streamed = is_streamed(&req);
        let start = Instant::now();
        ResponseFuture::new(
            self.inner.call(req),
            self.config,
            provider,
            dialect,
            streamed,
            start,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_requests_are_recognised_without_the_body() {
        let req = |uri: &str| Request::post(uri).body(()).unwrap();
        assert!(!is_streamed(&req(
            "https://api.openai.com/v1/chat/completions"
        )));
        assert!(is_streamed(&req(
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        )));
        let mut r = Request::post("/v1/messages")
            .header("accept", "application/json, Text/Event-Stream")
            .body(())
            .unwrap();
        assert!(is_streamed(&r));
        let meta = RequestMeta::parse("/v1/messages", br#"{"model":"m","stream":false}"#);
        r.extensions_mut().insert(meta);
        assert!(!is_streamed(&r), "the request's meta wins");
    }
}
