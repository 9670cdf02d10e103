//! A sliding window made of a ring of fixed-length slots.
//!
//! A window of `n` slots of `slot` seconds each counts what was added in the slot that holds
//! *now* and in the `n` slots before it: `n + 1` slots in all. Any interval of `n × slot`
//! seconds touches at most `n + 1` slots, so the window **never admits more than its limit
//! in any interval of its length**, whatever the alignment (of a provider's fixed windows,
//! say). The price is that a slot is forgotten up to one slot late: the window may refuse
//! up to `1/n` of its length earlier than an exact sliding log would (1 s of a minute, 1 min
//! of an hour, 15 min of a day). Memory is fixed: `n + 1` integers, whatever the traffic.
//!
//! Slot indices are absolute (`seconds since the budget's epoch / slot`), so a reservation
//! remembers its slot and can be corrected later, while that slot is still in the window.

/// A sliding sum over a ring of slots. All arithmetic saturates.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    limit: u64,
    /// Seconds per slot.
    slot_secs: u64,
    slots: Box<[u64]>,
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
            slots: vec![0; n + 1].into_boxed_slice(),
            head: 0,
            total: 0,
        }
    }

    /// The bytes its slots take on the heap.
    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.slots)
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
            self.slots.iter_mut().for_each(|s| *s = 0);
            self.total = 0;
        } else {
            for i in self.head + 1..=idx {
                let s = &mut self.slots[(i % len) as usize];
                self.total = self.total.saturating_sub(*s);
                *s = 0;
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
        let s = &mut self.slots[(self.head % len) as usize];
        *s = s.saturating_add(cost);
        self.total = self.total.saturating_add(cost);
    }

    /// Replaces `reserved` with `actual` in the slot of `secs`, if that slot is still in
    /// the window (a slot that already left it has nothing left to correct).
    pub(crate) fn correct(&mut self, secs: u64, reserved: u64, actual: u64) {
        let idx = self.index(secs);
        let len = self.slots.len() as u64;
        if idx > self.head || self.head - idx >= len {
            return;
        }
        let s = &mut self.slots[(idx % len) as usize];
        let old = *s;
        let new = old.saturating_sub(reserved).saturating_add(actual);
        *s = new;
        self.total = self.total.saturating_sub(old).saturating_add(new);
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
            total = total.saturating_sub(self.slots[(i % len) as usize]);
            if total.saturating_add(cost) <= self.limit {
                return Some((i + len).saturating_mul(self.slot_secs));
            }
        }
        // Every slot has left by then.
        Some((self.head + len).saturating_mul(self.slot_secs))
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
        assert_eq!(w.used(), u64::MAX, "saturates");
        w.raise_to(5);
        assert_eq!(w.used(), u64::MAX);
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
