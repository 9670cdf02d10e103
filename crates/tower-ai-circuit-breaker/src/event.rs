//! What the breaker tells a listener: state changes and rejections.

use std::fmt;
use std::sync::Arc;

use tokio::time::Instant;
use tower_ai_core::keys::Key;

/// A breaker's state for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CircuitState {
    /// Calls pass and are measured.
    Closed,
    /// Calls are rejected until the open duration ends.
    Open,
    /// A bounded number of probe calls pass; the rest are rejected.
    HalfOpen,
    /// Forced open by the handle: every call is rejected until reset.
    ForcedOpen,
    /// Forced closed by the handle: every call passes, nothing is measured, until reset.
    ForcedClosed,
}

impl CircuitState {
    /// A short snake_case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
            CircuitState::ForcedOpen => "forced_open",
            CircuitState::ForcedClosed => "forced_closed",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the state changed.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum TransitionReason {
    /// Failures reached the configured rate of the window's `calls`.
    FailureRate {
        /// The measured rate.
        rate: f64,
        /// Calls in the window.
        calls: u64,
    },
    /// Slow calls reached the configured rate of the window's `calls`.
    SlowCallRate {
        /// The measured rate.
        rate: f64,
        /// Calls in the window.
        calls: u64,
    },
    /// This many failures in a row.
    ConsecutiveFailures(u32),
    /// The open duration ended: probing begins.
    OpenElapsed,
    /// A probe failed (or was slow).
    ProbeFailed,
    /// Enough probes succeeded.
    ProbesSucceeded,
    /// The handle forced it.
    Forced,
    /// The handle reset it.
    Reset,
    /// Another replica decided it, through the layer's shared
    /// [store](crate::store::BreakerStore): opened there, or closed by probes there.
    Shared,
}

/// Something a breaker did, as a [`Listener`] sees it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum CircuitEvent {
    /// A key's breaker changed state.
    StateChanged {
        /// The key.
        key: Key,
        /// Its readable label (provider host and model by default; never a secret).
        label: Arc<str>,
        /// The state before.
        from: CircuitState,
        /// The state now.
        to: CircuitState,
        /// Why.
        reason: TransitionReason,
        /// When.
        at: Instant,
        /// For [`Open`](CircuitState::Open): when probing may begin.
        until: Option<Instant>,
    },
    /// A call was refused without reaching the inner service.
    Rejected {
        /// The key.
        key: Key,
        /// Its label.
        label: Arc<str>,
        /// The state that refused it.
        state: CircuitState,
        /// When the breaker expects to admit a call again.
        until: Instant,
    },
}

/// Receives a breaker's [`CircuitEvent`]s.
///
/// Implemented for `()` (the default: nothing happens) and for every
/// `Fn(&CircuitEvent) + Send + Sync + 'static`. Called outside any lock, on the task whose
/// call caused the event; a panic in a listener is caught and logged, never propagated.
/// Events are rare (state changes, rejections); the closed-state path emits none.
pub trait Listener: Send + Sync + 'static {
    /// One event.
    fn on_event(&self, event: &CircuitEvent);
}

impl Listener for () {
    fn on_event(&self, _: &CircuitEvent) {}
}

impl<F> Listener for F
where
    F: Fn(&CircuitEvent) + Send + Sync + 'static,
{
    fn on_event(&self, event: &CircuitEvent) {
        self(event)
    }
}

/// How many state changes a [`subscribe`](crate::CircuitBreakerHandle::subscribe)r may
/// fall behind before it misses the oldest (it then reads
/// [`RecvError::Lagged`](tokio::sync::broadcast::error::RecvError::Lagged)).
pub const SUBSCRIBER_CAPACITY: usize = 256;

/// Where a breaker's events go: the listener fixed at build time (behind the panic
/// guard), the run-time subscribers (a broadcast channel made by the first
/// subscription), and the layer's metrics. One pointer per breaker.
#[derive(Clone)]
pub(crate) struct Emitter(Arc<Sinks>);

struct Sinks {
    listener: Box<dyn Listener>,
    live: std::sync::OnceLock<tokio::sync::broadcast::Sender<CircuitEvent>>,
    #[cfg(feature = "metrics")]
    labels: tower_ai_core::meter::LabelCap,
}

impl Emitter {
    pub(crate) fn new<L: Listener>(l: L) -> Self {
        Emitter(Arc::new(Sinks {
            listener: Box::new(l),
            live: std::sync::OnceLock::new(),
            #[cfg(feature = "metrics")]
            labels: tower_ai_core::meter::LabelCap::new(),
        }))
    }

    pub(crate) fn emit(&self, event: &CircuitEvent) {
        let l = &self.0.listener;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| l.on_event(event))).is_err() {
            tracing::error!("circuit breaker listener panicked; event dropped");
        }
        if let (CircuitEvent::StateChanged { .. }, Some(tx)) = (event, self.0.live.get()) {
            // No receiver left is no error: the next subscriber starts from now.
            let _ = tx.send(event.clone());
        }
    }

    /// A new receiver of the state changes from now on.
    pub(crate) fn subscribe(&self) -> tokio::sync::broadcast::Receiver<CircuitEvent> {
        self.0
            .live
            .get_or_init(|| tokio::sync::broadcast::channel(SUBSCRIBER_CAPACITY).0)
            .subscribe()
    }

    /// The layer's cap on key label values (feature `metrics`).
    #[cfg(feature = "metrics")]
    pub(crate) fn labels(&self) -> &tower_ai_core::meter::LabelCap {
        &self.0.labels
    }
}

impl fmt::Debug for Emitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Listener")
    }
}
