//! What the layers' `metrics` features share (feature `metrics`): metric keys built once,
//! so that recording a labelled metric allocates nothing, and the cap on per-key label
//! values.
//!
//! Each layer crate records through the [`metrics`](https://docs.rs/metrics) facade when
//! its `metrics` feature is on: with no recorder installed a record is a thread-local read
//! and an atomic load, with no allocation (the keys below are built on first use and
//! kept). The metric names, types, units and labels are listed in the README ("Metrics").
//!
//! Label values come from fixed sets (error kinds, wait sources, limits, phases) or from
//! names the user configured (fallback routes), with one exception: the CircuitBreaker's
//! per-key state, labelled by the key's readable label (provider host and model by
//! default, capped at [`MAX_LABEL_LEN`](crate::keys::MAX_LABEL_LEN) bytes). Those pass
//! through a [`LabelCap`]: the first [`MAX_KEY_LABELS`] distinct values a layer sees are
//! kept, every later one is recorded as [`OTHER`]. API keys and request bodies are never
//! label values.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

pub use metrics;
use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, SharedString};

/// How many distinct per-key label values one layer records; later keys are [`OTHER`].
pub const MAX_KEY_LABELS: usize = 64;

/// The label value of every key past [`MAX_KEY_LABELS`], and of a value outside a
/// [`KeyTable`]'s set: `_OTHER`, as OpenTelemetry's semantic conventions spell a value
/// outside a known set (the GenAI metrics' caps use it too).
pub const OTHER: &str = "_OTHER";

/// Bucket boundaries, in seconds, the README recommends for the layers' wait histograms
/// (`tower_ai.*.wait`): 5 ms to 10 minutes, since a provider's `Retry-After` or a budget's
/// window can hold a request for minutes.
pub const WAIT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Every [`ErrorKind`](crate::ErrorKind)'s name, then [`OTHER`]: the values of an
/// `error_type` label.
pub const ERROR_TYPES: &[&str] = &[
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
    OTHER,
];

static METADATA: Metadata<'static> = Metadata::new("tower_ai", Level::INFO, Some("tower_ai"));

/// One metric name with a fixed set of values per label: its [`Key`]s are made on first
/// use (one per combination) and kept, so recording allocates nothing.
///
/// A value outside a label's set is recorded as the set's last value (make it [`OTHER`]
/// when the set is not closed).
pub struct KeyTable<const N: usize> {
    name: &'static str,
    labels: [(&'static str, &'static [&'static str]); N],
    keys: OnceLock<Box<[Key]>>,
}

impl<const N: usize> fmt::Debug for KeyTable<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyTable")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<const N: usize> KeyTable<N> {
    /// `name` with `labels`: each a label name and its values (at least one).
    pub const fn new(
        name: &'static str,
        labels: [(&'static str, &'static [&'static str]); N],
    ) -> Self {
        KeyTable {
            name,
            labels,
            keys: OnceLock::new(),
        }
    }

    /// The metric's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    fn keys(&self) -> &[Key] {
        self.keys.get_or_init(|| {
            let total: usize = self.labels.iter().map(|(_, v)| v.len().max(1)).product();
            (0..total)
                .map(|mut flat| {
                    let mut labels = Vec::with_capacity(N);
                    for (name, values) in self.labels.iter().rev() {
                        let len = values.len().max(1);
                        let value = values.get(flat % len).copied().unwrap_or(OTHER);
                        labels.push(Label::from_static_parts(name, value));
                        flat /= len;
                    }
                    labels.reverse();
                    Key::from_parts(self.name, labels)
                })
                .collect()
        })
    }

    /// The key whose label values are `values` (one per label, in order; a value outside
    /// its set is the set's last value).
    pub fn key(&self, values: [&str; N]) -> &Key {
        let mut flat = 0;
        for ((_, set), value) in self.labels.iter().zip(values) {
            let len = set.len().max(1);
            let i = set.iter().position(|v| *v == value).unwrap_or(len - 1);
            flat = flat * len + i;
        }
        // In range by construction; the first key otherwise.
        let keys = self.keys();
        keys.get(flat).unwrap_or(&keys[0])
    }

    /// The key whose label values are at `indices` in their sets (one per label, in
    /// order; an index past its set is the set's last value): [`key`](Self::key) without
    /// comparing strings, for a hot path that knows its values' places.
    pub fn key_at(&self, indices: [usize; N]) -> &Key {
        let mut flat = 0;
        for ((_, set), i) in self.labels.iter().zip(indices) {
            let len = set.len().max(1);
            flat = flat * len + i.min(len - 1);
        }
        let keys = self.keys();
        keys.get(flat).unwrap_or(&keys[0])
    }

    /// The counter whose label values are at `indices` (see [`key_at`](Self::key_at)).
    pub fn counter_at(&self, indices: [usize; N]) -> Counter {
        let key = self.key_at(indices);
        metrics::with_recorder(|r| r.register_counter(key, &METADATA))
    }

    /// The counter with these label values.
    pub fn counter(&self, values: [&str; N]) -> Counter {
        let key = self.key(values);
        metrics::with_recorder(|r| r.register_counter(key, &METADATA))
    }

    /// The gauge with these label values.
    pub fn gauge(&self, values: [&str; N]) -> Gauge {
        let key = self.key(values);
        metrics::with_recorder(|r| r.register_gauge(key, &METADATA))
    }

    /// The histogram with these label values.
    pub fn histogram(&self, values: [&str; N]) -> Histogram {
        let key = self.key(values);
        metrics::with_recorder(|r| r.register_histogram(key, &METADATA))
    }
}

/// The counter of a prepared key (a key with labels the user configured, such as a route
/// name, made once when the layer is built).
pub fn counter(key: &Key) -> Counter {
    metrics::with_recorder(|r| r.register_counter(key, &METADATA))
}

/// The gauge of a prepared key.
pub fn gauge(key: &Key) -> Gauge {
    metrics::with_recorder(|r| r.register_gauge(key, &METADATA))
}

/// The histogram of a prepared key.
pub fn histogram(key: &Key) -> Histogram {
    metrics::with_recorder(|r| r.register_histogram(key, &METADATA))
}

/// Keeps a layer's per-key label values bounded: the first [`MAX_KEY_LABELS`] distinct
/// values are recorded as they are, later ones as [`OTHER`]. For rare events only (a
/// breaker's state change): it takes a lock.
#[derive(Debug, Default)]
pub struct LabelCap {
    seen: Mutex<HashSet<Arc<str>>>,
}

impl LabelCap {
    /// An empty cap.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value to record for `label`: itself while fewer than [`MAX_KEY_LABELS`]
    /// distinct values were seen (or it is one of them), else [`OTHER`].
    pub fn label(&self, label: &Arc<str>) -> SharedString {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(label) {
            return SharedString::from(String::from(&**label));
        }
        if seen.len() < MAX_KEY_LABELS {
            seen.insert(label.clone());
            return SharedString::from(String::from(&**label));
        }
        SharedString::const_str(OTHER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static T: KeyTable<2> = KeyTable::new("t", [("a", &["x", "y", OTHER]), ("b", &["one", "two"])]);

    #[test]
    fn keys_carry_their_labels_and_fold_unknown_values() {
        let k = T.key(["y", "two"]);
        assert_eq!(k.name(), "t");
        let labels: Vec<_> = k.labels().map(|l| (l.key(), l.value())).collect();
        assert_eq!(labels, [("a", "y"), ("b", "two")]);
        let k = T.key(["zzz", "one"]);
        let labels: Vec<_> = k.labels().map(|l| (l.key(), l.value())).collect();
        assert_eq!(labels, [("a", OTHER), ("b", "one")]);
        // the same key every time
        assert!(std::ptr::eq(T.key(["x", "one"]), T.key(["x", "one"])));
    }

    #[test]
    fn a_key_by_index_is_the_key_by_value() {
        assert!(std::ptr::eq(T.key_at([1, 1]), T.key(["y", "two"])));
        assert!(std::ptr::eq(T.key_at([0, 0]), T.key(["x", "one"])));
        // Past a set's end: its last value, as an unknown value is.
        assert!(std::ptr::eq(T.key_at([9, 0]), T.key(["zzz", "one"])));
    }

    #[test]
    fn every_error_kind_has_its_value() {
        use crate::ErrorKind::*;
        for k in [
            RateLimited,
            QuotaExhausted,
            Overloaded,
            ServerError,
            Timeout,
            Connection,
            Stalled,
            ContextLengthExceeded,
            ContentFiltered,
            RequestTooLarge,
            Unauthorized,
            Forbidden,
            NotFound,
            BadRequest,
            Unknown,
        ] {
            assert!(ERROR_TYPES.contains(&k.as_str()), "{k:?}");
        }
    }

    #[test]
    fn the_cap_folds_keys_past_the_limit() {
        let cap = LabelCap::new();
        for i in 0..MAX_KEY_LABELS {
            let l: Arc<str> = Arc::from(format!("k{i}"));
            assert_eq!(&*cap.label(&l), l.as_ref());
        }
        assert_eq!(&*cap.label(&Arc::from("late")), OTHER);
        assert_eq!(&*cap.label(&Arc::from("k3")), "k3");
    }
}
