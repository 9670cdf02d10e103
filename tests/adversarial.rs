//! A hostile tenant against the whole stack (issue #16): `AiStack` with a per-API-key
//! budget and a fallback chain over the simulator, in-process on a paused clock.
//!
//! The tenant invents API keys and model names by the hundred thousand, sends 1 MiB model
//! names, churns keys to push its exhausted key out of the budget's map, and floods one
//! key with waiters. Asserted: no exhausted window is ever reset, waiters never exceed
//! the caps, every per-key map stays within its bound, and the memory all per-key maps
//! hold is bounded (counted with the allocator and with each layer's own accessors).
//!
//! Sizes: the per-key maps are driven with 10^6 hostile keys each in an optimised build
//! (200,000 in a debug build, see [`map_keys`]), directly: one layer over a trivial
//! service, what a key costs that layer. The whole stack takes [`STACK_KEYS`]: a call
//! through seven layers and the simulator costs about 50 µs in a debug build, so 10^6
//! would take minutes; the maps it fills are the same ones.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tower::util::BoxCloneService;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_ai::core::keys::{ApiKeyHash, HostModel, Key, KeyFn, MAX_LABEL_LEN};
use tower_ai::prelude::*;
use tower_ai_sim::{ModelSpec, Scenario, Simulator};

/// Distinct hostile keys through the whole stack.
const STACK_KEYS: u64 = 50_000;
/// Distinct hostile keys through each per-key map: 10^6 in an optimised build, 200,000
/// in a debug build (10^6 take about two minutes there on a CI machine with 2 cores;
/// the maps are full long before either). `ADVERSARIAL_KEYS=1000000` sets it.
fn map_keys() -> u64 {
    std::env::var("ADVERSARIAL_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) {
            200_000
        } else {
            1_000_000
        })
}

fn sim() -> Simulator {
    Simulator::new(
        Scenario::builder()
            .model(ModelSpec::new("gpt-4o").completion_tokens(4))
            .model(ModelSpec::new("gpt-4o-mini").completion_tokens(4))
            // No latency: the flood takes no virtual time, so the victim's minute is
            // still running when it is asked again.
            .latency(tower_ai_sim::Latency::fixed(Duration::ZERO))
            .token_interval(tower_ai_sim::Latency::fixed(Duration::ZERO))
            .build()
            .unwrap(),
    )
}

fn ask(key: &str, model: &str) -> Request<AiBody> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(AiBody::from(format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":4}}"#
        )))
        .unwrap()
}

/// The stack with default settings everywhere but the budget (per API key) and a
/// fallback model; the layers kept to read their state.
struct Rig {
    budget: TokenBudgetLayer<ApiKeyHash>,
    gate: RetryAfterAwareLayer,
    breaker: CircuitBreakerLayer,
    victim_calls: Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>,
    sim: Simulator,
}

/// What a call came to: the status of a response (its body read whole), or the error.
type Outcome = Result<u16, BoxError>;

impl Rig {
    fn new(budget: TokenBudgetLayer<ApiKeyHash>) -> Rig {
        Rig {
            budget,
            gate: RetryAfterAwareLayer::new(),
            breaker: CircuitBreakerLayer::new(),
            victim_calls: Arc::default(),
            sim: sim(),
        }
    }

    fn service(&self) -> BoxCloneService<Request<AiBody>, u16, BoxError> {
        let stack = AiStack::seeded(16)
            .circuit_breaker(self.breaker.clone())
            .retry_after(self.gate.clone())
            .budget(self.budget.clone())
            .fallback(ModelFallbackLayer::models(["gpt-4o-mini"]).unwrap());
        let sim = self.sim.service();
        let victim = self.victim_calls.clone();
        let upstream = service_fn(move |req: Request<AiBody>| {
            if req
                .headers()
                .get("authorization")
                .is_some_and(|v| v == "Bearer victim")
            {
                victim.lock().unwrap().push(tokio::time::Instant::now());
            }
            sim.clone().oneshot(req)
        });
        BoxCloneService::new(
            stack
                .layer(upstream)
                .and_then(|res: Response<_>| async move {
                    let status = res.status().as_u16();
                    let _ = http_body_util::BodyExt::collect(res.into_body()).await;
                    Ok(status)
                }),
        )
    }

    /// Bytes the per-key maps hold, by their own accounting: (budget, cooldown gate).
    fn map_bytes(&self) -> (usize, usize) {
        (
            self.budget.stats().approx_bytes,
            self.gate.stats().approx_bytes,
        )
    }
}

async fn call(
    svc: &BoxCloneService<Request<AiBody>, u16, BoxError>,
    req: Request<AiBody>,
) -> Outcome {
    svc.clone().oneshot(req).await
}

fn default_budget() -> TokenBudgetLayer<ApiKeyHash> {
    TokenBudgetLayer::builder()
        .key_fn(ApiKeyHash)
        .requests_per_minute(1)
        .tokens_per_minute(100_000)
        .reject()
        .build()
        .unwrap()
}

/// 50,000 hostile tenants, each with its own key and its own junk model name, through
/// the whole stack, against a victim whose key was exhausted just before: the victim's
/// window is never reset (the budget still counts its request however many keys pass,
/// and no second request of it reaches the provider before its minute is over), and
/// every map is within its bound.
#[tokio::test(start_paused = true)]
async fn a_flood_of_keys_and_models_resets_nothing_and_stays_bounded() {
    let rig = Rig::new(default_budget());
    let svc = rig.service();
    let victim = ApiKeyHash.key(&ask("victim", "gpt-4o")).unwrap();
    assert_eq!(call(&svc, ask("victim", "gpt-4o")).await.unwrap(), 200);
    let exhausted_at = tokio::time::Instant::now();
    let started = std::time::Instant::now();
    for i in 0..STACK_KEYS {
        let _ = call(&svc, ask(&format!("junk-{i}"), &format!("model-{i}"))).await;
        if i % 1_000 == 0 {
            let snap = rig
                .budget
                .snapshot(victim)
                .expect("the victim's key is never forgotten");
            assert_eq!(snap.requests, Some(1), "after {i} junk keys");
        }
    }
    let flood = started.elapsed();
    assert!(
        exhausted_at.elapsed() < Duration::from_secs(60),
        "the flood took no virtual time: still inside the victim's minute"
    );
    // The victim asks again: refused (every route, by the budget of its key).
    let err = call(&svc, ask("victim", "gpt-4o")).await.unwrap_err();
    assert_eq!(err_kind(&err), ErrorKind::RateLimited, "{err}");
    // Once its minute is over, it is served again: limited, not lost.
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(call(&svc, ask("victim", "gpt-4o")).await.unwrap(), 200);
    let times = rig.victim_calls.lock().unwrap().clone();
    assert_eq!(times.len(), 2, "{times:?}");
    let gap = times[1] - times[0];
    assert!(
        gap >= Duration::from_secs(59),
        "the victim's second call came {gap:?} after its first"
    );
    let budget = rig.budget.stats();
    let gate = rig.gate.stats();
    let breaker = rig.breaker.handle();
    println!(
        "{STACK_KEYS} hostile keys through the stack in {flood:?}: budget {} keys ({} overflowed, {} bytes), cooldown gate {} keys ({} bytes), breaker {} keys; the victim's next call reached the provider {gap:?} after its first",
        budget.keys,
        budget.overflowed,
        budget.approx_bytes,
        gate.keys,
        gate.approx_bytes,
        breaker.key_count(),
    );
    assert!(budget.keys <= 10_001, "{} budget keys", budget.keys);
    assert!(
        breaker.key_count() <= 1024,
        "{} circuits",
        breaker.key_count()
    );
    for m in breaker.all_metrics() {
        assert!(m.label.len() <= MAX_LABEL_LEN);
    }
    let (b, g) = rig.map_bytes();
    assert!(b + g < 64 << 20, "{b} + {g} bytes");
}

fn err_kind(err: &BoxError) -> ErrorKind {
    ErrorKind::of_error(&**err)
}

/// 1 MiB model names: refused with a clear error before any layer keeps them; nothing
/// reaches the provider, no circuit or cooldown is made for them.
#[tokio::test(start_paused = true)]
async fn one_mib_model_names_are_refused_and_pin_nothing() {
    let rig = Rig::new(default_budget());
    let svc = rig.service();
    for i in 0..64 {
        let model = format!("{i}{}", "m".repeat(1 << 20));
        let err = call(&svc, ask(&format!("tenant-{i}"), &model))
            .await
            .unwrap_err();
        let Some(AiError::ModelTooLong { len, .. }) = AiError::find(&*err) else {
            panic!("{err}")
        };
        assert!(*len > 1 << 20);
        assert!(err.to_string().len() < 200, "the error is short");
    }
    assert_eq!(rig.sim.calls().len(), 0, "nothing reached the provider");
    assert_eq!(rig.breaker.handle().key_count(), 0);
    assert_eq!(rig.gate.stats().keys, 0);
    assert_eq!(rig.budget.stats().keys, 0);
}

/// One key flooded with waiters: the budget holds at most its caps waiting, refuses the
/// rest at once, and the held ones are served as the window frees.
#[tokio::test(start_paused = true)]
async fn a_waiter_flood_never_exceeds_the_caps() {
    let budget = TokenBudgetLayer::builder()
        .key_fn(ApiKeyHash)
        .requests_per_minute(1)
        .wait(Duration::from_secs(3600))
        .build()
        .unwrap();
    let rig = Rig::new(budget);
    let svc = rig.service();
    assert_eq!(call(&svc, ask("flood", "gpt-4o")).await.unwrap(), 200);
    let tasks: Vec<_> = (0..5_000)
        .map(|i| {
            let svc = svc.clone();
            let key = if i % 2 == 0 {
                "flood".to_owned()
            } else {
                format!("flood-{}", i % 64)
            };
            tokio::spawn(svc.oneshot(ask(&key, "gpt-4o")))
        })
        .collect();
    let flood = ApiKeyHash.key(&ask("flood", "gpt-4o")).unwrap();
    let mut max_waiters = 0;
    let mut max_per_key = 0;
    for _ in 0..50 {
        tokio::task::yield_now().await;
        max_waiters = max_waiters.max(rig.budget.stats().waiters);
        max_per_key = max_per_key.max(rig.budget.snapshot(flood).map_or(0, |s| s.waiting));
    }
    let mut refused = 0;
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(7200), t).await {
            Ok(Ok(Err(_))) => refused += 1,
            Ok(Ok(Ok(_))) => {}
            other => panic!("{other:?}"),
        }
        max_waiters = max_waiters.max(rig.budget.stats().waiters);
    }
    println!(
        "waiter flood: at most {max_waiters} waiting ({max_per_key} on the flooded key), {refused} of 5,000 refused"
    );
    assert!(max_waiters <= 4096, "{max_waiters} waiters");
    assert!(max_per_key <= 256, "{max_per_key} waiters on one key");
    assert!(max_per_key > 0, "the flood did wait");
    assert!(refused > 0);
    assert_eq!(rig.budget.stats().waiters, 0);
}

// ---------------------------------------------------------------------------------
// 10^6 hostile keys through each per-key map, measured with the allocator.

fn bare(
) -> impl Service<Request<AiBody>, Response = Response<String>, Error = BoxError, Future: Send> + Clone
{
    service_fn(|_: Request<AiBody>| async { Ok::<_, BoxError>(Response::new(String::new())) })
}

fn nth(i: u64) -> Request<AiBody> {
    ask(&format!("k{i}"), &format!("model-{i}"))
}

/// Drives `n` distinct keys through `svc` one call each (each call's future polled to
/// its end on the spot: the bare service answers at once).
fn drive<S>(svc: &mut S, from: u64, n: u64)
where
    S: Service<Request<AiBody>>,
{
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    for i in from..from + n {
        let _ = svc.poll_ready(&mut cx);
        let fut = std::pin::pin!(svc.call(nth(i)));
        let _ = std::future::Future::poll(fut, &mut cx);
    }
}

#[tokio::test(start_paused = true)]
async fn a_million_hostile_keys_per_map_stay_bounded() {
    // TokenBudget keyed by API key (default max_keys).
    let budget = TokenBudgetLayer::builder()
        .key_fn(ApiKeyHash)
        .requests_per_minute(1_000)
        .tokens_per_minute(1_000_000)
        .reject()
        .build()
        .unwrap();
    let mut svc = budget.layer(bare());
    drive(&mut svc, 0, 1);
    let t = std::time::Instant::now();
    let b = allocation_counter::measure(|| drive(&mut svc, 1, map_keys()));
    let tb = t.elapsed();
    let bs = budget.stats();
    // CircuitBreaker keyed by host + model (a junk model per call; default max_keys).
    let breaker = CircuitBreakerLayer::new();
    let mut svc = breaker.layer(bare());
    drive(&mut svc, 0, 1);
    let t = std::time::Instant::now();
    let c = allocation_counter::measure(|| drive(&mut svc, 1, map_keys()));
    let tc = t.elapsed();
    let circuits = breaker.handle().key_count();
    // RetryAfterAware keyed by API key + host + model: every key told to wait.
    let gate = RetryAfterAwareLayer::new().key_fn(tower_ai::core::keys::ApiKeyHostModel);
    let told = service_fn(|_: Request<AiBody>| async {
        Ok::<_, BoxError>(
            Response::builder()
                .status(429)
                .header("retry-after", "30")
                .body(String::new())
                .unwrap(),
        )
    });
    let mut svc = gate.layer(ClassifyLayer::new().layer(told));
    drive(&mut svc, 0, 1);
    let t = std::time::Instant::now();
    let g = allocation_counter::measure(|| drive(&mut svc, 1, map_keys()));
    let tg = t.elapsed();
    println!("time: budget {tb:?}, breaker {tc:?}, gate {tg:?}");
    let gs = gate.stats();

    let per = |bytes: i64, keys: usize| bytes.max(0) as u64 / keys.max(1) as u64;
    let keys = map_keys();
    println!("{keys} hostile keys per layer (bytes held after, allocator; keys held; bytes per held key):");
    println!(
        "  TokenBudget:     {:>10} bytes, {:>6} keys, {:>4} B/key (stats: {} bytes), {} overflowed",
        b.bytes_current,
        bs.keys,
        per(b.bytes_current, bs.keys),
        bs.approx_bytes,
        bs.overflowed
    );
    println!(
        "  CircuitBreaker:  {:>10} bytes, {:>6} keys, {:>4} B/key",
        c.bytes_current,
        circuits,
        per(c.bytes_current, circuits)
    );
    println!(
        "  RetryAfterAware: {:>10} bytes, {:>6} keys, {:>4} B/key (stats: {} bytes)",
        g.bytes_current,
        gs.keys,
        per(g.bytes_current, gs.keys),
        gs.approx_bytes
    );
    let total = b.bytes_current + c.bytes_current + g.bytes_current;
    println!("  total: {total} bytes for {keys} keys per layer");
    assert!(total < 64 << 20, "{total} bytes");
    assert!(
        bs.keys <= 10_001 && circuits <= 1024,
        "{} budget keys, {circuits} circuits",
        bs.keys
    );
    // An idle circuit holds its breaker, its label and its slot in the map: no lane (its
    // calls moved into the breaker once only the breaker held the lane). 577 bytes when
    // each key kept the 256-byte cache-padded lane of the thread that called it (697 when
    // a breaker also kept an empty record of bad calls, room for four lanes and its own
    // copy of the layer's settings, 1,208 when every thread stripe's lane and counter
    // were made with the key). crates/tower-ai-circuit-breaker/tests/hostile.rs too.
    assert!(
        per(c.bytes_current, circuits) <= 200,
        "{} bytes per circuit",
        per(c.bytes_current, circuits)
    );
    // A budget key that sent one request holds its 56-byte entry, its two windows inline
    // (16 bytes each while at most two slots hold anything) and its share of the map and
    // the eviction order: 142 bytes measured (1,101 when each window was its full ring of
    // 61 slots and each key had a 128-byte fast state); tower-ai-budget's tests/memory.rs
    // bounds each configuration closer.
    assert!(
        per(b.bytes_current, bs.keys) <= 200,
        "{} bytes per budget key",
        per(b.bytes_current, bs.keys)
    );
}

#[test]
fn keys_are_fixed_size_whatever_their_source() {
    // The maps hold a 64-bit hash per key, never the key's text.
    assert_eq!(std::mem::size_of::<Key>(), 8);
    let huge = ask(&"k".repeat(1 << 20), "gpt-4o");
    assert!(ApiKeyHash.label(&huge).len() <= MAX_LABEL_LEN);
    assert!(HostModel.label(&huge).len() <= MAX_LABEL_LEN);
}
