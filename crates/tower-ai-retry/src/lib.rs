//! AiRetry: retries for AI model API calls, with backoff, jitter, Retry-After and a retry budget.
//!
//! This crate is not written yet: it is the subject of issue #4. It exports nothing,
//! so nothing can depend on it by mistake.
