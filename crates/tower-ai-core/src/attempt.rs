//! One cap on upstream calls per logical request, shared by every layer that sends.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::facts::Facts;

/// A cap on the upstream calls one logical request may make, across every route of a
/// fallback chain and every retry on each route.
///
/// ModelFallback (crate `tower-ai-fallback`) creates one per request (when its chain's
/// `share_budget` is on, the default) and puts a handle in the extensions of every request
/// it sends ([`attach`](AttemptBudget::attach)); clones of that request (a retry layer's
/// copies) share the same counter.
///
/// # The protocol for layers below (AiRetry)
///
/// - ModelFallback takes one unit with [`try_acquire`](AttemptBudget::try_acquire)
///   before it sends to a route, and sets [`reserved`](AttemptBudget::reserved) to the
///   number of later routes that could still serve.
/// - A retry layer reads the budget with [`AttemptBudget::of`] and, **before each retry**
///   (not before the first attempt, which ModelFallback already paid for), calls
///   [`try_acquire_retry`](AttemptBudget::try_acquire_retry). It succeeds only while more
///   units remain than are reserved for later routes; when it fails, the retry layer gives
///   up on this route at once (its usual "retries exhausted" outcome), and ModelFallback
///   moves on.
/// - A retry layer should also not *wait* on a refusal from below (`CircuitOpen`,
///   `CoolingDown`) while [`has_fallback`](AttemptBudget::has_fallback) is true: it
///   returns the refusal, and ModelFallback sends to the next route at once.
///
/// So 3 retries × 4 routes cannot multiply into 12 calls: with a cap of 6, the first route
/// gets at most 3 calls (3 units stay reserved for the other routes), and every later route
/// gets at least one.
///
/// ```
/// use tower_ai_core::AttemptBudget;
/// let budget = AttemptBudget::new(4);
/// assert!(budget.try_acquire());          // route 1, first attempt
/// budget.set_reserved(1);                  // one more route can serve
/// assert!(budget.try_acquire_retry());     // route 1, retry (2 left)
/// assert!(budget.try_acquire_retry());     // route 1, retry (1 left)
/// assert!(!budget.try_acquire_retry());    // the last unit is route 2's
/// budget.set_reserved(0);
/// assert!(budget.try_acquire());           // route 2
/// assert_eq!(budget.remaining(), 0);
/// ```
#[derive(Clone)]
pub struct AttemptBudget {
    inner: Arc<Counters>,
}

struct Counters {
    remaining: AtomicU32,
    reserved: AtomicU32,
}

impl AttemptBudget {
    /// A budget of `max_calls` upstream calls.
    pub fn new(max_calls: u32) -> Self {
        AttemptBudget {
            inner: Arc::new(Counters {
                remaining: AtomicU32::new(max_calls),
                reserved: AtomicU32::new(0),
            }),
        }
    }

    /// The budget a request carries in its extensions, if any: an `AttemptBudget` there,
    /// else the one [`attach`](AttemptBudget::attach) put on it.
    pub fn of<B>(req: &http::Request<B>) -> Option<&AttemptBudget> {
        AttemptBudget::in_extensions(req.extensions())
    }

    /// [`of`](AttemptBudget::of), from a request's extensions.
    #[inline]
    pub(crate) fn in_extensions(ext: &http::Extensions) -> Option<&AttemptBudget> {
        if let Some(facts) = Facts::alone(ext) {
            return facts.budget.as_ref();
        }
        match ext.get::<AttemptBudget>() {
            Some(b) => Some(b),
            None => Facts::of(ext)?.budget.as_ref(),
        }
    }

    /// Puts a handle to this budget on `req`, in place of any budget it carried, for
    /// [`of`](AttemptBudget::of) to find (and every copy of `req` to share). Unless `req`
    /// carries an `AttemptBudget` of its own in its extensions (then that one is replaced),
    /// the handle goes into the slot the stack's layers share for their per-call facts,
    /// with the request's [`Deadline`](crate::Deadline): no allocation of its own.
    ///
    /// ```
    /// use tower_ai_core::AttemptBudget;
    /// let mut req = http::Request::new(());
    /// let budget = AttemptBudget::new(2);
    /// budget.attach(&mut req);
    /// assert!(AttemptBudget::of(&req).unwrap().try_acquire());
    /// assert_eq!(budget.remaining(), 1);
    /// ```
    pub fn attach<B>(&self, req: &mut http::Request<B>) {
        let ext = req.extensions_mut();
        if let Some(facts) = Facts::alone_mut(ext) {
            facts.budget = Some(self.clone());
            return;
        }
        match ext.get_mut::<AttemptBudget>() {
            Some(b) => b.clone_from(self),
            None => Facts::get_or_insert(ext).budget = Some(self.clone()),
        }
    }

    /// Takes one unit for a route's first attempt (ignores the reservation).
    pub fn try_acquire(&self) -> bool {
        self.take(0)
    }

    /// Takes one unit for a retry, only if more units remain than are reserved for later
    /// routes.
    pub fn try_acquire_retry(&self) -> bool {
        self.take(self.inner.reserved.load(Ordering::Acquire))
    }

    /// Hands back one unit taken by [`try_acquire`](AttemptBudget::try_acquire) or
    /// [`try_acquire_retry`](AttemptBudget::try_acquire_retry) for a call that was then
    /// not made (another limit refused it). Call it only for a unit you took.
    pub fn release(&self) {
        // Saturating: a stray release cannot wrap the counter.
        let _ = self
            .inner
            .remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_add(1));
    }

    fn take(&self, keep: u32) -> bool {
        self.inner
            .remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                (r > keep).then(|| r - 1)
            })
            .is_ok()
    }

    /// Units left.
    pub fn remaining(&self) -> u32 {
        self.inner.remaining.load(Ordering::Acquire)
    }

    /// Units kept back for later routes (retries may not take them).
    pub fn reserved(&self) -> u32 {
        self.inner.reserved.load(Ordering::Acquire)
    }

    /// Whether a later route of the chain could still serve this request (units are
    /// reserved for it). A layer below that would *wait* (a retry sleeping on a
    /// `CircuitOpen { until }` or `CoolingDown { until }` refusal) should return at once
    /// instead when this is true, so that ModelFallback moves on without spending time.
    pub fn has_fallback(&self) -> bool {
        self.reserved() > 0
    }

    /// Sets how many units retries must leave for later routes.
    pub fn set_reserved(&self, units: u32) {
        self.inner.reserved.store(units, Ordering::Release);
    }
}

impl fmt::Debug for AttemptBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttemptBudget")
            .field("remaining", &self.remaining())
            .field("reserved", &self.reserved())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_leave_the_reserve() {
        let b = AttemptBudget::new(6);
        let shared = b.clone();
        assert!(b.try_acquire());
        assert!(!b.has_fallback());
        b.set_reserved(3);
        assert!(shared.has_fallback());
        let mut retries = 0;
        while shared.try_acquire_retry() {
            retries += 1;
        }
        assert_eq!(retries, 2, "6 - 1 first - 3 reserved");
        for left in (0..3).rev() {
            b.set_reserved(left);
            assert!(b.try_acquire());
        }
        assert!(!b.try_acquire());
        assert!(!b.try_acquire_retry());
        assert_eq!(b.remaining(), 0);
    }

    #[test]
    fn zero_budget_refuses() {
        let b = AttemptBudget::new(0);
        assert!(!b.try_acquire());
        let mut req = http::Request::new(());
        assert!(AttemptBudget::of(&req).is_none());
        req.extensions_mut().insert(b);
        assert_eq!(AttemptBudget::of(&req).unwrap().remaining(), 0);
    }
}
