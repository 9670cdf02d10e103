//! TokenBudget: requests/min, tokens/min, concurrency and spend caps for AI model API calls.
//!
//! This crate is not written yet: it is the subject of issue #6. It exports nothing,
//! so nothing can depend on it by mistake.
