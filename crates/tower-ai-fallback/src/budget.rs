//! The attempt budget lives in tower-ai-core, so that AiRetry draws from the same counter.

pub use tower_ai_core::AttemptBudget;
