//! [`Periodic`]: a background task that works for an owner every period, for as long as the
//! owner lives (the store's heartbeat, the leased cooldowns' and the breakers' refreshers);
//! and [`PerRuntime`]: what belongs to the Tokio runtime it was made in (a task, a
//! connection whose task runs there), made again in the current runtime once that one is
//! gone.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// A value tied to a Tokio runtime by a task running there: usable while the task runs,
/// made again in the current runtime once it has ended.
///
/// A Tokio runtime that is dropped ends its tasks (a `#[tokio::test]`'s runtime ends with
/// the test; an application may build a new runtime): a store kept in a `static` and used
/// from the next runtime must not keep a connection whose task is gone (every call would
/// fail), nor count on a heartbeat or a flusher that no longer runs. The task's
/// [`JoinHandle::is_finished`] tells, in one load, that its runtime is gone (or that it
/// ended otherwise, e.g. by a panic): the next use makes the value again, in the runtime
/// it runs in.
///
/// A value made in one runtime serves every runtime while it lives (redis-rs's connections
/// are handles to a task that may run elsewhere).
///
/// The fast path is a load of `moved`, of the value and of its task's state: no lock. The
/// value of the first runtime stays in a `OnceLock`; later ones (after a runtime has gone)
/// in an `ArcSwapOption`.
pub(crate) struct PerRuntime<T> {
    first: OnceLock<Entry<T>>,
    /// The value made after the first runtime had gone (then `moved` is set).
    later: ArcSwapOption<Entry<T>>,
    moved: AtomicBool,
    /// Held while a value is made, so that two callers do not both make one.
    making: Mutex<()>,
    /// Abort the task when its value is dropped (a task that only works for the value);
    /// `false` for a task that finishes its work by itself (a flusher).
    abort_on_drop: bool,
}

struct Entry<T> {
    value: T,
    task: JoinHandle<()>,
    abort_on_drop: bool,
}

impl<T> Drop for Entry<T> {
    fn drop(&mut self) {
        if self.abort_on_drop {
            self.task.abort();
        }
    }
}

impl<T> std::fmt::Debug for PerRuntime<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerRuntime")
            .field("moved", &self.moved.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<T: Clone> PerRuntime<T> {
    /// Empty; `abort_on_drop`: abort the task when the value is dropped.
    pub(crate) const fn new(abort_on_drop: bool) -> Self {
        PerRuntime {
            first: OnceLock::new(),
            later: ArcSwapOption::const_empty(),
            moved: AtomicBool::new(false),
            making: Mutex::new(()),
            abort_on_drop,
        }
    }

    /// The value, while its task runs.
    #[inline]
    fn live(&self) -> Option<T> {
        if !self.moved.load(Ordering::Acquire) {
            let entry = self.first.get()?;
            return (!entry.task.is_finished()).then(|| entry.value.clone());
        }
        let entry = self.later.load();
        let entry = entry.as_ref()?;
        (!entry.task.is_finished()).then(|| entry.value.clone())
    }

    /// The value while its task runs, else one `make` makes in the current runtime
    /// (`Ok(None)` without a runtime: a later call may make it).
    #[inline]
    pub(crate) fn get_or_try_make<E>(
        &self,
        make: impl FnOnce(&Handle) -> Result<(T, JoinHandle<()>), E>,
    ) -> Result<Option<T>, E> {
        match self.live() {
            Some(value) => Ok(Some(value)),
            None => self.make(make),
        }
    }

    #[cold]
    fn make<E>(
        &self,
        make: impl FnOnce(&Handle) -> Result<(T, JoinHandle<()>), E>,
    ) -> Result<Option<T>, E> {
        let Ok(runtime) = Handle::try_current() else {
            return Ok(None);
        };
        let _making = self.making.lock().unwrap_or_else(PoisonError::into_inner);
        // Another caller may have made it meanwhile.
        if let Some(value) = self.live() {
            return Ok(Some(value));
        }
        let (value, task) = make(&runtime)?;
        let entry = Entry {
            value: value.clone(),
            task,
            abort_on_drop: self.abort_on_drop,
        };
        if self.first.get().is_none() {
            // Only set under `making`: the slot is free.
            let _ = self.first.set(entry);
        } else {
            // The first runtime's value stays (its task ended); the latest replaces the
            // one before it, which is dropped once no caller holds it.
            self.later.store(Some(Arc::new(entry)));
            self.moved.store(true, Ordering::Release);
        }
        Ok(Some(value))
    }
}

impl PerRuntime<()> {
    /// Spawns `task()` in the current runtime unless the last one spawned still runs.
    #[inline]
    pub(crate) fn spawn_unless_running<F>(&self, task: impl FnOnce() -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let _ = self.get_or_try_make(|runtime| Ok::<_, Infallible>(((), runtime.spawn(task()))));
    }
}

/// A task started once per runtime, holding its owner weakly (it ends when the owner is
/// dropped, and is aborted when the `Periodic` is). Started again in the current runtime
/// when the runtime it ran in is gone.
#[derive(Debug)]
pub(crate) struct Periodic(PerRuntime<()>);

impl Default for Periodic {
    fn default() -> Self {
        Periodic::new()
    }
}

impl Periodic {
    pub(crate) const fn new() -> Self {
        Periodic(PerRuntime::new(true))
    }

    /// Starts `work(owner)` every `period` (the first at once; a late tick is delayed, not
    /// repeated) in the current Tokio runtime, unless it runs (in this runtime or another
    /// one still alive) or there is no runtime (then a later call may start it).
    pub(crate) fn start<T, W, F>(&self, owner: &Arc<T>, period: Duration, work: W)
    where
        T: Send + Sync + 'static,
        W: Fn(Arc<T>) -> F + Send + 'static,
        F: Future<Output = ()> + Send,
    {
        self.0.spawn_unless_running(|| {
            let weak = Arc::downgrade(owner);
            async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(owner) = weak.upgrade() else { return };
                    work(owner).await;
                }
            }
        });
    }
}
