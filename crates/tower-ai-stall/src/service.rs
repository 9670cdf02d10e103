//! [`StallDetector`]: the service.

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, Request, Response};
use http_body::Body;
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
    let path = req.uri().path();
    if path
        .find(':')
        .is_some_and(|i| path[i..].starts_with(":streamGenerateContent"))
    {
        return true;
    }
    req.headers().get_all(header::ACCEPT).iter().any(|v| {
        v.as_bytes()
            .windows(17)
            .any(|w| w.eq_ignore_ascii_case(b"text/event-stream"))
    })
}

/// The stream dialect of `req` and the `gen_ai.system` name for trace events: the
/// provider is [`Provider::of`] (a caller-set [`Provider`] in the extensions, else the
/// host and headers), the dialect [`StreamDialect::of`] (the endpoint's path when it names
/// one, so an OpenAI-compatible endpoint on another provider's host streams OpenAI's
/// dialect while its system stays that provider's).
pub(crate) fn dialect_of<B>(req: &Request<B>) -> (StreamDialect, &'static str) {
    let p = Provider::of(req);
    (StreamDialect::of(p, req.uri().path()), p.as_str())
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
        let (dialect, system) = dialect_of(&req);
        let streamed = is_streamed(&req);
        ResponseFuture::new(self.inner.call(req), self.config, system, dialect, streamed)
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

    #[test]
    fn dialects_follow_the_endpoint() {
        let of = |uri: &str| dialect_of(&Request::post(uri).body(()).unwrap());
        assert_eq!(
            of("https://api.openai.com/v1/chat/completions"),
            (StreamDialect::OpenAiChat, "openai")
        );
        assert_eq!(
            of("https://x.openai.azure.com/openai/deployments/gpt4/chat/completions?api-version=1"),
            (StreamDialect::OpenAiChat, "azure_openai")
        );
        assert_eq!(
            of("https://api.openai.com/v1/responses"),
            (StreamDialect::OpenAiResponses, "openai")
        );
        assert_eq!(
            of("https://api.anthropic.com/v1/messages"),
            (StreamDialect::Anthropic, "anthropic")
        );
        assert_eq!(
            of("https://generativelanguage.googleapis.com/v1beta/models/g:streamGenerateContent?alt=sse"),
            (StreamDialect::Gemini, "gemini")
        );
        // OpenAI-compatible endpoints on other providers' hosts stream OpenAI's dialect.
        // The system stays the provider's.
        assert_eq!(
            of("https://generativelanguage.googleapis.com/v1beta/openai/chat/completions"),
            (StreamDialect::OpenAiChat, "gemini")
        );
        assert_eq!(
            of("https://api.anthropic.com/v1/chat/completions"),
            (StreamDialect::OpenAiChat, "anthropic")
        );
        // Unknown paths: the provider decides (host, then headers).
        assert_eq!(
            of("https://api.anthropic.com/v1/complete"),
            (StreamDialect::Anthropic, "anthropic")
        );
        let req = Request::post("http://gateway/x")
            .header("anthropic-version", "2023-06-01")
            .body(())
            .unwrap();
        assert_eq!(dialect_of(&req), (StreamDialect::Anthropic, "anthropic"));
        assert_eq!(
            of("http://gateway/x"),
            (StreamDialect::OpenAiChat, "generic")
        );
        // A provider the caller set wins over the host.
        let mut req = Request::post("http://gateway/v1/chat/completions")
            .body(())
            .unwrap();
        req.extensions_mut().insert(Provider::Gemini);
        assert_eq!(dialect_of(&req), (StreamDialect::OpenAiChat, "gemini"));
        let mut req = Request::post("http://gateway/x").body(()).unwrap();
        req.extensions_mut().insert(Provider::Anthropic);
        assert_eq!(dialect_of(&req), (StreamDialect::Anthropic, "anthropic"));
    }
}
