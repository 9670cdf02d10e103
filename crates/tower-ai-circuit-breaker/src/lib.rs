//! CircuitBreaker: a per-key closed/open/half-open breaker for AI model APIs.
//!
//! This crate is not written yet: it is the subject of issue #5. It exports nothing,
//! so nothing can depend on it by mistake.
