//! ModelFallback: a chain of models and providers chosen by the kind of failure.
//!
//! This crate is not written yet: it is the subject of issue #7. It exports nothing,
//! so nothing can depend on it by mistake.
