//! The one clock the breaker reads on a call's path.
//!
//! tokio's, so that tests with a paused runtime drive it. Unit tests count the reads of
//! the calling thread, to hold the hot path to its budget (none for a closed success in a
//! count window).

use tokio::time::Instant;

/// The time now.
#[inline]
pub(crate) fn now() -> Instant {
    #[cfg(test)]
    READS.with(|r| r.set(r.get() + 1));
    Instant::now()
}

#[cfg(test)]
thread_local! {
    static READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Clock reads made by the calling thread so far.
#[cfg(test)]
pub(crate) fn reads() -> u64 {
    READS.with(std::cell::Cell::get)
}
