//! Tower middleware that makes calls to AI model APIs survive rate limits, outages and stalls.
//!
//! This crate is not written yet: it is the subject of issue #9. It exports nothing,
//! so nothing can depend on it by mistake.
