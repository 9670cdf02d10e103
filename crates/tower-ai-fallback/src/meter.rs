//! ModelFallback's metrics (feature `metrics`); names, types and labels in the README.
//!
//! `route` is a route's name from the chain (configured by the user, so bounded by the
//! chain's length); its keys are made when the chain is built.

use ::metrics::{Key, Label};
use tower_ai_core::meter::{self, KeyTable, OTHER};

const SERVED: &str = "tower_ai.fallback.served";

/// Values of `trigger`: the failure's error type, `skipped` (the route's skip predicate,
/// an open circuit), `attempt_budget` (no attempt left for the route), or `deadline` (the
/// request's deadline too near to start the route).
const TRIGGERS: &[&str] = &[
    "rate_limited",
    "quota_exhausted",
    "overloaded",
    "server_error",
    "timeout",
    "connection",
    "stalled",
    "context_length_exceeded",
    "content_filtered",
    "request_too_large",
    "unauthorized",
    "forbidden",
    "not_found",
    "bad_request",
    "unknown",
    "skipped",
    "attempt_budget",
    "deadline",
    OTHER,
];

/// `tower_ai.fallback.fallbacks`: moves from a route to a later one, by what caused them.
static FALLBACKS: KeyTable<1> =
    KeyTable::new("tower_ai.fallback.fallbacks", [("trigger", TRIGGERS)]);
/// `tower_ai.fallback.exhausted`: calls no route could serve.
static EXHAUSTED: KeyTable<0> = KeyTable::new("tower_ai.fallback.exhausted", []);

/// The `served` key of each route, by position in the chain.
pub(crate) fn served_keys<'a>(names: impl Iterator<Item = &'a str>) -> Box<[Key]> {
    names
        .map(|name| Key::from_parts(SERVED, vec![Label::new("route", name.to_owned())]))
        .collect()
}

/// Route `key` answered.
#[inline]
pub(crate) fn served(key: Option<&Key>) {
    if let Some(key) = key {
        meter::counter(key).increment(1);
    }
}

/// The chain moved on after `trigger`.
pub(crate) fn fallback(trigger: &str) {
    FALLBACKS.counter([trigger]).increment(1);
}

/// Every route failed.
pub(crate) fn exhausted() {
    EXHAUSTED.counter([]).increment(1);
}

/// Describes the metrics to the installed recorder (units and help text).
pub(crate) fn describe() {
    use ::metrics::{describe_counter, Unit};
    describe_counter!(
        SERVED,
        Unit::Count,
        "Answers ModelFallback returned, by the route that served them"
    );
    describe_counter!(FALLBACKS.name(), Unit::Count, "Times ModelFallback moved on to a later route, by trigger (the failure's error type, skipped or attempt_budget)");
    describe_counter!(
        EXHAUSTED.name(),
        Unit::Count,
        "Calls no ModelFallback route could serve"
    );
}
