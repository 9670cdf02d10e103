//! The simulator handle and its `tower::Service`.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;
use tower_service::Service;

use crate::accounting::{CallRecord, Stats};
use crate::body::SimBody;
use crate::dialect::{self, BadRequest, ErrorCase};
use crate::engine::{Arrival, Inner};
use crate::scenario::Scenario;
use crate::server::SimServer;

/// A boxed error, as Tower stacks use at their edges.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One simulated provider: a scenario, its clock, its RNG and its call log.
///
/// Cheap to clone (an `Arc`); clones share everything. The simulator's
/// clock (its *t = 0*, from which windows, faults and outages are timed)
/// starts when `new` is called, on `tokio`'s clock: create it inside the
/// runtime that will drive it (for a paused-clock test, inside the test).
///
/// ```
/// use http_body_util::{BodyExt, Full};
/// use tower::ServiceExt;
/// use tower_ai_sim::{ModelSpec, Scenario, Simulator};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let sim = Simulator::new(
///     Scenario::builder().model(ModelSpec::new("gpt-4o").completion_tokens(5)).build()?,
/// );
/// let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi!"}]}"#;
/// let request = http::Request::post("/v1/chat/completions").body(Full::new(body.into()))?;
/// let response = sim.service().oneshot(request).await?;
/// assert_eq!(response.status(), 200);
/// let json: serde_json::Value =
///     serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
/// assert_eq!(json["usage"]["completion_tokens"], 5);
/// assert_eq!(sim.stats().successes, 1);
/// assert_eq!(sim.calls()[0].body_digest, tower_ai_sim::digest(body.as_bytes()));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("scenario", &self.inner.scenario)
            .field("elapsed", &self.elapsed())
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// A simulator following `scenario`; its clock starts now.
    pub fn new(scenario: Scenario) -> Self {
        Self::starting_at(scenario, Instant::now())
    }

    /// A simulator following `scenario` whose clock (its calls' times, its rate windows)
    /// started at `start` rather than now: its windows then line up with another clock's,
    /// e.g. a shared budget's windows on a Redis server's clock. Calls before `start` fall
    /// in its first window.
    pub fn starting_at(scenario: Scenario, start: Instant) -> Self {
        Simulator {
            inner: Arc::new(Inner::new(scenario, start)),
        }
    }

    /// An in-process `tower::Service` answering as the provider would.
    pub fn service(&self) -> SimService {
        SimService {
            inner: self.inner.clone(),
        }
    }

    /// Serve over real HTTP/1.1 on `addr` (use port 0 for any free port).
    ///
    /// # Errors
    ///
    /// When the address cannot be bound.
    pub async fn serve(&self, addr: SocketAddr) -> io::Result<SimServer> {
        SimServer::start(self.service(), addr).await
    }

    /// Every call received so far, in the order they were decided.
    ///
    /// All calls are kept (tests need them all); a long-running server can
    /// drop them with [`clear_calls`](Self::clear_calls).
    pub fn calls(&self) -> Vec<CallRecord> {
        self.inner.calls()
    }

    /// Counts over every call so far.
    pub fn stats(&self) -> Stats {
        self.inner.stats()
    }

    /// Forget the call log and the counts (limits, windows and quota are kept).
    pub fn clear_calls(&self) {
        self.inner.clear_calls();
    }

    /// Time since the simulator's start, on `tokio`'s clock.
    pub fn elapsed(&self) -> Duration {
        Instant::now().saturating_duration_since(self.inner.start)
    }

    /// The scenario it follows.
    pub fn scenario(&self) -> &Scenario {
        &self.inner.scenario
    }
}

/// The simulator as a `tower::Service<http::Request<B>>`; see [`Simulator::service`].
///
/// Always ready. The request is judged (limits, faults, outages) at the time
/// `call` is invoked; the response head is due `latency` later.
#[derive(Clone)]
pub struct SimService {
    inner: Arc<Inner>,
}

impl fmt::Debug for SimService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimService").finish_non_exhaustive()
    }
}

impl<B> Service<Request<B>> for SimService
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<SimBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> ResponseFuture {
        let inner = self.inner.clone();
        let at = Instant::now();
        ResponseFuture {
            inner: Box::pin(async move {
                let (parts, body) = req.into_parts();
                let route = dialect::route(&parts.method, &parts.uri, &parts.headers);
                let limit = inner.scenario.max_body_bytes;
                let body = match Limited::new(body, limit).collect().await {
                    Ok(collected) => Ok(collected.to_bytes()),
                    Err(e) if e.is::<LengthLimitError>() => Err(ErrorCase::BodyTooLarge { limit }),
                    Err(e) => Err(ErrorCase::BadRequest(BadRequest::InvalidJson(format!(
                        "error reading the request body: {e}"
                    )))),
                };
                let (due, response) = inner.respond(Arrival {
                    at,
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_owned(),
                    route,
                    body,
                });
                if due > Instant::now() {
                    tokio::time::sleep_until(due).await;
                }
                Ok(response)
            }),
        }
    }
}

/// The future of [`SimService::call`]: reads the body, decides, waits the
/// scenario's latency, then yields the response head. `Send`.
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<Response<SimBody>, BoxError>> + Send>>,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<SimBody>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
