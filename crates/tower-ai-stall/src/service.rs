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
/// `accept: text/event-stream` header. `by_path` is the dialect the path names
/// ([`StreamDialect::of_path`]): only a Gemini path is read for `:streamGenerateContent`.
pub(crate) fn is_streamed<B>(req: &Request<B>, by_path: Option<StreamDialect>) -> bool {
    if let Some(meta) = req.extensions().get::<RequestMeta>() {
        return meta.stream;
    }
    if by_path == Some(StreamDialect::Gemini) {
        let path = req.uri().path().as_bytes();
        if path
            .iter()
            .position(|&b| b == b':')
            .is_some_and(|i| path[i..].starts_with(b":streamGenerateContent"))
        {
            return true;
        }
    }
    req.headers().get_all(header::ACCEPT).iter().any(|v| {
        v.as_bytes()
            .windows(17)
            .any(|w| w.eq_ignore_ascii_case(b"text/event-stream"))
    })
}

/// The stream dialect of `req` and the `gen_ai.system` of its trace events: the provider
/// is [`Provider::of`] (a caller-set [`Provider`] in the extensions, else the host and
/// headers), the dialect [`StreamDialect::of`] (the endpoint's path when it names one, so
/// an OpenAI-compatible endpoint on another provider's host streams OpenAI's dialect
/// while its system stays that provider's).
pub(crate) fn dialect_of<B>(req: &Request<B>) -> (StreamDialect, Provider) {
    let p = Provider::of(req);
    (StreamDialect::of(p, req.uri().path()), p)
}

/// What the detector needs to know about a call, read from the request in `call`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Route {
    /// The dialect of a streamed answer.
    pub(crate) dialect: StreamDialect,
    /// The `gen_ai.system` of trace events.
    pub(crate) system: Provider,
    /// Whether the head deadline for streamed requests applies.
    pub(crate) streamed: bool,
}

impl Route {
    /// The route of `req` as [`dialect_of`] and [`is_streamed`] tell it, reading no more
    /// than `config` needs: the request counts as streamed only where the head deadlines
    /// differ, and the provider (whose detection parses the host) is looked for only when
    /// the path names no dialect or a warning could be recorded. When no subscriber takes
    /// warnings, events (there are none then) would name the dialect's provider.
    pub(crate) fn of<B>(req: &Request<B>, config: &StallConfig) -> Route {
        let by_path = StreamDialect::of_path(req.uri().path());
        let (dialect, system) = match by_path {
            Some(d) if !tracing::level_enabled!(tracing::Level::WARN) => (d, d.provider()),
            _ => dialect_of(req),
        };
        Route {
            dialect,
            system,
            streamed: config.head_depends_on_stream() && is_streamed(req, by_path),
        }
    }
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
        let route = Route::of(&req, &self.config);
        ResponseFuture::new(self.inner.call(req), self.config, route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_requests_are_recognised_without_the_body() {
        let req = |uri: &str| Request::post(uri).body(()).unwrap();
        let is_streamed = |r: &Request<()>| is_streamed(r, StreamDialect::of_path(r.uri().path()));
        assert!(!is_streamed(&req(
            "https://api.openai.com/v1/chat/completions"
        )));
        assert!(is_streamed(&req(
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        )));
        assert!(!is_streamed(&req(
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
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
        let of = |uri: &str| {
            let (d, p) = dialect_of(&Request::post(uri).body(()).unwrap());
            (d, p.as_str())
        };
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
        assert_eq!(
            dialect_of(&req),
            (StreamDialect::Anthropic, Provider::Anthropic)
        );
        assert_eq!(
            of("http://gateway/x"),
            (StreamDialect::OpenAiChat, "generic")
        );
        // A provider the caller set wins over the host.
        let mut req = Request::post("http://gateway/v1/chat/completions")
            .body(())
            .unwrap();
        req.extensions_mut().insert(Provider::Gemini);
        assert_eq!(
            dialect_of(&req),
            (StreamDialect::OpenAiChat, Provider::Gemini)
        );
        let mut req = Request::post("http://gateway/x").body(()).unwrap();
        req.extensions_mut().insert(Provider::Anthropic);
        assert_eq!(
            dialect_of(&req),
            (StreamDialect::Anthropic, Provider::Anthropic)
        );
    }

    /// Takes every event and span, records nothing.
    struct Sink;

    impl tracing::Subscriber for Sink {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {}
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn the_route_reads_what_the_config_and_the_subscriber_need() {
        let azure = "https://x.openai.azure.com/openai/deployments/gpt4/chat/completions";
        let streamed = || {
            Request::post(azure)
                .header("accept", "text/event-stream")
                .body(())
                .unwrap()
        };
        let config = StallConfig::default();
        // No subscriber takes warnings: the host is not parsed for a system name.
        let r = Route::of(&streamed(), &config);
        assert_eq!(
            (r.dialect, r.system, r.streamed),
            (StreamDialect::OpenAiChat, Provider::OpenAi, true)
        );
        // With one, events name the provider.
        let r = tracing::subscriber::with_default(Sink, || Route::of(&streamed(), &config));
        assert_eq!(
            (r.dialect, r.system),
            (StreamDialect::OpenAiChat, Provider::AzureOpenAi)
        );
        // A path that names no dialect: the provider decides, subscriber or not.
        let req = Request::post("https://api.anthropic.com/v1/complete")
            .body(())
            .unwrap();
        assert_eq!(Route::of(&req, &config).dialect, StreamDialect::Anthropic);
        // Head deadlines that do not depend on it: the request is not inspected.
        let same = StallConfig::builder()
            .unary_head(crate::DEFAULT_HEAD)
            .build_config()
            .unwrap();
        assert!(!Route::of(&streamed(), &same).streamed);
    }
}
