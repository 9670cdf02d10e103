//! TokenBudget: holds AI API calls to requests/min, tokens/min, concurrency and spend caps
//! before the provider has to say no.
//!
//! # Why AI APIs need it
//!
//! Providers limit requests *and tokens* per minute, and a request's tokens are only known
//! after the call. A client that learns its limits from 429s wastes calls, and a 429 for a
//! request larger than the whole limit can never be fixed by retrying. [`TokenBudget`]
//! keeps the budget on the client side: it reserves what a request may cost before the
//! call, corrects the reservation with what the provider reports after it, and holds back
//! (or refuses) what does not fit.
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, Response};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_ai_budget::{PriceTable, TokenBudgetLayer};
//! use tower_ai_core::keys::ApiKeyHash;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_ai_core::BoxError> {
//! let budget = TokenBudgetLayer::builder()
//!     .key_fn(ApiKeyHash)                       // one budget per API key
//!     .requests_per_minute(500)
//!     .tokens_per_minute(30_000)
//!     .max_concurrent(16)
//!     .spend_per_day(50.0)
//!     .prices(PriceTable::new().model("gpt-4o", 2.50, 10.00))
//!     .wait(Duration::from_secs(30))            // the default mode, with a shorter wait
//!     .soft_limit(0.8)
//!     .build()?;
//! let provider = service_fn(|_req: Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
//!         bytes::Bytes::from_static(br#"{"usage":{"prompt_tokens":9,"completion_tokens":3}}"#),
//!     )))
//! });
//! let svc = ServiceBuilder::new().layer(budget).service(provider);
//! let req = Request::post("https://api.openai.com/v1/chat/completions")
//!     .body(r#"{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"Hi"}]}"#.to_owned())?;
//! let res = svc.oneshot(req).await?;
//! assert_eq!(res.status(), 200);
//! # Ok(())
//! # }
//! ```
//!
//! Its place in the recommended stack is below the retry and the circuit breaker and above
//! the cooldown gate: `ModelFallback → AiRetry → CircuitBreaker → TokenBudget →
//! RetryAfterAware → StallDetector → Classify → client`.
//!
//! # Limits
//!
//! Any combination of, per key:
//!
//! - **requests per minute**; **tokens per minute**: a request reserves its input estimate
//!   ([`RequestMeta`](tower_ai_core::RequestMeta): text bytes / 4, the simulator's rule)
//!   plus its `max_tokens`, or [`default_output_tokens`](TokenBudgetBuilder::default_output_tokens)
//!   (1024) when it names none;
//! - **concurrent requests**: held from the call until the response body ends or is
//!   dropped (not when the head arrives: a streamed answer is still being generated and
//!   counted by the provider while its body flows);
//! - **spend per hour / per day**, from a [`PriceTable`] (price per million input and
//!   output tokens per model). A model the table does not list follows the table's
//!   [`UnknownModel`] policy: reject (the default), assume a price, or free.
//!
//! Minute windows slide over 60 one-second slots plus the current one, hours over 60
//! one-minute slots, days over 96 fifteen-minute slots. A window never admits more than
//! its limit in *any* interval of its length, whatever the alignment (so it also holds a
//! provider's fixed windows); it may refuse up to one slot (1/60 of a minute or an hour,
//! 1/96 of a day) earlier than an exact sliding log. Memory per key is bounded by the
//! limits configured (about 200 bytes for a key that sent a request or two, at most ~2.5 KB
//! for a key busy in every slot of every window, plus about 60 bytes per request in flight
//! with tokens or money reserved; see [Keys](#keys)); all time is `tokio::time`.
//!
//! A budget with no token or money limit admits most requests without its lock or the
//! clock (see [Performance](#performance)): while a key's minute window is below its limit
//! (and its soft-limit line) and nobody waits, the locked path grants it a batch of up to
//! 1/32 of its request limit (at most 1024; none for a limit under 32), and each request of
//! the batch takes one. A batch is counted in the window when the next locked call ends it,
//! at a time no earlier than any of its requests, and counts as used until then: the window
//! still never admits more than its limit in any minute, on any clock. But a batch counts
//! from its end rather than from each request, so the window may hold up to one batch more
//! than an exact log (the batch that spans the start of the minute): it may refuse up to
//! 1/32 of the limit earlier, never later.
//!
//! # Keys
//!
//! The key function defaults to [`Global`](tower_ai_core::keys::Global): one budget for
//! everything through the layer, which is what a provider account's limits are, and the
//! cheapest (no hashing, no body scan). Use [`ApiKeyHash`](tower_ai_core::keys::ApiKeyHash)
//! for a proxy serving several API keys, [`HostModel`](tower_ai_core::keys::HostModel) for
//! per-model limits (OpenAI's are per model), or a closure for tenants. A key function that
//! returns `None` exempts the request.
//!
//! A key is forgotten only when it has nothing to lose: nothing in flight, waiting or
//! reserved, and every window emptied (a window's length after its last request: 61 s for
//! the minute limits, 61 min with an hourly cap, a day and 15 min with a daily one). So no
//! caller can reset its windows by sending requests under other keys. At most
//! [`max_keys`](TokenBudgetBuilder::max_keys) (10 000) keys are held; while all of them
//! still hold something, a new key shares the **overflow key**: one more set of the same
//! limits, shared by every key that found no room, until keys are forgotten. Each request
//! sent to it is counted ([`BudgetStats::overflowed`] from
//! [`TokenBudgetLayer::stats`]) and logged at `warn` at the 1st, 2nd, 4th, 8th… time.
//! Overflowing rather than refusing new keys: the keys already held keep their own
//! budgets whatever new keys do, the overflow key still holds every limit (a flood of
//! new keys shares one budget), and a new tenant is served as long as that shared budget
//! lasts instead of being refused for up to a day (the longest window) because others
//! filled the map. Eviction looks at the least recently touched keys only: amortised
//! O(1) per call, however many keys are held.
//!
//! Memory: each key holds a 56-byte entry, its windows and, when the budget has a fast
//! path or a concurrency limit, a 40-byte fast-path state, besides its share of the map
//! and of the eviction order. A window is 16 bytes while at most two of its slots hold
//! anything (a key that sent a request or two, the usual idle key); a key busy in more
//! slots than that moves to the full ring of slots (a slot per second of a minute limit,
//! per minute of the hourly cap, per 15 minutes of the daily cap, 61 or 97 slots; 4 bytes
//! a slot when the limit fits in 32 bits, else 8), and back once a whole window has passed
//! without it; both forms decide alike. Reservations not yet settled are kept in one table
//! for the whole budget, as large as the most held at once. Measured per idle key at
//! 10 000 keys (`tests/memory.rs`): 150 bytes with a concurrency limit alone, 166 with
//! requests per minute, 142 with requests and tokens per minute, 174 with both spend caps
//! too. [`TokenBudgetLayer::stats`] adds it up at run time.
//!
//! # Reserve, then reconcile
//!
//! After the call, the reservation is replaced with the actual [`Usage`](tower_ai_core::Usage):
//!
//! - a non-streamed JSON body is copied as it passes (up to
//!   [`max_usage_body`](TokenBudgetBuilder::max_usage_body), 1 MiB; a body in one frame is
//!   read in place, with the same bound) and its `usage` / `usageMetadata` read at its end;
//! - a `text/event-stream` body is fed chunk by chunk, unbuffered, to the dialect's
//!   [`StreamScanner`](tower_ai_core::stream::StreamScanner): OpenAI's `include_usage`
//!   chunk, Anthropic's cumulative `message_delta`, Gemini's last `usageMetadata`;
//! - the correction lands in the window slot where the reservation was made, so over- and
//!   under-estimates are corrected, not accumulated (an underestimate is charged in full).
//!
//! What each exit gives back:
//!
//! | how the request ends | tokens and money | request count | concurrency permit |
//! |---|---|---|---|
//! | body ends with usage (a JSON body, or a stream that reached its terminal event) | replaced by the usage | kept | released |
//! | body ends without usage (no `include_usage`, not JSON, over 1 MiB) | reservation kept | kept | released |
//! | stream cut before its terminal event (reset, EOF without it, an error from a layer below such as a stall) | the larger of the usage reported so far and the reservation | kept | released |
//! | body dropped before its end | as a cut stream (a stream past its terminal event: its usage) | kept | released |
//! | error response (non-2xx) | refunded | kept (it was sent) | released with the body |
//! | inner service error | refunded | kept | released |
//! | future dropped while in flight | reservation kept (it may have been billed) | kept | released |
//! | future dropped while waiting | nothing was reserved; its place in the queue goes to the next | — | — |
//!
//! A stream's terminal event is `data: [DONE]` (OpenAI Chat, Azure, compatible servers),
//! `response.completed` / `.incomplete` / `.failed` (OpenAI Responses), `message_stop`
//! (Anthropic), or the chunk with a `finishReason` (Gemini). Usage reported before it is
//! partial: Anthropic's `message_start` counts one output token, and the provider keeps
//! generating (and billing) until it notices the connection is gone. So a stream that
//! did not reach it is charged at least its reservation, tokens and money alike. A body
//! the caller drops early did not reach it either and is charged the same way: the
//! provider bills what it generated before the drop, and the budget cannot tell an
//! abandoned answer from a cut one.
//!
//! # When a request does not fit
//!
//! - [`WhenFull::Wait`] (default, `max_wait` 10 s): the request waits in its response
//!   future on a `tokio` timer (no lock held), woken when capacity frees up (a window slot
//!   expires, a reservation is corrected down, a permit is released). Waiters are served in
//!   FIFO order per key, so a large request is never starved by small ones (the price:
//!   small requests behind a large one wait for it). A request whose predicted start
//!   (see [Queue discipline](#queue-discipline)) is past `max_wait`, or past the request's
//!   [`Deadline`](tower_ai_core::Deadline) less the
//!   [`expected_service`](TokenBudgetBuilder::expected_service) time when that comes
//!   first (a waiter also gives up then), is refused at once with its `retry_after`, and
//!   so is one that finds its key's
//!   queue at [`max_waiters_per_key`](TokenBudgetBuilder::max_waiters_per_key) (256) or all
//!   queues at [`max_waiters`](TokenBudgetBuilder::max_waiters) (4 096): a waiter holds its
//!   request, so waiters are bounded. A waiter holds no readiness of the inner service
//!   (no `Buffer` or `ConcurrencyLimit` slot): it gets ready only once admitted.
//! - [`WhenFull::Reject`]: refused at once with
//!   [`AiError::BudgetExceeded`](tower_ai_core::AiError::BudgetExceeded) `{ key, limit,
//!   retry_after }`, `retry_after` saying when it would fit (`Duration::ZERO` for the
//!   concurrency limit, whose time is unknown).
//! - A request larger than a whole limit (tokens over the TPM limit, cost over a spend cap)
//!   is refused at once in both modes with `retry_after: None`, as OpenAI does with
//!   "Request too large".
//!
//! # Queue discipline
//!
//! Under overload the queue decides which callers get the provider's capacity. The aim is
//! goodput: every slot of the limit goes to an answer its caller still waits for, and a
//! caller who will not be served in time learns it at once (with when capacity would
//! come) instead of at its deadline. TokenBudget does it by **admission by predicted
//! wait** in front of a **FIFO queue**:
//!
//! - A request that does not fit is given its *predicted start*: the time from which the
//!   limit has room for everyone queued before it (their tokens and money as well as
//!   their number) and then for it, if those ahead are admitted as soon as they fit.
//!   For a request limit it is the queue position spread over the window's slots as they
//!   come back (a queue longer than the limit over several windows); a concurrency limit
//!   alone tells no time.
//! - If that start is later than when the request gives up (`max_wait`, or its
//!   `Deadline` less the expected service time), it is refused now with `BudgetExceeded
//!   { retry_after }`: when capacity would come for it, and, when it comes too late for
//!   its caller's deadline, no earlier than that deadline, so that a retry layer that
//!   honours deadlines (AiRetry) stops instead of waiting for a slot nobody can use.
//! - Otherwise it waits; the head of the queue is admitted the moment it fits and wakes
//!   the next. FIFO makes the prediction hold: nobody who arrives later can overtake a
//!   waiter, so its start only moves earlier (when someone ahead leaves), and a waiter
//!   that was admitted to the queue is served in time.
//!
//! The alternatives studied: **CoDel** (as in Facebook's server queues: drop when the
//! queue's minimum sojourn stays above a target) and **adaptive LIFO** (serve the newest
//! first once the queue is congested) exist because a generic server does not know how
//! long its callers wait nor when its capacity comes back; both learn it from sojourn
//! times and shed load after requests have waited. A budget knows both: the caller's
//! deadline is in the request and the windows say exactly when each slot frees. Deciding
//! at admission refuses a request in microseconds instead of after it waited, and LIFO
//! would break the prediction (every newcomer would push the earlier waiters back past
//! their deadlines). Earliest-deadline-first would serve more short-deadline callers when
//! deadlines are mixed, at the same goodput, but moves waiters back after they were
//! promised a start; it is not done.
//!
//! `cargo bench --bench scenarios` (tables 2, 2b and 2c of `benches/RESULTS.md`; 60
//! requests a minute allowed, 5 minutes, every caller's timeout in its request), with
//! [`expected_service`](TokenBudgetBuilder::expected_service) 2 s and a 300 s `max_wait`
//! (so that the caller's deadline decides):
//!
//! | offered | caller deadline | goodput | 429s | answers after the deadline | refusals within 10 ms | p99 latency served |
//! |---|---|---:|---:|---:|---:|---:|
//! | 2× | 60 s | 100.0% (360 of 360) | 0 | 0 | 240 of 240 | 58.7 s |
//! | 10× | 60 s | 100.0% (360 of 360) | 0 | 0 | 2,640 of 2,640 | 59.0 s |
//! | 2× | 10 s or 120 s | 93.3% (336 of 360) | 0 | 0 | 264 of 264 | 8.1 s / 40.5 s |
//!
//! The same runs with the default 10 s `max_wait` (the caller's deadline is further
//! away): 93.6%, 96.9% and 86.1% of capacity, and refusals up to 49.5 s, 59.9 s and
//! 47.5 s after the request (AiRetry waits out a `retry_after` that ends before the
//! deadline, then is refused again); tower-resilience's rate limiter with a 60 s
//! timeout: 98.3%, 92.8% and 85.5%, with 246, 2,666 and 241 callers left without an
//! answer at their deadline. In the mixed run FIFO gives the slots to the 120 s callers
//! queued first (all 300 served) and serves 36 of the 300 10 s callers; the others learn
//! it at once.
//!
//! # Bad input
//!
//! Nothing panics and all arithmetic saturates. A body that is not JSON is estimated at its
//! byte length / 4 tokens; a body the layer cannot read (a streamed upload) at 1 token;
//! either plus `default_output_tokens`. A request with no model keys as "no model" and is
//! priced by the [`UnknownModel`] policy. An absurd `max_tokens` (up to `u64::MAX`)
//! saturates the reservation, which is larger than any limit: refused at once with
//! `retry_after: None`. A response with no usage keeps its reservation.
//!
//! # Soft limits and provider headers
//!
//! [`soft_limit(0.8)`](TokenBudgetBuilder::soft_limit) emits
//! [`BudgetEvent::SoftLimit`] and a `tracing` warning when an admitted request takes a limit
//! past 80 %. [`sync_from_headers(true)`](TokenBudgetBuilder::sync_from_headers) reads
//! [`RateLimitInfo`](tower_ai_core::RateLimitInfo) from every response and never believes
//! more of a minute limit remains than the provider says (it only tightens).
//!
//! # Several replicas
//!
//! The state lives in the layer, so N replicas of a service each hold the whole limit.
//! [`store`](TokenBudgetBuilder::store) moves it to a shared [`BudgetStore`] (the
//! `tower-ai-redis` crate's `RedisBudget`, feature `redis` of `tower-ai`): the store
//! decides each admission, the layer still estimates each request and reads its usage, and
//! the store is told what the request cost when its body ends (the same rules as the table
//! above). Without a store nothing on any path changes.
//!
//! # Performance
//!
//! Without token or money limits (requests per minute and concurrency), a request is
//! admitted with one compare-and-swap on its key's state, which holds its place in flight
//! and the fast permits of the minute window: no lock, no clock read (a clock read costs
//! more than the rest of the admission), no allocation. Each service clone caches the state
//! of the last key it used, so the key function's key is looked up under the lock only
//! when it changes. The response body gives the place in flight back with one atomic
//! subtraction. The locked path runs when the permits of a batch run out, a limit is near,
//! or someone waits.
//!
//! With token or money limits (and no concurrency limit), requests are admitted from
//! *leases*: the budget has a few stripes (twice the cores, 4 to 64), each a lock of its own
//! that one thread uses, and while a key is far from every limit (more than a chunk per
//! stripe below the line) the locked path lends the calling thread's stripe a chunk of each
//! window (1/32 of the line among the stripes), counted in the window at once and good for
//! the second it was lent in. The next requests of that key on that thread are admitted from
//! it, and settled into it, under the stripe's lock alone: two threads do not write to the
//! same memory per call. Every admission is counted at least as early and as much as
//! without leases, so the window never admits more than its limit; and before it decides on
//! a request that comes near a limit, the locked path takes the key's leases (their unused
//! part) and waiting refunds back from every stripe, so near its limits a key is decided
//! exactly as without them. A request larger than a chunk (a limit under about
//! 32 × stripes × its cost) takes the locked path, as before.
//!
//! The locked path takes one `std::sync::Mutex` for a few dozen instructions (look the key
//! up, move the windows to now, compare, add) and allocates nothing once the key exists (the
//! budget's table of reservations keeps its room); settling takes it once more when the
//! body ends (a stripe's settlement takes it only for a charge its lease cannot hold, or
//! once per 8 refunds it keeps). A waiting request boxes its state (the future of
//! the common case stays small). A JSON response's usage is read by a scan that builds no
//! JSON value (falling back to `Usage::from_json` for shapes it does not know), so
//! admit, call, read and settle allocate nothing (a streamed response boxes its stream
//! scanner, whose line buffers allocate anyway, to keep every response body small to
//! move). The token estimate parses the request body
//! (two small allocations, in core's `RequestMeta::parse`) unless a
//! [`RequestMeta`](tower_ai_core::RequestMeta) is already in its extensions.
//!
//! # Differences from tower and tower-resilience
//!
//! `tower::limit::RateLimit` counts requests in fixed intervals and waits in `poll_ready`
//! (it cannot see the request); `ConcurrencyLimit` releases its permit when the response
//! future completes. tower-resilience's rate limiter counts permits, not tokens. TokenBudget
//! is per key, counts tokens and money, waits per request in the response future, corrects
//! its estimates from the response, and holds concurrency until the body ends.
//!
//! # Errors
//!
//! Refusals are [`AiError::BudgetExceeded`](tower_ai_core::AiError::BudgetExceeded) inside
//! the service's `BoxError` (`err.downcast_ref::<AiError>()`); the inner service's errors
//! pass through.
//!
//! # Panics
//!
//! Waiting uses a `tokio::time` timer: the layer must run inside a Tokio runtime with the
//! time driver enabled (as `tower::timeout`). [`TokenBudgetLayer::new`] panics on a zero
//! limit; the builder returns an error instead.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod budget;
mod config;
mod event;
pub mod future;
mod layer;
mod lease;
#[cfg(feature = "metrics")]
mod meter;
mod service;
pub mod store;
mod window;

pub use body::BudgetBody;
pub use budget::{BudgetStats, KeySnapshot};
pub use config::{
    ConfigError, ModelPrice, PriceTable, TokenBudgetBuilder, UnknownModel, WhenFull,
    DEFAULT_MAX_KEYS, DEFAULT_MAX_USAGE_BODY, DEFAULT_MAX_WAIT, DEFAULT_MAX_WAITERS,
    DEFAULT_MAX_WAITERS_PER_KEY, DEFAULT_OUTPUT_TOKENS, MAX_WAIT_CEILING,
};
pub use event::{BudgetEvent, BudgetListener};
pub use layer::TokenBudgetLayer;
pub use service::TokenBudget;
pub use store::{
    BudgetStore, Spent, StoreAdmit, StoreDecision, StoreLease, StoreLimits, StoreRequest,
};

/// Describes TokenBudget's metrics (units and help text) to the installed `metrics` recorder;
/// call it once after installing the recorder. Feature `metrics`; the metrics are listed
/// in the README ("Metrics").
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    meter::describe();
}
