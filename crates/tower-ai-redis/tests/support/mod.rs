//! What the Redis tests share.

use std::time::Duration;

/// The most a call may take while Redis is down or paused, in these tests: enough to tell a
/// call that fell back (Redis's faults here last seconds) from one that waited on Redis,
/// on a machine busy with the rest of the suite. The fall-back itself takes the store's
/// 20 ms response timeout at most; the tests print what they measured.
#[allow(dead_code)]
pub(crate) const NO_HANG: Duration = Duration::from_millis(500);
