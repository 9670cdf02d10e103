//! What the budget reports: events for a listener, and `tracing` events.

use std::time::Duration;

use tower_ai_core::keys::Key;
use tower_ai_core::BudgetLimit;

/// Something the budget did that a caller may want to see.
///
/// Events carry the budget [`Key`] (a salted hash, never a secret); errors carry the key's
/// readable label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BudgetEvent {
    /// An admitted request took `limit` past the soft-limit threshold.
    SoftLimit {
        /// The budget key.
        key: Key,
        /// Which limit.
        limit: BudgetLimit,
        /// What the window now holds (requests, tokens, or nano-units of money).
        used: u64,
        /// The limit.
        max: u64,
    },
    /// A request does not fit now and waits.
    Waiting {
        /// The budget key.
        key: Key,
        /// The limit it waits for.
        limit: BudgetLimit,
    },
    /// A request that waited was admitted.
    Admitted {
        /// The budget key.
        key: Key,
        /// How long it waited.
        waited: Duration,
    },
    /// A request was refused with `BudgetExceeded`.
    Rejected {
        /// The budget key.
        key: Key,
        /// The limit that refused it.
        limit: BudgetLimit,
        /// When it would fit (`None`: never).
        retry_after: Option<Duration>,
    },
}

/// Receives [`BudgetEvent`]s. Implemented for `()` (no listener, the default: costs
/// nothing) and for every `Fn(&BudgetEvent) + Send + Sync + 'static`.
///
/// Called synchronously, outside the budget's lock; keep it short.
pub trait BudgetListener: Send + Sync + 'static {
    /// One event.
    fn on_event(&self, event: &BudgetEvent);
}

impl BudgetListener for () {
    #[inline]
    fn on_event(&self, _: &BudgetEvent) {}
}

impl<F> BudgetListener for F
where
    F: Fn(&BudgetEvent) + Send + Sync + 'static,
{
    fn on_event(&self, event: &BudgetEvent) {
        self(event)
    }
}

/// Sends an event to `tracing` and to the listener (a panicking listener is contained).
pub(crate) fn emit<L: BudgetListener + ?Sized>(listener: &L, event: BudgetEvent) {
    match event {
        BudgetEvent::SoftLimit {
            key,
            limit,
            used,
            max,
        } => tracing::warn!(
            budget.key = key.as_u64(),
            budget.limit = %limit,
            budget.used = used,
            budget.max = max,
            "token budget past its soft limit"
        ),
        BudgetEvent::Waiting { key, limit } => tracing::debug!(
            budget.key = key.as_u64(),
            budget.limit = %limit,
            "request waits for the token budget"
        ),
        BudgetEvent::Admitted { key, waited } => tracing::debug!(
            budget.key = key.as_u64(),
            budget.waited_ms = waited.as_millis() as u64,
            "request admitted after waiting"
        ),
        BudgetEvent::Rejected {
            key,
            limit,
            retry_after,
        } => tracing::info!(
            budget.key = key.as_u64(),
            budget.limit = %limit,
            budget.retry_after_ms = retry_after.map(|d| d.as_millis() as u64),
            error.type = "budget_exceeded",
            "request refused by the token budget"
        ),
    }
    #[cfg(feature = "metrics")]
    match event {
        BudgetEvent::SoftLimit { limit, .. } => crate::meter::soft_limit(limit),
        BudgetEvent::Waiting { limit, .. } => crate::meter::queued(limit),
        BudgetEvent::Admitted { waited, .. } => crate::meter::admitted(Some(waited)),
        BudgetEvent::Rejected { limit, .. } => crate::meter::refused(limit),
    }
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| listener.on_event(&event)));
}
