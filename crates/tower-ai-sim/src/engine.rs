//! The decision for one request: judged at arrival time under the simulator's lock
//! (limits, faults and the call record are updated together, so every decision sees the
//! ones before it; no `.await` is ever reached with the lock held), then rendered in the
//! dialect's shape outside it.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, DATE};
use http::{Response, StatusCode};
use tokio::time::Instant;

use crate::accounting::{digest, CallRecord, Outcome, Stats, StreamFaultKind};
use crate::body::{SimBody, Step};
use crate::dialect::{
    self, anthropic, ceil_millis, ceil_secs, gemini, go_duration, openai, rfc3339, Answer, Ctx,
    Dialect, ErrorCase, LimitKind, RequestFacts, Route, RouteError, StreamEnd,
};
use crate::scenario::{Scenario, StreamFault};

/// The shared state of one simulator.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) scenario: Scenario,
    pub(crate) start: Instant,
    pub(crate) wall_start: SystemTime,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    rng: fastrand::Rng,
    window: u64,
    window_requests: u64,
    window_tokens: u64,
    successes: u64,
    seq: u64,
    calls: Vec<CallRecord>,
    stats: Stats,
}

/// What reached the simulator, before any decision.
#[derive(Debug)]
pub(crate) struct Arrival {
    pub(crate) at: Instant,
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) route: Result<Route, RouteError>,
    /// The body, or the error case reading it gave.
    pub(crate) body: Result<Bytes, ErrorCase>,
}

/// Rate-limit window numbers for headers.
#[derive(Debug, Clone, Copy)]
struct RateSnapshot {
    requests: Option<(u64, u64)>,
    tokens: Option<(u64, u64)>,
    /// Time until the current window ends.
    reset: Duration,
}

#[derive(Debug)]
struct Decision {
    seq: u64,
    dialect: Dialect,
    model: String,
    verdict: Result<(Answer, bool, StreamEnd), ErrorCase>,
    rate: Option<RateSnapshot>,
    retry_after: Option<Duration>,
    delay: Duration,
    stream_seed: u64,
    token_interval: crate::Latency,
    at: Duration,
}

impl Inner {
    pub(crate) fn new(scenario: Scenario, start: Instant) -> Self {
        let wall_start = scenario.wall_clock.unwrap_or_else(|| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            UNIX_EPOCH + Duration::from_secs(now.as_secs())
        });
        Inner {
            state: Mutex::new(State {
                rng: fastrand::Rng::with_seed(scenario.seed),
                window: 0,
                window_requests: 0,
                window_tokens: 0,
                successes: 0,
                seq: 0,
                calls: Vec::new(),
                stats: Stats::default(),
            }),
            scenario,
            start,
            wall_start,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written in
        // a way that matters to a simulator; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn calls(&self) -> Vec<CallRecord> {
        self.lock().calls.clone()
    }

    pub(crate) fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    pub(crate) fn clear_calls(&self) {
        let mut s = self.lock();
        s.calls = Vec::new();
        s.stats = Stats::default();
    }

    /// Decide and render; returns how long after arrival the head is due.
    pub(crate) fn respond(&self, arrival: Arrival) -> (Instant, Response<SimBody>) {
        let due_base = arrival.at;
        let decision = self.decide(arrival);
        let due = due_base + decision.delay;
        (due, self.render(decision))
    }

    fn decide(&self, arrival: Arrival) -> Decision {
        let sc = &self.scenario;
        let at = arrival.at.saturating_duration_since(self.start);
        let (dialect, route) = match &arrival.route {
            Ok(r) => (r.dialect, Some(r)),
            Err(RouteError::NotFound(d)) | Err(RouteError::MethodNotAllowed(d)) => (*d, None),
        };
        // Work that needs no lock: routing and parsing.
        let (body_len, body_digest) = match &arrival.body {
            Ok(b) => (b.len(), digest(b)),
            Err(_) => (0, digest(&[])),
        };
        let parsed: Result<RequestFacts, ErrorCase> = match (&arrival.route, &arrival.body) {
            (Err(RouteError::NotFound(_)), _) => Err(ErrorCase::NotFound {
                method: arrival.method.clone(),
                path: arrival.path.clone(),
            }),
            (Err(RouteError::MethodNotAllowed(_)), _) => Err(ErrorCase::MethodNotAllowed {
                method: arrival.method.clone(),
                path: arrival.path.clone(),
            }),
            (Ok(_), Err(case)) => Err(case.clone()),
            (Ok(route), Ok(body)) => {
                dialect::parse_request(route, body).map_err(ErrorCase::BadRequest)
            }
        };

        let mut st = self.lock();
        let seq = st.seq;
        st.seq += 1;
        let model = parsed.as_ref().ok().map(|f| f.model.clone());
        let outcome;
        let mut rate = None;
        let mut retry_after = None;
        let mut prompt_tokens = 0;
        let verdict: Result<(Answer, bool, StreamEnd), ErrorCase> = match parsed {
            Err(case) => {
                outcome = match case {
                    ErrorCase::NotFound { .. } | ErrorCase::MethodNotAllowed { .. } => {
                        Outcome::NotFound
                    }
                    ErrorCase::BodyTooLarge { .. } => Outcome::BodyTooLarge,
                    _ => Outcome::BadRequest,
                };
                Err(case)
            }
            Ok(facts) => {
                prompt_tokens = facts.prompt_tokens();
                let gemini_sse = route.is_some_and(|r| r.gemini_sse);
                let v = st.judge(
                    sc,
                    at,
                    dialect,
                    &facts,
                    gemini_sse,
                    &mut rate,
                    &mut retry_after,
                );
                outcome = v.1;
                v.0
            }
        };
        let spec = model.as_deref().and_then(|m| sc.model_spec(m));
        let (delay, token_interval) = match &verdict {
            Err(_) => (sc.error_latency.sample(&mut st.rng), sc.token_interval),
            Ok((answer, stream, _)) => {
                let latency = spec.and_then(|s| s.latency).unwrap_or(sc.latency);
                let interval = spec
                    .and_then(|s| s.token_interval)
                    .unwrap_or(sc.token_interval);
                let mut d = latency.sample(&mut st.rng);
                if !stream {
                    for _ in 0..answer.completion_tokens {
                        d = d.saturating_add(interval.sample(&mut st.rng));
                    }
                }
                (d, interval)
            }
        };
        let stream_seed = st.rng.u64(..);
        let (status, completion_tokens, truncated, stream_fault, streamed) = match &verdict {
            Ok((a, stream, end)) => {
                let (sent, fault) = match *end {
                    StreamEnd::Complete => (a.completion_tokens, None),
                    StreamEnd::StallBeforeFirst => {
                        (0, Some(StreamFaultKind::StallBeforeFirstToken))
                    }
                    StreamEnd::StallAfter(k) => (
                        k.min(a.completion_tokens),
                        Some(StreamFaultKind::StallAfterTokens(k)),
                    ),
                    StreamEnd::ErrorAfter(k) => (
                        k.min(a.completion_tokens),
                        Some(StreamFaultKind::ErrorEventAfterTokens(k)),
                    ),
                    StreamEnd::CutAfter(k) => (
                        k.min(a.completion_tokens),
                        Some(StreamFaultKind::CutAfterTokens(k)),
                    ),
                    StreamEnd::ResetAfter(k) => (
                        k.min(a.completion_tokens),
                        Some(StreamFaultKind::ResetAfterTokens(k)),
                    ),
                };
                (200, sent, a.truncated, fault, *stream)
            }
            Err(case) => (case.status(), 0, false, None, false),
        };
        let record = CallRecord {
            seq,
            at,
            dialect,
            path: arrival.path.clone(),
            model: model.clone(),
            status,
            outcome,
            streamed,
            prompt_tokens,
            completion_tokens,
            truncated,
            stream_fault,
            body_len,
            body_digest,
        };
        st.stats.add(&record);
        st.calls.push(record);
        drop(st);
        Decision {
            seq,
            dialect,
            model: model.unwrap_or_default(),
            verdict,
            rate,
            retry_after,
            delay,
            stream_seed,
            token_interval,
            at,
        }
    }

    fn render(&self, d: Decision) -> Response<SimBody> {
        let sc = &self.scenario;
        let wall_now = self.wall_start + d.at;
        let day = Duration::from_secs(86_400);
        let wall_secs = wall_now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let until_next_day =
            day - Duration::from_nanos((wall_secs.as_nanos() % day.as_nanos()) as u64);
        let ctx = Ctx {
            model: d.model.clone(),
            seq: d.seq,
            wall_now,
            retry_after: d.retry_after,
            until_next_day,
        };
        let mut builder = Response::builder();
        let (status, body) = match &d.verdict {
            Err(case) => {
                let status = case.status();
                let json = match d.dialect {
                    Dialect::OpenAi | Dialect::AzureOpenAi => {
                        openai::error_body(d.dialect, case, &ctx)
                    }
                    Dialect::Anthropic => anthropic::error_body(case, &ctx),
                    Dialect::Gemini => gemini::error_body(case, &ctx),
                };
                let ct = if d.dialect == Dialect::Gemini {
                    "application/json; charset=UTF-8"
                } else {
                    "application/json"
                };
                builder = builder.header(CONTENT_TYPE, ct);
                let bytes = Bytes::from(json.to_string());
                builder = builder.header(CONTENT_LENGTH, bytes.len());
                (status, SimBody::full(bytes))
            }
            Ok((answer, false, _)) => {
                let json = match d.dialect {
                    Dialect::OpenAi | Dialect::AzureOpenAi => openai::success_json(&ctx, answer),
                    Dialect::Anthropic => anthropic::success_json(&ctx, answer),
                    Dialect::Gemini => gemini::success_json(&ctx, answer),
                };
                let ct = if d.dialect == Dialect::Gemini {
                    "application/json; charset=UTF-8"
                } else {
                    "application/json"
                };
                let bytes = Bytes::from(json.to_string());
                builder = builder
                    .header(CONTENT_TYPE, ct)
                    .header(CONTENT_LENGTH, bytes.len());
                (200, SimBody::full(bytes))
            }
            Ok((answer, true, end)) => {
                let pieces = match d.dialect {
                    Dialect::OpenAi | Dialect::AzureOpenAi => openai::stream(&ctx, answer, *end),
                    Dialect::Anthropic => anthropic::stream(&ctx, answer, *end),
                    Dialect::Gemini => gemini::stream(&ctx, answer, *end),
                };
                let mut rng = fastrand::Rng::with_seed(d.stream_seed);
                let mut steps = VecDeque::with_capacity(pieces.len() * 2 + 1);
                for p in pieces {
                    if p.is_token {
                        steps.push_back(Step::Wait(d.token_interval.sample(&mut rng)));
                    }
                    steps.push_back(Step::Data(p.bytes));
                }
                if matches!(end, StreamEnd::StallBeforeFirst | StreamEnd::StallAfter(_)) {
                    steps.push_back(Step::Stall(sc.stall_duration));
                }
                if let StreamEnd::ResetAfter(_) = end {
                    // A failure at once: over HTTP, a connection cut mid-body.
                    steps.push_back(Step::Stall(Duration::ZERO));
                }
                let ct = match d.dialect {
                    Dialect::Gemini if !answer.gemini_sse => "application/json; charset=UTF-8",
                    Dialect::Gemini => "text/event-stream",
                    _ => "text/event-stream; charset=utf-8",
                };
                builder = builder
                    .header(CONTENT_TYPE, ct)
                    .header(CACHE_CONTROL, "no-cache");
                (200, SimBody::stream(steps))
            }
        };
        let mut response = builder
            .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
            .body(body)
            .unwrap_or_else(|_| Response::new(SimBody::empty()));
        let headers = response.headers_mut();
        let mut put = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::try_from(value) {
                headers.insert(HeaderName::from_static(name), v);
            }
        };
        let quota = matches!(d.verdict, Err(ErrorCase::QuotaExhausted));
        let too_large = matches!(
            d.verdict,
            Err(ErrorCase::RateLimited {
                too_large: true,
                ..
            })
        );
        match d.dialect {
            Dialect::OpenAi | Dialect::AzureOpenAi => {
                let azure = d.dialect == Dialect::AzureOpenAi;
                put("x-request-id", format!("req_sim{:024x}", d.seq));
                put("openai-version", "2020-10-01".into());
                put("openai-processing-ms", d.delay.as_millis().to_string());
                if let Some(r) = d.rate {
                    let reset = |dur: Duration| {
                        if azure {
                            ceil_secs(dur).to_string()
                        } else {
                            go_duration(round_ms(dur))
                        }
                    };
                    if let Some((limit, remaining)) = r.requests {
                        put("x-ratelimit-limit-requests", limit.to_string());
                        put("x-ratelimit-remaining-requests", remaining.to_string());
                        put("x-ratelimit-reset-requests", reset(r.reset));
                    }
                    if let Some((limit, remaining)) = r.tokens {
                        put("x-ratelimit-limit-tokens", limit.to_string());
                        put("x-ratelimit-remaining-tokens", remaining.to_string());
                        put("x-ratelimit-reset-tokens", reset(r.reset));
                    }
                }
                if let Some(wait) = d.retry_after {
                    put("retry-after", ceil_secs(wait).to_string());
                    if azure {
                        put("retry-after-ms", ceil_millis(wait).to_string());
                    }
                }
            }
            Dialect::Anthropic => {
                put("request-id", anthropic::request_id(&ctx));
                if let Some(r) = d.rate {
                    let reset_at = rfc3339(wall_now + r.reset);
                    if let Some((limit, remaining)) = r.requests {
                        put("anthropic-ratelimit-requests-limit", limit.to_string());
                        put(
                            "anthropic-ratelimit-requests-remaining",
                            remaining.to_string(),
                        );
                        put("anthropic-ratelimit-requests-reset", reset_at.clone());
                    }
                    if let Some((limit, remaining)) = r.tokens {
                        // "rounded to the nearest thousand" (docs/protocols.md#anthropic-rate-limit-headers)
                        let rounded = ((remaining + 500) / 1000 * 1000).min(limit);
                        put("anthropic-ratelimit-tokens-limit", limit.to_string());
                        put("anthropic-ratelimit-tokens-remaining", rounded.to_string());
                        put("anthropic-ratelimit-tokens-reset", reset_at);
                    }
                }
                if let Some(wait) = d.retry_after {
                    put("retry-after", ceil_secs(wait).to_string());
                }
                if !quota && !too_large && (status == 429 || status >= 500) {
                    put("x-should-retry", "true".into());
                }
            }
            Dialect::Gemini => {}
        }
        put("date", httpdate::fmt_http_date(wall_now));
        debug_assert!(response.headers().contains_key(DATE));
        response
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(ceil_millis(d)).unwrap_or(u64::MAX))
}

fn draw(rng: &mut fastrand::Rng, p: f64) -> bool {
    if p >= 1.0 {
        true
    } else if p <= 0.0 {
        false
    } else {
        rng.f64() < p
    }
}

impl State {
    /// Judge a well-formed request. Returns the verdict and its outcome; fills
    /// in the rate snapshot and the wait to advertise.
    #[allow(clippy::too_many_arguments)]
    fn judge(
        &mut self,
        sc: &Scenario,
        at: Duration,
        dialect: Dialect,
        facts: &RequestFacts,
        gemini_sse: bool,
        rate: &mut Option<RateSnapshot>,
        retry_after: &mut Option<Duration>,
    ) -> (Result<(Answer, bool, StreamEnd), ErrorCase>, Outcome) {
        let Some(spec) = sc.model_spec(&facts.model) else {
            return (Err(ErrorCase::ModelNotFound), Outcome::ModelNotFound);
        };
        let prompt = facts.prompt_tokens();
        let completion = match facts.max_tokens {
            Some(max) => u64::from(spec.completion_tokens).min(max) as u32,
            None => spec.completion_tokens,
        };
        let truncated = facts
            .max_tokens
            .is_some_and(|m| m < u64::from(spec.completion_tokens));
        let answer = Answer {
            prompt_tokens: prompt,
            completion_tokens: completion,
            truncated,
            include_usage: facts.include_usage,
            gemini_sse,
        };

        if sc.quota_after.is_some_and(|n| self.successes >= n)
            || sc.quota_models.contains(&facts.model)
        {
            return (Err(ErrorCase::QuotaExhausted), Outcome::QuotaExhausted);
        }

        // The rate window this arrival falls in (never earlier than the current one).
        let window_nanos = sc.rate_window.as_nanos().max(1);
        let index = u64::try_from(at.as_nanos() / window_nanos).unwrap_or(u64::MAX);
        if index > self.window {
            self.window = index;
            self.window_requests = 0;
            self.window_tokens = 0;
        }
        let end_nanos = u128::from(self.window).saturating_add(1) * window_nanos;
        let reset = Duration::from_nanos(
            u64::try_from(end_nanos.saturating_sub(at.as_nanos())).unwrap_or(u64::MAX),
        );
        let limited = sc.rpm_limit.is_some() || sc.tpm_limit.is_some();
        let snapshot = |s: &State| RateSnapshot {
            requests: sc
                .rpm_limit
                .map(|l| (l, l.saturating_sub(s.window_requests))),
            tokens: sc.tpm_limit.map(|l| (l, l.saturating_sub(s.window_tokens))),
            reset,
        };

        if let Some(outage) = sc.outage_for(&facts.model, at) {
            if limited {
                *rate = Some(snapshot(self));
            }
            let status = outage
                .status
                .unwrap_or_else(|| Scenario::overload_status(dialect));
            return (Err(ErrorCase::Status(status)), Outcome::Outage);
        }
        if prompt > spec.context_window {
            if limited {
                *rate = Some(snapshot(self));
            }
            return (
                Err(ErrorCase::ContextLength {
                    prompt,
                    window: spec.context_window,
                }),
                Outcome::ContextLengthExceeded,
            );
        }

        let cost = prompt + u64::from(completion);
        if let Some(limit) = sc.rpm_limit {
            if self.window_requests >= limit {
                *rate = Some(snapshot(self));
                *retry_after = Some(reset);
                return (
                    Err(ErrorCase::RateLimited {
                        kind: LimitKind::Requests,
                        limit,
                        used: self.window_requests,
                        requested: 1,
                        too_large: false,
                    }),
                    Outcome::RateLimitedRequests,
                );
            }
        }
        if let Some(limit) = sc.tpm_limit {
            let too_large = cost > limit;
            if too_large || self.window_tokens + cost > limit {
                *rate = Some(snapshot(self));
                if !too_large {
                    *retry_after = Some(reset);
                }
                return (
                    Err(ErrorCase::RateLimited {
                        kind: LimitKind::Tokens,
                        limit,
                        used: self.window_tokens,
                        requested: cost,
                        too_large,
                    }),
                    if too_large {
                        Outcome::RequestTooLarge
                    } else {
                        Outcome::RateLimitedTokens
                    },
                );
            }
        }
        self.window_requests += 1;
        self.window_tokens += cost;
        if limited {
            *rate = Some(snapshot(self));
        }

        for fault in &sc.faults {
            if fault.matches(at, &facts.model) && draw(&mut self.rng, fault.probability) {
                *retry_after = fault
                    .retry_after
                    .or((fault.status == 429).then_some(Duration::from_secs(1)));
                return (Err(ErrorCase::Status(fault.status)), Outcome::Fault);
            }
        }

        let mut end = StreamEnd::Complete;
        if facts.stream {
            for (model, f) in &sc.stream_faults {
                let for_model = model.as_deref().is_none_or(|m| m == facts.model);
                if for_model && draw(&mut self.rng, f.probability()) {
                    end = match *f {
                        StreamFault::StallBeforeFirstToken { .. } => StreamEnd::StallBeforeFirst,
                        StreamFault::StallAfterTokens { tokens, .. } => {
                            StreamEnd::StallAfter(tokens)
                        }
                        StreamFault::ErrorEventAfterTokens { tokens, .. } => {
                            StreamEnd::ErrorAfter(tokens)
                        }
                        StreamFault::CutAfterTokens { tokens, .. } => StreamEnd::CutAfter(tokens),
                        StreamFault::ResetAfterTokens { tokens, .. } => {
                            StreamEnd::ResetAfter(tokens)
                        }
                    };
                    break;
                }
            }
        }
        self.successes += 1;
        (Ok((answer, facts.stream, end)), Outcome::Success)
    }
}
