//! A sliding window made of a ring of fixed-length slots.
//!
//! A window of `n` slots of `slot` seconds each counts what was added in the slot that holds
//! *now* and in the `n` slots before it: `n + 1` slots in all. Any interval of `n × slot`
//! seconds touches at most `n + 1` slots, so the window **never admits more than its limit
//! in any interval of its length**, whatever the alignment (of a provider's fixed windows,
//! say). The price is that a slot is forgotten up to one slot late: the window may refuse
//! up to `1/n` of its length earlier than an exact sliding log would (1 s of a minute, 1 min
//! of an hour, 15 min of a day). Memory is fixed: `n + 1` integers, whatever the traffic:
//! 4 bytes each when the limit fits in 32 bits, else 8. A 4-byte slot saturates at
//! `u32::MAX`, which is past the limit: a saturated slot still reads as full, and the
//! total is always the sum of what the slots hold.
//!
//! Slot indices are absolute (`seconds since the budget's epoch / slot`), so a reservation
//! remembers its slot and can be corrected later, while that slot is still in the window.

/// A sliding sum over a ring of slots. All arithmetic saturates.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    limit: u64,
    /// Seconds per slot.
    slot_secs: u64,
    slots: Slots,
    /// Absolute index of the newest slot.
    head: u64,
    /// The sum of `slots`.
    total: u64,
}

impl Window {
    /// A window of `n` slots (plus the current one) of `slot_secs` seconds, admitting
    /// `limit` in all.
    pub(crate) fn new(limit: u64, slot_secs: u64, n: usize) -> Self {
        Window {
            limit,
            slot_secs: slot_secs.max(1),
            slots: if u32::try_from(limit).is_ok() {
                Slots::Narrow(vec![0; n + 1].into_boxed_slice())
            } else {
                Slots::Wide(vec![0; n + 1].into_boxed_slice())
            },
            head: 0,
            total: 0,
        }
    }

    /// The bytes its slots take on the heap.
    pub(crate) fn heap_bytes(&self) -> usize {
        match &self.slots {
            Slots::Narrow(s) => std::mem::size_of_val(&**s),
            Slots::Wide(s) => std::mem::size_of_val(&**s),
        }
    }

    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    /// What the window holds now (after [`advance`](Self::advance)).
    pub(crate) fn used(&self) -> u64 {
        self.total
    }

    /// The absolute slot index of a time given in seconds since the epoch.
    pub(crate) fn index(&self, secs: u64) -> u64 {
        secs / self.slot_secs
    }

    /// Moves the window to `secs`, forgetting slots that fell out of it.
    pub(crate) fn advance(&mut self, secs: u64) {
        let idx = self.index(secs);
        if idx <= self.head {
            return;
        }
        let len = self.slots.len() as u64;
        if idx - self.head >= len {
            self.slots.clear();
            self.total = 0;
        } else {
            for i in self.head + 1..=idx {
                let old = self.slots.set((i % len) as usize, 0);
                self.total = self.total.saturating_sub(old);
            }
        }
        self.head = idx;
    }

    /// Whether `cost` more fits now.
    pub(crate) fn fits(&self, cost: u64) -> bool {
        self.total.saturating_add(cost) <= self.limit
    }

    /// Whether `cost` can never fit (it is larger than the whole limit).
    pub(crate) fn never_fits(&self, cost: u64) -> bool {
        cost > self.limit
    }

    /// Adds `cost` to the current slot.
    pub(crate) fn add(&mut self, cost: u64) {
        let len = self.slots.len() as u64;
        let i = (self.head % len) as usize;
        let old = self.slots.get(i);
        self.slots.set(i, old.saturating_add(cost));
        self.total = self
            .total
            .saturating_sub(old)
            .saturating_add(self.slots.get(i));
    }

    /// Replaces `reserved` with `actual` in the slot of `secs`, if that slot is still in
    /// the window (a slot that already left it has nothing left to correct).
    pub(crate) fn correct(&mut self, secs: u64, reserved: u64, actual: u64) {
        let idx = self.index(secs);
        let len = self.slots.len() as u64;
        if idx > self.head || self.head - idx >= len {
            return;
        }
        let i = (idx % len) as usize;
        let old = self.slots.get(i);
        self.slots
            .set(i, old.saturating_sub(reserved).saturating_add(actual));
        self.total = self
            .total
            .saturating_sub(old)
            .saturating_add(self.slots.get(i));
    }

    /// Raises what the current slot holds so the window holds at least `used` (a
    /// provider's count that is higher than ours: other clients share the account).
    pub(crate) fn raise_to(&mut self, used: u64) {
        if used > self.total {
            self.add(used - self.total);
        }
    }

    /// The time, in seconds since the epoch, from which `cost` fits if nothing more is
    /// added; `None` when it never fits. Call after [`advance`](Self::advance).
    pub(crate) fn fits_at(&self, cost: u64, now_secs: u64) -> Option<u64> {
        if self.never_fits(cost) {
            return None;
        }
        if self.fits(cost) {
            return Some(now_secs);
        }
        let len = self.slots.len() as u64;
        let mut total = self.total;
        // Oldest slot first: slot `i` leaves the window when the head reaches `i + len`.
        let oldest = self.head.saturating_sub(len - 1);
        for i in oldest..=self.head {
            total = total.saturating_sub(self.slots.get((i % len) as usize));
            if total.saturating_add(cost) <= self.limit {
                return Some((i + len).saturating_mul(self.slot_secs));
            }
        }
        // Every slot has left by then.
        Some((self.head + len).saturating_mul(self.slot_secs))
    }

    /// The second (since the epoch) from which the last of `amounts` fits, if they are
    /// admitted in order, each as soon as it fits, and nothing else is added: the
    /// predicted start of a request behind a FIFO queue (`amounts`: the queue's costs,
    /// then its own). What is admitted in the meantime fills the window in turn and
    /// leaves it a window's length later, so a queue longer than the limit is predicted
    /// over several windows. `None` when an amount never fits. Call after
    /// [`advance`](Self::advance); O(slots + amounts).
    pub(crate) fn start_of(
        &self,
        amounts: impl IntoIterator<Item = u64>,
        now_secs: u64,
    ) -> Option<u64> {
        let len = self.slots.len() as u64;
        // What leaves the window, and when (in seconds), in order of leaving: the slots
        // held now, oldest first, then what the prediction admits.
        let oldest = self.head.saturating_sub(len - 1);
        let mut leaving: std::collections::VecDeque<(u64, u64)> = (oldest..=self.head)
            .filter_map(|i| {
                let a = self.slots.get((i % len) as usize);
                (a > 0).then(|| ((i + len).saturating_mul(self.slot_secs), a))
            })
            .collect();
        let mut free = self.limit.saturating_sub(self.total);
        let mut at = now_secs;
        for c in amounts {
            if self.never_fits(c) {
                return None;
            }
            while free < c {
                let (t, a) = leaving.pop_front()?;
                at = at.max(t);
                free = free.saturating_add(a);
            }
            free -= c;
            let leaves = (self.index(at) + len).saturating_mul(self.slot_secs);
            match leaving.back_mut() {
                // Admitted in the same slot: they leave together.
                Some((t, a)) if *t == leaves => *a = a.saturating_add(c),
                _ => leaving.push_back((leaves, c)),
            }
        }
        Some(at)
    }
}

/// The slots of a window: 4 bytes each when its limit fits in 32 bits.
#[derive(Debug, Clone)]
enum Slots {
    Narrow(Box<[u32]>),
    Wide(Box<[u64]>),
}

impl Slots {
    fn len(&self) -> usize {
        match self {
            Slots::Narrow(s) => s.len(),
            Slots::Wide(s) => s.len(),
        }
    }

    fn get(&self, i: usize) -> u64 {
        match self {
            Slots::Narrow(s) => s.get(i).map_or(0, |v| u64::from(*v)),
            Slots::Wide(s) => s.get(i).copied().unwrap_or(0),
        }
    }

    /// Stores `v` (saturated to the slot's width) in slot `i`; returns what it held.
    fn set(&mut self, i: usize, v: u64) -> u64 {
        match self {
            Slots::Narrow(s) => s.get_mut(i).map_or(0, |s| {
                u64::from(std::mem::replace(s, u32::try_from(v).unwrap_or(u32::MAX)))
            }),
            Slots::Wide(s) => s.get_mut(i).map_or(0, |s| std::mem::replace(s, v)),
        }
    }

    fn clear(&mut self) {
        match self {
            Slots::Narrow(s) => s.fill(0),
            Slots::Wide(s) => s.fill(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_and_slides() {
        let mut w = Window::new(10, 1, 60);
        w.advance(0);
        w.add(6);
        w.advance(30);
        w.add(4);
        assert!(!w.fits(1));
        // Slot 0 is counted through second 60 (61 slots), gone at 61.
        assert_eq!(w.fits_at(1, 30), Some(61));
        w.advance(60);
        assert_eq!(w.used(), 10);
        w.advance(61);
        assert_eq!(w.used(), 4);
        assert!(w.fits(6) && !w.fits(7));
        assert_eq!(w.fits_at(7, 61), Some(91));
        assert_eq!(w.fits_at(11, 61), None);
        w.advance(10_000);
        assert_eq!(w.used(), 0);
    }

    #[test]
    fn never_more_than_the_limit_in_any_interval() {
        // Brute force: admit greedily every 0.25 s for 10 minutes; check every 60 s interval.
        let mut w = Window::new(7, 1, 60);
        let mut admitted = Vec::new();
        for q in 0..2400u64 {
            let secs = q / 4;
            w.advance(secs);
            if w.fits(1) {
                w.add(1);
                admitted.push(q);
            }
        }
        for start in 0..2400u64 {
            let n = admitted
                .iter()
                .filter(|&&q| q >= start && q < start + 240)
                .count();
            assert!(n <= 7, "{n} in [{start}, +60 s)");
        }
        // ... and it is not much stricter than needed: 7 per 61 s.
        assert!(admitted.len() >= 7 * 9, "{}", admitted.len());
    }

    #[test]
    fn corrections_apply_to_their_slot_only_while_it_counts() {
        let mut w = Window::new(100, 1, 60);
        w.advance(5);
        w.add(50);
        w.advance(20);
        w.add(10);
        w.correct(5, 50, 20);
        assert_eq!(w.used(), 30);
        w.correct(5, 20, 70); // an underestimate is charged too
        assert_eq!(w.used(), 80);
        w.advance(70);
        assert_eq!(w.used(), 10);
        w.correct(5, 70, 0); // slot 5 already left: nothing to correct
        assert_eq!(w.used(), 10);
        w.correct(500, 1, 0); // a future slot: ignored
        assert_eq!(w.used(), 10);
        w.add(u64::MAX);
        // A 4-byte slot saturates at u32::MAX: past the limit all the same.
        let full = u64::from(u32::MAX) + 10;
        assert_eq!(w.used(), full, "saturates");
        w.raise_to(5);
        assert_eq!(w.used(), full);
        let mut wide = Window::new(u64::MAX, 1, 60);
        wide.add(u64::MAX);
        wide.add(1);
        assert_eq!(wide.used(), u64::MAX, "saturates");
    }

    #[test]
    fn narrow_slots_saturate_past_the_limit_and_stay_full() {
        let mut w = Window::new(10, 1, 60);
        assert_eq!(w.heap_bytes(), 61 * 4);
        w.advance(1);
        w.add(u64::MAX);
        assert_eq!(w.used(), u64::from(u32::MAX));
        assert!(!w.fits(1));
        w.correct(1, 5, 0);
        assert!(!w.fits(1), "still past the limit");
        w.add(3);
        w.advance(70);
        assert_eq!(w.used(), 0);
        assert!(w.fits(10));
        assert_eq!(
            Window::new(u64::from(u32::MAX) + 1, 1, 60).heap_bytes(),
            61 * 8
        );
    }

    #[test]
    fn a_queue_is_predicted_over_as_many_windows_as_it_takes() {
        // 2 a second for 30 s fill a limit of 60; then each slot's 2 leave 61 s later.
        let mut w = Window::new(60, 1, 60);
        for s in 0..30 {
            w.advance(s);
            w.add(2);
        }
        w.advance(40);
        assert_eq!(w.start_of([1], 40), w.fits_at(1, 40));
        assert_eq!(w.start_of([1], 40), Some(61));
        assert_eq!(w.start_of([1, 1], 40), Some(61));
        assert_eq!(w.start_of([1; 3], 40), Some(62));
        // The 60th queued goes when slot 29 leaves (90); the 61st when what the 1st took
        // at 61 leaves, a window later (122).
        assert_eq!(w.start_of([1; 60], 40), Some(90));
        assert_eq!(w.start_of([1; 61], 40), Some(122));
        assert_eq!(w.start_of([1; 121], 40), Some(183));
        // An empty window: a limit's worth goes now, the next a window later.
        w.advance(100);
        assert_eq!(w.start_of([1; 60], 100), Some(100));
        assert_eq!(w.start_of([1; 61], 100), Some(161));
        // Unequal amounts, and one that can never fit.
        let mut t = Window::new(100, 1, 60);
        t.add(90);
        assert_eq!(t.start_of([10, 50], 0), Some(61));
        assert_eq!(t.start_of([10, 50, 60], 0), Some(122));
        assert_eq!(t.start_of([10, 101], 0), None);
        assert_eq!(t.start_of([], 0), Some(0));
    }

    #[test]
    fn coarse_slots() {
        // An hour of 1-minute slots.
        let mut w = Window::new(5, 60, 60);
        w.advance(59);
        w.add(5);
        assert_eq!(w.fits_at(1, 59), Some(61 * 60));
        w.advance(61 * 60 - 1);
        assert!(!w.fits(1));
        w.advance(61 * 60);
        assert!(w.fits(5));
    }
}
