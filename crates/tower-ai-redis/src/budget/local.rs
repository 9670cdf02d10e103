//! The in-process fall-back of [`RedisBudget`](super::RedisBudget) while Redis cannot be
//! asked: the same algorithms as the scripts, on this process's clock, at each limit
//! divided by the number of replicas.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tower_ai_budget::{Spent, StoreLimits};
use tower_ai_core::keys::Key;
use tower_ai_core::BudgetLimit;

use super::{lock, micro_up, RedisBudgetBuilder};

/// Keys held at most; past it, keys with nothing to lose are forgotten, and a new key
/// that still finds no room shares the overflow state.
const MAX_KEYS: usize = 10_000;

#[derive(Debug, Default)]
pub(super) struct Local {
    keys: Mutex<Keys>,
    /// Until when (microseconds since the budget's epoch) some key's arrival time may be
    /// ahead of the clock: before it, a replica back on Redis carries the key's lead there
    /// (see [`take_lead`](Self::take_lead)); after it, nothing is taken (no lock).
    ahead_until: AtomicU64,
}

#[derive(Debug, Default)]
struct Keys {
    map: HashMap<Key, State>,
    overflow: State,
}

#[derive(Debug, Default, Clone, Copy)]
struct State {
    /// GCRA arrival times, microseconds since the budget's epoch.
    rpm_tat: f64,
    tpm_tat: f64,
    /// Calendar windows of this process's clock: (index, micro-units used).
    hour: (u64, u64),
    day: (u64, u64),
    in_flight: u32,
}

impl State {
    fn idle(&self, now: f64) -> bool {
        self.in_flight == 0 && self.rpm_tat <= now && self.tpm_tat <= now
    }
}

/// One GCRA step (see `budget_admit.lua`): the new arrival time, or the refusal
/// (`None`: never fits).
pub(crate) fn gcra(
    tat: f64,
    now: f64,
    window_us: f64,
    limit: u64,
    burst: u64,
    cost: u64,
) -> Result<f64, Option<Duration>> {
    if limit == 0 || cost == 0 {
        return Ok(tat);
    }
    if cost > limit {
        return Err(None);
    }
    let t = window_us / limit as f64;
    // How far ahead of now the arrival time would be, compared with the room without going
    // through `now + ... - now`: on an idle key that rounding made a request as large as the
    // whole tolerance come out a hair over it, refused at most times.
    let ahead = (tat - now).max(0.0) + cost as f64 * t;
    let room = burst.max(cost) as f64 * t;
    if ahead > room {
        let wait_us = (ahead - room).ceil();
        return Err(Some(Duration::from_micros(wait_us as u64)));
    }
    Ok(tat.max(now) + cost as f64 * t)
}

fn share(limit: u64, n: u64) -> u64 {
    (limit / n.max(1)).max(1)
}

impl Local {
    /// Admits a request at the limits ÷ `n`, or says which limit refused it and when it
    /// may fit.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn admit(
        &self,
        key: Key,
        c: &RedisBudgetBuilder,
        l: &StoreLimits,
        n: u64,
        tokens: u64,
        spend_nanos: u64,
        since_epoch: Duration,
    ) -> Result<(), (BudgetLimit, Option<Duration>)> {
        let now = since_epoch.as_micros() as f64;
        let now_ms = since_epoch.as_millis() as u64;
        let window = c.minute.as_micros() as f64;
        let (request_burst, token_burst) = c.bursts(l);
        let mut keys = lock(&self.keys);
        let keys = &mut *keys;
        if keys.map.len() >= MAX_KEYS && !keys.map.contains_key(&key) {
            keys.map.retain(|_, s| !s.idle(now));
        }
        let st = if keys.map.len() < MAX_KEYS || keys.map.contains_key(&key) {
            keys.map.entry(key).or_default()
        } else {
            &mut keys.overflow
        };
        let rpm = match l.requests_per_minute {
            Some(limit) => gcra(
                st.rpm_tat,
                now,
                window,
                share(limit, n),
                request_burst / n,
                1,
            )
            .map_err(|e| (BudgetLimit::RequestsPerMinute, e))?,
            None => st.rpm_tat,
        };
        let tpm = match l.tokens_per_minute {
            Some(limit) => gcra(
                st.tpm_tat,
                now,
                window,
                share(limit, n),
                token_burst / n,
                tokens,
            )
            .map_err(|e| (BudgetLimit::TokensPerMinute, e))?,
            None => st.tpm_tat,
        };
        if let Some(max) = l.max_concurrent {
            if u64::from(st.in_flight) >= share(u64::from(max), n) {
                return Err((BudgetLimit::Concurrency, Some(Duration::ZERO)));
            }
        }
        let cost = micro_up(spend_nanos);
        let hour_ms = c.hour.as_millis().max(1) as u64;
        let day_ms = c.day.as_millis().max(1) as u64;
        let windows = [
            (
                l.spend_per_hour,
                hour_ms,
                st.hour,
                BudgetLimit::SpendPerHour,
            ),
            (l.spend_per_day, day_ms, st.day, BudgetLimit::SpendPerDay),
        ];
        let mut used = [st.hour, st.day];
        for (i, (cap, length, (index, spent), limit)) in windows.into_iter().enumerate() {
            let Some(cap) = cap else { continue };
            let cap = share(cap / 1000, n);
            let now_index = now_ms / length;
            let spent = if index == now_index { spent } else { 0 };
            if cost > cap {
                return Err((limit, None));
            }
            if spent + cost > cap {
                let left = (now_index + 1) * length - now_ms;
                return Err((limit, Some(Duration::from_millis(left))));
            }
            used[i] = (now_index, spent + cost);
        }
        st.rpm_tat = rpm;
        st.tpm_tat = tpm;
        self.ahead_until
            .fetch_max(rpm.max(tpm).ceil() as u64, Ordering::Relaxed);
        st.hour = used[0];
        st.day = used[1];
        if l.max_concurrent.is_some() {
            st.in_flight += 1;
        }
        Ok(())
    }

    /// Whether some key's arrival time may be ahead of the clock (one atomic load: false
    /// unless the fall-back admitted something whose lead has not been seen to pass).
    pub(super) fn may_lead(&self) -> bool {
        self.ahead_until.load(Ordering::Relaxed) != 0
    }

    /// Takes how far `key`'s arrival times run ahead of the clock (what this fall-back
    /// admitted that GCRA still counts), in the increments of the whole limits (Redis's:
    /// a request here moved the time by `n` times Redis's increment), for the first
    /// script of the key back on Redis to add to the key there. `None` when nothing is
    /// ahead (always once the last lead has passed: then without taking the lock, and
    /// [`may_lead`](Self::may_lead) is false from then on).
    /// Tokens are taken only with `tokens` (the script has the key's tokens key).
    pub(super) fn take_lead(
        &self,
        key: Key,
        l: &StoreLimits,
        n: u64,
        tokens: bool,
        since_epoch: Duration,
    ) -> Option<(f64, f64)> {
        let now_us = since_epoch.as_micros() as u64;
        let until = self.ahead_until.load(Ordering::Relaxed);
        if now_us >= until {
            // Every lead has passed: none to take until the fall-back admits again.
            let _ =
                self.ahead_until
                    .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
            return None;
        }
        let now = now_us as f64;
        let mut keys = lock(&self.keys);
        let st = keys.map.get_mut(&key)?;
        let mut lead = (0.0, 0.0);
        if let Some(limit) = l.requests_per_minute.filter(|&x| x > 0) {
            lead.0 = (st.rpm_tat - now).max(0.0) * share(limit, n) as f64 / limit as f64;
            st.rpm_tat = st.rpm_tat.min(now);
        }
        if let Some(limit) = l.tokens_per_minute.filter(|&x| x > 0 && tokens) {
            lead.1 = (st.tpm_tat - now).max(0.0) * share(limit, n) as f64 / limit as f64;
            st.tpm_tat = st.tpm_tat.min(now);
        }
        (lead.0 > 0.0 || lead.1 > 0.0).then_some(lead)
    }

    /// Gives back a lead [`take_lead`](Self::take_lead) took whose script Redis did not
    /// run.
    pub(super) fn give_back(
        &self,
        key: Key,
        l: &StoreLimits,
        n: u64,
        lead: (f64, f64),
        since_epoch: Duration,
    ) {
        let now = since_epoch.as_micros() as f64;
        let mut keys = lock(&self.keys);
        let Some(st) = keys.map.get_mut(&key) else {
            return;
        };
        if let Some(limit) = l.requests_per_minute.filter(|&x| x > 0) {
            st.rpm_tat = st.rpm_tat.max(now) + lead.0 * limit as f64 / share(limit, n) as f64;
        }
        if let Some(limit) = l.tokens_per_minute.filter(|&x| x > 0) {
            st.tpm_tat = st.tpm_tat.max(now) + lead.1 * limit as f64 / share(limit, n) as f64;
        }
        self.ahead_until
            .fetch_max(st.rpm_tat.max(st.tpm_tat).ceil() as u64, Ordering::Relaxed);
    }

    /// Settles a request this fall-back admitted.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn settle(
        &self,
        key: Key,
        l: &StoreLimits,
        n: u64,
        c: &RedisBudgetBuilder,
        tokens: u64,
        spend_nanos: u64,
        spent: Spent,
        since_epoch: Duration,
    ) {
        let now = since_epoch.as_micros() as f64;
        let mut keys = lock(&self.keys);
        let keys = &mut *keys;
        let st = match keys.map.get_mut(&key) {
            Some(st) => st,
            None => &mut keys.overflow,
        };
        if let Some(limit) = l.tokens_per_minute {
            let t = c.minute.as_micros() as f64 / share(limit, n) as f64;
            let delta = spent.tokens as f64 - tokens as f64;
            if delta > 0.0 {
                st.tpm_tat = st.tpm_tat.max(now) + delta * t;
                self.ahead_until
                    .fetch_max(st.tpm_tat.ceil() as u64, Ordering::Relaxed);
            } else {
                st.tpm_tat += delta * t;
            }
        }
        let delta = micro_up(spent.spend) as i128 - micro_up(spend_nanos) as i128;
        for w in [&mut st.hour, &mut st.day] {
            w.1 = (w.1 as i128 + delta).max(0) as u64;
        }
        if l.max_concurrent.is_some() {
            st.in_flight = st.in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: f64 = 60_000_000.0;

    #[test]
    fn gcra_admits_the_burst_then_paces_at_the_limit() {
        // 60 a minute (one a second), burst 3: 3 at once, then one a second.
        let mut tat = 0.0;
        let mut admitted = 0;
        for _ in 0..10 {
            if let Ok(t) = gcra(tat, 0.0, W, 60, 3, 1) {
                tat = t;
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3);
        assert_eq!(
            gcra(tat, 0.0, W, 60, 3, 1),
            Err(Some(Duration::from_secs(1)))
        );
        assert!(gcra(tat, 1_000_000.0, W, 60, 3, 1).is_ok());
        // Over any minute: at most limit + burst.
        let (mut tat, mut n) = (0.0, 0);
        for ms in 0..60_000u64 {
            if let Ok(t) = gcra(tat, ms as f64 * 1000.0, W, 60, 3, 1) {
                tat = t;
                n += 1;
            }
        }
        assert!(n <= 63, "{n}");
        assert!(n >= 62, "{n}");
    }

    #[test]
    fn gcra_takes_a_request_as_large_as_the_limit_when_idle_and_never_a_larger_one() {
        assert!(gcra(0.0, 0.0, W, 1000, 0, 1000).is_ok());
        assert_eq!(gcra(0.0, 0.0, W, 1000, 0, 1001), Err(None));
        // After it, a request larger than the burst waits for the key to be idle again,
        // as the in-process sliding window waits for the first one to leave it.
        let tat = gcra(0.0, 0.0, W, 1000, 0, 1000).unwrap();
        assert_eq!(
            gcra(tat, 0.0, W, 1000, 0, 500),
            Err(Some(Duration::from_secs(60)))
        );
        // With a burst of 500, half a minute after it.
        assert_eq!(
            gcra(tat, 0.0, W, 1000, 500, 500),
            Err(Some(Duration::from_secs(60)))
        );
        assert!(gcra(tat, 60_000_000.0, W, 1000, 500, 500).is_ok());
    }

    #[test]
    fn an_idle_key_takes_a_request_the_whole_tolerance_fits_at_any_time() {
        // The fall-back's share of 3,000 tokens a 1 s window among 4 replicas (750, burst
        // 150 / 4 = 37) and a request reserving 60: on an idle key it fits exactly. It
        // was refused, "retry in 1 us", at most times since the epoch: (now + 60 t) - now
        // came out a rounding above 60 t (Redis killed 1 s into the replicas test: 4
        // admitted in the 1.5 s outage instead of ~25 a replica a second).
        for ms in 0..20_000u64 {
            let now = ms as f64 * 1000.0 + 0.123;
            assert!(
                gcra(0.0, now, 1_000_000.0, 750, 37, 60).is_ok(),
                "refused at {ms} ms"
            );
        }
    }
}
