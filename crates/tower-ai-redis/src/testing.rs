//! A throwaway `redis-server` for tests and examples: started on a free loopback port with
//! no persistence, stopped when dropped.
//!
//! ```no_run
//! # async fn demo() {
//! use tower_ai_redis::testing::RedisServer;
//!
//! let Some(server) = RedisServer::start_or_skip("my test") else { return };
//! let store = server.store();
//! # }
//! ```

use std::io::{self, BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::{RedisStore, StoreError};

/// A `redis-server` process of this test's own, killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    binary: PathBuf,
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port (`--save "" --appendonly no`) and waits
    /// until it logs that it accepts connections.
    ///
    /// When no `redis-server` can be found: returns `None` after printing why, so a local
    /// test run without Redis skips the test; but panics when the environment variable
    /// `CI` is `true`, so CI cannot pass without having run it.
    pub fn start_or_skip(test: &str) -> Option<Self> {
        match Self::start() {
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

    /// Starts `redis-server` (from `$REDIS_SERVER`, or `redis-server` on the `PATH`).
    pub fn start() -> io::Result<Self> {
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
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let ready = child.stdout.take().map(ready_signal);
        self.child = Some(child);
        match ready.map(|r| r.recv_timeout(Duration::from_secs(10))) {
            Some(Ok(())) => Ok(()),
            _ => {
                // Exited (a port taken, say) or not ready in time.
                self.kill();
                Err(io::Error::other("redis-server did not get ready"))
            }
        }
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

    /// `SCRIPT FLUSH`: the server forgets every script loaded, as after a restart.
    pub async fn script_flush(&self) -> redis::RedisResult<()> {
        self.admin(redis::cmd("SCRIPT").arg("FLUSH")).await
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

/// A signal sent once the server logs that it accepts connections (its stdout is read to
/// its end by a thread of its own, so the server never blocks on a full pipe); dropped
/// without a signal when the server exits first.
fn ready_signal(stdout: std::process::ChildStdout) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line.contains("Ready to accept connections") {
                let _ = tx.send(());
            }
        }
    });
    rx
}
