//! TokenBudget's metrics (feature `metrics`); names, types and labels in the README.

use std::time::Duration;

use tower_ai_core::meter::{KeyTable, OTHER};
use tower_ai_core::BudgetLimit;

/// Values of `limit`: the budget's dimensions.
const LIMITS: &[&str] = &[
    "requests_per_minute",
    "tokens_per_minute",
    "concurrency",
    "spend_per_hour",
    "spend_per_day",
    OTHER,
];

const BOOLS: &[&str] = &["false", "true"];

fn limit_name(limit: BudgetLimit) -> &'static str {
    match limit {
        BudgetLimit::RequestsPerMinute => "requests_per_minute",
        BudgetLimit::TokensPerMinute => "tokens_per_minute",
        BudgetLimit::Concurrency => "concurrency",
        BudgetLimit::SpendPerHour => "spend_per_hour",
        BudgetLimit::SpendPerDay => "spend_per_day",
        _ => OTHER,
    }
}

/// `tower_ai.budget.admitted`: requests admitted, by whether they waited first.
static ADMITTED: KeyTable<1> = KeyTable::new("tower_ai.budget.admitted", [("waited", BOOLS)]);
/// `tower_ai.budget.queued`: requests that did not fit and joined the queue, by the
/// limit they wait for.
static QUEUED: KeyTable<1> = KeyTable::new("tower_ai.budget.queued", [("limit", LIMITS)]);
/// `tower_ai.budget.refused`: requests refused with `BudgetExceeded`, by limit.
static REFUSED: KeyTable<1> = KeyTable::new("tower_ai.budget.refused", [("limit", LIMITS)]);
/// `tower_ai.budget.soft_limit`: admitted requests that took a limit past its soft threshold.
static SOFT: KeyTable<1> = KeyTable::new("tower_ai.budget.soft_limit", [("limit", LIMITS)]);
/// `tower_ai.budget.queue_wait`: how long an admitted request waited, in seconds.
static QUEUE_WAIT: KeyTable<0> = KeyTable::new("tower_ai.budget.queue_wait", []);
/// `tower_ai.budget.tokens`: tokens reserved before the call and settled after it.
static TOKENS: KeyTable<1> = KeyTable::new(
    "tower_ai.budget.tokens",
    [("stage", &["reserved", "settled"])],
);
/// `tower_ai.budget.spend`: money settled, in nano-units of the prices' currency.
static SPEND: KeyTable<0> = KeyTable::new("tower_ai.budget.spend", []);

/// Admitted at once (`waited` false) or after a wait.
#[inline]
pub(crate) fn admitted(waited: Option<Duration>) {
    ADMITTED
        .counter([BOOLS[usize::from(waited.is_some())]])
        .increment(1);
    if let Some(w) = waited {
        QUEUE_WAIT.histogram([]).record(w.as_secs_f64());
    }
}

pub(crate) fn queued(limit: BudgetLimit) {
    QUEUED.counter([limit_name(limit)]).increment(1);
}

pub(crate) fn refused(limit: BudgetLimit) {
    REFUSED.counter([limit_name(limit)]).increment(1);
}

pub(crate) fn soft_limit(limit: BudgetLimit) {
    SOFT.counter([limit_name(limit)]).increment(1);
}

/// A reservation ended: `reserved` tokens held, `settled` counted, `spend` nano-units.
pub(crate) fn settled(reserved: u64, settled: u64, spend: u64) {
    TOKENS.counter(["reserved"]).increment(reserved);
    TOKENS.counter(["settled"]).increment(settled);
    if spend > 0 {
        SPEND.counter([]).increment(spend);
    }
}

/// Describes the metrics to the installed recorder (units and help text).
pub(crate) fn describe() {
    use ::metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(
        ADMITTED.name(),
        Unit::Count,
        "Requests TokenBudget admitted, by whether they waited in its queue first"
    );
    describe_counter!(
        QUEUED.name(),
        Unit::Count,
        "Requests that did not fit TokenBudget at once and waited, by the limit they waited for"
    );
    describe_counter!(
        REFUSED.name(),
        Unit::Count,
        "Requests TokenBudget refused (BudgetExceeded), by the limit that refused them"
    );
    describe_counter!(
        SOFT.name(),
        Unit::Count,
        "Admitted requests that took a TokenBudget limit past its soft threshold, by limit"
    );
    describe_histogram!(
        QUEUE_WAIT.name(),
        Unit::Seconds,
        "How long a request waited in TokenBudget's queue before it was admitted"
    );
    describe_counter!(TOKENS.name(), Unit::Count, "Tokens TokenBudget reserved before calls (stage=reserved) and counted once their usage was known (stage=settled)");
    describe_counter!(SPEND.name(), Unit::Count, "Money TokenBudget counted for finished calls, in nano-units of the configured prices' currency");
}
