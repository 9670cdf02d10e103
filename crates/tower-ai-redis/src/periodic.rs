//! [`Periodic`]: a background task that works for an owner every period, for as long as the
//! owner lives (the store's heartbeat, the leased cooldowns' and the breakers' refreshers).

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::task::JoinHandle;

/// A task started at most once, holding its owner weakly (it ends when the owner is
/// dropped, and is aborted when the `Periodic` is).
#[derive(Debug, Default)]
pub(crate) struct Periodic(OnceLock<JoinHandle<()>>);

impl Periodic {
    pub(crate) const fn new() -> Self {
        Periodic(OnceLock::new())
    }

    /// Starts `work(owner)` every `period` (the first at once; a late tick is delayed, not
    /// repeated) in the current Tokio runtime, unless it has started or there is no
    /// runtime (then a later call may start it).
    pub(crate) fn start<T, W, F>(&self, owner: &Arc<T>, period: Duration, work: W)
    where
        T: Send + Sync + 'static,
        W: Fn(Arc<T>) -> F + Send + 'static,
        F: Future<Output = ()> + Send,
    {
        if self.0.get().is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(owner);
        self.0.get_or_init(|| {
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(owner) = weak.upgrade() else { return };
                    work(owner).await;
                }
            })
        });
    }
}

impl Drop for Periodic {
    fn drop(&mut self) {
        if let Some(task) = self.0.get() {
            task.abort();
        }
    }
}
