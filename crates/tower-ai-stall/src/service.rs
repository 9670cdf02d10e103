//! [`StallDetector`]: the service.

use std::any::Any;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, Request, Response};
use http_body::Body;
use tower_ai_core::overrides::StallDeadlines;
use tower_ai_core::stream::StreamDialect;
use tower_ai_core::{top_level_bool, AiBody, BoxError, Deadline, Provider, RequestMeta};
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

/// Whether the answer to `req` is streamed: its [`RequestMeta`] if a layer put one in the
/// extensions, Gemini's streaming path, an `accept: text/event-stream` header, else a
/// top-level `"stream": true` in a body held in memory ([`body_says_stream`]). `by_path` is
/// the dialect the path names ([`StreamDialect::of_path`]): only a Gemini path is read for
/// `:streamGenerateContent`.
pub(crate) fn is_streamed<B: 'static>(req: &Request<B>, by_path: Option<StreamDialect>) -> bool {
    if let Some(meta) = RequestMeta::stored(req) {
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
    }) || body_says_stream(req.body())
}

/// Whether a request body held in memory ([`AiBody`], [`Bytes`], `String`, `Vec<u8>`,
/// `&'static str`) has a top-level `"stream": true`: one forward walk over the top-level
/// keys that skips nested values and stops at the key ([`top_level_bool`]), no parse. Other
/// body types (streamed bodies) are not read.
fn body_says_stream<B: 'static>(body: &B) -> bool {
    let any = body as &dyn Any;
    let bytes: Option<&[u8]> = if let Some(b) = any.downcast_ref::<AiBody>() {
        b.as_bytes().map(|b| &b[..])
    } else if let Some(b) = any.downcast_ref::<Bytes>() {
        Some(b)
    } else if let Some(b) = any.downcast_ref::<String>() {
        Some(b.as_bytes())
    } else if let Some(b) = any.downcast_ref::<Vec<u8>>() {
        Some(b)
    } else {
        any.downcast_ref::<&'static str>().map(|s| s.as_bytes())
    };
    bytes.and_then(|b| top_level_bool(b, b"stream")) == Some(true)
}

/// The stream dialect of `req` and the provider its trace events name: the provider
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
    /// The provider trace events name (`gen_ai.provider.name`).
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
    pub(crate) fn of<B: 'static>(req: &Request<B>, config: &StallConfig) -> Route {
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
    ReqB: 'static,
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
        // The request's own deadlines, if it carries any (one extensions lookup).
        let config = match StallDeadlines::of(&req) {
            Some(o) => self.config.overridden(o),
            None => self.config,
        };
        let route = Route::of(&req, &config);
        // One extensions lookup; the clock is read only for a request with a deadline.
        let deadline = Deadline::of(&req).map(Deadline::instant);
        if deadline.is_some_and(|at| at <= tokio::time::Instant::now()) {
            // Its caller has given up (the time went in waits above): not sent.
            return ResponseFuture::expired(config, route);
        }
        ResponseFuture::new(self.inner.call(req), config, route, deadline)
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
    fn a_top_level_stream_true_in_the_body_counts() {
        fn is_streamed<B: 'static>(r: &Request<B>) -> bool {
            super::is_streamed(r, StreamDialect::of_path(r.uri().path()))
        }
        let uri = "https://api.openai.com/v1/chat/completions";
        let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"\"stream\": true"}],"stream" : true}"#;
        assert!(is_streamed(
            &Request::post(uri).body(AiBody::from(body)).unwrap()
        ));
        assert!(is_streamed(
            &Request::post(uri).body(Bytes::from(body)).unwrap()
        ));
        assert!(is_streamed(
            &Request::post(uri).body(body.to_owned()).unwrap()
        ));
        assert!(is_streamed(
            &Request::post(uri).body(body.as_bytes().to_vec()).unwrap()
        ));
        assert!(is_streamed(&Request::post(uri).body(body).unwrap()));
        for not in [
            r#"{"model":"gpt-4o","stream":false}"#,
            r#"{"model":"gpt-4o","messages":[{"stream":true}]}"#,
            r#"{"model":"gpt-4o","stream":"true"}"#,
            r#"{"model":"gpt-4o","note":"\"stream\":true"}"#,
            "not json",
        ] {
            assert!(
                !is_streamed(&Request::post(uri).body(AiBody::from(not)).unwrap()),
                "{not}"
            );
        }
        // A streamed body is not read.
        let streaming = AiBody::streaming(http_body_util::Full::new(Bytes::from(body)));
        assert!(!is_streamed(&Request::post(uri).body(streaming).unwrap()));
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
