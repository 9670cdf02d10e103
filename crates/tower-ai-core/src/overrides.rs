//! Per-request overrides: what a caller knows better than a layer's configuration, put in
//! the request's extensions. This is the one place they are listed.
//!
//! | extension | read by | what it changes, for this request only |
//! |---|---|---|
//! | [`Deadline`](crate::Deadline) | every layer (see its docs) | when the caller stops waiting: AiRetry never waits past it, TokenBudget and RetryAfterAware refuse at once what they cannot admit before it, ModelFallback does not start a route it leaves too little time for, StallDetector's total deadline is the earlier of its own and it |
//! | [`StallDeadlines`] | StallDetector | its deadlines (head, first byte, first content, idle, total): e.g. a longer total for an answer with a large `max_tokens` |
//! | [`RetryLimits`] | AiRetry | its most attempts (the first included), within the layer's bounds (1 to 100) |
//! | [`BudgetKey`] | TokenBudget (or any keyed layer) whose key function is wrapped in [`WithOverride`] | the key the request is counted under |
//!
//! Each is set by the program (a handler, a middleware), never by the network: a gateway
//! that let a client choose its budget key or its stall deadlines from a header would let
//! it out of its limits. A [`Deadline`](crate::Deadline) from the caller's own timeout
//! headers is the exception: [`DeadlineLayer`](crate::DeadlineLayer) reads them, and a
//! caller can only shorten its wait with them.
//!
//! ```
//! use std::time::Duration;
//! use http::Request;
//! use tower_ai_core::keys::Key;
//! use tower_ai_core::overrides::{BudgetKey, RetryLimits, StallDeadlines};
//!
//! let mut req = Request::post("https://api.openai.com/v1/chat/completions")
//!     .body(r#"{"model":"gpt-4o","max_tokens":16000,"messages":[]}"#)
//!     .unwrap();
//! // A long answer: 40 minutes in all instead of the layer's 20.
//! req.extensions_mut().insert(StallDeadlines::new().total(Duration::from_secs(40 * 60)));
//! // An interactive call that would rather fail fast: no retry.
//! req.extensions_mut().insert(RetryLimits::new().max_attempts(1));
//! // Counted under the tenant's budget, whatever the key function would say.
//! req.extensions_mut().insert(BudgetKey(Key::of("tenant-42")));
//! ```

use std::time::Duration;

use http::Request;

use crate::keys::{Key, KeyFn};

/// StallDetector's deadlines for one request (each `None`: the layer's own). A zero
/// duration is ignored (the layer's own stays), as the layer's builder refuses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StallDeadlines {
    /// The head deadline (both streamed and non-streamed requests).
    pub head: Option<Duration>,
    /// From the head to the first body byte.
    pub first_byte: Option<Duration>,
    /// From the head to the first content event.
    pub first_content: Option<Duration>,
    /// The longest gap between chunks once content started.
    pub idle: Option<Duration>,
    /// The whole exchange (still cut by the request's `Deadline`).
    pub total: Option<Duration>,
}

impl StallDeadlines {
    /// No override: every deadline the layer's own.
    pub fn new() -> Self {
        StallDeadlines::default()
    }
    /// The head deadline.
    pub fn head(mut self, d: Duration) -> Self {
        self.head = Some(d);
        self
    }
    /// The first-byte deadline.
    pub fn first_byte(mut self, d: Duration) -> Self {
        self.first_byte = Some(d);
        self
    }
    /// The first-content deadline.
    pub fn first_content(mut self, d: Duration) -> Self {
        self.first_content = Some(d);
        self
    }
    /// The idle deadline.
    pub fn idle(mut self, d: Duration) -> Self {
        self.idle = Some(d);
        self
    }
    /// The total deadline.
    pub fn total(mut self, d: Duration) -> Self {
        self.total = Some(d);
        self
    }
    /// The override `req` carries, if any: one extensions lookup.
    #[inline]
    pub fn of<B>(req: &Request<B>) -> Option<&StallDeadlines> {
        req.extensions().get::<StallDeadlines>()
    }
}

/// AiRetry's limits for one request (`None`: the layer's own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryLimits {
    /// The most attempts, the first included; clamped to 1..=100 as the layer's own.
    pub max_attempts: Option<u32>,
}

impl RetryLimits {
    /// No override.
    pub fn new() -> Self {
        RetryLimits::default()
    }
    /// The most attempts, the first included (1: no retry).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }
    /// The override `req` carries, if any: one extensions lookup.
    #[inline]
    pub fn of<B>(req: &Request<B>) -> Option<&RetryLimits> {
        req.extensions().get::<RetryLimits>()
    }
}

/// The key a request is counted under by a keyed layer whose key function is wrapped in
/// [`WithOverride`] (TokenBudget's, typically), instead of what the key function says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BudgetKey(pub Key);

/// A key function that takes the request's [`BudgetKey`] when it carries one, and asks
/// the wrapped key function otherwise. Opt-in, so that layers which do not use it pay no
/// extensions lookup.
///
/// ```
/// use tower_ai_core::keys::ApiKeyHash;
/// use tower_ai_core::overrides::WithOverride;
/// # fn budget<K>(_k: K) {}
/// // TokenBudgetLayer::builder().key_fn(WithOverride(ApiKeyHash))
/// budget(WithOverride(ApiKeyHash));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct WithOverride<K>(pub K);

impl<B, K: KeyFn<B>> KeyFn<B> for WithOverride<K> {
    fn key(&self, req: &Request<B>) -> Option<Key> {
        match req.extensions().get::<BudgetKey>() {
            Some(k) => Some(k.0),
            None => self.0.key(req),
        }
    }

    fn label(&self, req: &Request<B>) -> String {
        match req.extensions().get::<BudgetKey>() {
            Some(k) => k.0.to_string(),
            None => self.0.label(req),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Global;

    #[test]
    fn a_budget_key_in_the_extensions_wins_over_the_key_function() {
        let mut req = Request::new(());
        let global = Global.key(&req);
        assert_eq!(WithOverride(Global).key(&req), global);
        let tenant = Key::of("tenant");
        req.extensions_mut().insert(BudgetKey(tenant));
        assert_eq!(WithOverride(Global).key(&req), Some(tenant));
        assert_eq!(WithOverride(Global).label(&req), tenant.to_string());
    }
}
