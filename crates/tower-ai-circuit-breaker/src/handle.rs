//! [`CircuitBreakerHandle`]: read and steer a layer's breakers.

use std::fmt;
use std::sync::Arc;

use http::Request;
use tokio::time::Instant;
use tower_ai_core::keys::{cap_label, HostModel, Key, KeyFn};

use crate::breaker::Metrics;
use crate::event::CircuitState;
use crate::registry::Registry;

/// Reads each key's state and metrics, and forces breakers open or closed.
///
/// From [`CircuitBreakerLayer::handle`](crate::CircuitBreakerLayer::handle); cheap to
/// clone, `Send + Sync`. Keys come from the layer's key function: [`key_of`](Self::key_of)
/// derives one from a request, and the `*_for` methods take the request directly.
///
/// **For ModelFallback**: [`is_open`](Self::is_open) / [`is_open_for`](Self::is_open_for)
/// say whether a call sent now would be refused, without sending it and without taking a
/// half-open permit, so a router can skip that route at once.
pub struct CircuitBreakerHandle<K = HostModel> {
    registry: Arc<Registry>,
    key_fn: Arc<K>,
}

impl<K> Clone for CircuitBreakerHandle<K> {
    fn clone(&self) -> Self {
        CircuitBreakerHandle {
            registry: self.registry.clone(),
            key_fn: self.key_fn.clone(),
        }
    }
}

impl<K> fmt::Debug for CircuitBreakerHandle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerHandle")
            .field("keys", &self.registry.len())
            .finish_non_exhaustive()
    }
}

impl<K> CircuitBreakerHandle<K> {
    pub(crate) fn new(registry: Arc<Registry>, key_fn: Arc<K>) -> Self {
        CircuitBreakerHandle { registry, key_fn }
    }

    /// `key`'s state (`Closed` for a key not tracked: it would be admitted and measured).
    ///
    /// An open breaker whose duration has ended reads `Open` until the next call moves
    /// it to half-open; [`is_open`](Self::is_open) accounts for that.
    pub fn state(&self, key: Key) -> CircuitState {
        self.registry
            .get(key)
            .map_or(CircuitState::Closed, |c| c.state())
    }

    /// Whether a call for `key` sent now would be refused: open and not yet due to
    /// probe, forced open, or half-open with every probe permit taken.
    pub fn is_open(&self, key: Key) -> bool {
        self.registry
            .get(key)
            .is_some_and(|c| !c.would_admit(Instant::now()))
    }

    /// `key`'s metrics, if it is tracked.
    pub fn metrics(&self, key: Key) -> Option<Metrics> {
        self.registry.get(key).map(|c| c.metrics(Instant::now()))
    }

    /// The metrics of every tracked key: a snapshot of every key's state, label, open
    /// deadline and counts, for a health endpoint.
    pub fn all_metrics(&self) -> Vec<Metrics> {
        let now = Instant::now();
        self.registry.all().iter().map(|c| c.metrics(now)).collect()
    }

    /// Every state change of this layer's breakers from now on
    /// ([`CircuitEvent::StateChanged`](crate::CircuitEvent::StateChanged); rejections are not sent), to as many subscribers
    /// as ask, each with its own receiver, at run time (the builder's
    /// [`listener`](crate::CircuitBreakerBuilder::listener) is fixed when the layer is
    /// built).
    ///
    /// A `tokio::sync::broadcast` channel of [`SUBSCRIBER_CAPACITY`](crate::SUBSCRIBER_CAPACITY)
    /// events, made by the first subscription (a layer nobody subscribes to pays one
    /// atomic load per state change): a receiver that falls further behind misses the
    /// oldest events and reads `RecvError::Lagged(n)` once, then goes on. Sending never
    /// waits for a receiver.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tower_ai_circuit_breaker::{CircuitBreakerLayer, CircuitEvent, CircuitState};
    /// use tower_ai_core::keys::Key;
    ///
    /// let layer = CircuitBreakerLayer::new();
    /// let handle = layer.handle();
    /// let mut events = handle.subscribe();
    /// handle.force_open(Key::of("api.openai.com/gpt-4o"));
    /// match events.recv().await.unwrap() {
    ///     CircuitEvent::StateChanged { to, .. } => assert_eq!(to, CircuitState::ForcedOpen),
    ///     other => panic!("{other:?}"),
    /// }
    /// # }
    /// ```
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::CircuitEvent> {
        self.registry.emitter.subscribe()
    }

    /// `true` while the layer's shared [store](crate::store::BreakerStore) cannot be
    /// reached and the breakers decide in-process (always `false` without a store).
    pub fn is_degraded(&self) -> bool {
        self.registry
            .cfg
            .store
            .as_deref()
            .is_some_and(|s| s.is_degraded())
    }

    /// How many keys are tracked.
    pub fn key_count(&self) -> usize {
        self.registry.len()
    }

    /// Refuse every call for `key` until [`reset`](Self::reset) or
    /// [`force_closed`](Self::force_closed). A forced key is never evicted.
    pub fn force_open(&self, key: Key) {
        self.force(key, CircuitState::ForcedOpen, || key.to_string());
    }

    /// Admit every call for `key` and measure none, until [`reset`](Self::reset) or
    /// [`force_open`](Self::force_open).
    pub fn force_closed(&self, key: Key) {
        self.force(key, CircuitState::ForcedClosed, || key.to_string());
    }

    /// Back to closed with an empty window and the open duration back at its base.
    pub fn reset(&self, key: Key) {
        if let Some(c) = self.registry.get(key) {
            c.force(CircuitState::Closed, Instant::now());
        }
    }

    /// [`reset`](Self::reset) every tracked key.
    pub fn reset_all(&self) {
        let now = Instant::now();
        for c in self.registry.all() {
            c.force(CircuitState::Closed, now);
        }
    }

    /// Stops tracking `key` (it starts again closed and empty). True if it was tracked.
    pub fn forget(&self, key: Key) -> bool {
        self.registry.remove(key)
    }

    fn force(&self, key: Key, to: CircuitState, label: impl FnOnce() -> String) {
        if let Some(c) = self.registry.get_or_insert(key, label) {
            c.force(to, Instant::now());
        }
    }

    /// The key of `req`, as the layer derives it.
    pub fn key_of<B>(&self, req: &Request<B>) -> Option<Key>
    where
        K: KeyFn<B>,
    {
        self.key_fn.key(req)
    }

    /// [`state`](Self::state) of `req`'s key (`Closed` for a request without one).
    pub fn state_for<B>(&self, req: &Request<B>) -> CircuitState
    where
        K: KeyFn<B>,
    {
        self.key_of(req)
            .map_or(CircuitState::Closed, |k| self.state(k))
    }

    /// [`is_open`](Self::is_open) for `req`'s key.
    pub fn is_open_for<B>(&self, req: &Request<B>) -> bool
    where
        K: KeyFn<B>,
    {
        self.key_of(req).is_some_and(|k| self.is_open(k))
    }

    /// [`force_open`](Self::force_open) for `req`'s key, labelled by the key function.
    pub fn force_open_for<B>(&self, req: &Request<B>)
    where
        K: KeyFn<B>,
    {
        if let Some(k) = self.key_of(req) {
            self.force(k, CircuitState::ForcedOpen, || {
                cap_label(self.key_fn.label(req))
            });
        }
    }

    /// [`force_closed`](Self::force_closed) for `req`'s key, labelled by the key function.
    pub fn force_closed_for<B>(&self, req: &Request<B>)
    where
        K: KeyFn<B>,
    {
        if let Some(k) = self.key_of(req) {
            self.force(k, CircuitState::ForcedClosed, || {
                cap_label(self.key_fn.label(req))
            });
        }
    }
}
