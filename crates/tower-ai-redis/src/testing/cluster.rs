//! [`RedisCluster`]: three throwaway `redis-server` primaries joined into a Redis Cluster.

use std::cell::Cell;
use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::{free_port, or_skip, RedisServer};
use crate::RedisStore;

/// A Redis Cluster of three primaries (no replicas) of this test's own: `redis-server`
/// processes on free loopback ports with `--cluster-enabled yes`, no persistence and their
/// cluster configuration files in a directory of their own, the 16,384 slots split in
/// three ranges ([`SLOTS`](Self::SLOTS)), joined by `CLUSTER MEET`. Every node is killed
/// and the directory removed when it is dropped.
///
/// ```no_run
/// # async fn demo() {
/// use tower_ai_redis::testing::RedisCluster;
///
/// let Some(cluster) = RedisCluster::start_or_skip("my test") else { return };
/// let store = cluster.store();
/// # }
/// ```
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// The cluster bus port of each node.
    bus: Vec<u16>,
    dir: PathBuf,
}

impl RedisCluster {
    /// The slots of each node, first and last: node `i` serves `SLOTS[i]`.
    pub const SLOTS: [(u16, u16); 3] = [(0, 5460), (5461, 10922), (10923, 16383)];

    /// How long [`start`](Self::start) waits for the cluster to serve every slot.
    const READY: Duration = Duration::from_secs(20);

    /// Starts the cluster, as [`start`](Self::start); when it cannot: returns `None` after
    /// printing why, so a local test run without Redis skips the test; but panics when the
    /// environment variable `CI` is `true`, so CI cannot pass without having run it.
    pub fn start_or_skip(test: &str) -> Option<Self> {
        or_skip(test, Self::start())
    }

    /// Starts three nodes (`redis-server` from `$REDIS_SERVER`, or on the `PATH`; Redis 7 or
    /// later), gives each its range of slots (`CLUSTER ADDSLOTSRANGE`), joins them
    /// (`CLUSTER MEET`) and waits until every node logs that its cluster's state is ok,
    /// then checks that `CLUSTER INFO` says `cluster_state:ok` on each.
    pub fn start() -> io::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "tower-ai-redis-cluster-{}-{:016x}",
            std::process::id(),
            crate::store::fastrand_u64()
        ));
        std::fs::create_dir_all(&dir)?;
        // From here on, a failure drops `cluster`: its nodes are killed, `dir` removed.
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            bus: Vec::new(),
            dir,
        };
        for _ in Self::SLOTS {
            let bus = Cell::new(0);
            let node = RedisServer::start_with(|port| {
                bus.set(free_port()?);
                let config = cluster.dir.join(format!("nodes-{port}.conf"));
                Ok(vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    config.into(),
                    "--cluster-port".into(),
                    bus.get().to_string().into(),
                    "--dir".into(),
                    OsString::from(cluster.dir.as_os_str()),
                ])
            })?;
            cluster.nodes.push(node);
            cluster.bus.push(bus.get());
        }
        for (node, (first, last)) in cluster.nodes.iter().zip(Self::SLOTS) {
            node.command(
                redis::cmd("CLUSTER")
                    .arg("ADDSLOTSRANGE")
                    .arg(first)
                    .arg(last),
            )?;
        }
        let first = &cluster.nodes[0];
        for (node, bus) in cluster.nodes.iter().zip(&cluster.bus).skip(1) {
            first.command(
                redis::cmd("CLUSTER")
                    .arg("MEET")
                    .arg("127.0.0.1")
                    .arg(node.port())
                    .arg(*bus),
            )?;
        }
        for node in &cluster.nodes {
            if !node.next_event(Self::READY) {
                return Err(io::Error::other(format!(
                    "the cluster's node on port {} did not say its state is ok within {:?}",
                    node.port(),
                    Self::READY
                )));
            }
            let info: String = node.query(redis::cmd("CLUSTER").arg("INFO"))?;
            if !info.contains("cluster_state:ok") {
                return Err(io::Error::other(format!(
                    "CLUSTER INFO of the node on port {}: {info}",
                    node.port()
                )));
            }
        }
        Ok(cluster)
    }

    /// The nodes' URLs, `redis://127.0.0.1:{port}/`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Node `i` (of [`SLOTS`](Self::SLOTS)'s order), e.g. for a command of its own or to
    /// read the keys it holds. Panics past the third.
    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    /// The node that serves `key`'s slot (Redis's own `CLUSTER KEYSLOT`, asked of a live
    /// node).
    pub fn node_of(&self, key: &str) -> io::Result<usize> {
        let mut last = io::Error::other("no node alive");
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            match node.query::<u16>(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)) {
                Ok(slot) => {
                    return Ok(Self::SLOTS
                        .iter()
                        .position(|&(first, last)| (first..=last).contains(&slot))
                        .unwrap_or(0))
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// A cluster client of the nodes, with [`RedisStore::CLUSTER_RETRIES`] retries.
    pub fn client(&self) -> redis::cluster::ClusterClient {
        redis::cluster::ClusterClient::builder(self.urls())
            .retries(RedisStore::CLUSTER_RETRIES)
            .build()
            .expect("a cluster client for local nodes")
    }

    /// A [`RedisStore`] on this cluster for tests that are not about slowness: its response
    /// timeout is [`RedisServer::TEST_RESPONSE_TIMEOUT`] (see [`RedisServer::store`]).
    pub fn store(&self) -> RedisStore {
        RedisStore::builder()
            .response_timeout(RedisServer::TEST_RESPONSE_TIMEOUT)
            .build_cluster(self.client())
    }

    /// Kills node `i` (as a crash would). The others go on serving their slots until the
    /// cluster marks it failed (after its node timeout, 15 s by default), and then refuse
    /// every command (`CLUSTERDOWN`: no replica takes the dead node's slots over).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again after [`kill`](Self::kill), on the same ports and with the
    /// same cluster configuration file: it comes back with its identity and its slots
    /// (empty of keys).
    pub fn restart(&mut self, i: usize) -> io::Result<()> {
        self.nodes[i].restart()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
