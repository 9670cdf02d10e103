//! CircuitBreaker's metrics (feature `metrics`); names, types and labels in the README.
//!
//! `key` is the key's readable label (provider host and model by default), through the
//! layer's [`LabelCap`](tower_ai_core::meter::LabelCap): the first 64 distinct keys are
//! named, later ones are `other`. State changes and new keys are rare; the closed-state
//! call records nothing.

use ::metrics::{Key, Label};
use tower_ai_core::meter::{self, KeyTable, OTHER};

use crate::breaker::Core;
use crate::event::CircuitState;

const STATE: &str = "tower_ai.circuit_breaker.state";
const TRANSITIONS: &str = "tower_ai.circuit_breaker.transitions";

/// `tower_ai.circuit_breaker.rejected`: calls refused, by the state that refused them.
static REJECTED: KeyTable<1> = KeyTable::new(
    "tower_ai.circuit_breaker.rejected",
    [("state", &["open", "half_open", "forced_open", OTHER])],
);

fn key_label(core: &Core) -> ::metrics::SharedString {
    core.emitter().labels().label(&core.label)
}

fn state_gauge(key: &::metrics::SharedString, state: CircuitState) -> ::metrics::Gauge {
    let labels = vec![
        Label::new("key", key.clone()),
        Label::from_static_parts("state", state.as_str()),
    ];
    meter::gauge(&Key::from_parts(STATE, labels))
}

/// A new key, closed.
pub(crate) fn created(core: &Core) {
    state_gauge(&key_label(core), CircuitState::Closed).increment(1.0);
}

/// The registry forgot a key in `state`.
pub(crate) fn forgotten(core: &Core, state: CircuitState) {
    state_gauge(&key_label(core), state).decrement(1.0);
}

/// A key moved `from` → `to`; `tracked` unless the registry forgot it already.
pub(crate) fn transition(core: &Core, from: CircuitState, to: CircuitState, tracked: bool) {
    let key = key_label(core);
    if tracked {
        state_gauge(&key, from).decrement(1.0);
        state_gauge(&key, to).increment(1.0);
    }
    let labels = vec![
        Label::new("key", key),
        Label::from_static_parts("from", from.as_str()),
        Label::from_static_parts("to", to.as_str()),
    ];
    meter::counter(&Key::from_parts(TRANSITIONS, labels)).increment(1);
}

/// A call refused in `state`.
pub(crate) fn rejected(state: CircuitState) {
    REJECTED.counter([state.as_str()]).increment(1);
}

/// Describes the metrics to the installed recorder (units and help text).
pub(crate) fn describe() {
    use ::metrics::{describe_counter, describe_gauge, Unit};
    describe_gauge!(STATE, Unit::Count, "CircuitBreaker keys in each state, by key (1 or 0 for a named key; the count of keys folded into key=\"_OTHER\")");
    describe_counter!(
        TRANSITIONS,
        Unit::Count,
        "CircuitBreaker state changes, by key, from and to"
    );
    describe_counter!(
        REJECTED.name(),
        Unit::Count,
        "Calls a CircuitBreaker refused, by the state that refused them"
    );
}
