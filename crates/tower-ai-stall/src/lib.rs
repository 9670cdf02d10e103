//! StallDetector: first-byte, idle-gap and total deadlines on streamed AI answers.
//!
//! This crate is not written yet: it is the subject of issue #8. It exports nothing,
//! so nothing can depend on it by mistake.
