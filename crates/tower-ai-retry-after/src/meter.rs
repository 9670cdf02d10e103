//! RetryAfterAware's metrics (feature `metrics`); names, types and labels in the README.

use std::time::Duration;

use tower_ai_core::meter::{KeyTable, OTHER};

/// `tower_ai.retry_after.cooldowns`: cooldowns learned from a provider's answer.
static COOLDOWNS: KeyTable<0> = KeyTable::new("tower_ai.retry_after.cooldowns", []);
/// `tower_ai.retry_after.wait`: how long a request was held for its key's cooldown, in
/// seconds (planned when it starts waiting).
static WAIT: KeyTable<0> = KeyTable::new("tower_ai.retry_after.wait", []);
/// `tower_ai.retry_after.refusals`: requests refused with `CoolingDown`, by reason.
static REFUSALS: KeyTable<1> = KeyTable::new(
    "tower_ai.retry_after.refusals",
    [(
        "reason",
        &[
            "fail_fast",
            "wait_too_long",
            "past_deadline",
            "fallback_available",
            "waiters_full",
            "gave_up_waiting",
            OTHER,
        ],
    )],
);
/// `tower_ai.retry_after.keys_cooling`: keys whose cooldown has not ended.
static KEYS_COOLING: KeyTable<0> = KeyTable::new("tower_ai.retry_after.keys_cooling", []);

pub(crate) fn learned() {
    COOLDOWNS.counter([]).increment(1);
}

pub(crate) fn waits(wait: Duration) {
    WAIT.histogram([]).record(wait.as_secs_f64());
}

pub(crate) fn refused(reason: &'static str) {
    REFUSALS.counter([reason]).increment(1);
}

pub(crate) fn keys_cooling(n: usize) {
    KEYS_COOLING.gauge([]).set(n as f64);
}

/// Describes the metrics to the installed recorder (units and help text).
pub(crate) fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(COOLDOWNS.name(), Unit::Count, "Cooldowns RetryAfterAware learned from providers' answers (Retry-After, exhausted rate-limit buckets)");
    describe_histogram!(
        WAIT.name(),
        Unit::Seconds,
        "How long RetryAfterAware held a request for its key's cooldown"
    );
    describe_counter!(
        REFUSALS.name(),
        Unit::Count,
        "Requests RetryAfterAware refused (CoolingDown), by reason"
    );
    describe_gauge!(KEYS_COOLING.name(), Unit::Count, "Keys whose cooldown has not ended (refreshed at most once a second when a cooldown is learned, and by RetryAfterAwareLayer::cooling)");
}
