//! The seam to a breaker state shared by several replicas: [`BreakerStore`]
//! (tower-ai-redis implements it on Redis).
//!
//! Without a store (the default) nothing here is touched: the breaker decides in-process
//! and its closed state stays one atomic load per call. With one, the closed state's path
//! is the same (the failure window stays per replica); the store is told when this
//! replica's breaker opens, asked for a probe permit when an open duration ends (so the
//! probes of all replicas stay within the configured number), told how each probe ended,
//! and pushes the states other replicas decided through a [`BreakerSink`].

use std::fmt;
use std::sync::Weak;
use std::time::Duration;

use tower_ai_core::keys::Key;

use crate::registry::Registry;

/// What the shared state says about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SharedState {
    /// Closed (or unknown to the store): the key's breaker closes here too.
    Closed,
    /// Open for this much longer (measured on the store's clock).
    Open(Duration),
    /// Half-open with every probe permit taken by the replicas: ask again after this long.
    Busy(Duration),
    /// Half-open, still probing (an answer to a probe's end that did not close it).
    HalfOpen,
    /// A probe permit for this replica.
    Granted,
    /// The store could not answer: the breaker decides in-process.
    Unavailable,
}

/// Where a [`BreakerStore`] hands its answers: the breakers of one layer. Cheap to clone;
/// holds the layer weakly (an answer for a dropped layer goes nowhere).
#[derive(Clone)]
pub struct BreakerSink {
    registry: Weak<Registry>,
}

impl fmt::Debug for BreakerSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerSink")
            .field("live", &(self.registry.strong_count() > 0))
            .finish()
    }
}

impl BreakerSink {
    pub(crate) fn new(registry: Weak<Registry>) -> Self {
        BreakerSink { registry }
    }

    /// Applies `state`, as the store found it, to `key`'s breaker (if the layer still
    /// tracks it). Never blocks on I/O; takes the breaker's lock for a few instructions.
    pub fn apply(&self, key: Key, state: SharedState) {
        if let Some(core) = self.registry.upgrade().and_then(|r| r.get(key)) {
            core.apply_shared(state, tokio::time::Instant::now());
        }
    }
}

/// A breaker state shared by several replicas, chosen with
/// [`CircuitBreakerBuilder::store`](crate::CircuitBreakerBuilder::store).
///
/// Every method returns at once: a store does its I/O on its own (e.g. in a task of the
/// runtime) and hands each answer to the [`BreakerSink`] it is given, with the key it was
/// asked about. Keys are named in the store by their **label** (`host/model` by default):
/// a [`Key`] is a hash seeded per process, the same key in another replica is another
/// number.
///
/// ```
/// use std::time::Duration;
/// use tower_ai_circuit_breaker::store::{BreakerSink, BreakerStore, SharedState};
/// use tower_ai_circuit_breaker::CircuitBreakerLayer;
/// use tower_ai_core::keys::Key;
///
/// /// Shares nothing: answers as a store that is down.
/// #[derive(Debug)]
/// struct Nowhere;
///
/// impl BreakerStore for Nowhere {
///     fn opened(&self, _: Key, _: &str, _: Duration, _: &BreakerSink) {}
///     fn probe(&self, key: Key, _: &str, _: u32, sink: &BreakerSink) {
///         sink.apply(key, SharedState::Unavailable);
///     }
///     fn probe_done(&self, key: Key, _: &str, _: bool, _: u32, sink: &BreakerSink) {
///         sink.apply(key, SharedState::Unavailable);
///     }
/// }
///
/// let layer = CircuitBreakerLayer::builder().store(Nowhere).build().unwrap();
/// # let _ = layer;
/// ```
pub trait BreakerStore: fmt::Debug + Send + Sync + 'static {
    /// This replica's breaker for `key` opened (its window tripped, or a probe failed):
    /// the shared state opens for `open_for` (extending, never shortening, an open
    /// state). Answers [`Open`](SharedState::Open) with what the store then holds, or
    /// [`Unavailable`](SharedState::Unavailable) when the opening could not be shared
    /// (the breaker then probes on its own permits when it ends: the store, which does
    /// not know of it, would call the key closed).
    fn opened(&self, key: Key, label: &str, open_for: Duration, sink: &BreakerSink);

    /// This replica's open duration for `key` ended: take one probe permit, if fewer than
    /// `max` are out across the replicas. Answers [`Granted`](SharedState::Granted),
    /// [`Busy`](SharedState::Busy), [`Open`](SharedState::Open) (another replica
    /// reopened it), [`Closed`](SharedState::Closed) (probes elsewhere closed it) or
    /// [`Unavailable`](SharedState::Unavailable) (the breaker then probes on its own
    /// permits).
    fn probe(&self, key: Key, label: &str, max: u32, sink: &BreakerSink);

    /// A probe on a permit from [`probe`](Self::probe) ended: `success`, or nothing
    /// learned (an ignored outcome, a dropped call: the permit is given back). `needed`
    /// successes across the replicas close the shared state. A failed probe is reported by
    /// [`opened`](Self::opened) instead. Answers [`Closed`](SharedState::Closed),
    /// [`HalfOpen`](SharedState::HalfOpen), [`Open`](SharedState::Open) or
    /// [`Unavailable`](SharedState::Unavailable).
    fn probe_done(&self, key: Key, label: &str, success: bool, needed: u32, sink: &BreakerSink);

    /// A breaker for `key` is tracked in this replica from now on: a store that reads
    /// the shared state by itself may push it through `sink`.
    fn track(&self, key: Key, label: &str, sink: &BreakerSink) {
        let _ = (key, label, sink);
    }

    /// `true` while the store cannot be reached and the breaker decides in-process.
    fn is_degraded(&self) -> bool {
        false
    }
}
