//! AiRetry's metrics (feature `metrics`); names, types and labels in the README.

use tower_ai_core::meter::{KeyTable, ERROR_TYPES, OTHER};

/// Values of `wait_source`: the provider's header or field, a layer's "not before"
/// (`until`), or the backoff.
const WAIT_SOURCES: &[&str] = &[
    "retry-after-ms",
    "retry-after",
    "retry-after-date",
    "x-ms-retry-after-ms",
    "x-amz-retry-after",
    "retry-info",
    "message",
    "ratelimit",
    "until",
    "backoff",
    OTHER,
];

/// Values of `outcome`: `success`, or the [`StopReason`](crate::StopReason) that ended it.
const OUTCOMES: &[&str] = &[
    "success",
    "not_retryable",
    "max_attempts",
    "deadline",
    "request_deadline",
    "budget",
    "wait_too_long",
    "not_replayable",
    "attempt_budget",
    "fallback_available",
    OTHER,
];

const BOOLS: &[&str] = &["false", "true"];

/// `tower_ai.retry.calls`: calls that ended, by outcome and whether any retry was made.
static CALLS: KeyTable<2> = KeyTable::new(
    "tower_ai.retry.calls",
    [("outcome", OUTCOMES), ("retried", BOOLS)],
);
/// `tower_ai.retry.attempts`: attempts sent (the first included), counted when the call ends.
static ATTEMPTS: KeyTable<0> = KeyTable::new("tower_ai.retry.attempts", []);
/// `tower_ai.retry.retries`: retries planned, by the error that caused them and the
/// source of the wait before them.
static RETRIES: KeyTable<2> = KeyTable::new(
    "tower_ai.retry.retries",
    [("error_type", ERROR_TYPES), ("wait_source", WAIT_SOURCES)],
);
/// `tower_ai.retry.wait`: the wait before each retry, in seconds.
static WAIT: KeyTable<1> = KeyTable::new("tower_ai.retry.wait", [("wait_source", WAIT_SOURCES)]);

/// A call succeeded after `attempts` attempts: [`ended`] with `success`, by index (the
/// path every successful call takes: no label compared).
pub(crate) fn succeeded(attempts: u32) {
    CALLS
        .counter_at([0, usize::from(attempts > 1)])
        .increment(1);
    ATTEMPTS.counter_at([]).increment(u64::from(attempts));
}

/// A call ended after `attempts` attempts with `outcome`.
pub(crate) fn ended(outcome: &str, attempts: u32) {
    CALLS
        .counter([outcome, BOOLS[usize::from(attempts > 1)]])
        .increment(1);
    ATTEMPTS.counter([]).increment(u64::from(attempts));
}

/// A retry after `error_type`, waiting `wait` from `source`.
pub(crate) fn retry(error_type: &str, source: &str, wait: std::time::Duration) {
    RETRIES.counter([error_type, source]).increment(1);
    WAIT.histogram([source]).record(wait.as_secs_f64());
}

/// Describes the metrics to the installed recorder (units and help text).
pub(crate) fn describe() {
    use ::metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(CALLS.name(), Unit::Count, "AiRetry calls that ended, by outcome (success or why retrying stopped) and whether a retry was made");
    describe_counter!(
        ATTEMPTS.name(),
        Unit::Count,
        "Attempts AiRetry sent, the first of each call included"
    );
    describe_counter!(
        RETRIES.name(),
        Unit::Count,
        "Retries AiRetry made, by the error type that caused them and where the wait came from"
    );
    describe_histogram!(
        WAIT.name(),
        Unit::Seconds,
        "How long AiRetry waited before a retry, by where the wait came from"
    );
}
