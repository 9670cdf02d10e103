//! The seam to a shared store: a budget whose limits hold across several replicas of a
//! service (e.g. `tower-ai-redis`'s `RedisBudget`), chosen at build time with
//! [`TokenBudgetBuilder::store`](crate::TokenBudgetBuilder::store).
//!
//! Without a store (the default) nothing here is on any path: the in-process budget decides
//! as before, with the same instructions. With a store, the layer still estimates each
//! request (tokens, money) and reads its usage from the response exactly as in-process; the
//! store decides admission and is told what each request really cost when its body ends.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tower_ai_core::keys::Key;
use tower_ai_core::BudgetLimit;

/// The limits a budget holds, as a [`BudgetStore`] sees them. Money is in nano-units
/// (1e-9) of the price table's currency, as the budget counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreLimits {
    /// Requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Tokens per minute.
    pub tokens_per_minute: Option<u64>,
    /// Requests in flight at once.
    pub max_concurrent: Option<u32>,
    /// Money per hour, in nano-units.
    pub spend_per_hour: Option<u64>,
    /// Money per day, in nano-units.
    pub spend_per_day: Option<u64>,
    /// Whether the layer waits for a refused request to fit (`Some(max_wait)`) or refuses
    /// it at once (`None`).
    pub max_wait: Option<Duration>,
}

/// One request to admit.
pub struct StoreRequest<'a> {
    /// The request's key in this process (seeded per process: not a name to share).
    pub key: Key,
    /// Tokens reserved: input estimate + maximum output (0 when no token limit is set).
    pub tokens: u64,
    /// Money reserved, in nano-units (0 when no spend cap is set).
    pub spend: u64,
    label: &'a (dyn Fn() -> String + 'a),
}

impl<'a> StoreRequest<'a> {
    /// A request of `key`, reserving `tokens` and `spend`; `label` names the key the same
    /// way in every replica (the key function's label), called only when the store needs
    /// the name.
    pub fn new(key: Key, tokens: u64, spend: u64, label: &'a (dyn Fn() -> String + 'a)) -> Self {
        StoreRequest {
            key,
            tokens,
            spend,
            label,
        }
    }

    /// The key's name, the same in every replica (the key function's label).
    pub fn label(&self) -> String {
        (self.label)()
    }
}

impl fmt::Debug for StoreRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreRequest")
            .field("key", &self.key)
            .field("tokens", &self.tokens)
            .field("spend", &self.spend)
            .finish_non_exhaustive()
    }
}

/// What an admitted request holds in the store until it is settled: what it reserved and
/// whatever the store needs to settle it (its own words; no allocation needed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLease {
    /// The request's key in this process.
    pub key: Key,
    /// Tokens reserved.
    pub tokens: u64,
    /// Money reserved, in nano-units.
    pub spend: u64,
    /// The key's shared name, if the store needs it to settle (an empty `String` does not
    /// allocate).
    pub name: String,
    /// The store's own words (window indices, a semaphore member, a local/remote flag).
    pub state: [u64; 3],
}

/// What a request really cost, given to [`BudgetStore::settle`]: its usage when the
/// response said it, its reservation when it did not, nothing when the call failed (the
/// request still counts against the request limit, as in-process).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Spent {
    /// Tokens used.
    pub tokens: u64,
    /// Money spent, in nano-units.
    pub spend: u64,
}

impl Spent {
    /// `tokens` and `spend` (nano-units).
    pub fn new(tokens: u64, spend: u64) -> Self {
        Spent { tokens, spend }
    }
}

/// A store's verdict on a request.
#[derive(Debug)]
pub enum StoreDecision {
    /// Admitted: settle the lease when the request ends.
    Admitted(StoreLease),
    /// Refused for `limit`; `retry_after` says when it may fit (`None`: never, the
    /// request is larger than the limit).
    Refused {
        /// The limit that refused it.
        limit: BudgetLimit,
        /// When it may fit.
        retry_after: Option<Duration>,
    },
}

/// A verdict now, or a round trip to wait for.
pub enum StoreAdmit {
    /// Decided without waiting (a cached denial, a lease spent locally, a fall-back).
    Ready(StoreDecision),
    /// Decided by a round trip.
    Pending(Pin<Box<dyn Future<Output = StoreDecision> + Send>>),
}

impl fmt::Debug for StoreAdmit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreAdmit::Ready(d) => f.debug_tuple("Ready").field(d).finish(),
            StoreAdmit::Pending(_) => f.write_str("Pending"),
        }
    }
}

/// Where a budget's shared state lives: decides admissions and takes settlements for
/// every limit of a [`TokenBudget`](crate::TokenBudget) built with
/// [`store`](crate::TokenBudgetBuilder::store).
///
/// The store owns every decision, its fall-back included: when its backend is
/// unreachable it decides itself (in-process, or refusing), so the layer never waits on
/// anything but the future it returns. [`admit`](Self::admit) returns a ready verdict
/// when it needs no round trip, so a store that decides locally most of the time (a lease,
/// a cached denial) costs no allocation; a round trip is a boxed future, whose allocation
/// is small beside the trip itself and keeps the layer's types free of a store parameter.
pub trait BudgetStore: Send + Sync + 'static {
    /// Admits `request` under `limits`, or refuses it.
    fn admit(&self, limits: &StoreLimits, request: &StoreRequest<'_>) -> StoreAdmit;

    /// Settles an admitted request: replaces its reservation with what it `spent` and
    /// gives back its place in flight. Called once per lease, from a response body's end
    /// or drop (so it must not block: a store sends it in the background).
    fn settle(&self, limits: &StoreLimits, lease: StoreLease, spent: Spent);
}

impl<T: BudgetStore + ?Sized> BudgetStore for std::sync::Arc<T> {
    fn admit(&self, limits: &StoreLimits, request: &StoreRequest<'_>) -> StoreAdmit {
        (**self).admit(limits, request)
    }
    fn settle(&self, limits: &StoreLimits, lease: StoreLease, spent: Spent) {
        (**self).settle(limits, lease, spent)
    }
}

/// A budget's store, with the limits it is asked about.
#[derive(Clone)]
pub(crate) struct Stored {
    pub(crate) store: std::sync::Arc<dyn BudgetStore>,
    pub(crate) limits: StoreLimits,
}

impl fmt::Debug for Stored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stored")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}
