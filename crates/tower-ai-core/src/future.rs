//! The future of [`Classify`](crate::Classify).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::response::Parts;
use http::{HeaderMap, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use crate::body::ClassifiedBody;
use crate::classify::{classify, ClassifyConfig};
use crate::error::{AiError, BoxError};
use crate::provider::Provider;

pin_project! {
    /// The response future of [`Classify`](crate::Classify): waits for the response and,
    /// for a non-2xx one, reads its body (bounded) to classify it.
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
        provider: Provider,
        config: ClassifyConfig,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        Calling { #[pin] fut: F },
        // Boxed: only error responses get here, and a response head, a buffer and a
        // timer inline would make every call's future several hundred bytes larger.
        Reading { reading: Pin<Box<Reading<B>>> },
        Done,
    }
}

pin_project! {
    /// What the future holds while it reads an error body.
    #[project = ReadingProj]
    struct Reading<B> {
        parts: Option<Parts>,
        body: Option<Pin<Box<B>>>,
        buf: BytesMut,
        #[pin]
        deadline: Sleep,
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn new(fut: F, provider: Provider, config: ClassifyConfig) -> Self {
        ResponseFuture {
            state: State::Calling { fut },
            provider,
            config,
        }
    }
}

impl<F, B> std::fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ClassifiedBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let res = match ready!(fut.poll(cx)) {
                        Ok(res) => res,
                        Err(e) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(AiError::transport(e.into())));
                        }
                    };
                    let status = res.status();
                    if !crate::classify::is_error_status(status) {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(res.map(ClassifiedBody::passthrough)));
                    }
                    let (parts, body) = res.into_parts();
                    this.state.set(State::Reading {
                        reading: Box::pin(Reading {
                            parts: Some(parts),
                            body: Some(Box::pin(body)),
                            buf: BytesMut::new(),
                            deadline: tokio::time::sleep(this.config.error_body_timeout),
                        }),
                    });
                }
                StateProj::Reading { reading } => {
                    let ReadingProj {
                        parts,
                        body,
                        buf,
                        mut deadline,
                    } = reading.as_mut().project();
                    let max = this.config.max_error_body;
                    let mut tail = None;
                    let mut trailers: Option<HeaderMap> = None;
                    let mut error = None;
                    let mut ended = false;
                    while buf.len() < max {
                        let Some(b) = body.as_mut() else { break };
                        match b.as_mut().poll_frame(cx) {
                            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                                Ok(mut data) => {
                                    let room = max - buf.len();
                                    if data.len() > room {
                                        tail = Some(data.split_off(room));
                                    }
                                    buf.extend_from_slice(&data);
                                }
                                Err(frame) => {
                                    trailers = frame.into_trailers().ok();
                                    ended = true;
                                    break;
                                }
                            },
                            Poll::Ready(Some(Err(e))) => {
                                error = Some(e.into());
                                ended = true;
                                break;
                            }
                            Poll::Ready(None) => {
                                ended = true;
                                break;
                            }
                            Poll::Pending => {
                                if deadline.as_mut().poll(cx).is_pending() {
                                    return Poll::Pending;
                                }
                                // Too slow: classify what arrived, hand on the rest.
                                break;
                            }
                        }
                    }
                    let parts = parts.take().expect("Reading holds its parts until done");
                    let remainder = if ended { None } else { body.take() };
                    let bytes = std::mem::take(buf).freeze();
                    let verdict = classify(
                        *this.provider,
                        parts.status,
                        &parts.headers,
                        &bytes,
                        this.config,
                    );
                    tracing::debug!(
                        gen_ai.provider.name = this.provider.gen_ai_name(),
                        http.response.status_code = parts.status.as_u16(),
                        error.type = verdict.kind.map_or("unknown", |k| k.as_str()),
                        retry_wait_ms = verdict.wait.map(|w| w.delay.as_millis() as u64),
                        "classified provider error"
                    );
                    let mut res = Response::from_parts(
                        parts,
                        ClassifiedBody::buffered(bytes, tail, trailers, error, remainder),
                    );
                    res.extensions_mut().insert(verdict);
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(res));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}
