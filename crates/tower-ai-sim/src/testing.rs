//! Helpers for testing stacks frame by frame: a response body the test feeds itself.
//!
//! The simulator scripts whole provider behaviours; some tests need to hold a body at an
//! exact byte (a chunk now, nothing for 30 s, then an error) and look at what a layer did
//! in between. [`body_channel`] gives a body and the handle that feeds it.
//!
//! ```
//! use http_body_util::BodyExt;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let (tx, body) = tower_ai_sim::testing::body_channel();
//! let sent = tx.send("data: {}\n\n");
//! drop(tx); // ends the body
//! assert_eq!(body.collect().await.unwrap().to_bytes(), sent);
//! # }
//! ```

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use tokio::sync::mpsc;

use crate::BoxError;

type Item = Result<Frame<Bytes>, BoxError>;

/// A body and the handle that feeds it. The body ends when every sender is dropped.
pub fn body_channel() -> (BodySender, ChannelBody) {
    let (tx, rx) = mpsc::unbounded_channel();
    (BodySender(tx), ChannelBody(rx))
}

/// A response body whose frames come from a [`BodySender`].
#[derive(Debug)]
pub struct ChannelBody(mpsc::UnboundedReceiver<Item>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        self.0.poll_recv(cx)
    }
}

/// Feeds a [`ChannelBody`]. Sending to a body that was dropped is silently ignored.
#[derive(Debug, Clone)]
pub struct BodySender(mpsc::UnboundedSender<Item>);

impl BodySender {
    /// Sends one data frame; returns the `Bytes` sent, so a test can check that a layer
    /// passed this very buffer on (`Bytes::as_ptr`) rather than a copy.
    pub fn send(&self, data: impl AsRef<[u8]>) -> Bytes {
        let bytes = Bytes::copy_from_slice(data.as_ref());
        let _ = self.0.send(Ok(Frame::data(bytes.clone())));
        bytes
    }

    /// Sends a trailers frame.
    pub fn send_trailers(&self, trailers: HeaderMap) {
        let _ = self.0.send(Ok(Frame::trailers(trailers)));
    }

    /// Fails the body with `err`.
    pub fn fail(&self, err: impl Into<BoxError>) {
        let _ = self.0.send(Err(err.into()));
    }
}

/// A `tracing` subscriber that records every span and event, for tests that check what a
/// layer reports: which spans it opens, which events it emits, with which fields.
///
/// Install it for the current thread with [`TraceLog::install`] (a `#[tokio::test]` on
/// the current-thread runtime runs its tasks on that thread). Field values are kept as their
/// `Debug` text, strings without quotes.
///
/// ```
/// let log = tower_ai_sim::testing::TraceLog::default();
/// {
///     let _guard = log.install();
///     let span = tracing::debug_span!("call", attempts = tracing::field::Empty);
///     tracing::debug!(parent: &span, attempt = 1, "tried");
///     span.record("attempts", 1);
/// }
/// let spans = log.spans();
/// assert_eq!(spans[0].name, "call");
/// assert_eq!(spans[0].field("attempts"), Some("1"));
/// let events = log.events();
/// assert_eq!(events[0].message(), Some("tried"));
/// assert_eq!(events[0].parent, Some(0), "the index of its span");
/// ```
#[derive(Debug, Clone, Default)]
pub struct TraceLog(std::sync::Arc<std::sync::Mutex<Log>>);

#[derive(Debug, Default)]
struct Log {
    spans: Vec<Recorded>,
    events: Vec<Recorded>,
    entered: Vec<usize>,
}

/// A span or an event as [`TraceLog`] saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The span's name, or the event's callsite name.
    pub name: &'static str,
    /// Its level.
    pub level: tracing::Level,
    /// Its fields (for an event, `message` included), values as `Debug` text.
    pub fields: std::collections::BTreeMap<&'static str, String>,
    /// The index in [`TraceLog::spans`] of its parent span: the explicit one, else the
    /// span entered when it was made.
    pub parent: Option<usize>,
}

impl Recorded {
    /// The value of `field`, if it was recorded.
    pub fn field(&self, field: &str) -> Option<&str> {
        self.fields.get(field).map(String::as_str)
    }

    /// An event's message.
    pub fn message(&self) -> Option<&str> {
        self.field("message")
    }
}

/// While alive, the spans and events of the current thread go to a [`TraceLog`].
#[derive(Debug)]
#[must_use = "the log records only while the guard is alive"]
pub struct TraceGuard(Installed);

#[derive(Debug)]
enum Installed {
    /// Routed by the process-wide router: the log this one replaced on the thread.
    Routed(Option<TraceLog>),
    /// The thread's default subscriber (another global subscriber was there first).
    Local(#[allow(dead_code)] tracing::subscriber::DefaultGuard),
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        if let Installed::Routed(prev) = &mut self.0 {
            let prev = prev.take();
            let _ = CURRENT.try_with(|c| *c.borrow_mut() = prev);
        }
    }
}

std::thread_local! {
    static CURRENT: std::cell::RefCell<Option<TraceLog>> = const { std::cell::RefCell::new(None) };
}

/// The process-wide subscriber [`TraceLog::install`] sets once: it hands each span and
/// event to the log installed on the current thread, if any. Being global from the
/// start, it sees every callsite: a thread-local subscriber alone can miss events whose
/// callsite another test thread registered first, while no subscriber wanted it.
struct Router;

fn current() -> Option<TraceLog> {
    CURRENT.try_with(|c| c.borrow().clone()).ok().flatten()
}

impl tracing::Subscriber for Router {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }

    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        CURRENT.try_with(|c| c.borrow().is_some()).unwrap_or(false)
    }

    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        match current() {
            Some(log) => log.new_span(span),
            // Only when the log went away between `enabled` and here.
            None => tracing::span::Id::from_u64(u64::MAX),
        }
    }

    fn record(&self, span: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        if let Some(log) = current() {
            tracing::Subscriber::record(&log, span, values);
        }
    }

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        if let Some(log) = current() {
            log.event(event);
        }
    }

    fn enter(&self, span: &tracing::span::Id) {
        if let Some(log) = current() {
            log.enter(span);
        }
    }

    fn exit(&self, span: &tracing::span::Id) {
        if let Some(log) = current() {
            log.exit(span);
        }
    }
}

impl TraceLog {
    /// Records what the current thread traces until the guard is dropped.
    ///
    /// The first call sets a process-wide router as the global `tracing` subscriber; it
    /// passes each span and event to the log installed on the thread that made it (and
    /// says "disabled" on threads without one). If the process already has a global
    /// subscriber, the log becomes the thread's default subscriber instead. Spans made
    /// under one log should not outlive it.
    pub fn install(&self) -> TraceGuard {
        static ROUTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let routed =
            *ROUTED.get_or_init(|| tracing::subscriber::set_global_default(Router).is_ok());
        if routed {
            let prev = CURRENT.with(|c| c.borrow_mut().replace(self.clone()));
            TraceGuard(Installed::Routed(prev))
        } else {
            TraceGuard(Installed::Local(tracing::subscriber::set_default(
                self.clone(),
            )))
        }
    }

    /// The spans recorded so far, in the order they were made.
    pub fn spans(&self) -> Vec<Recorded> {
        self.lock().spans.clone()
    }

    /// The events recorded so far, in order.
    pub fn events(&self) -> Vec<Recorded> {
        self.lock().events.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Collects fields as `Debug` text.
struct Fields<'a>(&'a mut std::collections::BTreeMap<&'static str, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name(), value.to_owned());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name(), format!("{value:?}"));
    }
}

impl Log {
    /// A span or event with `metadata`, its fields from `record`, and its parent: the
    /// explicit one, else (if contextual) the span entered last.
    fn recorded(
        &self,
        metadata: &'static tracing::Metadata<'static>,
        (parent, contextual): (Option<&tracing::span::Id>, bool),
        record: impl FnOnce(&mut dyn tracing::field::Visit),
    ) -> Recorded {
        let mut fields = std::collections::BTreeMap::new();
        record(&mut Fields(&mut fields));
        let parent = match parent {
            Some(p) => Some(index_of(p)),
            None if contextual => self.entered.last().copied(),
            None => None,
        };
        Recorded {
            name: metadata.name(),
            level: *metadata.level(),
            fields,
            parent,
        }
    }
}

fn index_of(id: &tracing::span::Id) -> usize {
    usize::try_from(id.into_u64() - 1).unwrap_or(usize::MAX)
}

impl tracing::Subscriber for TraceLog {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::always()
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }

    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut log = self.lock();
        let recorded = log.recorded(
            span.metadata(),
            (span.parent(), span.is_contextual()),
            |v| span.record(v),
        );
        log.spans.push(recorded);
        tracing::span::Id::from_u64(log.spans.len() as u64)
    }

    fn record(&self, span: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut log = self.lock();
        if let Some(s) = log.spans.get_mut(index_of(span)) {
            values.record(&mut Fields(&mut s.fields));
        }
    }

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut log = self.lock();
        let recorded = log.recorded(
            event.metadata(),
            (event.parent(), event.is_contextual()),
            |v| event.record(v),
        );
        log.events.push(recorded);
    }

    fn enter(&self, span: &tracing::span::Id) {
        self.lock().entered.push(index_of(span));
    }

    fn exit(&self, span: &tracing::span::Id) {
        let mut log = self.lock();
        let i = index_of(span);
        if let Some(at) = log.entered.iter().rposition(|&e| e == i) {
            log.entered.remove(at);
        }
    }
}
