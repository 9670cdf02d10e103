//! RetryAfterAware: a shared per-key cooldown gate learned from Retry-After and rate-limit headers.
//!
//! This crate is not written yet: it is the subject of issue #4. It exports nothing,
//! so nothing can depend on it by mistake.
