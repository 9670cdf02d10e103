//! The stall detector's own logic, without Tower: which deadline is armed, what a chunk
//! proves, how a stream ends. [`Tracker`] is driven by the response future and the body;
//! [`StreamOutcome`] is what the caller reads when the stream ended.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use tokio::time::Instant;
use tower_ai_core::stream::{FinishReason, StreamDialect, StreamScanner};
use tower_ai_core::{AiError, BoxError, ErrorKind, Provider, StallPhase, Usage};

use crate::config::StallConfig;

/// How a streamed answer ended, as [`StreamSummary::end`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamEnd {
    /// The body ended cleanly (with the terminal marker, where the dialect has one and it
    /// is required).
    Complete,
    /// The body ended without its terminal marker; the caller got
    /// [`AiError::Truncated`].
    Truncated,
    /// A deadline expired; the caller got [`AiError::Stalled`] with this phase.
    Stalled(StallPhase),
    /// The provider sent an error inside the stream; the caller got
    /// [`AiError::Provider`] with this kind.
    ProviderError(Option<ErrorKind>),
    /// The inner body failed (a cut connection); the caller got its error.
    BodyError,
    /// The request's [`Deadline`](tower_ai_core::Deadline) passed while the answer was
    /// read; the caller got [`AiError::DeadlineExceeded`].
    DeadlineExceeded,
}

/// What a streamed answer came to: read it from [`StreamOutcome::get`] once the body
/// ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamSummary {
    /// How the body ended.
    pub end: StreamEnd,
    /// Why the model stopped, if it said. [`FinishReason::Length`] means the answer was cut
    /// by the output-token limit (`finish_reason: length`, `stop_reason: max_tokens`,
    /// `finishReason: MAX_TOKENS`): incomplete, and JSON in it may not parse.
    pub finish_reason: Option<FinishReason>,
    /// The tokens used, as the stream reported them (OpenAI only with
    /// `stream_options.include_usage`).
    pub usage: Option<Usage>,
    /// Whether the dialect's terminal marker arrived.
    pub terminal_seen: bool,
    /// Whether any content event arrived.
    pub content_seen: bool,
    /// Body bytes received.
    pub bytes_received: u64,
}

impl StreamSummary {
    /// Whether the model cut its answer at the output-token limit.
    pub fn truncated_by_model(&self) -> bool {
        self.finish_reason.is_some_and(FinishReason::is_truncation)
    }

    /// Whether the answer is whole: the body ended cleanly and the model stopped for a
    /// reason other than its token limit.
    pub fn is_complete(&self) -> bool {
        self.end == StreamEnd::Complete && !self.truncated_by_model()
    }
}

/// A handle on how an answer ended, put in the response's extensions by
/// [`StallDetector`](crate::StallDetector) for every `text/event-stream` success, and for
/// every non-streamed `application/json` success too: then it is read at the body's end
/// for why the model stopped and the usage (`finish_reason: "length"`, `stop_reason:
/// "max_tokens"`, `finishReason: "MAX_TOKENS"`, `incomplete_details.reason:
/// "max_output_tokens"` make [`StreamSummary::truncated_by_model`] true and are warned
/// about as for a stream), its `end` is `Complete` and `terminal_seen` true. A JSON answer
/// larger than [`max_event`](crate::StallConfigBuilder::max_event) is not read (no finish
/// reason); one in a single frame is read in place, one in several is copied first.
///
/// It is a shared handle (`Arc<OnceLock<…>>`, cheap to clone): take it from the
/// extensions before consuming the body, read it after. It is empty until the body ended
/// (or failed, or stalled), and stays empty if the body was dropped before that.
///
/// ```
/// # use tower_ai_stall::StreamOutcome;
/// # fn after(res: http::Response<()>) {
/// let outcome = res.extensions().get::<StreamOutcome>().cloned();
/// // … consume the body …
/// if let Some(summary) = outcome.as_ref().and_then(StreamOutcome::get) {
///     if summary.truncated_by_model() {
///         eprintln!("the answer was cut at max_tokens");
///     }
/// }
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct StreamOutcome {
    inner: Arc<OnceLock<StreamSummary>>,
}

impl StreamOutcome {
    /// An empty handle.
    pub fn new() -> Self {
        StreamOutcome::default()
    }

    /// The summary, once the body ended.
    pub fn get(&self) -> Option<&StreamSummary> {
        self.inner.get()
    }

    pub(crate) fn set(&self, summary: StreamSummary) {
        // The body ends once; a second end (impossible by construction) keeps the first.
        let _ = self.inner.set(summary);
    }
}

/// What a deadline check found.
// A short-lived return value: boxing the error would cost an allocation for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Check {
    /// Nothing expired yet; the next deadline is at this instant.
    Wait(Instant),
    /// Nothing is armed any more.
    Disarmed,
    /// A deadline expired: end the body with this error.
    Stalled(AiError),
    /// A deadline expired after the terminal marker: the answer is whole, end cleanly.
    End,
}

/// What the body holds back to deliver on its next poll.
pub(crate) enum Held {
    /// A frame the response future read ahead.
    Frame(Frame<Bytes>),
    /// The error found in the frame delivered last.
    Error(BoxError),
}

/// The state of one response: the deadlines armed, what the stream showed so far.
///
/// Small for responses that are not streams (the total deadline, its start, a byte
/// count); a stream's state is boxed apart, since a body is moved through every layer
/// above.
#[derive(Debug)]
pub(crate) struct Tracker {
    /// The total deadline.
    total: Option<Duration>,
    /// The request's [`Deadline`](tower_ai_core::Deadline), if it carries one: the total
    /// deadline is the earlier of the two.
    deadline: Option<Instant>,
    /// When the call started to wait; taken lazily (see [`Tracker::arm`]), so that a
    /// response that never makes anyone wait never reads the clock.
    start: Option<Instant>,
    bytes: u64,
    /// The provider trace events name (`gen_ai.provider.name`).
    system: Provider,
    /// Present for SSE success responses only.
    sse: Option<Box<Sse>>,
    /// Present for JSON success responses only: the answer, read at its end for why the
    /// model stopped.
    json: Option<Box<Json>>,
}

/// A non-streamed JSON answer being read.
#[derive(Debug)]
struct Json {
    outcome: StreamOutcome,
    /// The body's one frame (the common case: no copy).
    first: Option<Bytes>,
    /// The body copied when it comes in several frames, up to the event bound.
    copied: Vec<u8>,
    /// The body outgrew the bound: not read.
    over: bool,
    max: usize,
    /// The summary was recorded.
    done: bool,
}

/// What a stream showed so far.
#[derive(Debug)]
struct Sse {
    config: StallConfig,
    scanner: StreamScanner,
    outcome: StreamOutcome,
    head_at: Instant,
    /// The last progress, as the idle deadline counts it.
    last_progress: Instant,
    /// Progress was made since the clock was last read: `last_progress` moves to the
    /// next time the body waits (reading the clock once per wait, not once per chunk).
    progressed: bool,
    /// A frame or an error the body delivers on its next poll.
    held_frames: std::collections::VecDeque<Frame<Bytes>>,
    /// The data bytes of `held_frames`.
    held_bytes: u64,
    held_error: Option<BoxError>,
}

impl Tracker {
    /// A tracker for a response that is not a stream: only the total deadline applies.
    pub(crate) fn plain(config: &StallConfig, system: Provider, start: Option<Instant>) -> Self {
        Tracker {
            total: config.total(),
            deadline: None,
            system,
            start,
            bytes: 0,
            sse: None,
            json: None,
        }
    }

    /// A tracker for a JSON success response: the total deadline applies, and the answer
    /// is read at its end for why the model stopped (see [`Tracker::on_json`]).
    pub(crate) fn json(config: &StallConfig, system: Provider, start: Option<Instant>) -> Self {
        Tracker {
            json: Some(Box::new(Json {
                outcome: StreamOutcome::new(),
                first: None,
                copied: Vec::new(),
                over: false,
                max: config.max_event(),
                done: false,
            })),
            ..Tracker::plain(config, system, start)
        }
    }

    /// A tracker for an SSE success response in `dialect` whose head arrived at `head_at`.
    pub(crate) fn stream(
        config: StallConfig,
        system: Provider,
        start: Option<Instant>,
        dialect: StreamDialect,
        head_at: Instant,
    ) -> Self {
        Tracker {
            total: config.total(),
            deadline: None,
            system,
            start: start.or(Some(head_at)),
            bytes: 0,
            sse: Some(Box::new(Sse {
                config,
                scanner: StreamScanner::with_max_event(dialect, config.max_event()),
                outcome: StreamOutcome::new(),
                head_at,
                last_progress: head_at,
                progressed: false,
                held_frames: std::collections::VecDeque::new(),
                held_bytes: 0,
                held_error: None,
            })),
            json: None,
        }
    }

    /// Bounds the total deadline by the request's deadline `at` (the earlier wins).
    pub(crate) fn with_deadline(mut self, at: Option<Instant>) -> Self {
        self.deadline = at;
        self
    }

    /// Takes the start instant if it was not taken yet, and moves the last progress to
    /// now if progress was made since the last wait: call it when the body waits.
    /// Reads the clock only when one of them needs it.
    pub(crate) fn arm(&mut self, now: impl FnOnce() -> Instant) {
        let progressed = self.sse.as_ref().is_some_and(|s| s.progressed);
        if self.start.is_some() && !progressed {
            return;
        }
        let now = now();
        self.start.get_or_insert(now);
        if let (true, Some(sse)) = (progressed, self.sse.as_deref_mut()) {
            sse.last_progress = now;
            sse.progressed = false;
        }
    }

    /// The outcome handle, for an SSE or a JSON success response.
    pub(crate) fn outcome(&self) -> Option<&StreamOutcome> {
        match (&self.sse, &self.json) {
            (Some(s), _) => Some(&s.outcome),
            (None, Some(j)) => Some(&j.outcome),
            (None, None) => None,
        }
    }

    /// Whether the body is a JSON answer being read.
    pub(crate) fn reads_json(&self) -> bool {
        self.json.is_some()
    }

    /// A data frame of a JSON answer: kept (the first as it is, more copied, up to the
    /// bound) to be read at the end.
    #[cold]
    pub(crate) fn on_json(&mut self, data: &Bytes) {
        let Some(j) = self.json.as_deref_mut() else {
            return;
        };
        if j.over || j.done || data.is_empty() {
            return;
        }
        if j.first.is_none() && j.copied.is_empty() {
            if data.len() > j.max {
                j.over = true;
            } else {
                j.first = Some(data.clone());
            }
            return;
        }
        let first = j.first.take();
        let held = first.as_ref().map_or(0, |f| f.len()) + j.copied.len();
        if held + data.len() > j.max {
            j.over = true;
            j.copied = Vec::new();
            return;
        }
        if let Some(f) = first {
            j.copied.extend_from_slice(&f);
        }
        j.copied.extend_from_slice(data);
    }

    /// A JSON answer ended: records why the model stopped and its usage, and warns of a
    /// truncation by the token limit, as for a stream.
    pub(crate) fn end_json(&mut self) {
        let Some(j) = self.json.as_deref_mut() else {
            return;
        };
        if j.done {
            return;
        }
        j.done = true;
        let body: &[u8] = match &j.first {
            Some(f) => f,
            None => &j.copied,
        };
        let (finish_reason, usage) = if j.over {
            (None, None)
        } else {
            (FinishReason::of_answer(body), Usage::from_json(body))
        };
        let summary = StreamSummary {
            end: StreamEnd::Complete,
            finish_reason,
            usage,
            terminal_seen: true,
            content_seen: true,
            bytes_received: self.bytes,
        };
        j.first = None;
        j.copied = Vec::new();
        if summary.truncated_by_model() {
            warn_truncated(self.system, &summary);
        }
        j.outcome.set(summary);
    }

    pub(crate) fn is_sse(&self) -> bool {
        self.sse.is_some()
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Holds `frame` (read ahead by the response future) for the body's first poll.
    pub(crate) fn hold_frame(&mut self, frame: Frame<Bytes>) {
        if let Some(sse) = self.sse.as_deref_mut() {
            sse.held_bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
            sse.held_frames.push_back(frame);
        }
    }

    /// Whether the response future should keep reading ahead before handing the response
    /// on: [`await_first_content`](crate::StallConfigBuilder::await_first_content) is on,
    /// no content and no terminal marker came yet, and the preamble held is within its
    /// bound.
    pub(crate) fn wants_more_preamble(&self) -> bool {
        let Some(sse) = self.sse.as_deref() else {
            return false;
        };
        sse.config.await_first_content
            && !sse.scanner.content_seen()
            && !sse.scanner.terminal_seen()
            && sse.held_bytes < sse.config.max_preamble() as u64
    }

    /// Holds `err` (found in the frame just delivered) for the body's next poll.
    pub(crate) fn hold_error(&mut self, err: AiError) {
        if let Some(sse) = self.sse.as_deref_mut() {
            sse.held_error = Some(Box::new(err));
        }
    }

    /// What the body holds back, to deliver now.
    #[inline]
    pub(crate) fn take_held(&mut self) -> Option<Held> {
        let sse = self.sse.as_deref_mut()?;
        if let Some(frame) = sse.held_frames.pop_front() {
            sse.held_bytes -= frame.data_ref().map_or(0, |d| d.len() as u64);
            return Some(Held::Frame(frame));
        }
        sse.held_error.take().map(Held::Error)
    }

    /// Whether the body holds something back, and the data bytes of a held frame.
    pub(crate) fn held(&self) -> Option<u64> {
        let sse = self.sse.as_deref()?;
        if sse.held_frames.is_empty() {
            sse.held_error.is_some().then_some(0)
        } else {
            Some(sse.held_bytes)
        }
    }

    /// The deadline before the response head, for a call started at `start`.
    pub(crate) fn head_deadline(
        config: &StallConfig,
        streamed: bool,
        start: Instant,
    ) -> Option<(Instant, StallPhase, Duration)> {
        let (phase, d) = config.head_wait(streamed)?;
        Some((start + d, phase, d))
    }

    /// The earliest armed deadline, with its phase and duration.
    fn next(&self) -> Option<(Instant, StallPhase, Duration)> {
        let total = self
            .total
            .zip(self.start)
            .map(|(d, start)| (start + d, StallPhase::Total, d));
        let total = earliest(total, self.request_deadline());
        let Some(sse) = &self.sse else {
            return total;
        };
        if sse.scanner.terminal_seen() {
            // The answer is whole: only the total deadline still bounds the body's end.
            return total;
        }
        let c = &sse.config;
        // On a tie the more specific phase wins, so `total` is merged last.
        let mut next = None;
        let first_byte = self.bytes > 0;
        let content = sse.scanner.content_seen();
        if !first_byte {
            next = earliest(
                next,
                c.first_byte()
                    .map(|d| (sse.head_at + d, StallPhase::FirstByte, d)),
            );
        }
        if !content {
            next = earliest(
                next,
                c.first_content()
                    .map(|d| (sse.head_at + d, StallPhase::FirstContent, d)),
            );
        }
        // Idle gaps count once content started; before that the first-content deadline
        // governs when it is set, else they count from the first byte.
        let idle_armed = content || (first_byte && c.first_content().is_none());
        if idle_armed {
            next = earliest(
                next,
                c.idle()
                    .map(|d| (sse.last_progress + d, StallPhase::Idle, d)),
            );
        }
        earliest(next, total)
    }

    /// The request's deadline as a total deadline, its duration counted from the start.
    fn request_deadline(&self) -> Option<(Instant, StallPhase, Duration)> {
        let at = self.deadline?;
        let after = self
            .start
            .map_or(Duration::ZERO, |s| at.saturating_duration_since(s));
        Some((at, StallPhase::Total, after))
    }

    /// The earliest of the head deadline (see [`Tracker::head_deadline`]) and the
    /// request's deadline `at`, as a total deadline.
    pub(crate) fn head_or_request_deadline(
        config: &StallConfig,
        streamed: bool,
        start: Instant,
        at: Option<Instant>,
    ) -> Option<(Instant, StallPhase, Duration)> {
        let by_request = at.map(|at| (at, StallPhase::Total, at.saturating_duration_since(start)));
        earliest(Tracker::head_deadline(config, streamed, start), by_request)
    }

    /// The instant of the earliest armed deadline.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.next().map(|(at, _, _)| at)
    }

    /// Whether a deadline expired at `now`.
    pub(crate) fn check(&mut self, now: Instant) -> Check {
        match self.next() {
            None => Check::Disarmed,
            Some((at, _, _)) if at > now => Check::Wait(at),
            Some((at, phase, after)) => {
                if self.sse.as_ref().is_some_and(|s| s.scanner.terminal_seen()) {
                    tracing::debug!(
                        gen_ai.provider.name = self.system.gen_ai_name(),
                        bytes_received = self.bytes,
                        "stream idle after its terminal event: ending it"
                    );
                    self.finish(StreamEnd::Complete);
                    return Check::End;
                }
                if self.deadline == Some(at) {
                    // The caller's deadline, not one of the detector's own.
                    return Check::Stalled(self.deadline_passed());
                }
                Check::Stalled(self.stalled(phase, after))
            }
        }
    }

    /// The error for a body cut at the request's deadline, recorded and traced: the
    /// caller's deadline is not a stall of the provider's.
    fn deadline_passed(&mut self) -> AiError {
        self.finish(StreamEnd::DeadlineExceeded);
        crate::future::deadline_passed(self.system, true, self.bytes)
    }

    /// The error for a stall in `phase`, recorded and traced.
    pub(crate) fn stalled(&mut self, phase: StallPhase, after: Duration) -> AiError {
        tracing::warn!(
            gen_ai.provider.name = self.system.gen_ai_name(),
            error.type = "stalled",
            stall.phase = ?phase,
            stall.after_ms = after.as_millis() as u64,
            bytes_received = self.bytes,
            "stream stalled"
        );
        #[cfg(feature = "metrics")]
        crate::meter::stalled(phase);
        self.finish(StreamEnd::Stalled(phase));
        AiError::Stalled {
            phase,
            after,
            bytes_received: self.bytes,
        }
    }

    /// A data chunk arrived. Returns the error to deliver after this chunk, if it carried
    /// one. Reads no clock: progress is timed when the body next waits ([`Tracker::arm`]).
    #[inline]
    pub(crate) fn on_data(&mut self, data: &[u8]) -> Option<AiError> {
        self.bytes += data.len() as u64;
        if self.sse.is_none() || data.is_empty() {
            return None;
        }
        self.scan(data)
    }

    /// Reads a stream's chunk.
    fn scan(&mut self, data: &[u8]) -> Option<AiError> {
        let sse = self.sse.as_deref_mut()?;
        let facts = sse.scanner.feed(data);
        if let Some(classification) = facts.error {
            let kind = classification.kind;
            tracing::warn!(
                gen_ai.provider.name = self.system.gen_ai_name(),
                error.type = kind.map_or("unknown", |k| k.as_str()),
                bytes_received = self.bytes,
                "provider error inside the stream"
            );
            self.finish(StreamEnd::ProviderError(kind));
            return Some(AiError::Provider { classification });
        }
        if facts.content || sse.config.liveness_resets_idle {
            sse.progressed = true;
        }
        None
    }

    /// The inner body ended. Returns the error to end with, if the stream was cut or its
    /// last event was an error.
    #[inline]
    pub(crate) fn on_end(&mut self) -> Option<AiError> {
        if self.sse.is_some() {
            self.end_stream()
        } else {
            if self.json.is_some() {
                self.end_json();
            }
            None
        }
    }

    /// A stream's end.
    fn end_stream(&mut self) -> Option<AiError> {
        let sse = self.sse.as_deref_mut()?;
        let facts = sse.scanner.finish();
        if let Some(classification) = facts.error {
            self.finish(StreamEnd::ProviderError(classification.kind));
            return Some(AiError::Provider { classification });
        }
        if sse.config.require_terminal
            && sse.scanner.dialect().has_terminal_marker()
            && !sse.scanner.terminal_seen()
        {
            tracing::warn!(
                gen_ai.provider.name = self.system.gen_ai_name(),
                error.type = "truncated",
                bytes_received = self.bytes,
                "stream ended without its terminal event"
            );
            self.finish(StreamEnd::Truncated);
            return Some(AiError::Truncated {
                bytes_received: self.bytes,
            });
        }
        self.finish(StreamEnd::Complete);
        None
    }

    /// The inner body failed.
    pub(crate) fn on_body_error(&mut self) {
        self.finish(StreamEnd::BodyError);
    }

    fn finish(&mut self, end: StreamEnd) {
        let Some(sse) = &self.sse else {
            return;
        };
        #[cfg(feature = "metrics")]
        match end {
            StreamEnd::ProviderError(kind) => {
                crate::meter::stream_error(kind.map_or("unknown", |k| k.as_str()));
            }
            StreamEnd::Truncated => crate::meter::truncated("no_terminal_event"),
            _ => {}
        }
        let summary = StreamSummary {
            end,
            finish_reason: sse.scanner.finish_reason(),
            usage: sse.scanner.usage(),
            terminal_seen: sse.scanner.terminal_seen(),
            content_seen: sse.scanner.content_seen(),
            bytes_received: self.bytes,
        };
        if summary.truncated_by_model() {
            warn_truncated(self.system, &summary);
        }
        sse.outcome.set(summary);
    }
}

/// The warning for an answer cut at the output-token limit, streamed or not.
fn warn_truncated(system: Provider, summary: &StreamSummary) {
    #[cfg(feature = "metrics")]
    crate::meter::truncated("max_tokens");
    tracing::warn!(
        gen_ai.provider.name = system.gen_ai_name(),
        gen_ai.response.finish_reasons = "length",
        gen_ai.usage.input_tokens = summary.usage.map(|u| u.input_tokens),
        gen_ai.usage.output_tokens = summary.usage.map(|u| u.output_tokens),
        "answer truncated at the output-token limit"
    );
}

/// The earlier of two deadlines; on a tie the first (the more specific phase).
fn earliest<T>(
    a: Option<(Instant, T, Duration)>,
    b: Option<(Instant, T, Duration)>,
) -> Option<(Instant, T, Duration)> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn config() -> StallConfig {
        StallConfig::builder()
            .first_byte(5 * S)
            .first_content(20 * S)
            .idle(10 * S)
            .total(100 * S)
            .build_config()
            .unwrap()
    }

    fn tracker(config: StallConfig, dialect: StreamDialect) -> (Tracker, Instant) {
        let t0 = Instant::now();
        (
            Tracker::stream(config, Provider::OpenAi, Some(t0), dialect, t0 + S),
            t0,
        )
    }

    /// A chunk arrives, then the body waits at `at`.
    fn chunk(t: &mut Tracker, data: &[u8], at: Instant) -> Option<AiError> {
        let err = t.on_data(data);
        t.arm(|| at);
        err
    }

    fn phase(c: Check) -> Option<StallPhase> {
        match c {
            Check::Stalled(AiError::Stalled { phase, .. }) => Some(phase),
            _ => None,
        }
    }

    #[test]
    fn deadlines_follow_the_phases() {
        let (mut t, t0) = tracker(config(), StreamDialect::Anthropic);
        // From the head (t0 + 1 s): first byte within 5 s.
        assert_eq!(t.deadline(), Some(t0 + 6 * S));
        assert!(matches!(t.check(t0 + 5 * S), Check::Wait(_)));
        assert_eq!(
            phase(
                Tracker::stream(
                    config(),
                    Provider::Anthropic,
                    Some(t0),
                    StreamDialect::Anthropic,
                    t0 + S
                )
                .check(t0 + 6 * S)
            ),
            Some(StallPhase::FirstByte)
        );
        // A ping is a byte but not content: first content by t0 + 21 s.
        assert!(chunk(
            &mut t,
            b"event: ping\ndata: {\"type\":\"ping\"}\n\n",
            t0 + 2 * S
        )
        .is_none());
        assert_eq!(t.deadline(), Some(t0 + 21 * S));
        assert_eq!(phase(t.check(t0 + 21 * S)), Some(StallPhase::FirstContent));
        let (mut t, t0) = tracker(config(), StreamDialect::Anthropic);
        let delta = b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n";
        chunk(&mut t, delta, t0 + 3 * S);
        // Content started: idle from the last chunk (timed when the body next waits).
        assert_eq!(t.deadline(), Some(t0 + 13 * S));
        t.on_data(delta);
        assert_eq!(
            t.deadline(),
            Some(t0 + 13 * S),
            "not timed until the body waits"
        );
        t.arm(|| t0 + 12 * S);
        assert_eq!(t.deadline(), Some(t0 + 22 * S));
        assert_eq!(phase(t.check(t0 + 22 * S)), Some(StallPhase::Idle));
    }

    #[test]
    fn liveness_resets_idle_only_when_asked() {
        let ping = b": keepalive\n\n";
        let delta = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
        for resets in [true, false] {
            let c = config()
                .to_builder()
                .liveness_resets_idle(resets)
                .build_config()
                .unwrap();
            let (mut t, t0) = tracker(c, StreamDialect::OpenAiChat);
            chunk(&mut t, delta, t0 + 2 * S);
            t.on_data(ping);
            if resets {
                t.arm(|| t0 + 8 * S);
            } else {
                t.arm(|| panic!("a ping is no progress then: no clock read"));
            }
            let expect = if resets { t0 + 18 * S } else { t0 + 12 * S };
            assert_eq!(t.deadline(), Some(expect), "resets={resets}");
        }
    }

    #[test]
    fn terminal_marker_and_truncation() {
        let (mut t, _) = tracker(config(), StreamDialect::OpenAiChat);
        t.on_data(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":\"length\"}]}\n\n");
        assert!(
            matches!(t.on_end(), Some(AiError::Truncated { bytes_received }) if bytes_received > 0)
        );
        let s = t.outcome().unwrap().get().unwrap().clone();
        assert_eq!(s.end, StreamEnd::Truncated);
        assert!(s.truncated_by_model());

        let (mut t, t0) = tracker(config(), StreamDialect::OpenAiChat);
        chunk(
            &mut t,
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n",
            t0,
        );
        // After the marker only the total deadline is armed, and expiry ends cleanly.
        assert_eq!(t.deadline(), Some(t0 + 100 * S));
        assert!(matches!(t.check(t0 + 100 * S), Check::End));
        assert!(t.outcome().unwrap().get().unwrap().is_complete());

        // Gemini's marker is the finishReason of its last candidate chunk.
        let (mut t, t0) = tracker(config(), StreamDialect::Gemini);
        chunk(&mut t, b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"a\"}]},\"finishReason\":\"STOP\"}]}\r\n\r\n", t0);
        assert!(t.on_end().is_none());
        let (mut t, t0) = tracker(config(), StreamDialect::Gemini);
        chunk(
            &mut t,
            b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"a\"}]}}]}\r\n\r\n",
            t0,
        );
        assert!(matches!(t.on_end(), Some(AiError::Truncated { .. })));
        // Unless required off, OpenAI without [DONE] is truncated; off, it is not.
        let c = config()
            .to_builder()
            .require_terminal(false)
            .build_config()
            .unwrap();
        let (mut t, _) = tracker(c, StreamDialect::OpenAiChat);
        assert!(t.on_end().is_none());
    }

    #[test]
    fn non_sse_gets_only_the_total_deadline() {
        let t0 = Instant::now();
        let mut t = Tracker::plain(&config(), Provider::OpenAi, None);
        // Not armed until someone waits: no clock read for a response that is ready.
        assert_eq!(t.deadline(), None);
        t.arm(|| t0);
        t.arm(|| panic!("the clock is read once"));
        assert_eq!(t.deadline(), Some(t0 + 100 * S));
        assert!(t.on_data(b"{\"error\":{\"message\":\"x\"}}").is_none());
        t.arm(|| panic!("no progress is timed for a plain body"));
        assert!(t.on_end().is_none());
        assert_eq!(t.bytes(), 25);
        assert!(t.outcome().is_none());
        assert_eq!(phase(t.check(t0 + 100 * S)), Some(StallPhase::Total));
    }

    #[test]
    fn head_deadline_by_request_kind() {
        let t0 = Instant::now();
        let c = StallConfig::none()
            .to_builder()
            .head(3 * S)
            .total(50 * S)
            .build_config()
            .unwrap();
        assert_eq!(
            Tracker::head_deadline(&c, true, t0),
            Some((t0 + 3 * S, StallPhase::Head, 3 * S))
        );
        assert_eq!(
            Tracker::head_deadline(&c, false, t0),
            Some((t0 + 50 * S, StallPhase::Total, 50 * S))
        );
        // On a tie the head deadline is named.
        let tie = c.to_builder().head(50 * S).build_config().unwrap();
        assert_eq!(
            Tracker::head_deadline(&tie, true, t0).map(|d| d.1),
            Some(StallPhase::Head)
        );
        assert!(Tracker::head_deadline(&StallConfig::none(), true, t0).is_none());
    }
}
