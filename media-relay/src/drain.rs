//! When the relay stops: the drain decision, pure (explicit time, no I/O).
//!
//! The first SIGTERM/SIGINT starts draining: new Twilio streams are refused and `/health`
//! answers 503 `draining`, while the calls in progress go on until they end, up to
//! `RELAY_DRAIN_SECS`. Then the process exits: at once once no call is left, or at the
//! deadline, when the calls still open are closed cleanly. A second signal exits at once.
//! `server::run` is the shell that carries this out.

use std::time::{Duration, Instant};

/// How long calls still open at the drain deadline get to close cleanly (tell their DO,
/// close Twilio's socket) before the process exits anyway.
pub const CLOSE_BOUND: Duration = Duration::from_secs(5);

/// Where the relay is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Taking new calls.
    Accepting,
    /// Refusing new calls; the ones in progress may go on until `deadline`.
    Draining { deadline: Instant },
}

/// What a shutdown signal means now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSignal {
    /// The first: refuse new calls, let the others go on until `deadline`.
    StartDraining { deadline: Instant },
    /// A second: exit now, abandoning whatever calls are left.
    ExitNow,
}

/// What the shell does next while draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing yet: look again when a call ends, a signal comes, or at `until`.
    Wait { until: Instant },
    /// Every call has ended: exit.
    AllCallsEnded,
    /// The deadline has come with `open` calls left: close them (within [`CLOSE_BOUND`])
    /// and exit.
    DeadlineReached { open: usize },
}

/// The drain state machine.
#[derive(Debug, Clone)]
pub struct Drain {
    grace: Duration,
    phase: Phase,
}

impl Drain {
    /// Accepting, with `grace` (`RELAY_DRAIN_SECS`) for the calls in progress once drained.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            phase: Phase::Accepting,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// A SIGTERM or SIGINT at `now`.
    pub fn signal(&mut self, now: Instant) -> OnSignal {
        match self.phase {
            Phase::Accepting => {
                let deadline = now.checked_add(self.grace).unwrap_or(now);
                self.phase = Phase::Draining { deadline };
                OnSignal::StartDraining { deadline }
            }
            Phase::Draining { .. } => OnSignal::ExitNow,
        }
    }

    /// What to do at `now` with `open` calls still in progress. Before any signal there
    /// is nothing to decide: the relay waits (for ever) for one.
    pub fn step(&self, now: Instant, open: usize) -> Step {
        match self.phase {
            Phase::Accepting => Step::Wait {
                until: now + Duration::from_secs(86_400),
            },
            Phase::Draining { .. } if open == 0 => Step::AllCallsEnded,
            Phase::Draining { deadline } if now >= deadline => Step::DeadlineReached { open },
            Phase::Draining { deadline } => Step::Wait { until: deadline },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(600);

    /// The first signal starts draining with the deadline `grace` after it; calls in
    /// progress are waited for until then.
    #[test]
    fn first_signal_drains_until_the_deadline() {
        let t0 = Instant::now();
        let mut d = Drain::new(GRACE);
        assert_eq!(d.phase(), Phase::Accepting);
        let at = t0 + Duration::from_secs(3);
        assert_eq!(
            d.signal(at),
            OnSignal::StartDraining {
                deadline: at + GRACE
            }
        );
        assert_eq!(
            d.phase(),
            Phase::Draining {
                deadline: at + GRACE
            }
        );
        assert_eq!(
            d.step(at + Duration::from_secs(10), 2),
            Step::Wait { until: at + GRACE }
        );
    }

    /// Draining ends as soon as the last call has ended, well before the deadline.
    #[test]
    fn exits_once_the_last_call_ends() {
        let t0 = Instant::now();
        let mut d = Drain::new(GRACE);
        d.signal(t0);
        assert!(matches!(d.step(t0, 1), Step::Wait { .. }));
        assert_eq!(d.step(t0 + Duration::from_secs(1), 0), Step::AllCallsEnded);
    }

    /// At the deadline the calls still open are reported for closing, not waited for.
    #[test]
    fn the_deadline_ends_calls_still_open() {
        let t0 = Instant::now();
        let mut d = Drain::new(Duration::from_secs(30));
        d.signal(t0);
        assert!(matches!(
            d.step(t0 + Duration::from_millis(29_999), 3),
            Step::Wait { .. }
        ));
        assert_eq!(
            d.step(t0 + Duration::from_secs(30), 3),
            Step::DeadlineReached { open: 3 }
        );
        assert_eq!(d.step(t0 + Duration::from_secs(31), 0), Step::AllCallsEnded);
    }

    /// `RELAY_DRAIN_SECS=0`: the calls in progress are closed at once.
    #[test]
    fn zero_grace_closes_calls_at_once() {
        let t0 = Instant::now();
        let mut d = Drain::new(Duration::ZERO);
        d.signal(t0);
        assert_eq!(d.step(t0, 1), Step::DeadlineReached { open: 1 });
    }

    /// A second signal exits at once, whatever is left, and does not move the deadline.
    #[test]
    fn a_second_signal_exits_at_once() {
        let t0 = Instant::now();
        let mut d = Drain::new(GRACE);
        d.signal(t0);
        assert_eq!(d.signal(t0 + Duration::from_secs(5)), OnSignal::ExitNow);
        assert_eq!(
            d.phase(),
            Phase::Draining {
                deadline: t0 + GRACE
            }
        );
    }

    /// Before any signal nothing ends, however many calls there are (or none).
    #[test]
    fn accepting_never_exits() {
        let t0 = Instant::now();
        let d = Drain::new(GRACE);
        assert!(matches!(d.step(t0, 0), Step::Wait { .. }));
        assert!(matches!(d.step(t0, 5), Step::Wait { .. }));
    }
}
