use std::fmt;
use std::sync::Arc;

use tower_ai_core::keys::{Global, Key};
use tower_layer::Layer;

use crate::budget::{overflow_key, Budget, BudgetStats, KeySnapshot};
use crate::config::{Limits, TokenBudgetBuilder};
use crate::service::TokenBudget;

/// Applies [`TokenBudget`] to a service: see the [crate docs](crate).
///
/// The layer holds the budget's state in one `Arc`: every service it makes (and every clone
/// of them) shares one budget, as a provider's limits belong to one account. Build two
/// layers for two separate budgets.
pub struct TokenBudgetLayer<K = Global, L = ()> {
    budget: Arc<Budget>,
    key_fn: Arc<K>,
    listener: Arc<L>,
}

impl TokenBudgetLayer {
    /// A budget of `requests_per_minute` and `tokens_per_minute` for everything through
    /// the layer, waiting up to 10 s for a request to fit. Use [`builder`](Self::builder)
    /// for the rest.
    ///
    /// Infallible: a limit of zero is taken as 1, the strictest a limit can be (fail
    /// closed: a budget of nothing admits next to nothing), with a warning traced. The
    /// [`builder`](Self::builder) returns an error for a zero limit instead.
    pub fn new(requests_per_minute: u64, tokens_per_minute: u64) -> Self {
        if requests_per_minute == 0 || tokens_per_minute == 0 {
            tracing::warn!(
                requests_per_minute,
                tokens_per_minute,
                "TokenBudgetLayer::new: a zero limit is taken as 1"
            );
        }
        let built = TokenBudgetLayer::builder()
            .requests_per_minute(requests_per_minute.max(1))
            .tokens_per_minute(tokens_per_minute.max(1))
            .build();
        match built {
            Ok(layer) => layer,
            // Unreachable: two non-zero limits and defaults for the rest always build.
            Err(_) => TokenBudgetLayer::builder()
                .requests_per_minute(1)
                .build()
                .unwrap_or_else(|_| unreachable!("one non-zero limit builds")),
        }
    }

    /// A builder: limits in any combination, key function, wait or reject, prices,
    /// soft limit, listener.
    pub fn builder() -> TokenBudgetBuilder {
        TokenBudgetBuilder::default()
    }
}

impl<K, L> TokenBudgetLayer<K, L> {
    pub(crate) fn from_parts(limits: Arc<Limits>, key_fn: K, listener: L) -> Self {
        TokenBudgetLayer {
            budget: Budget::new(limits),
            key_fn: Arc::new(key_fn),
            listener: Arc::new(listener),
        }
    }

    #[cfg(test)]
    pub(crate) fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// What the budget holds for `key` (compute it with the layer's key function, e.g.
    /// `Global.key(&req)`), or `None` if the key is not held.
    pub fn snapshot(&self, key: Key) -> Option<KeySnapshot> {
        self.budget.key_state(key)
    }

    /// The number of keys the budget holds: at most `max_keys`, plus the overflow key.
    pub fn key_count(&self) -> usize {
        self.budget.key_count()
    }

    /// Keys, waiters, overflowed requests and the memory the keys take (see
    /// [`BudgetStats`]). Walks every key under the budget's lock: for monitoring and
    /// tests, not for every request.
    pub fn stats(&self) -> BudgetStats {
        self.budget.stats()
    }

    /// The key that new keys share while the map is full of keys with something to lose
    /// (pass it to [`snapshot`](Self::snapshot)). The same for every budget of a process.
    pub fn overflow_key(&self) -> Key {
        overflow_key()
    }
}

impl<K, L> Clone for TokenBudgetLayer<K, L> {
    fn clone(&self) -> Self {
        TokenBudgetLayer {
            budget: self.budget.clone(),
            key_fn: self.key_fn.clone(),
            listener: self.listener.clone(),
        }
    }
}

impl<K, L> fmt::Debug for TokenBudgetLayer<K, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBudgetLayer")
            .field("limits", &self.budget.limits)
            .finish_non_exhaustive()
    }
}

impl<S, K, L> Layer<S> for TokenBudgetLayer<K, L> {
    type Service = TokenBudget<S, K, L>;

    fn layer(&self, inner: S) -> TokenBudget<S, K, L> {
        TokenBudget::from_parts(
            inner,
            self.budget.clone(),
            self.key_fn.clone(),
            self.listener.clone(),
        )
    }
}
