//! One credential's request budget (`pleo_requests_per_sec_max`), shared by every thread that
//! sends with it: the sync thread, the listing pool and the processor lanes spend one budget
//! together.
//!
//! Two kinds of request share it. *Urgent* ones (the default: a job's events and item
//! updates, a recovery pass, the detection a webhook or a trigger asked for) take the next free
//! slot in the order they ask. *Routine* ones (scheduled polls, marked with
//! [`Priority::enter`]) take a slot only when no urgent request has one reserved ahead, so
//! a job in hand or a webhook-named company never waits behind a batch of due polls; a routine
//! request that has waited [`ROUTINE_WAIT_MAX`] queues like an urgent one, so polls go on (at a
//! share of the budget) even while processing uses all of it.
//!
//! The algorithm is GCRA (virtual scheduling): `tat` is when the budget is next free; a request
//! at `now` may go at once if `now >= tat - tolerance` (the tolerance is the burst: one
//! second's worth of requests), and every request pushes `tat` on by one interval. A request
//! reserves its slot under the lock and sleeps outside it, so waiters are served in order.

use std::cell::Cell;
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::Clock;

/// Which share of the budget a request draws on (see the module's notes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Urgent,
    Routine,
}

thread_local! {
    static PRIORITY: Cell<Priority> = const { Cell::new(Priority::Urgent) };
}

/// Until dropped, requests this thread sends have the entered priority.
#[must_use = "the priority holds only while the guard lives"]
pub struct PriorityGuard(Priority);

impl Drop for PriorityGuard {
    fn drop(&mut self) {
        PRIORITY.with(|p| p.set(self.0));
    }
}

impl Priority {
    /// Requests this thread sends are of this priority until the guard drops.
    pub fn enter(self) -> PriorityGuard {
        PriorityGuard(PRIORITY.with(|p| p.replace(self)))
    }

    /// The priority of this thread's requests now.
    pub fn current() -> Priority {
        PRIORITY.with(|p| p.get())
    }
}

/// The longest a routine request defers to urgent ones before it queues with them.
pub const ROUTINE_WAIT_MAX: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Pacer {
    interval_ms: f64,
    tolerance_ms: f64,
    state: Mutex<State>,
}

/// Times in ms on the pacer's clock, as fractions so rates that do not divide 1000 keep pace.
#[derive(Debug)]
struct State {
    /// When the budget is next free.
    tat: f64,
    /// The latest time seen (a step back is noticed).
    seen: f64,
    /// The slot of the last routine request that stopped deferring: only one at a time queues
    /// with the urgent ones, so routine work never fills the queue ahead of them.
    routine_slot: f64,
}

impl Pacer {
    /// `rate` requests a second, a burst of one second's worth (at least one request).
    pub fn new(rate: f64, now_ms: i64) -> Pacer {
        let rate = rate.max(0.001);
        let interval_ms = 1000.0 / rate;
        Pacer {
            interval_ms,
            tolerance_ms: (rate.max(1.0) - 1.0) * interval_ms,
            state: Mutex::new(State {
                tat: now_ms as f64,
                seen: now_ms as f64,
                routine_slot: f64::MIN,
            }),
        }
    }

    /// Waits (on `clock`) until this request may go, at the priority of the calling thread.
    pub fn acquire(&self, clock: &dyn Clock) {
        self.acquire_as(clock, Priority::current());
    }

    pub fn acquire_as(&self, clock: &dyn Clock, priority: Priority) {
        let mut deferred = Duration::ZERO;
        loop {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = clock.now().0 as f64;
            // The clock stepped back: move the schedule back with it, so nobody waits for the
            // lost time (and nothing is refilled either).
            if now < st.seen {
                let back = st.seen - now;
                st.tat -= back;
                st.routine_slot -= back;
            }
            st.seen = now;
            let free_at = (st.tat - self.tolerance_ms).max(now);
            let queue_routine = deferred >= ROUTINE_WAIT_MAX && st.routine_slot <= now;
            if priority == Priority::Urgent || free_at <= now || queue_routine {
                st.tat = st.tat.max(now) + self.interval_ms;
                if priority == Priority::Routine && free_at > now {
                    st.routine_slot = free_at;
                }
                drop(st);
                if free_at > now {
                    clock.sleep(Duration::from_secs_f64((free_at - now) / 1000.0));
                }
                return;
            }
            // Someone holds the next slots: look again when they are used, or (having deferred
            // long enough) when the routine request queued ahead has gone.
            let until = if deferred < ROUTINE_WAIT_MAX {
                free_at.min(now + (ROUTINE_WAIT_MAX - deferred).as_secs_f64() * 1000.0)
            } else {
                free_at.min(st.routine_slot)
            };
            drop(st);
            let wait = Duration::from_secs_f64((until - now).max(1.0) / 1000.0);
            clock.sleep(wait);
            deferred += wait;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, Millis};

    #[test]
    fn a_burst_then_the_pace() {
        let clock = ManualClock::new(Millis(0));
        let p = Pacer::new(10.0, 0);
        for _ in 0..10 {
            p.acquire_as(&*clock, Priority::Urgent);
        }
        assert_eq!(clock.now(), Millis(0), "one second's worth goes at once");
        for _ in 0..10 {
            p.acquire_as(&*clock, Priority::Urgent);
        }
        assert_eq!(clock.now(), Millis(1000), "then 10 a second");
    }

    /// A clock that stands still: requests "sent" with it reserve slots without time passing,
    /// as other threads' requests would.
    #[derive(Debug)]
    struct Frozen(std::sync::Arc<ManualClock>);
    impl Clock for Frozen {
        fn now(&self) -> Millis {
            self.0.now()
        }
        fn sleep(&self, _: Duration) {}
    }

    /// A manual clock that, the first time someone sleeps on it, lets an urgent request arrive.
    #[derive(Debug)]
    struct ArrivalDuringSleep<'a> {
        clock: std::sync::Arc<ManualClock>,
        pacer: &'a Pacer,
        arrived: std::sync::atomic::AtomicBool,
    }
    impl Clock for ArrivalDuringSleep<'_> {
        fn now(&self) -> Millis {
            self.clock.now()
        }
        fn sleep(&self, d: Duration) {
            if !self
                .arrived
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                self.pacer
                    .acquire_as(&Frozen(self.clock.clone()), Priority::Urgent);
            }
            self.clock.sleep(d);
        }
    }

    #[test]
    fn a_routine_request_lets_urgent_ones_go_first_but_not_for_ever() {
        for (priority, ends_at) in [(Priority::Urgent, 600), (Priority::Routine, 700)] {
            let clock = ManualClock::new(Millis(0));
            let p = Pacer::new(10.0, 0);
            // Other threads hold the burst and 5 slots ahead (the last one at 500 ms).
            for _ in 0..15 {
                p.acquire_as(&Frozen(clock.clone()), Priority::Urgent);
            }
            // While this request waits, an urgent one arrives: an urgent request keeps the
            // slot it reserved (600 ms), a routine one lets the newcomer have it.
            let c = ArrivalDuringSleep {
                clock: clock.clone(),
                pacer: &p,
                arrived: Default::default(),
            };
            p.acquire_as(&c, priority);
            assert_eq!(clock.now(), Millis(ends_at), "{priority:?}");
        }
        // With urgent demand that never lets up, a routine request stops deferring after
        // ROUTINE_WAIT_MAX and reserves its slot: urgent requests after it go after it.
        let clock = ManualClock::new(Millis(0));
        let p = Pacer::new(1.0, 0);
        p.acquire_as(&*clock, Priority::Urgent);
        p.state.lock().unwrap().tat += 100_000.0;
        p.acquire_as(&*clock, Priority::Routine);
        assert_eq!(
            p.state.lock().unwrap().tat,
            102_000.0,
            "its slot is reserved"
        );
        assert_eq!(clock.now(), Millis(101_000));
        assert!(
            clock.sleeps()[0] == ROUTINE_WAIT_MAX,
            "it deferred first: {:?}",
            clock.sleeps()
        );
    }

    #[test]
    fn only_one_routine_request_at_a_time_queues_with_the_urgent_ones() {
        let clock = ManualClock::new(Millis(0));
        let p = Pacer::new(1.0, 0);
        p.acquire_as(&*clock, Priority::Urgent);
        {
            let mut st = p.state.lock().unwrap();
            // Urgent work holds the next 10 s; another routine request holds a slot at 5 s.
            st.tat += 10_000.0;
            st.routine_slot = 5_000.0;
        }
        p.acquire_as(&*clock, Priority::Routine);
        // It deferred past its second (the other routine request's slot still ahead), joined
        // the queue once that slot was used, and went at the end of the urgent work.
        let sleeps = clock.sleeps();
        assert_eq!(sleeps[0], ROUTINE_WAIT_MAX);
        assert_eq!(clock.now(), Millis(11_000));
        assert_eq!(p.state.lock().unwrap().routine_slot, 11_000.0);
        let waited_before_queueing: Duration = sleeps[..sleeps.len() - 1].iter().sum();
        assert!(
            waited_before_queueing >= Duration::from_secs(5),
            "{sleeps:?}"
        );
    }

    #[test]
    fn a_clock_stepping_back_makes_nobody_wait_for_the_lost_time() {
        let clock = ManualClock::new(Millis(3_600_000));
        let p = Pacer::new(10.0, clock.now().0);
        for _ in 0..10 {
            p.acquire_as(&*clock, Priority::Urgent);
        }
        clock.set(Millis(0));
        p.acquire_as(&*clock, Priority::Urgent);
        assert_eq!(clock.now(), Millis(100), "one interval, not an hour");
    }

    #[test]
    fn the_priority_is_the_threads_until_the_guard_drops() {
        assert_eq!(Priority::current(), Priority::Urgent);
        {
            let _g = Priority::Routine.enter();
            assert_eq!(Priority::current(), Priority::Routine);
            std::thread::spawn(|| assert_eq!(Priority::current(), Priority::Urgent))
                .join()
                .unwrap();
        }
        assert_eq!(Priority::current(), Priority::Urgent);
    }
}
