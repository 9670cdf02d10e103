//! Strict mode's settlements: queued by the replica, carried to Redis by its next admission
//! (in the same script, applied before the admission is decided), or sent on their own
//! after a short delay when no admission comes.
//!
//! Why this is safe for GCRA's reserve-then-settle: until a settlement lands, the request's
//! whole reservation (its token estimate, its spend estimate, its place in flight) stays
//! counted in Redis, so a late refund or a late release only holds the key back longer. A
//! charge (usage over the estimate) lands at the latest with this replica's next
//! admission, before that admission is decided, or after the delay. What cannot land
//! stays queued:
//!
//! - **Redis skipped** (the store's breaker is open, nothing was sent): the settlements go
//!   back to the queue as they were.
//! - **Sent, no answer** (a timeout, a connection that broke): Redis may or may not have
//!   applied them (`CLIENT PAUSE` runs a queued script when the pause ends). Applying a
//!   refund twice would give back tokens or money that were used, so refunds are given up
//!   (their reservation stays counted: the safe side); charges and releases go back to the
//!   queue (a charge applied twice counts more than was used: the safe side; releasing a
//!   place twice does nothing).
//! - **Too old to matter:** a token difference more than a window ("minute") old no longer
//!   moves what any window of now may admit, a place is released by its hold, a spend
//!   difference lands in its calendar window only while that window's key exists (a day):
//!   past those, the part is dropped.
//! - **The queue is full** ([`MAX_QUEUED`], Redis down under load): the oldest settlement
//!   is dropped.
//!
//! Every settlement or part given up is counted ([`RedisBudget::settlements_dropped`]) and
//! logged once per outage.
//!
//! [`RedisBudget::settlements_dropped`]: super::RedisBudget::settlements_dropped

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::io::Write as _;

use redis::{Cmd, RedisWrite as _, Script};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::lock;
use crate::periodic::PerRuntime;
use crate::store::{RedisStore, StoreError};

/// The most settlements a replica's budget keeps queued (about 100 bytes and a name each).
pub(super) const MAX_QUEUED: usize = 10_000;
/// The most settlements one admission carries.
pub(super) const MAX_CARRIED: usize = 32;
/// The most settlements one flush sends.
const MAX_FLUSHED: usize = 256;
/// How long the flusher waits after a failed flush before it tries again (the store's
/// breaker answers at once meanwhile).
const RETRY: Duration = Duration::from_millis(100);

/// The flush script: settlements only.
pub(super) const FLUSH: &str = concat!(
    include_str!("../scripts/budget_settle.lua"),
    include_str!("../scripts/budget_flush.lua")
);

/// One settlement waiting to be sent.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    /// When the usage was known.
    pub(super) queued: Instant,
    /// The key's shared name.
    pub(super) name: String,
    /// Tokens per window (0: no token limit).
    pub(super) tpm: u64,
    /// Tokens used - tokens reserved (negative: a refund).
    pub(super) tokens: i64,
    /// Spend used - spend reserved, micro-units.
    pub(super) spend: i64,
    /// Calendar windows of the reservation.
    pub(super) hour: u64,
    pub(super) day: u64,
    /// The request's member in the semaphore (empty: none).
    pub(super) member: String,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.tokens == 0 && self.spend == 0 && self.member.is_empty()
    }

    /// Gives up the refunds (after a send whose fate is unknown); `true` if one was.
    fn forgo_refunds(&mut self) -> bool {
        let mut forgone = false;
        if self.tokens < 0 {
            self.tokens = 0;
            forgone = true;
        }
        if self.spend < 0 {
            self.spend = 0;
            forgone = true;
        }
        forgone
    }

    /// Drops the parts too old to matter at `now`; `true` if a part was dropped.
    fn expire(&mut self, now: Instant, ages: &Ages) -> bool {
        let age = now.saturating_duration_since(self.queued);
        let mut dropped = false;
        if age > ages.minute && self.tokens != 0 {
            self.tokens = 0;
            dropped = true;
        }
        if age > ages.hold && !self.member.is_empty() {
            // Expired in Redis by now: nothing to release.
            self.member = String::new();
        }
        if age > ages.day && self.spend != 0 {
            self.spend = 0;
            dropped = true;
        }
        dropped
    }

    /// The parts of this settlement that change something, as the scripts' flags (1 tokens,
    /// 2 spend, 4 release; see `budget_settle.lua`); 0: nothing to send.
    pub(super) fn parts(&self) -> u8 {
        u8::from(self.tpm > 0 && self.tokens != 0)
            | u8::from(self.spend != 0) << 1
            | u8::from(!self.member.is_empty()) << 2
    }

    /// The keys the parts in `flags` take in KEYS (none with the admission's own, 8).
    pub(super) fn key_count(flags: u8) -> usize {
        if flags & OWN_KEYS != 0 {
            return 0;
        }
        usize::from(flags & 1) + 2 * usize::from(flags >> 1 & 1) + usize::from(flags >> 2 & 1)
    }

    /// Adds the keys of the parts in `flags` to `cmd` (none with the admission's own).
    pub(super) fn write_keys(&self, cmd: &mut Cmd, names: &KeyNames, flags: u8) {
        if flags & OWN_KEYS != 0 {
            return;
        }
        if flags & 1 != 0 {
            names.write(cmd, Kind::Tat, &self.name);
        }
        if flags & 2 != 0 {
            names.write(cmd, Kind::Hour, &self.name);
            names.write(cmd, Kind::Day, &self.name);
        }
        if flags & 4 != 0 {
            names.write(cmd, Kind::Conc, &self.name);
        }
    }

    /// Adds `flags` and the arguments of those parts to `cmd`. The tokens' move of the TAT
    /// is computed here as the script did: `tokens * (window / limit)` in doubles.
    pub(super) fn write_args(&self, cmd: &mut Cmd, flags: u8, window_us: u64) {
        cmd.arg(flags);
        if flags & 1 != 0 {
            cmd.arg(self.tokens as f64 * (window_us as f64 / self.tpm as f64));
        }
        if flags & 2 != 0 {
            cmd.arg(self.spend).arg(self.hour).arg(self.day);
        }
        if flags & 4 != 0 {
            cmd.arg(self.member.as_str());
        }
    }
}

/// The settlement flag that says its keys are the admission's own (the same name).
pub(super) const OWN_KEYS: u8 = 8;

/// The kinds of a strict budget's keys.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    /// Both GCRA TATs of a name, requests and tokens, in one key.
    Tat = 0,
    Hour,
    Day,
    Conc,
}

const KINDS: [&str; 4] = ["budget:tat", "budget:hour", "budget:day", "budget:conc"];

/// How the budget names its keys.
#[derive(Debug, Clone)]
pub(super) struct KeyNames {
    pub(super) store: RedisStore,
    pub(super) tag: String,
    /// Each key's name is its own hash tag (`tag` unused).
    pub(super) per_key: bool,
    /// With one tag: each kind's key up to the name (`prefix:kind:{tag}:`), so a key is
    /// written without a string of its own.
    heads: [String; 4],
}

impl KeyNames {
    pub(super) fn new(store: RedisStore, tag: String, per_key: bool) -> Self {
        let heads = KINDS.map(|kind| store.key(kind, &tag, ""));
        KeyNames {
            store,
            tag,
            per_key,
            heads,
        }
    }

    /// The hash tag of `name`'s keys.
    pub(super) fn tag<'a>(&'a self, name: &'a str) -> &'a str {
        if self.per_key {
            name
        } else {
            &self.tag
        }
    }

    /// `name`'s key of `kind` (as [`RedisStore::key`] names it).
    pub(super) fn key(&self, kind: Kind, name: &str) -> String {
        self.store.key(KINDS[kind as usize], self.tag(name), name)
    }

    /// Adds `name`'s key of `kind` to `cmd`.
    pub(super) fn write(&self, cmd: &mut Cmd, kind: Kind, name: &str) {
        if self.per_key {
            cmd.arg(self.key(kind, name));
        } else {
            let mut w = cmd.writer_for_next_arg();
            // Writes into the command's buffer: they cannot fail.
            let _ = w.write_all(self.heads[kind as usize].as_bytes());
            let _ = w.write_all(name.as_bytes());
        }
    }
}

/// How long each part of a settlement matters.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ages {
    pub(super) minute: Duration,
    pub(super) hold: Duration,
    pub(super) day: Duration,
}

/// What became of a script that carried settlements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fate {
    /// Applied.
    Applied,
    /// Not sent (Redis skipped): all of it goes back.
    NotSent,
    /// Sent without an answer: maybe applied.
    Unknown,
    /// Redis answered with an error: given up (a settlement that fails a script would
    /// fail every admission that carried it).
    Failed,
}

impl Fate {
    pub(super) fn of<T>(result: &Result<T, StoreError>) -> Fate {
        match result {
            Ok(_) => Fate::Applied,
            Err(StoreError::Unavailable { .. }) => Fate::NotSent,
            Err(StoreError::Script(_)) => Fate::Failed,
            Err(_) => Fate::Unknown,
        }
    }
}

/// A budget's queue of settlements and its flusher.
pub(super) struct Settlements {
    shared: Arc<Shared>,
    /// The flusher, in the runtime it was started in (started again in the current one
    /// when that runtime is gone).
    flusher: PerRuntime<()>,
}

struct Shared {
    queue: Mutex<VecDeque<Pending>>,
    /// Settlements taken from the queue whose script has not answered yet.
    in_flight: AtomicUsize,
    notify: Notify,
    /// The budget is gone: flush what is left and stop.
    closed: AtomicBool,
    dropped: AtomicU64,
    /// A drop has been logged since Redis last took a settlement.
    warned: AtomicBool,
    names: KeyNames,
    ages: Ages,
    window_us: u64,
    delay: Duration,
    flush: Script,
}

impl std::fmt::Debug for Settlements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settlements")
            .field("pending", &self.pending())
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl Settlements {
    pub(super) fn new(names: KeyNames, ages: Ages, window_us: u64, delay: Duration) -> Self {
        Settlements {
            shared: Arc::new(Shared {
                queue: Mutex::new(VecDeque::new()),
                in_flight: AtomicUsize::new(0),
                notify: Notify::new(),
                closed: AtomicBool::new(false),
                dropped: AtomicU64::new(0),
                warned: AtomicBool::new(false),
                names,
                ages,
                window_us,
                delay,
                flush: Script::new(FLUSH),
            }),
            // Not aborted with the budget: it sends what is left, then ends.
            flusher: PerRuntime::new(false),
        }
    }

    pub(super) fn names(&self) -> &KeyNames {
        &self.shared.names
    }

    /// Settlements not applied yet: queued, or sent without an answer yet.
    pub(super) fn pending(&self) -> usize {
        lock(&self.shared.queue).len() + self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Settlements (or their refunds) given up so far.
    pub(super) fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Queues `p`, to be carried by the next admission or flushed after the delay.
    pub(super) fn push(&self, p: Pending) {
        let shared = &self.shared;
        {
            let mut queue = lock(&shared.queue);
            if queue.len() >= MAX_QUEUED {
                queue.pop_front();
                shared.give_up(1, "the queue of settlements is full");
            }
            queue.push_back(p);
        }
        self.start();
        shared.notify.notify_one();
    }

    /// Takes up to `max` settlements to send, the oldest first, without the parts too old
    /// to matter.
    pub(super) fn take(&self, max: usize) -> Vec<Pending> {
        self.shared.take(max, None)
    }

    /// As [`take`](Self::take), for an admission of `name`: with a hash tag per key, only
    /// `name`'s settlements (the others' keys are in other slots).
    pub(super) fn take_for(&self, max: usize, name: &str) -> Vec<Pending> {
        self.shared.take(max, Some(name))
    }

    /// What became of `batch` once sent (or not).
    pub(super) fn sent(&self, batch: Vec<Pending>, fate: Fate) {
        self.shared.sent(batch, fate);
    }

    /// Sends everything queued now, in batches; the first failure ends it (what could not
    /// be sent stays queued).
    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        self.shared.flush_all().await
    }

    /// Starts the flusher in the current runtime unless it runs (without a runtime, a later
    /// call starts it; meanwhile admissions carry the queue). A flusher whose runtime is
    /// gone is started again in the current one.
    pub(super) fn start(&self) {
        self.flusher.spawn_unless_running(|| {
            let shared = Arc::clone(&self.shared);
            async move { shared.run().await }
        });
    }
}

impl Drop for Settlements {
    fn drop(&mut self) {
        // The flusher sends what is left (once, without waiting for an admission) and ends.
        self.shared.closed.store(true, Ordering::Release);
        self.shared.notify.notify_one();
    }
}

impl Shared {
    fn give_up(&self, n: u64, why: &'static str) {
        if n == 0 {
            return;
        }
        self.dropped.fetch_add(n, Ordering::Relaxed);
        if !self.warned.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                target: "tower_ai::redis",
                reason = why,
                "budget settlements given up: their reservations stay counted in redis (places come back after the hold)"
            );
        }
    }

    /// Up to `max` settlements, the oldest first. With a hash tag per key, the keys of one
    /// script must share a slot: only those of `name` (an admission's), or of the oldest
    /// one's name (a flush), among the first `max * 8` queued; the others stay in order.
    fn take(&self, max: usize, name: Option<&str>) -> Vec<Pending> {
        let now = Instant::now();
        let mut expired = 0;
        let mut batch = Vec::new();
        let mut queue = lock(&self.queue);
        if self.names.per_key {
            let scan = queue.len().min(max * 8);
            let window: Vec<Pending> = queue.drain(..scan).collect();
            let mut name = name.map(str::to_owned);
            let mut rest = Vec::new();
            for mut p in window {
                let name = name.get_or_insert_with(|| p.name.clone());
                if batch.len() >= max || p.name != *name {
                    rest.push(p);
                    continue;
                }
                if p.expire(now, &self.ages) {
                    expired += 1;
                }
                if !p.is_empty() {
                    batch.push(p);
                }
            }
            for p in rest.into_iter().rev() {
                queue.push_front(p);
            }
        } else {
            while batch.len() < max {
                let Some(mut p) = queue.pop_front() else {
                    break;
                };
                if p.expire(now, &self.ages) {
                    expired += 1;
                }
                if !p.is_empty() {
                    batch.push(p);
                }
            }
        }
        // Counted in flight before the lock is let go, so `pending` never misses them.
        self.in_flight.fetch_add(batch.len(), Ordering::AcqRel);
        drop(queue);
        self.give_up(expired, "a settlement waited longer than its window");
        batch
    }

    fn sent(&self, mut batch: Vec<Pending>, fate: Fate) {
        let taken = batch.len();
        match fate {
            Fate::Applied => {
                if self.warned.load(Ordering::Relaxed) && !batch.is_empty() {
                    self.warned.store(false, Ordering::Relaxed);
                }
                self.in_flight.fetch_sub(taken, Ordering::AcqRel);
                return;
            }
            Fate::Failed => {
                self.in_flight.fetch_sub(taken, Ordering::AcqRel);
                self.give_up(taken as u64, "redis refused the settlement script");
                return;
            }
            Fate::Unknown => {
                let mut forgone = 0;
                for p in &mut batch {
                    forgone += u64::from(p.forgo_refunds());
                }
                self.give_up(forgone, "redis did not answer: refunds given up");
                batch.retain(|p| !p.is_empty());
            }
            Fate::NotSent => {}
        }
        let mut queue = lock(&self.queue);
        self.in_flight.fetch_sub(taken, Ordering::AcqRel);
        let mut over = 0;
        // Back at the front, in their order; past the bound, the oldest go.
        for p in batch.into_iter().rev() {
            if queue.len() >= MAX_QUEUED {
                over += 1;
                continue;
            }
            queue.push_front(p);
        }
        drop(queue);
        self.give_up(over, "the queue of settlements is full");
    }

    /// Sends `batch` by the flush script.
    async fn send(&self, batch: Vec<Pending>) -> Result<(), StoreError> {
        let keys = batch.iter().map(|p| Pending::key_count(p.parts())).sum();
        let mut cmd = RedisStore::evalsha(&self.flush, keys);
        for p in &batch {
            p.write_keys(&mut cmd, &self.names, p.parts());
        }
        for p in &batch {
            let flags = p.parts();
            if flags != 0 {
                p.write_args(&mut cmd, flags, self.window_us);
            }
        }
        // Every key of the batch carries one hash tag: the first picks the node.
        let first = (batch.first()).map(|p| self.names.key(Kind::Tat, &p.name));
        let result = self
            .names
            .store
            .run_cmd::<i64>(&cmd, &self.flush, first.as_deref())
            .await;
        let result = result.map(drop);
        self.sent(batch, Fate::of(&result));
        result
    }

    async fn flush_all(&self) -> Result<(), StoreError> {
        loop {
            let batch = self.take(MAX_FLUSHED, None);
            if batch.is_empty() {
                return Ok(());
            }
            self.send(batch).await?;
        }
    }

    /// The flusher: after a settlement is queued, waits the delay for an admission to
    /// carry it, then sends what is still queued. While settlements keep coming it wakes
    /// once per delay, not once per settlement (a push while it sleeps leaves a permit).
    async fn run(self: Arc<Self>) {
        loop {
            if self.closed.load(Ordering::Acquire) {
                // The budget is gone: one try, then what could not be sent is given up.
                let _ = self.flush_all().await;
                let left = std::mem::take(&mut *lock(&self.queue)).len() as u64;
                self.give_up(left, "the budget was dropped while redis was unreachable");
                return;
            }
            if lock(&self.queue).is_empty() {
                self.notify.notified().await;
                if !self.closed.load(Ordering::Acquire) {
                    tokio::time::sleep(self.delay).await;
                }
                continue;
            }
            if self.flush_all().await.is_err() {
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settlements() -> Settlements {
        // No I/O: a store is connected on first use.
        let store = RedisStore::open("redis://127.0.0.1:1/").unwrap();
        Settlements::new(
            KeyNames::new(store, "t".to_owned(), false),
            Ages {
                minute: Duration::from_secs(60),
                hold: Duration::from_secs(600),
                day: Duration::from_secs(86_400),
            },
            60_000_000,
            Duration::from_millis(2),
        )
    }

    fn pending(tokens: i64, spend: i64, member: &str) -> Pending {
        Pending {
            queued: Instant::now(),
            name: "k".to_owned(),
            tpm: 1000,
            tokens,
            spend,
            hour: 1,
            day: 2,
            member: member.to_owned(),
        }
    }

    #[test]
    fn a_send_without_an_answer_gives_up_refunds_and_keeps_charges_and_releases() {
        let s = settlements();
        s.push(pending(-500, -7, "m1"));
        s.push(pending(50, 3, ""));
        s.push(pending(-5, 0, ""));
        let batch = s.take(MAX_CARRIED);
        assert_eq!(batch.len(), 3);
        assert_eq!(s.pending(), 3, "in flight counts as pending");
        s.sent(batch, Fate::Unknown);
        // Two settlements lost their refunds; the one that was only a refund is gone.
        assert_eq!(s.dropped(), 2);
        let back = s.take(MAX_CARRIED);
        let kept: Vec<_> = back
            .iter()
            .map(|p| (p.tokens, p.spend, p.member.as_str()))
            .collect();
        assert_eq!(kept, [(0, 0, "m1"), (50, 3, "")]);
        s.sent(back, Fate::Applied);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn a_settlement_not_sent_goes_back_whole_and_first() {
        let s = settlements();
        s.push(pending(-500, 0, "m1"));
        let batch = s.take(MAX_CARRIED);
        s.push(pending(10, 0, ""));
        s.sent(batch, Fate::NotSent);
        assert_eq!(s.dropped(), 0);
        let back = s.take(MAX_CARRIED);
        assert_eq!(back.len(), 2);
        assert_eq!((back[0].tokens, back[0].member.as_str()), (-500, "m1"));
        assert_eq!(back[1].tokens, 10);
    }

    #[test]
    fn a_settlement_redis_refused_is_given_up() {
        let s = settlements();
        s.push(pending(10, 0, "m"));
        let batch = s.take(MAX_CARRIED);
        s.sent(batch, Fate::Failed);
        assert_eq!((s.pending(), s.dropped()), (0, 1));
    }

    #[test]
    fn the_queue_is_bounded_and_counts_what_it_drops() {
        let s = settlements();
        for i in 0..MAX_QUEUED + 5 {
            s.push(pending(i as i64 + 1, 0, ""));
        }
        assert_eq!(s.pending(), MAX_QUEUED);
        assert_eq!(s.dropped(), 5);
        // The oldest went.
        assert_eq!(s.take(1)[0].tokens, 6);
    }

    #[test]
    fn parts_older_than_their_window_are_dropped() {
        let ages = Ages {
            minute: Duration::from_secs(60),
            hold: Duration::from_secs(600),
            day: Duration::from_secs(86_400),
        };
        let now = Instant::now() + Duration::from_secs(61);
        let mut p = pending(-500, 7, "m");
        assert!(p.expire(now, &ages), "the token part is a minute old");
        assert_eq!((p.tokens, p.spend, p.member.as_str()), (0, 7, "m"));
        let mut p = pending(0, 7, "m");
        assert!(!p.expire(Instant::now() + Duration::from_secs(601), &ages));
        assert_eq!((p.spend, p.member.as_str()), (7, ""));
        assert!(p.expire(Instant::now() + Duration::from_secs(86_401), &ages));
        assert!(p.is_empty());
    }
}
