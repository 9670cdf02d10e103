//! [`StallConfig`], its builder and its validation.

use std::num::NonZeroU64;
use std::time::Duration;

use tower_ai_core::overrides::StallDeadlines;

use tower_ai_core::StallPhase;

use crate::layer::StallDetectorLayer;

/// The deadlines of a [`StallDetector`](crate::StallDetector), each optional, and how
/// streams are judged.
///
/// | deadline | measured from | applies to | default |
/// |---|---|---|---|
/// | [`head`](StallConfigBuilder::head) | the call | streamed requests | 60 s |
/// | [`unary_head`](StallConfigBuilder::unary_head) | the call | other requests | off |
/// | [`first_byte`](StallConfigBuilder::first_byte) | the response head | SSE responses | 30 s |
/// | [`first_content`](StallConfigBuilder::first_content) | the response head | SSE responses | 300 s |
/// | [`idle`](StallConfigBuilder::idle) | the last progress | SSE responses, once content started | 60 s |
/// | [`total`](StallConfigBuilder::total) | the call | every response, to the body's end | 20 min |
///
/// "The call" is the first time the response future (or, when the answer was ready at
/// once, the body) has to wait: a client sends nothing before its future is polled, and a
/// response that never makes anyone wait never reads the clock. "The last progress" is
/// the first time the body had to wait after the last chunk that counts as progress
/// (content, and with [`liveness_resets_idle`](StallConfigBuilder::liveness_resets_idle)
/// any chunk): the clock is read once per wait rather than once per chunk, and time the
/// caller spends between polls is not counted against the provider.
///
/// # Why these defaults
///
/// - **head 60 s, streamed only.** A streamed answer's head comes once the request is
///   queued and the prompt accepted: normally well under 10 s, and under load or with a
///   very long prompt still well under a minute. A *non-streamed* answer's head comes only
///   when the whole answer has been generated, which takes minutes for long answers and
///   reasoning models; a head deadline there would turn slow answers into paid-for
///   retries, so [`unary_head`](StallConfigBuilder::unary_head) is off by default and
///   only `total` bounds them. A request counts as streamed when its
///   [`RequestMeta`](tower_ai_core::RequestMeta) (in the extensions, as TokenBudget puts
///   it) says so, when its path is Gemini's `:streamGenerateContent`, when it sends
///   `accept: text/event-stream`, or else when its body, held in memory (`AiBody`,
///   `Bytes`, `String`, `Vec<u8>`, `&'static str`), has a top-level `"stream": true`: a
///   forward walk over the top-level keys that stops at `stream`, never a parse, and only
///   when the head deadlines differ.
/// - **first byte 30 s.** Providers flush the stream's head together with its first event
///   (`message_start`, OpenAI's role chunk), so a head with no byte after it means a
///   connection that went bad.
/// - **first content 300 s.** Before the first token the model reads the prompt and, for
///   reasoning models, thinks; OpenAI Chat streams stay silent through minutes of
///   reasoning, Anthropic sends `ping`s. Five minutes covers long reasoning and still ends
///   a stream that never answers.
/// - **idle 60 s, once content started; liveness resets it.** Between tokens of an answer
///   the gaps are milliseconds, but tool calls and server-side tools pause a stream for
///   tens of seconds, usually with keep-alives (`ping`, `: OPENROUTER PROCESSING`).
///   Until the first content event the first-content deadline governs instead (so silent
///   reasoning is not called a stall); when that deadline is off, idle gaps are measured
///   from the first byte.
/// - **total 20 min.** A backstop so nothing hangs forever: 32k output tokens at a slow
///   27 tokens/s take 20 minutes. The official SDKs' 600 s is a *per-read* timeout, not a
///   total.
/// - **`require_terminal` on.** A stream that ends without its dialect's terminal marker
///   (`[DONE]`, `message_stop`, `response.completed`, Gemini's `finishReason` on the last
///   candidate chunk) is cut: the caller gets
///   [`AiError::Truncated`](tower_ai_core::AiError::Truncated) instead of a clean end.
/// - **`await_first_byte` on.** The response future waits for the first body byte of a
///   stream before handing the response on, so a stall (or a cut connection) before any
///   byte is a retryable error of the call, which AiRetry and ModelFallback can act on.
///
/// - **`await_first_content` off.** Holding the response until the first content event
///   makes a first-token stall retryable, but hides the head and the stream's start from
///   the caller for up to the first-content deadline and makes a retry pay for the prompt
///   again after a long wait: see
///   [`await_first_content`](StallConfigBuilder::await_first_content).
/// - **`max_event` 4 MiB.** The largest event read whole; see
///   [`max_event`](StallConfigBuilder::max_event).
///
/// ```
/// use std::time::Duration;
/// use tower_ai_stall::StallConfig;
///
/// let config = StallConfig::builder()
///     .idle(Duration::from_secs(20))
///     .first_content(Duration::from_secs(90))
///     .liveness_resets_idle(false)
///     .build_config()?;
/// assert_eq!(config.idle(), Some(Duration::from_secs(20)));
/// assert!(StallConfig::builder().idle(Duration::ZERO).build_config().is_err());
/// # Ok::<(), tower_ai_stall::StallConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallConfig {
    // Deadlines in nanoseconds (8 bytes each instead of 16: every call and every body
    // carries a copy). Zero cannot be stored; the builder rejects it.
    head: Deadline,
    unary_head: Deadline,
    first_byte: Deadline,
    first_content: Deadline,
    idle: Deadline,
    total: Deadline,
    pub(crate) liveness_resets_idle: bool,
    pub(crate) require_terminal: bool,
    pub(crate) await_first_byte: bool,
    /// The largest SSE event read whole, in bytes (a `u32`: a body carries a copy).
    max_event: u32,
    pub(crate) await_first_content: bool,
    /// The most preamble bytes held while awaiting the first content.
    max_preamble: u32,
}

/// A deadline in nanoseconds, `None` when off.
type Deadline = Option<NonZeroU64>;

impl StallConfig {
    /// This configuration with a request's [`StallDeadlines`] override applied: each
    /// deadline it sets replaces the layer's (a zero one is ignored).
    pub(crate) fn overridden(mut self, o: &StallDeadlines) -> StallConfig {
        let set = |slot: &mut Deadline, d: Option<Duration>| {
            if let Ok(Some(v)) = store(d) {
                *slot = Some(v);
            }
        };
        set(&mut self.head, o.head);
        set(&mut self.unary_head, o.head);
        set(&mut self.first_byte, o.first_byte);
        set(&mut self.first_content, o.first_content);
        set(&mut self.idle, o.idle);
        set(&mut self.total, o.total);
        self
    }
}

/// Stores `d`; zero is reported back as `Err(())`. Durations over 584 years saturate.
fn store(d: Option<Duration>) -> Result<Deadline, ()> {
    match d {
        None => Ok(None),
        Some(d) => NonZeroU64::new(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .map(Some)
            .ok_or(()),
    }
}

fn load(d: Deadline) -> Option<Duration> {
    d.map(|n| Duration::from_nanos(n.get()))
}

/// The default head deadline of streamed requests.
pub const DEFAULT_HEAD: Duration = Duration::from_secs(60);
/// The default time from the head to the first body byte.
pub const DEFAULT_FIRST_BYTE: Duration = Duration::from_secs(30);
/// The default time from the head to the first content event.
pub const DEFAULT_FIRST_CONTENT: Duration = Duration::from_secs(300);
/// The default longest gap between chunks once content started.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);
/// The default total deadline.
pub const DEFAULT_TOTAL: Duration = Duration::from_secs(20 * 60);

/// The default bound on the preamble held by
/// [`await_first_content`](StallConfigBuilder::await_first_content): 64 KiB.
pub const DEFAULT_MAX_PREAMBLE: u32 = 64 * 1024;

const DEFAULT_MAX_EVENT_U32: u32 = tower_ai_core::sse::DEFAULT_MAX_EVENT as u32;

impl Default for StallConfig {
    fn default() -> Self {
        let d = |d: Duration| store(Some(d)).unwrap_or(None);
        StallConfig {
            head: d(DEFAULT_HEAD),
            unary_head: None,
            first_byte: d(DEFAULT_FIRST_BYTE),
            first_content: d(DEFAULT_FIRST_CONTENT),
            idle: d(DEFAULT_IDLE),
            total: d(DEFAULT_TOTAL),
            liveness_resets_idle: true,
            require_terminal: true,
            await_first_byte: true,
            max_event: DEFAULT_MAX_EVENT_U32,
            await_first_content: false,
            max_preamble: DEFAULT_MAX_PREAMBLE,
        }
    }
}

impl StallConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> StallConfigBuilder {
        StallConfigBuilder {
            config: StallConfig::default(),
            zero: None,
        }
    }

    /// A config with every deadline off and the checks on; set what you need with the
    /// builder from [`StallConfig::none`]`().to_builder()`.
    pub fn none() -> Self {
        StallConfig {
            head: None,
            unary_head: None,
            first_byte: None,
            first_content: None,
            idle: None,
            total: None,
            ..StallConfig::default()
        }
    }

    /// A builder starting from this config.
    pub fn to_builder(self) -> StallConfigBuilder {
        StallConfigBuilder {
            config: self,
            zero: None,
        }
    }

    /// Time from the call to the response head, for streamed requests.
    pub fn head(&self) -> Option<Duration> {
        load(self.head)
    }
    /// Time from the call to the response head, for requests not known to be streamed.
    pub fn unary_head(&self) -> Option<Duration> {
        load(self.unary_head)
    }
    /// Time from the head to the first body byte of an SSE response.
    pub fn first_byte(&self) -> Option<Duration> {
        load(self.first_byte)
    }
    /// Time from the head to the first content event of an SSE response.
    pub fn first_content(&self) -> Option<Duration> {
        load(self.first_content)
    }
    /// Longest gap between chunks of an SSE response.
    pub fn idle(&self) -> Option<Duration> {
        load(self.idle)
    }
    /// Time from the call to the end of the body.
    pub fn total(&self) -> Option<Duration> {
        load(self.total)
    }
    /// Whether liveness (pings, comments, events without content) resets the idle timer.
    pub fn liveness_resets_idle(&self) -> bool {
        self.liveness_resets_idle
    }
    /// Whether a stream that ends without its dialect's terminal marker is an error.
    pub fn require_terminal(&self) -> bool {
        self.require_terminal
    }
    /// Whether the response future waits for the first body byte of an SSE response.
    pub fn await_first_byte(&self) -> bool {
        self.await_first_byte
    }
    /// The largest SSE event read whole, in bytes.
    pub fn max_event(&self) -> usize {
        self.max_event as usize
    }
    /// Whether the response future holds an SSE response until its first content event.
    pub fn await_first_content(&self) -> bool {
        self.await_first_content
    }
    /// The most preamble bytes held while awaiting the first content.
    pub fn max_preamble(&self) -> usize {
        self.max_preamble as usize
    }

    /// The deadline before the response head of a (`streamed` or not) request, from the
    /// call: the head deadline that applies, or the total deadline when it is earlier (on
    /// a tie, the head's).
    pub(crate) fn head_wait(&self, streamed: bool) -> Option<(StallPhase, Duration)> {
        let head = if streamed { self.head } else { self.unary_head };
        let (phase, nanos) = match (head, self.total) {
            (Some(h), Some(t)) if t < h => (StallPhase::Total, t),
            (Some(h), _) => (StallPhase::Head, h),
            (None, Some(t)) => (StallPhase::Total, t),
            (None, None) => return None,
        };
        Some((phase, Duration::from_nanos(nanos.get())))
    }

    /// Whether the head deadline depends on whether the request is streamed.
    pub(crate) fn head_depends_on_stream(&self) -> bool {
        self.head != self.unary_head
    }

    /// Checks that the config makes sense (the builder rejects zero deadlines).
    ///
    /// # Errors
    ///
    /// A first-byte deadline longer than the first-content deadline, or a deadline longer
    /// than the total deadline.
    pub fn validate(&self) -> Result<(), StallConfigError> {
        let named = [
            ("head", self.head()),
            ("unary_head", self.unary_head()),
            ("first_byte", self.first_byte()),
            ("first_content", self.first_content()),
            ("idle", self.idle()),
            ("total", self.total()),
        ];
        if let (Some(fb), Some(fc)) = (self.first_byte(), self.first_content()) {
            if fb > fc {
                return Err(StallConfigError::Order {
                    shorter: "first_byte",
                    longer: "first_content",
                });
            }
        }
        if let Some(total) = self.total() {
            for (what, d) in named.iter().take(5) {
                if d.is_some_and(|d| d > total) {
                    return Err(StallConfigError::Order {
                        shorter: what,
                        longer: "total",
                    });
                }
            }
        }
        Ok(())
    }
}

/// Why a [`StallConfig`] was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StallConfigError {
    /// A deadline of zero would fire before anything could arrive; turn it off with
    /// `None` instead.
    #[error("the {what} deadline is zero: use None to turn it off")]
    Zero {
        /// The deadline's name.
        what: &'static str,
    },
    /// Two deadlines in an order that makes one of them meaningless.
    #[error("the {shorter} deadline is longer than the {longer} deadline, so it could never fire")]
    Order {
        /// The deadline that must not be longer.
        shorter: &'static str,
        /// The deadline it exceeds.
        longer: &'static str,
    },
}

/// Builds a [`StallConfig`] (or a [`StallDetectorLayer`]) from the defaults; see
/// [`StallConfig`] for what each deadline means. Setters take a `Duration` or `None` (off).
#[derive(Debug, Clone, Copy)]
pub struct StallConfigBuilder {
    config: StallConfig,
    /// The first deadline set to zero, reported by `build`.
    zero: Option<&'static str>,
}

impl StallConfigBuilder {
    /// Time from the call to the response head, for streamed requests.
    pub fn head(self, d: impl Into<Option<Duration>>) -> Self {
        self.set("head", d.into(), |c| &mut c.head)
    }
    /// Time from the call to the response head, for requests not known to be streamed
    /// (their head arrives only once the whole answer is generated).
    pub fn unary_head(self, d: impl Into<Option<Duration>>) -> Self {
        self.set("unary_head", d.into(), |c| &mut c.unary_head)
    }
    /// Time from the head to the first body byte of an SSE response.
    pub fn first_byte(self, d: impl Into<Option<Duration>>) -> Self {
        self.set("first_byte", d.into(), |c| &mut c.first_byte)
    }
    /// Time from the head to the first content event of an SSE response.
    pub fn first_content(self, d: impl Into<Option<Duration>>) -> Self {
        self.set("first_content", d.into(), |c| &mut c.first_content)
    }
    /// Longest gap between chunks of an SSE response, once content started.
    pub fn idle(self, d: impl Into<Option<Duration>>) -> Self {
        self.set("idle", d.into(), |c| &mut c.idle)
    }
    /// Time from the call to the end of the body.
    pub fn total(self, d: impl Into<Option<Duration>>) -> Self {
        self.set("total", d.into(), |c| &mut c.total)
    }
    /// Whether every chunk resets the idle timer (`true`, the default: bytes flowing,
    /// pings and comments are signs of life) or only chunks that complete a content event
    /// (`false`: a stream that only pings is a stall after the idle deadline).
    pub fn liveness_resets_idle(mut self, yes: bool) -> Self {
        self.config.liveness_resets_idle = yes;
        self
    }
    /// Whether a stream that ends without its dialect's terminal marker ends with
    /// [`AiError::Truncated`](tower_ai_core::AiError::Truncated) (default `true`). Gemini's
    /// marker is the `finishReason` its last candidate chunk carries.
    pub fn require_terminal(mut self, yes: bool) -> Self {
        self.config.require_terminal = yes;
        self
    }
    /// Whether the response future waits for the first body byte of an SSE response
    /// before handing the response on (default `true`), so that a stall, a cut
    /// connection or an in-stream error before any byte reached the caller is an error of
    /// the call, which retry and fallback layers can act on.
    pub fn await_first_byte(mut self, yes: bool) -> Self {
        self.config.await_first_byte = yes;
        self
    }

    /// Whether the response future holds an SSE response until its first *content* event
    /// (default `false`), instead of handing it on at its first byte. The events before
    /// it (OpenAI's role chunk, Anthropic's `message_start` and `ping`s, Responses'
    /// `response.created`) are held, up to [`max_preamble`](Self::max_preamble) bytes,
    /// and delivered first, unchanged, when content comes. A first-content stall, a cut
    /// connection, a missing terminal marker or an in-stream error before any content
    /// then is an error *of the call* (nothing reached the caller): AiRetry retries it,
    /// ModelFallback moves on, and the circuit breaker counts it. A preamble that
    /// outgrows the bound is handed on as it is (the body then ends with the error as
    /// before).
    ///
    /// Off by default, because it hides from the caller, for up to the first-content
    /// deadline (300 s by default, sized for silent reasoning), the response head (its
    /// request id and rate-limit headers) and the stream's start, which streaming UIs show
    /// as "connected"; and because a retry after a long silent wait sends the prompt, and
    /// pays for it, again. Turn it on together with a first-content deadline sized for the
    /// model when a stalled first token should be retried or failed over.
    pub fn await_first_content(mut self, yes: bool) -> Self {
        self.config.await_first_content = yes;
        self
    }
    /// The most preamble bytes held by [`await_first_content`](Self::await_first_content)
    /// (default [`DEFAULT_MAX_PREAMBLE`], 64 KiB; at most 4 GiB − 1). A normal preamble is
    /// well under 2 KiB; keep-alive comments count too.
    pub fn max_preamble(mut self, bytes: usize) -> Self {
        self.config.max_preamble = u32::try_from(bytes).unwrap_or(u32::MAX);
        self
    }

    /// The largest SSE event the stream reader holds whole, in bytes (default 4 MiB,
    /// [`DEFAULT_MAX_EVENT`](tower_ai_core::sse::DEFAULT_MAX_EVENT); at most 4 GiB − 1,
    /// larger values are capped). It bounds the memory a stream can make the detector
    /// keep. A larger event passes through to the caller untouched but is not read
    /// whole: its name and the start of its data still tell a terminal event (an OpenAI
    /// Responses `response.completed` holding a generated image inline is whole) or an
    /// error event, whatever its size, and the end of its data (its last 16 KiB, less for
    /// a bound under 32 KiB) the finish reason and usage it ends with (a Gemini chunk
    /// holding an inline image ends the stream by its `finishReason` as a small one does);
    /// any other large event counts as content (OpenAI Chat, Gemini) or by its name
    /// (content deltas) and a sign of life otherwise. Only what lies between the two is
    /// lost (see [`SseItem::Oversized`](tower_ai_core::sse::SseItem::Oversized) and the
    /// heuristic of reading keys from a tail).
    pub fn max_event(mut self, bytes: usize) -> Self {
        self.config.max_event = u32::try_from(bytes).unwrap_or(u32::MAX);
        self
    }

    fn set(
        mut self,
        what: &'static str,
        d: Option<Duration>,
        field: impl FnOnce(&mut StallConfig) -> &mut Deadline,
    ) -> Self {
        match store(d) {
            Ok(v) => *field(&mut self.config) = v,
            Err(()) => self.zero = self.zero.or(Some(what)),
        }
        self
    }

    /// The config.
    ///
    /// # Errors
    ///
    /// A deadline set to zero, or see [`StallConfig::validate`].
    pub fn build_config(self) -> Result<StallConfig, StallConfigError> {
        if let Some(what) = self.zero {
            return Err(StallConfigError::Zero { what });
        }
        self.config.validate()?;
        Ok(self.config)
    }

    /// A layer with this config.
    ///
    /// # Errors
    ///
    /// See [`StallConfig::validate`].
    pub fn build(self) -> Result<StallDetectorLayer, StallConfigError> {
        Ok(StallDetectorLayer::with_config(self.build_config()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_errors_are_clear() {
        StallConfig::default().validate().unwrap();
        StallConfig::none().validate().unwrap();
        let e = StallConfig::builder()
            .idle(Duration::ZERO)
            .build_config()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the idle deadline is zero: use None to turn it off"
        );
        let e = StallConfig::builder()
            .first_byte(Duration::from_secs(10))
            .first_content(Duration::from_secs(5))
            .build_config()
            .unwrap_err();
        assert_eq!(
            e,
            StallConfigError::Order {
                shorter: "first_byte",
                longer: "first_content"
            }
        );
        let e = StallConfig::builder()
            .total(Duration::from_secs(30))
            .build_config()
            .unwrap_err();
        assert!(e.to_string().contains("longer than the total"), "{e}");
        let ok = StallConfig::builder()
            .total(None)
            .head(None)
            .build_config()
            .unwrap();
        assert_eq!(ok.total(), None);
        assert_eq!(ok.head(), None);
    }
}
