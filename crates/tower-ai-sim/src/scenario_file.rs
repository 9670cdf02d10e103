//! The JSON form of a scenario (see `Scenario::from_json`).

use std::time::{Duration, UNIX_EPOCH};

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::scenario::{Fault, Latency, ModelSpec, Scenario, ScenarioBuilder, StreamFault};

/// A duration written as `"1s"`/`"250ms"` (humantime) or a number of milliseconds.
#[derive(Debug, Clone, Copy)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Millis(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Millis(ms) => Ok(Dur(Duration::from_millis(ms))),
            Raw::Text(s) => humantime::parse_duration(s.trim())
                .map(Dur)
                .map_err(|e| de::Error::custom(format!("bad duration {s:?}: {e}"))),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum LatencyFile {
    Fixed(Dur),
    Uniform { min: Dur, max: Dur },
}

impl From<LatencyFile> for Latency {
    fn from(l: LatencyFile) -> Self {
        match l {
            LatencyFile::Fixed(d) => Latency::fixed(d.0),
            LatencyFile::Uniform { min, max } => Latency::uniform(min.0, max.0),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    name: String,
    context_window: Option<u64>,
    completion_tokens: Option<u32>,
    latency: Option<LatencyFile>,
    token_interval: Option<LatencyFile>,
}

impl ModelFile {
    fn into_spec(self) -> ModelSpec {
        let mut spec = ModelSpec::new(self.name);
        if let Some(c) = self.context_window {
            spec = spec.context_window(c);
        }
        if let Some(c) = self.completion_tokens {
            spec = spec.completion_tokens(c);
        }
        if let Some(l) = self.latency {
            spec = spec.latency(l.into());
        }
        if let Some(l) = self.token_interval {
            spec = spec.token_interval(l.into());
        }
        spec
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultFile {
    status: u16,
    probability: Option<f64>,
    from: Option<Dur>,
    until: Option<Dur>,
    model: Option<String>,
    retry_after: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutageFile {
    model: String,
    from: Dur,
    until: Dur,
    status: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamFaultFile {
    kind: StreamFaultKind,
    #[serde(default)]
    tokens: u32,
    probability: Option<f64>,
    model: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StreamFaultKind {
    StallBeforeFirstToken,
    StallAfterTokens,
    ErrorEventAfterTokens,
    CutAfterTokens,
    ResetAfterTokens,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ScenarioFile {
    seed: Option<u64>,
    #[serde(default)]
    models: Vec<ModelFile>,
    default_model: Option<ModelFile>,
    #[serde(default)]
    strict_models: bool,
    rpm_limit: Option<u64>,
    tpm_limit: Option<u64>,
    rate_window: Option<Dur>,
    quota_exhausted_after: Option<u64>,
    #[serde(default)]
    faults: Vec<FaultFile>,
    #[serde(default)]
    outages: Vec<OutageFile>,
    latency: Option<LatencyFile>,
    error_latency: Option<LatencyFile>,
    token_interval: Option<LatencyFile>,
    #[serde(default)]
    stream_faults: Vec<StreamFaultFile>,
    stall_duration: Option<Dur>,
    max_body_bytes: Option<usize>,
    /// Seconds since the Unix epoch of the simulator's t = 0.
    wall_clock_unix: Option<u64>,
}

impl ScenarioFile {
    pub(crate) fn into_builder(self) -> ScenarioBuilder {
        let mut b = Scenario::builder().strict_models(self.strict_models);
        if let Some(seed) = self.seed {
            b = b.seed(seed);
        }
        for m in self.models {
            b = b.model(m.into_spec());
        }
        if let Some(m) = self.default_model {
            b = b.default_model(m.into_spec());
        }
        if let Some(n) = self.rpm_limit {
            b = b.rpm_limit(n);
        }
        if let Some(n) = self.tpm_limit {
            b = b.tpm_limit(n);
        }
        if let Some(w) = self.rate_window {
            b = b.rate_window(w.0);
        }
        if let Some(n) = self.quota_exhausted_after {
            b = b.quota_exhausted_after(n);
        }
        for f in self.faults {
            let mut fault = Fault::status(f.status);
            if let Some(p) = f.probability {
                fault = fault.probability(p);
            }
            if f.from.is_some() || f.until.is_some() {
                let from = f.from.map_or(Duration::ZERO, |d| d.0);
                let until = f.until.map_or(Duration::MAX, |d| d.0);
                fault = fault.between(from, until);
            }
            if let Some(m) = f.model {
                fault = fault.model(m);
            }
            if let Some(r) = f.retry_after {
                fault = fault.retry_after(r.0);
            }
            b = b.fault(fault);
        }
        for o in self.outages {
            b = match o.status {
                Some(s) => b.outage_with_status(o.model, o.from.0, o.until.0, s),
                None => b.outage(o.model, o.from.0, o.until.0),
            };
        }
        if let Some(l) = self.latency {
            b = b.latency(l.into());
        }
        if let Some(l) = self.error_latency {
            b = b.error_latency(l.into());
        }
        if let Some(l) = self.token_interval {
            b = b.token_interval(l.into());
        }
        for f in self.stream_faults {
            let probability = f.probability.unwrap_or(1.0);
            let fault = match f.kind {
                StreamFaultKind::StallBeforeFirstToken => {
                    StreamFault::StallBeforeFirstToken { probability }
                }
                StreamFaultKind::StallAfterTokens => StreamFault::StallAfterTokens {
                    tokens: f.tokens,
                    probability,
                },
                StreamFaultKind::ErrorEventAfterTokens => StreamFault::ErrorEventAfterTokens {
                    tokens: f.tokens,
                    probability,
                },
                StreamFaultKind::CutAfterTokens => StreamFault::CutAfterTokens {
                    tokens: f.tokens,
                    probability,
                },
                StreamFaultKind::ResetAfterTokens => StreamFault::ResetAfterTokens {
                    tokens: f.tokens,
                    probability,
                },
            };
            b = match f.model {
                Some(m) => b.stream_fault_for(m, fault),
                None => b.stream_fault(fault),
            };
        }
        if let Some(d) = self.stall_duration {
            b = b.stall_duration(d.0);
        }
        if let Some(n) = self.max_body_bytes {
            b = b.max_body_bytes(n);
        }
        if let Some(secs) = self.wall_clock_unix {
            b = b.wall_clock(UNIX_EPOCH + Duration::from_secs(secs));
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses() {
        let s = Scenario::from_json(
            r#"{
            "seed": 9, "rpm_limit": 10, "tpm_limit": 1000, "rate_window": "30s",
            "quota_exhausted_after": 5, "strict_models": true,
            "models": [{"name": "a", "context_window": 100, "completion_tokens": 3,
                        "latency": "1s", "token_interval": {"min": 1, "max": 2}}],
            "faults": [{"status": 503, "from": "1s", "until": "2s", "retry_after": "3s"}],
            "outages": [{"model": "a", "from": 0, "until": "1m", "status": 500}],
            "error_latency": "5ms",
            "stream_faults": [{"kind": "stall_before_first_token", "model": "a"}],
            "stall_duration": "10s", "max_body_bytes": 1000, "wall_clock_unix": 1700000000
        }"#,
        )
        .unwrap();
        assert_eq!(s.seed(), 9);
        assert_eq!(s.rate_window(), Duration::from_secs(30));
        assert_eq!(s.model_spec("a").unwrap().context_window_tokens(), 100);
        assert!(s.model_spec("b").is_none());
        assert_eq!(s.outages[0].until, Duration::from_secs(60));
        assert_eq!(s.faults[0].retry_after, Some(Duration::from_secs(3)));
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        assert!(Scenario::from_json(r#"{"rpm_limt": 3}"#).is_err());
        assert!(Scenario::from_json(r#"{"latency": "soon"}"#).is_err());
        assert!(Scenario::from_json(r#"{"faults": [{"status": 503, "probability": 2}]}"#).is_err());
        assert!(Scenario::from_json("not json").is_err());
    }
}
