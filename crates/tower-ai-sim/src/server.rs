//! The simulator over real HTTP/1.1 (hyper 1) on a loopback port.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tower_service::Service;

use crate::service::SimService;

/// How long [`SimServer::shutdown`] lets open responses finish.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A running HTTP server for a [`Simulator`](crate::Simulator); see
/// [`Simulator::serve`](crate::Simulator::serve).
///
/// Dropping it stops the server at once (open connections are cut); use
/// [`shutdown`](Self::shutdown) to let responses in flight finish.
///
/// ```
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// use tower_ai_sim::{Scenario, Simulator};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let sim = Simulator::new(Scenario::default());
/// let server = sim.serve("127.0.0.1:0".parse()?).await?;
/// let mut tcp = tokio::net::TcpStream::connect(server.addr()).await?;
/// let body = r#"{"model":"claude-x","max_tokens":3,"messages":[{"role":"user","content":"Hi"}]}"#;
/// let request = format!(
///     "POST /v1/messages HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\n\
///      content-length: {}\r\nconnection: close\r\n\r\n{body}",
///     body.len()
/// );
/// tcp.write_all(request.as_bytes()).await?;
/// let mut response = String::new();
/// tcp.read_to_string(&mut response).await?;
/// assert!(response.starts_with("HTTP/1.1 200 OK"));
/// assert!(response.contains(r#""stop_reason":"max_tokens""#));
/// server.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub struct SimServer {
    addr: SocketAddr,
    stop: watch::Sender<Option<Duration>>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for SimServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SimServer {
    pub(crate) async fn start(service: SimService, addr: SocketAddr) -> io::Result<SimServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(None);
        let task = tokio::spawn(accept_loop(listener, service, stopped));
        Ok(SimServer {
            addr,
            stop,
            task: Some(task),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}` — a base URL for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop accepting, let responses in flight finish (up to
    /// [`DEFAULT_SHUTDOWN_GRACE`]), then cut what is left (e.g. stalls).
    pub async fn shutdown(self) {
        self.shutdown_with_grace(DEFAULT_SHUTDOWN_GRACE).await;
    }

    /// [`shutdown`](Self::shutdown) with a chosen grace period.
    pub async fn shutdown_with_grace(mut self, grace: Duration) {
        let _ = self.stop.send(Some(grace));
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    service: SimService,
    mut stopped: watch::Receiver<Option<Duration>>,
) {
    let mut conns = JoinSet::new();
    let grace = loop {
        tokio::select! {
            changed = stopped.changed() => {
                break match changed {
                    Ok(()) => (*stopped.borrow()).unwrap_or(Duration::ZERO),
                    Err(_) => Duration::ZERO,
                };
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    conns.spawn(serve_connection(stream, service.clone(), stopped.clone()));
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "tower-ai-sim: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    };
    drop(listener);
    let drained = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(grace, drained).await;
    conns.abort_all();
}

async fn serve_connection(
    stream: TcpStream,
    service: SimService,
    mut stopped: watch::Receiver<Option<Duration>>,
) {
    let _ = stream.set_nodelay(true);
    let svc = hyper::service::service_fn(move |req| {
        let mut s = service.clone();
        s.call(req)
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stopped.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
