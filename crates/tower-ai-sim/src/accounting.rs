//! What the simulator received and answered: one [`CallRecord`] per request.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::dialect::Dialect;

/// A 64-bit FNV-1a digest of `bytes`.
///
/// The simulator records `digest(body)` of every request body exactly as it
/// arrived; a test computes the same over what it sent and compares, to prove
/// that no layer altered, truncated or re-encoded the body. Not cryptographic.
///
/// ```
/// assert_eq!(tower_ai_sim::digest(b""), 0xcbf2_9ce4_8422_2325);
/// assert_ne!(tower_ai_sim::digest(b"a"), tower_ai_sim::digest(b"b"));
/// ```
pub fn digest(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

/// Why the simulator answered a call the way it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Outcome {
    /// HTTP 200 (a stream may still misbehave: see [`CallRecord::stream_fault`]).
    Success,
    /// No such endpoint (404) or wrong method (405).
    NotFound,
    /// Malformed body: not JSON, missing model, bad field type (400).
    BadRequest,
    /// Body over the size limit (413).
    BodyTooLarge,
    /// Model not described by a strict scenario (404).
    ModelNotFound,
    /// Quota exhausted (non-retryable 429).
    QuotaExhausted,
    /// The model's scripted outage.
    Outage,
    /// Prompt estimate over the model's context window (400).
    ContextLengthExceeded,
    /// Over the requests-per-window limit (429).
    RateLimitedRequests,
    /// Over the tokens-per-window limit (429).
    RateLimitedTokens,
    /// The request alone is over the tokens-per-window limit (429, never fits).
    RequestTooLarge,
    /// A scripted [`Fault`](crate::Fault).
    Fault,
}

/// How a streamed success misbehaved (see [`StreamFault`](crate::StreamFault)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StreamFaultKind {
    /// Stalled before any body byte.
    StallBeforeFirstToken,
    /// Stalled after this many content events.
    StallAfterTokens(u32),
    /// Ended with an error event after this many content events.
    ErrorEventAfterTokens(u32),
    /// Ended cleanly, without the terminal marker, after this many content events.
    CutAfterTokens(u32),
    /// Failed (a reset connection) after this many content events.
    ResetAfterTokens(u32),
}

/// One request the simulator received.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallRecord {
    /// 0-based order in which calls were decided.
    pub seq: u64,
    /// Arrival time since the simulator's start (tokio clock).
    pub at: Duration,
    /// The dialect, from the path (a guess for unknown paths).
    pub dialect: Dialect,
    /// The request's path.
    pub path: String,
    /// The model asked for, when the request named one.
    pub model: Option<String>,
    /// The HTTP status returned.
    pub status: u16,
    /// Why.
    pub outcome: Outcome,
    /// The request asked for a stream.
    pub streamed: bool,
    /// Prompt estimate (0 when the body could not be read).
    pub prompt_tokens: u64,
    /// Completion tokens of the answer (0 for errors; for a faulted stream,
    /// the tokens it sends before the fault).
    pub completion_tokens: u32,
    /// The answer was cut short by the request's max tokens.
    pub truncated: bool,
    /// The stream fault applied, if any.
    pub stream_fault: Option<StreamFaultKind>,
    /// Length of the request body as received.
    pub body_len: usize,
    /// [`digest`] of the request body as received.
    pub body_digest: u64,
}

/// Counts over all calls so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Every call received.
    pub total: u64,
    /// Calls answered 200.
    pub successes: u64,
    /// Calls per HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// Calls per outcome.
    pub by_outcome: BTreeMap<Outcome, u64>,
    /// Prompt tokens of successful calls.
    pub prompt_tokens: u64,
    /// Completion tokens of successful calls.
    pub completion_tokens: u64,
}

impl Stats {
    /// Calls answered with `status`.
    pub fn count(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// Calls answered for `outcome`.
    pub fn outcome(&self, outcome: Outcome) -> u64 {
        self.by_outcome.get(&outcome).copied().unwrap_or(0)
    }

    /// Calls answered with something other than 200.
    pub fn failures(&self) -> u64 {
        self.total - self.successes
    }

    pub(crate) fn add(&mut self, r: &CallRecord) {
        self.total += 1;
        *self.by_status.entry(r.status).or_default() += 1;
        *self.by_outcome.entry(r.outcome).or_default() += 1;
        if r.status == 200 {
            self.successes += 1;
            self.prompt_tokens += r.prompt_tokens;
            self.completion_tokens += u64::from(r.completion_tokens);
        }
    }
}
