use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::body::ClassifiedBody;
use crate::classify::ClassifyConfig;
use crate::error::{AiError, BoxError};
use crate::future::ResponseFuture;
use crate::provider::Provider;

/// Classifies every response once, next to the wire, so the layers above read the verdict
/// instead of parsing again.
///
/// - A 2xx (or 1xx/3xx) response passes through untouched: its body is not read, and
///   nothing is added (a response without a [`Classification`](crate::Classification) is
///   one `Classify` judged a success; [`Classification::of`](crate::Classification::of)
///   handles both cases).
/// - Any other response has its body read up to [`ClassifyConfig::max_error_body`] bytes
///   (for at most [`ClassifyConfig::error_body_timeout`]), is classified with
///   [`classify`](crate::classify()), and reaches the caller with the `Classification` in
///   its extensions and its body whole, byte for byte.
/// - A client error (no response) becomes an [`AiError::Transport`] with its kind judged by
///   [`ErrorKind::of_error`](crate::ErrorKind::of_error).
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response, StatusCode};
/// use http_body_util::{BodyExt, Full};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_ai_core::{Classification, ClassifyLayer, ErrorKind};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_ai_core::BoxError> {
/// let provider = service_fn(|_req: Request<String>| async {
///     let body = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
///     let res = Response::builder().status(529).body(Full::new(Bytes::from(body)))?;
///     Ok::<_, http::Error>(res)
/// });
/// let svc = ServiceBuilder::new().layer(ClassifyLayer::new()).service(provider);
///
/// let req = Request::post("https://api.anthropic.com/v1/messages").body(String::new())?;
/// let res = svc.oneshot(req).await?;
/// let verdict = res.extensions().get::<Classification>().unwrap();
/// assert_eq!(verdict.kind, Some(ErrorKind::Overloaded));
/// assert!(verdict.is_retryable());
/// // The caller still gets the provider's body, whole.
/// let body = res.into_body().collect().await?.to_bytes();
/// assert!(body.starts_with(br#"{"type":"error""#));
/// # Ok(())
/// # }
/// ```
///
/// # Panics
///
/// Reading an error body uses a `tokio::time` timer, so like `tower::timeout` it must run
/// inside a Tokio runtime with the time driver enabled.
#[derive(Debug, Clone)]
pub struct Classify<S> {
    inner: S,
    config: ClassifyConfig,
}

impl<S> Classify<S> {
    /// Wraps `inner`.
    pub const fn new(inner: S, config: ClassifyConfig) -> Self {
        Classify { inner, config }
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

impl<S, ReqB, ResB> Service<Request<ReqB>> for Classify<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ClassifiedBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| AiError::transport(e.into()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let provider = Provider::of(&req);
        ResponseFuture::new(self.inner.call(req), provider, self.config)
    }
}
