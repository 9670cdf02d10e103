//! The seam to a shared cooldown state: [`CooldownStore`], so that the replicas of a
//! service hold each other's cooldowns (tower-ai-redis implements it on Redis).
//!
//! Without a store (the default) the layer keeps its cooldowns in-process and never
//! touches this module: the no-store path reads one `Option` field that is `None`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// What the shared state says about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SharedCooldown {
    /// No shared cooldown for the key: send.
    Clear,
    /// The key cools down for this much longer (measured by the store's own clock, so
    /// replicas' clocks need not agree).
    Cooling(Duration),
    /// The store could not be asked (down, slow, or skipped after an outage): the layer
    /// decides in-process, as it would without a store.
    Unavailable,
}

/// A boxed future of a store's answer.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The answer to [`CooldownStore::check`]: known now, or after a round trip.
#[non_exhaustive]
pub enum Check {
    /// Known without a round trip (a local copy of the shared state).
    Now(SharedCooldown),
    /// Known once the future resolves (a round trip to the store, bounded by its timeout).
    Later(StoreFuture<SharedCooldown>),
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Now(c) => f.debug_tuple("Now").field(c).finish(),
            Check::Later(_) => f.write_str("Later(..)"),
        }
    }
}

/// A cooldown state shared by several replicas, chosen with
/// [`CooldownConfigBuilder::store`](crate::CooldownConfigBuilder::store).
///
/// Keys are named by their **label** (the key function's, e.g. `api.openai.com/gpt-4o`
/// for [`HostModel`](tower_ai_core::keys::HostModel)): a [`Key`](tower_ai_core::keys::Key)
/// is a hash seeded per process, so it is not the same in two replicas. A key function
/// whose label is not stable across processes shares nothing: `ApiKeyHash` and
/// `ApiKeyHostModel` are stable only when every replica is given the same seed with
/// [`set_seed`](tower_ai_core::keys::set_seed).
///
/// The layer still keeps every cooldown in-process: a cooldown learned from the store is
/// kept until its end, so a key known to be cooling costs no round trip. The store is
/// asked only about keys the local state lets go.
///
/// ```
/// use std::time::Duration;
/// use tower_ai_retry_after::store::{Check, CooldownStore, SharedCooldown, StoreFuture};
///
/// /// Shares nothing: what a store answers while it is down.
/// #[derive(Debug)]
/// struct Nowhere;
///
/// impl CooldownStore for Nowhere {
///     fn consult(&self) -> bool {
///         false
///     }
///     fn check(&self, _label: &str) -> Check {
///         Check::Now(SharedCooldown::Unavailable)
///     }
///     fn publish(&self, _label: &str, _wait: Duration) -> Option<StoreFuture<()>> {
///         None
///     }
/// }
///
/// let layer = tower_ai_retry_after::RetryAfterAwareLayer::builder()
///     .store(Nowhere)
///     .build()
///     .unwrap();
/// # let _ = layer;
/// ```
pub trait CooldownStore: fmt::Debug + Send + Sync + 'static {
    /// Whether a request the local state lets go must [`check`](Self::check) the shared
    /// state now. A store asked on every admission answers `true`; one that keeps a local
    /// copy, `true` only while the copy holds a cooldown.
    fn consult(&self) -> bool;

    /// The shared state of the key labelled `label`.
    fn check(&self, label: &str) -> Check;

    /// Shares a cooldown learned here: the key labelled `label` cools down for `wait`
    /// from now (the store extends, never shortens, a cooldown it holds). The response
    /// that taught it is handed to the caller once the future resolves, so that every
    /// replica holds the key by then; `None` when there is nothing to wait for.
    fn publish(&self, label: &str, wait: Duration) -> Option<StoreFuture<()>>;

    /// `true` while the store cannot be reached and the layer decides in-process.
    fn is_degraded(&self) -> bool {
        false
    }
}
