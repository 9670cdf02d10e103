//! A throwaway `redis-server` for tests and examples: started on a free loopback port with
//! no persistence, stopped when dropped; and (feature `cluster`) a throwaway Redis Cluster
//! of three of them, `RedisCluster`.
//!
//! ```no_run
//! # async fn demo() {
//! use tower_ai_redis::testing::RedisServer;
//!
//! let Some(server) = RedisServer::start_or_skip("my test") else { return };
//! let store = server.store();
//! # }
//! ```

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::{RedisStore, StoreError};

#[cfg(feature = "cluster")]
mod cluster;
#[cfg(feature = "cluster")]
pub use cluster::RedisCluster;

/// A `redis-server` process of this test's own, killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    binary: PathBuf,
    /// Arguments after the port and the persistence settings (a cluster node's).
    extra: Vec<OsString>,
    /// A signal per log line of [`EVENTS`]: the first is "ready"; a cluster node's next
    /// is its cluster's state turning ok.
    events: Option<mpsc::Receiver<()>>,
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port (`--save "" --appendonly no`) and waits
    /// until it logs that it accepts connections.
    ///
    /// When no `redis-server` can be found: returns `None` after printing why, so a local
    /// test run without Redis skips the test; but panics when the environment variable
    /// `CI` is `true`, so CI cannot pass without having run it.
    pub fn start_or_skip(test: &str) -> Option<Self> {
        or_skip(test, Self::start())
    }

    /// Starts `redis-server` (from `$REDIS_SERVER`, or `redis-server` on the `PATH`).
    pub fn start() -> io::Result<Self> {
        Self::start_with(|_| Ok(Vec::new()))
    }

    /// Starts a server with the extra arguments `extra(port)` gives.
    fn start_with(extra: impl Fn(u16) -> io::Result<Vec<OsString>>) -> io::Result<Self> {
        let binary = std::env::var_os("REDIS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("redis-server"));
        let mut last = io::Error::other("no attempt");
        // A free port can be taken by someone else between our probe and the server's bind:
        // try a few.
        for _ in 0..5 {
            let port = free_port()?;
            let mut server = Self {
                child: None,
                port,
                binary: binary.clone(),
                extra: extra(port)?,
                events: None,
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn spawn(&mut self) -> io::Result<()> {
        let mut child = Command::new(&self.binary)
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let events = child.stdout.take().map(log_events);
        self.child = Some(child);
        self.events = events;
        match self.next_event(Duration::from_secs(10)) {
            true => Ok(()),
            false => {
                // Exited (a port taken, say) or not ready in time.
                self.kill();
                Err(io::Error::other("redis-server did not get ready"))
            }
        }
    }

    /// Waits up to `wait` for the server's next log line of [`EVENTS`]; `false` when it
    /// did not come (or the server exited).
    fn next_event(&self, wait: Duration) -> bool {
        self.events
            .as_ref()
            .is_some_and(|e| e.recv_timeout(wait).is_ok())
    }

    /// The server's URL, `redis://127.0.0.1:{port}/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A [`RedisStore`] on this server for tests that are not about Redis being slow: its
    /// response timeout is [`TEST_RESPONSE_TIMEOUT`](Self::TEST_RESPONSE_TIMEOUT), not the
    /// default 20 ms, so a test machine busy with other tests does not turn a slow answer
    /// into an outage. A test of outages builds its store with the settings it tests
    /// (`RedisStore::builder()…build(server.client())`).
    pub fn store(&self) -> RedisStore {
        RedisStore::builder()
            .response_timeout(Self::TEST_RESPONSE_TIMEOUT)
            .build(self.client())
    }

    /// The response timeout of [`store`](Self::store)'s stores: 1 s.
    pub const TEST_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

    /// A [`RedisStore`] on this server with the default settings.
    pub fn try_store(&self) -> Result<RedisStore, StoreError> {
        RedisStore::open(&self.url())
    }

    /// A plain client, for a test's own commands (`CLIENT PAUSE`, `SCRIPT FLUSH`, …).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("a client for a local server")
    }

    /// `CLIENT PAUSE {pause} ALL`: the server answers no client for `pause`, as a stalled
    /// server would (its connections stay open).
    pub async fn pause_clients(&self, pause: Duration) -> redis::RedisResult<()> {
        self.admin(
            redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(pause.as_millis() as u64)
                .arg("ALL"),
        )
        .await
    }

    /// The time until this server's clock (`TIME`) next crosses a multiple of `window`:
    /// a test waits it out to start at the beginning of a fixed window the scripts count
    /// on Redis's clock. Zero when the server cannot be asked.
    pub async fn to_next_window(&self, window: Duration) -> Duration {
        let Ok(mut conn) = self.client().get_multiplexed_async_connection().await else {
            return Duration::ZERO;
        };
        let Ok((secs, micros)) = redis::cmd("TIME")
            .query_async::<(u64, u64)>(&mut conn)
            .await
        else {
            return Duration::ZERO;
        };
        let now_us = secs * 1_000_000 + micros;
        let w = window.as_micros().max(1) as u64;
        Duration::from_micros(w - now_us % w)
    }

    /// When this server's clock (`TIME`) last crossed a multiple of `window`, on this
    /// process's tokio clock: the middle of the fastest of five `TIME` round trips, less
    /// the server's time into its window (off by at most half that round trip). A
    /// simulator started then (tower-ai-sim's `Simulator::starting_at`) counts the
    /// windows the scripts count. `None` when the server cannot be asked.
    pub async fn window_started(&self, window: Duration) -> Option<tokio::time::Instant> {
        let mut conn = self
            .client()
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        let w = window.as_micros().max(1) as u64;
        let mut best: Option<(Duration, tokio::time::Instant)> = None;
        for _ in 0..5 {
            let sent = tokio::time::Instant::now();
            let (secs, micros) = redis::cmd("TIME")
                .query_async::<(u64, u64)>(&mut conn)
                .await
                .ok()?;
            let took = sent.elapsed();
            let into = Duration::from_micros((secs * 1_000_000 + micros) % w);
            let started = (sent + took / 2).checked_sub(into)?;
            if best.is_none_or(|(t, _)| took < t) {
                best = Some((took, started));
            }
        }
        best.map(|(_, started)| started)
    }

    /// `SCRIPT FLUSH`: the server forgets every script loaded, as after a restart.
    pub async fn script_flush(&self) -> redis::RedisResult<()> {
        self.admin(redis::cmd("SCRIPT").arg("FLUSH")).await
    }

    /// One command on a blocking connection of its own (the harness's set-up).
    #[cfg(feature = "cluster")]
    fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> io::Result<T> {
        const WAIT: Duration = Duration::from_secs(5);
        let mut conn = self
            .client()
            .get_connection_with_timeout(WAIT)
            .map_err(io::Error::other)?;
        conn.set_read_timeout(Some(WAIT))
            .map_err(io::Error::other)?;
        cmd.query(&mut conn).map_err(io::Error::other)
    }

    /// [`query`](Self::query) for a command answered `OK`.
    #[cfg(feature = "cluster")]
    fn command(&self, cmd: &redis::Cmd) -> io::Result<()> {
        self.query(cmd)
    }

    /// One command on a connection of its own.
    async fn admin(&self, cmd: &redis::Cmd) -> redis::RedisResult<()> {
        let mut conn = self.client().get_multiplexed_async_connection().await?;
        cmd.query_async(&mut conn).await
    }

    /// Kills the server (as a crash would: no shutdown, nothing saved).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty, after [`kill`](Self::kill).
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        // The killed server's socket is closed with it, and redis-server binds with
        // SO_REUSEADDR: the port is free at once; a second try covers a port taken since.
        self.spawn().or_else(|_| self.spawn())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The log lines a server's [`log_events`] signal: it accepts connections; (a cluster
/// node) every slot of its cluster is served.
const EVENTS: [&str; 2] = ["Ready to accept connections", "Cluster state changed: ok"];

/// A signal sent for each log line of [`EVENTS`] (the server's stdout is read to its end by
/// a thread of its own, so the server never blocks on a full pipe); the channel closes when
/// the server exits.
fn log_events(stdout: std::process::ChildStdout) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if EVENTS.iter().any(|e| line.contains(e)) {
                let _ = tx.send(());
            }
        }
    });
    rx
}

/// `Some` when started; `None` after printing why not, or a panic when `CI` is `true`.
fn or_skip<T>(test: &str, started: io::Result<T>) -> Option<T> {
    match started {
        Ok(server) => Some(server),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: redis-server is needed in CI and could not start: {e}")
        }
        Err(e) => {
            eprintln!("skipping {test}: redis-server could not start ({e}); install Debian's redis-server to run it");
            None
        }
    }
}

/// The Redis window (the index of the budget's fixed window, on Redis's clock) a request
/// admitted by a leased [`RedisBudget`](crate::RedisBudget) was counted in; `None` for a
/// lease made otherwise (strict mode, or decided in-process while Redis was away). A test
/// counts admissions per window with it: leased mode's chunks of one window never add up
/// to more than its limit.
pub fn leased_window(lease: &tower_ai_budget::StoreLease) -> Option<u64> {
    crate::budget::leased_window(lease)
}
