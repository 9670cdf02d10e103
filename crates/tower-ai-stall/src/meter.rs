//! StallDetector's metrics (feature `metrics`); names, types and labels in the README.

use tower_ai_core::meter::{KeyTable, ERROR_TYPES, OTHER};
use tower_ai_core::StallPhase;

/// `tower_ai.stall.stalls`: calls cut for a stall, by the phase that stalled.
static STALLS: KeyTable<1> = KeyTable::new(
    "tower_ai.stall.stalls",
    [(
        "phase",
        &[
            "head",
            "first_byte",
            "first_content",
            "idle",
            "total",
            OTHER,
        ],
    )],
);
/// `tower_ai.stall.truncations`: answers that ended short, by why: `no_terminal_event`
/// (a stream ended without its dialect's terminal event: an error for the caller) or
/// `max_tokens` (the model stopped at the output-token limit: a whole answer, cut).
static TRUNCATIONS: KeyTable<1> = KeyTable::new(
    "tower_ai.stall.truncations",
    [("reason", &["no_terminal_event", "max_tokens", OTHER])],
);
/// `tower_ai.stall.stream_errors`: provider errors inside a 200 stream, by error type.
static STREAM_ERRORS: KeyTable<1> = KeyTable::new(
    "tower_ai.stall.stream_errors",
    [("error_type", ERROR_TYPES)],
);

fn phase_name(phase: StallPhase) -> &'static str {
    match phase {
        StallPhase::Head => "head",
        StallPhase::FirstByte => "first_byte",
        StallPhase::FirstContent => "first_content",
        StallPhase::Idle => "idle",
        StallPhase::Total => "total",
        #[allow(unreachable_patterns)]
        _ => OTHER,
    }
}

pub(crate) fn stalled(phase: StallPhase) {
    STALLS.counter([phase_name(phase)]).increment(1);
}

pub(crate) fn truncated(reason: &'static str) {
    TRUNCATIONS.counter([reason]).increment(1);
}

pub(crate) fn stream_error(error_type: &str) {
    STREAM_ERRORS.counter([error_type]).increment(1);
}

/// Describes the metrics to the installed recorder (units and help text).
pub(crate) fn describe() {
    use ::metrics::{describe_counter, Unit};
    describe_counter!(
        STALLS.name(),
        Unit::Count,
        "Calls StallDetector cut for a stall, by the phase that stalled"
    );
    describe_counter!(TRUNCATIONS.name(), Unit::Count, "Answers that ended short, by reason (no_terminal_event: a cut stream; max_tokens: the output-token limit)");
    describe_counter!(
        STREAM_ERRORS.name(),
        Unit::Count,
        "Provider errors StallDetector found inside a streamed answer, by error type"
    );
}
