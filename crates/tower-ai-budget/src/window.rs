//! A sliding window made of a ring of fixed-length slots, held sparsely while few of its
//! slots hold anything.
//!
//! A window of `n` slots of `slot` seconds each counts what was added in the slot that holds
//! *now* and in the `n` slots before it: `n + 1` slots in all. Any interval of `n × slot`
//! seconds touches at most `n + 1` slots, so the window **never admits more than its limit
//! in any interval of its length**, whatever the alignment (of a provider's fixed windows,
//! say). The price is that a slot is forgotten up to one slot late: the window may refuse
//! up to `1/n` of its length earlier than an exact sliding log would (1 s of a minute, 1 min
//! of an hour, 15 min of a day).
//!
//! Memory: a window is 16 bytes in its key's state while at most [`SPARSE`] of its slots
//! hold anything (each as a 32-bit count and its age in slots), which is every key
//! that sent a request or two; a key busy in more slots than that moves to the full ring
//! of `n + 1` integers on the heap (4 bytes each when the limit fits in 32 bits, else 8),
//! and back once a whole window has passed without it. Both forms hold the same numbers
//! (what each slot holds), so they decide alike: the unit tests drive both with the same
//! random traffic. A 4-byte ring slot saturates at `u32::MAX`, which is past the limit:
//! a saturated slot still reads as full, and the total is always the sum of what the slots
//! hold. A sparse count that would not fit in 32 bits moves the window to the ring first.
//!
//! Slot indices are absolute (`seconds since the budget's epoch / slot`), so a reservation
//! remembers its slot and can be corrected later, while that slot is still in the window.
//! What is the same for every key (the limit, the slot length, the number of slots) is in
//! a [`Spec`], kept once per budget.

use std::num::NonZeroU8;

/// What every key's window of one limit shares: its limit and shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spec {
    limit: u64,
    /// Seconds per slot.
    slot_secs: u64,
    /// Slots in all: `n + 1`.
    len: u64,
}

impl Spec {
    /// A window of `n` slots (plus the current one) of `slot_secs` seconds, admitting
    /// `limit` in all.
    pub(crate) fn new(limit: u64, slot_secs: u64, n: usize) -> Self {
        Spec {
            limit,
            slot_secs: slot_secs.max(1),
            len: (n as u64).saturating_add(1),
        }
    }

    /// The absolute slot index of a time given in seconds since the epoch.
    fn index(&self, secs: u64) -> u64 {
        secs / self.slot_secs
    }

    /// Whether `cost` can never fit (it is larger than the whole limit).
    pub(crate) fn never_fits(&self, cost: u64) -> bool {
        cost > self.limit
    }
}

/// Slots a window holds inline before it moves to the full ring.
pub(crate) const SPARSE: usize = 2;

/// The inline form: at most [`SPARSE`] slots, each as its count and its age (how many
/// slots it is behind `head`, + 1, so that the byte is never zero and the whole window
/// fits in 16 bytes). An entry whose count is 0 is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Inline {
    /// Absolute index of the newest slot.
    head: u32,
    counts: [u32; SPARSE],
    ages: [NonZeroU8; SPARSE],
}

/// The longest window the inline form holds (an age is a byte); the budget's are 61 and
/// 97 slots.
const INLINE_MAX_LEN: u64 = 254;

impl Inline {
    fn new(head: u32) -> Self {
        Inline {
            head,
            counts: [0; SPARSE],
            ages: [NonZeroU8::MIN; SPARSE],
        }
    }

    /// The absolute index of entry `i`.
    fn idx(&self, i: usize) -> u64 {
        u64::from(self.head).saturating_sub(u64::from(self.ages[i].get() - 1))
    }

    fn used(&self) -> u64 {
        self.counts.iter().map(|&c| u64::from(c)).sum()
    }

    /// The entry holding slot `idx`.
    fn find(&self, idx: u64) -> Option<usize> {
        (0..SPARSE).find(|&i| self.counts[i] > 0 && self.idx(i) == idx)
    }

    fn free(&self) -> Option<usize> {
        (0..SPARSE).find(|&i| self.counts[i] == 0)
    }

    /// Puts `count` in entry `i` for slot `idx` (at most [`INLINE_MAX_LEN`] behind the
    /// head: the caller checked it is in the window).
    fn put(&mut self, i: usize, idx: u64, count: u32) {
        let age = u64::from(self.head).saturating_sub(idx);
        let age = u8::try_from(age.saturating_add(1))
            .ok()
            .and_then(NonZeroU8::new)
            .unwrap_or(NonZeroU8::MAX);
        self.counts[i] = count;
        self.ages[i] = age;
    }

    /// The slots holding anything, oldest first: (absolute index, amount).
    fn held(&self) -> impl Iterator<Item = (u64, u64)> {
        let mut held = [(0u64, 0u64); SPARSE];
        for (i, h) in held.iter_mut().enumerate() {
            *h = (self.idx(i), u64::from(self.counts[i]));
        }
        held.sort_unstable_by_key(|&(idx, _)| idx);
        held.into_iter().filter(|&(_, c)| c > 0)
    }
}

/// A sliding sum over slots (see the module's documentation). All arithmetic saturates.
#[derive(Debug, Clone)]
pub(crate) enum Window {
    /// At most [`SPARSE`] slots hold anything.
    Sparse(Inline),
    /// The full ring.
    Dense(Box<Ring>),
}

/// Every slot of a window, from `head - len + 1` to `head`.
#[derive(Debug, Clone)]
pub(crate) struct Ring {
    /// Absolute index of the newest slot.
    head: u64,
    /// The sum of `slots`.
    total: u64,
    slots: Slots,
}

/// A window and what its limit's windows share, to read and move it.
#[derive(Debug)]
pub(crate) struct WindowMut<'a> {
    pub(crate) spec: &'a Spec,
    pub(crate) window: &'a mut Window,
}

impl Default for Window {
    fn default() -> Self {
        Window::Sparse(Inline::new(0))
    }
}

impl Window {
    /// An empty window at slot 0.
    pub(crate) fn new() -> Self {
        Window::default()
    }

    /// The bytes it takes on the heap (none while sparse).
    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            Window::Sparse(_) => 0,
            Window::Dense(r) => {
                std::mem::size_of::<Ring>()
                    + match &r.slots {
                        Slots::Narrow(s) => std::mem::size_of_val(&**s),
                        Slots::Wide(s) => std::mem::size_of_val(&**s),
                    }
            }
        }
    }

    /// Whether it holds the full ring.
    #[cfg(test)]
    pub(crate) fn is_dense(&self) -> bool {
        matches!(self, Window::Dense(_))
    }

    /// What the window holds now (after [`advance`](Self::advance)).
    pub(crate) fn used(&self) -> u64 {
        match self {
            Window::Sparse(s) => s.used(),
            Window::Dense(r) => r.total,
        }
    }

    /// The absolute index of the newest slot.
    fn head(&self) -> u64 {
        match self {
            Window::Sparse(s) => u64::from(s.head),
            Window::Dense(r) => r.head,
        }
    }

    /// Moves to the full ring, with the same slots, and returns it.
    #[cold]
    #[inline(never)]
    fn densify(&mut self, spec: &Spec) -> Option<&mut Ring> {
        if let Window::Sparse(s) = *self {
            let len = spec.len;
            let n = usize::try_from(len).unwrap_or(usize::MAX);
            let mut ring = Ring {
                head: u64::from(s.head),
                total: 0,
                slots: if u32::try_from(spec.limit).is_ok() {
                    Slots::Narrow(vec![0; n].into_boxed_slice())
                } else {
                    Slots::Wide(vec![0; n].into_boxed_slice())
                },
            };
            for (idx, count) in s.held() {
                ring.slots.set((idx % len) as usize, count);
                ring.total += count;
            }
            *self = Window::Dense(Box::new(ring));
        }
        match self {
            Window::Dense(r) => Some(r),
            Window::Sparse(_) => None,
        }
    }

    /// Moves the window to `secs`, forgetting slots that fell out of it.
    pub(crate) fn advance(&mut self, spec: &Spec, secs: u64) {
        let idx = spec.index(secs);
        let len = spec.len;
        match self {
            Window::Sparse(s) => {
                let head = u64::from(s.head);
                if idx <= head {
                    return;
                }
                let (Ok(new_head), true) = (u32::try_from(idx), len <= INLINE_MAX_LEN) else {
                    // Past what the inline form holds: the ring's indices are 64-bit.
                    if let Some(r) = self.densify(spec) {
                        r.advance(len, idx);
                    }
                    return;
                };
                let step = idx - head;
                for i in 0..SPARSE {
                    let age = u64::from(s.ages[i].get() - 1).saturating_add(step);
                    if age >= len {
                        s.counts[i] = 0;
                        s.ages[i] = NonZeroU8::MIN;
                    } else {
                        // `age < len <= INLINE_MAX_LEN`: fits.
                        s.ages[i] = NonZeroU8::new(age as u8 + 1).unwrap_or(NonZeroU8::MAX);
                    }
                }
                s.head = new_head;
            }
            Window::Dense(r) => {
                if idx <= r.head {
                    return;
                }
                if idx - r.head >= len {
                    // A whole window passed: nothing is left, back to the inline form.
                    if let Ok(head) = u32::try_from(idx) {
                        *self = Window::Sparse(Inline::new(head));
                        return;
                    }
                }
                r.advance(len, idx);
            }
        }
    }

    /// Whether `cost` more fits now.
    pub(crate) fn fits(&self, spec: &Spec, cost: u64) -> bool {
        self.used().saturating_add(cost) <= spec.limit
    }

    /// Adds `cost` to the current slot.
    pub(crate) fn add(&mut self, spec: &Spec, cost: u64) {
        if let Window::Sparse(s) = self {
            if cost == 0 {
                return;
            }
            let head = u64::from(s.head);
            if spec.len <= INLINE_MAX_LEN {
                if let Some(i) = s.find(head) {
                    if let Ok(c) = u32::try_from(u64::from(s.counts[i]).saturating_add(cost)) {
                        s.counts[i] = c;
                        return;
                    }
                } else if let (Some(i), Ok(count)) = (s.free(), u32::try_from(cost)) {
                    s.put(i, head, count);
                    return;
                }
            }
        }
        if let Some(r) = self.densify(spec) {
            r.add(spec.len, cost);
        }
    }

    /// Replaces `reserved` with `actual` in the slot of `secs`, if that slot is still in
    /// the window (a slot that already left it has nothing left to correct).
    pub(crate) fn correct(&mut self, spec: &Spec, secs: u64, reserved: u64, actual: u64) {
        let idx = spec.index(secs);
        let head = self.head();
        if idx > head || head - idx >= spec.len {
            return;
        }
        if let Window::Sparse(s) = self {
            let at = s.find(idx);
            let old = at.map_or(0, |i| u64::from(s.counts[i]));
            let new = old.saturating_sub(reserved).saturating_add(actual);
            match (at.or_else(|| s.free()), u32::try_from(new)) {
                (_, Ok(0)) => {
                    if let Some(i) = at {
                        s.counts[i] = 0;
                    }
                    return;
                }
                // `head - idx < len <= INLINE_MAX_LEN` (the inline form is never longer).
                (Some(i), Ok(count)) => {
                    s.put(i, idx, count);
                    return;
                }
                _ => {}
            }
        }
        if let Some(r) = self.densify(spec) {
            r.correct(spec.len, idx, reserved, actual);
        }
    }

    /// Raises what the current slot holds so the window holds at least `used` (a
    /// provider's count that is higher than ours: other clients share the account).
    pub(crate) fn raise_to(&mut self, spec: &Spec, used: u64) {
        let total = self.used();
        if used > total {
            self.add(spec, used - total);
        }
    }

    /// The time, in seconds since the epoch, from which `cost` fits if nothing more is
    /// added; `None` when it never fits. Call after [`advance`](Self::advance).
    pub(crate) fn fits_at(&self, spec: &Spec, cost: u64, now_secs: u64) -> Option<u64> {
        if spec.never_fits(cost) {
            return None;
        }
        if self.fits(spec, cost) {
            return Some(now_secs);
        }
        let len = spec.len;
        let leaves = |i: u64| Some(i.saturating_add(len).saturating_mul(spec.slot_secs));
        let mut total = self.used();
        match self {
            Window::Sparse(s) => {
                // Oldest slot first: slot `i` leaves the window when the head reaches
                // `i + len`. Slots holding nothing change nothing.
                for (idx, count) in s.held() {
                    total = total.saturating_sub(count);
                    if total.saturating_add(cost) <= spec.limit {
                        return leaves(idx);
                    }
                }
                leaves(u64::from(s.head))
            }
            Window::Dense(r) => {
                let oldest = r.head.saturating_sub(len - 1);
                for i in oldest..=r.head {
                    total = total.saturating_sub(r.slots.get((i % len) as usize));
                    if total.saturating_add(cost) <= spec.limit {
                        return leaves(i);
                    }
                }
                // Every slot has left by then.
                leaves(r.head)
            }
        }
    }
}

impl Window {
    /// The slots holding anything, oldest first: (absolute index, amount).
    fn held(&self, spec: &Spec) -> std::collections::VecDeque<(u64, u64)> {
        match self {
            Window::Sparse(s) => s.held().collect(),
            Window::Dense(r) => {
                let len = spec.len;
                let oldest = r.head.saturating_sub(len - 1);
                (oldest..=r.head)
                    .filter_map(|i| {
                        let a = r.slots.get((i % len) as usize);
                        (a > 0).then_some((i, a))
                    })
                    .collect()
            }
        }
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
        spec: &Spec,
        amounts: impl IntoIterator<Item = u64>,
        now_secs: u64,
    ) -> Option<u64> {
        let len = spec.len;
        // What leaves the window, and when (in seconds), in order of leaving: the slots
        // held now, oldest first, then what the prediction admits.
        let mut leaving: std::collections::VecDeque<(u64, u64)> = self
            .held(spec)
            .into_iter()
            .map(|(i, a)| ((i.saturating_add(len)).saturating_mul(spec.slot_secs), a))
            .collect();
        let mut free = spec.limit.saturating_sub(self.used());
        let mut at = now_secs;
        for c in amounts {
            if spec.never_fits(c) {
                return None;
            }
            while free < c {
                let (t, a) = leaving.pop_front()?;
                at = at.max(t);
                free = free.saturating_add(a);
            }
            free -= c;
            let leaves = (spec.index(at).saturating_add(len)).saturating_mul(spec.slot_secs);
            match leaving.back_mut() {
                // Admitted in the same slot: they leave together.
                Some((t, a)) if *t == leaves => *a = a.saturating_add(c),
                _ => leaving.push_back((leaves, c)),
            }
        }
        Some(at)
    }
}

impl Ring {
    fn advance(&mut self, len: u64, idx: u64) {
        if idx <= self.head {
            return;
        }
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

    fn add(&mut self, len: u64, cost: u64) {
        let i = (self.head % len) as usize;
        let old = self.slots.get(i);
        self.slots.set(i, old.saturating_add(cost));
        self.total = self
            .total
            .saturating_sub(old)
            .saturating_add(self.slots.get(i));
    }

    fn correct(&mut self, len: u64, idx: u64, reserved: u64, actual: u64) {
        let i = (idx % len) as usize;
        let old = self.slots.get(i);
        self.slots
            .set(i, old.saturating_sub(reserved).saturating_add(actual));
        self.total = self
            .total
            .saturating_sub(old)
            .saturating_add(self.slots.get(i));
    }
}

impl WindowMut<'_> {
    pub(crate) fn limit(&self) -> u64 {
        self.spec.limit
    }

    pub(crate) fn used(&self) -> u64 {
        self.window.used()
    }

    #[cfg(test)]
    pub(crate) fn advance(&mut self, secs: u64) {
        self.window.advance(self.spec, secs);
    }

    pub(crate) fn fits(&self, cost: u64) -> bool {
        self.window.fits(self.spec, cost)
    }

    pub(crate) fn never_fits(&self, cost: u64) -> bool {
        self.spec.never_fits(cost)
    }

    pub(crate) fn add(&mut self, cost: u64) {
        self.window.add(self.spec, cost);
    }

    pub(crate) fn correct(&mut self, secs: u64, reserved: u64, actual: u64) {
        self.window.correct(self.spec, secs, reserved, actual);
    }

    pub(crate) fn raise_to(&mut self, used: u64) {
        self.window.raise_to(self.spec, used);
    }

    pub(crate) fn fits_at(&self, cost: u64, now_secs: u64) -> Option<u64> {
        self.window.fits_at(self.spec, cost, now_secs)
    }
}

/// The slots of a window: 4 bytes each when its limit fits in 32 bits.
#[derive(Debug, Clone)]
enum Slots {
    Narrow(Box<[u32]>),
    Wide(Box<[u64]>),
}

impl Slots {
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
    use proptest::prelude::*;

    /// A window with its spec, as the budget holds them.
    struct W {
        spec: Spec,
        window: Window,
    }

    impl W {
        fn new(limit: u64, slot_secs: u64, n: usize) -> Self {
            W {
                spec: Spec::new(limit, slot_secs, n),
                window: Window::new(),
            }
        }

        fn w(&mut self) -> WindowMut<'_> {
            WindowMut {
                spec: &self.spec,
                window: &mut self.window,
            }
        }
    }

    #[test]
    fn sums_and_slides() {
        let mut w = W::new(10, 1, 60);
        let mut w = w.w();
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
        let mut w = W::new(7, 1, 60);
        let mut w = w.w();
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
        let mut w = W::new(100, 1, 60);
        let mut w = w.w();
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
        let mut wide = W::new(u64::MAX, 1, 60);
        let mut wide = wide.w();
        wide.add(u64::MAX);
        wide.add(1);
        assert_eq!(wide.used(), u64::MAX, "saturates");
    }

    #[test]
    fn narrow_slots_saturate_past_the_limit_and_stay_full() {
        let mut w = W::new(10, 1, 60);
        assert_eq!(w.window.heap_bytes(), 0, "sparse: nothing on the heap");
        let mut w = w.w();
        w.advance(1);
        w.add(u64::MAX);
        assert!(w.window.is_dense(), "a count past 32 bits takes the ring");
        assert_eq!(w.window.heap_bytes(), std::mem::size_of::<Ring>() + 61 * 4);
        assert_eq!(w.used(), u64::from(u32::MAX));
        assert!(!w.fits(1));
        w.correct(1, 5, 0);
        assert!(!w.fits(1), "still past the limit");
        w.add(3);
        w.advance(70);
        assert_eq!(w.used(), 0);
        assert!(w.fits(10));
        assert!(!w.window.is_dense(), "a whole window later: inline again");
        let mut wide = W::new(u64::from(u32::MAX) + 1, 1, 60);
        let mut wide = wide.w();
        for s in 0..3 {
            wide.advance(s);
            wide.add(1);
        }
        assert_eq!(
            wide.window.heap_bytes(),
            std::mem::size_of::<Ring>() + 61 * 8
        );
    }

    #[test]
    fn a_window_is_small_while_few_slots_hold_anything() {
        assert_eq!(std::mem::size_of::<Window>(), 16);
        let mut w = W::new(1000, 1, 60);
        let mut w = w.w();
        w.advance(3);
        w.add(1);
        w.advance(9);
        w.add(2);
        w.correct(3, 1, 5);
        assert!(!w.window.is_dense(), "two slots: inline");
        assert_eq!(w.used(), 7);
        w.advance(10);
        w.add(1);
        assert!(w.window.is_dense(), "a third slot takes the ring");
        assert_eq!(w.used(), 8);
        assert_eq!(w.fits_at(995, 10), Some(64), "slot 3 leaves at 64");
    }

    #[test]
    fn a_queue_is_predicted_over_as_many_windows_as_it_takes() {
        // 2 a second for 30 s fill a limit of 60; then each slot's 2 leave 61 s later.
        let mut w = W::new(60, 1, 60);
        let mut w = w.w();
        for s in 0..30 {
            w.advance(s);
            w.add(2);
        }
        w.advance(40);
        let start_of =
            |w: &WindowMut<'_>, a: &[u64], now| w.window.start_of(w.spec, a.iter().copied(), now);
        assert_eq!(start_of(&w, &[1], 40), w.fits_at(1, 40));
        assert_eq!(start_of(&w, &[1], 40), Some(61));
        assert_eq!(start_of(&w, &[1, 1], 40), Some(61));
        assert_eq!(start_of(&w, &[1; 3], 40), Some(62));
        // The 60th queued goes when slot 29 leaves (90); the 61st when what the 1st took
        // at 61 leaves, a window later (122).
        assert_eq!(start_of(&w, &[1; 60], 40), Some(90));
        assert_eq!(start_of(&w, &[1; 61], 40), Some(122));
        assert_eq!(start_of(&w, &[1; 121], 40), Some(183));
        // An empty window: a limit's worth goes now, the next a window later.
        w.advance(100);
        assert_eq!(start_of(&w, &[1; 60], 100), Some(100));
        assert_eq!(start_of(&w, &[1; 61], 100), Some(161));
        // Unequal amounts, and one that can never fit (a sparse window this time).
        let mut t = W::new(100, 1, 60);
        let mut t = t.w();
        t.add(90);
        assert!(!t.window.is_dense());
        assert_eq!(start_of(&t, &[10, 50], 0), Some(61));
        assert_eq!(start_of(&t, &[10, 50, 60], 0), Some(122));
        assert_eq!(start_of(&t, &[10, 101], 0), None);
        assert_eq!(start_of(&t, &[], 0), Some(0));
    }

    #[test]
    fn coarse_slots() {
        // An hour of 1-minute slots.
        let mut w = W::new(5, 60, 60);
        let mut w = w.w();
        w.advance(59);
        w.add(5);
        assert_eq!(w.fits_at(1, 59), Some(61 * 60));
        w.advance(61 * 60 - 1);
        assert!(!w.fits(1));
        w.advance(61 * 60);
        assert!(w.fits(5));
    }

    /// The ring every window was before the sparse form: the reference the sparse form
    /// must match.
    struct Reference {
        limit: u64,
        slot_secs: u64,
        slots: Vec<u64>,
        narrow: bool,
        head: u64,
        total: u64,
    }

    impl Reference {
        fn new(limit: u64, slot_secs: u64, n: usize) -> Self {
            Reference {
                limit,
                slot_secs,
                slots: vec![0; n + 1],
                narrow: u32::try_from(limit).is_ok(),
                head: 0,
                total: 0,
            }
        }

        fn set(&mut self, i: usize, v: u64) -> u64 {
            let v = if self.narrow {
                v.min(u64::from(u32::MAX))
            } else {
                v
            };
            std::mem::replace(&mut self.slots[i], v)
        }

        fn advance(&mut self, secs: u64) {
            let idx = secs / self.slot_secs;
            if idx <= self.head {
                return;
            }
            let len = self.slots.len() as u64;
            if idx - self.head >= len {
                self.slots.fill(0);
                self.total = 0;
            } else {
                for i in self.head + 1..=idx {
                    let old = self.set((i % len) as usize, 0);
                    self.total = self.total.saturating_sub(old);
                }
            }
            self.head = idx;
        }

        fn add(&mut self, cost: u64) {
            let len = self.slots.len() as u64;
            let i = (self.head % len) as usize;
            let old = self.slots[i];
            self.set(i, old.saturating_add(cost));
            self.total = self.total.saturating_sub(old).saturating_add(self.slots[i]);
        }

        fn correct(&mut self, secs: u64, reserved: u64, actual: u64) {
            let idx = secs / self.slot_secs;
            let len = self.slots.len() as u64;
            if idx > self.head || self.head - idx >= len {
                return;
            }
            let i = (idx % len) as usize;
            let old = self.slots[i];
            self.set(i, old.saturating_sub(reserved).saturating_add(actual));
            self.total = self.total.saturating_sub(old).saturating_add(self.slots[i]);
        }

        fn fits_at(&self, cost: u64, now_secs: u64) -> Option<u64> {
            if cost > self.limit {
                return None;
            }
            if self.total.saturating_add(cost) <= self.limit {
                return Some(now_secs);
            }
            let len = self.slots.len() as u64;
            let mut total = self.total;
            let oldest = self.head.saturating_sub(len - 1);
            for i in oldest..=self.head {
                total = total.saturating_sub(self.slots[(i % len) as usize]);
                if total.saturating_add(cost) <= self.limit {
                    return Some((i + len).saturating_mul(self.slot_secs));
                }
            }
            Some((self.head + len).saturating_mul(self.slot_secs))
        }
    }

    impl Reference {
        fn start_of(&self, amounts: &[u64], now_secs: u64) -> Option<u64> {
            let len = self.slots.len() as u64;
            let oldest = self.head.saturating_sub(len - 1);
            let mut leaving: std::collections::VecDeque<(u64, u64)> = (oldest..=self.head)
                .filter_map(|i| {
                    let a = self.slots[(i % len) as usize];
                    (a > 0).then(|| ((i + len).saturating_mul(self.slot_secs), a))
                })
                .collect();
            let mut free = self.limit.saturating_sub(self.total);
            let mut at = now_secs;
            for &c in amounts {
                if c > self.limit {
                    return None;
                }
                while free < c {
                    let (t, a) = leaving.pop_front()?;
                    at = at.max(t);
                    free = free.saturating_add(a);
                }
                free -= c;
                let leaves = (at / self.slot_secs + len).saturating_mul(self.slot_secs);
                match leaving.back_mut() {
                    Some((t, a)) if *t == leaves => *a = a.saturating_add(c),
                    _ => leaving.push_back((leaves, c)),
                }
            }
            Some(at)
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Seconds forward.
        Wait(u64),
        Add(u64),
        /// Seconds back from now, reserved, actual.
        Correct(u64, u64, u64),
        RaiseTo(u64),
    }

    fn op(limit: u64) -> impl Strategy<Value = Op> {
        let cost = prop_oneof![
            6 => 0..=limit.min(1 << 40),
            1 => Just(0),
            1 => Just(u64::from(u32::MAX)),
            1 => (u64::from(u32::MAX) - 2)..=(u64::from(u32::MAX) + 2),
            1 => Just(u64::MAX),
        ];
        prop_oneof![
            3 => prop_oneof![6 => 0..3u64, 1 => 0..200u64, 1 => Just(1 << 33)].prop_map(Op::Wait),
            4 => cost.clone().prop_map(Op::Add),
            2 => (0..80u64, cost.clone(), cost.clone()).prop_map(|(b, r, a)| Op::Correct(b, r, a)),
            1 => cost.prop_map(Op::RaiseTo),
        ]
    }

    fn traffic() -> impl Strategy<Value = (u64, u64, Vec<Op>)> {
        (
            prop_oneof![
                Just(1u64),
                Just(7),
                Just(1000),
                Just(u64::from(u32::MAX)),
                Just(u64::from(u32::MAX) + 1),
                Just(10_000_000_000),
                Just(u64::MAX)
            ],
            prop_oneof![Just(1u64), Just(60), Just(900)],
        )
            .prop_flat_map(|(limit, slot)| {
                (
                    Just(limit),
                    Just(slot),
                    prop::collection::vec(op(limit), 1..200),
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The sparse form (and its moves to the ring and back) holds the same numbers as
        /// the ring alone, so it decides alike on any traffic.
        #[test]
        fn sparse_and_dense_decide_alike((limit, slot, ops) in traffic()) {
            let n = if slot == 900 { 96 } else { 60 };
            let mut w = W::new(limit, slot, n);
            let mut r = Reference::new(limit, slot, n);
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Wait(s) => {
                        now = now.saturating_add(s * slot.min(60));
                        w.w().advance(now);
                        r.advance(now);
                    }
                    Op::Add(c) => {
                        w.w().add(c);
                        r.add(c);
                    }
                    Op::Correct(back, reserved, actual) => {
                        let at = now.saturating_sub(back * slot);
                        w.w().correct(at, reserved, actual);
                        r.correct(at, reserved, actual);
                    }
                    Op::RaiseTo(u) => {
                        w.w().raise_to(u);
                        if u > r.total {
                            r.add(u - r.total);
                        }
                    }
                }
                prop_assert_eq!(w.w().used(), r.total);
                for c in [0, 1, limit / 3, limit / 2, limit] {
                    prop_assert_eq!(w.w().fits(c), r.total.saturating_add(c) <= limit);
                    prop_assert_eq!(w.w().fits_at(c, now), r.fits_at(c, now), "cost {}", c);
                }
                let queue = [limit / 4, 1, limit / 2, limit / 3];
                prop_assert_eq!(
                    w.window.start_of(&w.spec, queue, now),
                    r.start_of(&queue, now)
                );
            }
        }
    }
}
