//! The one reconnect skeleton of the Deepgram, ElevenLabs and control tasks.
//!
//! Owns the loop every socket task shares: connect, run the socket until it drops, decide
//! whether to try again and how long to wait (jittered, [`Backoff`]), give up when the
//! schedule is spent, count and log each reconnect with its `provider`. A task supplies
//! only its own steps (`Link`): how to connect, what to do while waiting, how to run a
//! connected socket, how to announce a reconnect or a loss.
//!
//! As in [`crate::machine`], the decisions are pure: [`Retry`] is told what happened and
//! how long a connection lived, and answers [`Step`]; `run` is the thin shell around it.

use std::future::Future;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::ws::{Backoff, ConnectError, CONTROL_DELAYS, PROVIDER_DELAYS};

/// When a failure starts the delay schedule over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    /// Every successful connect: as long as the peer accepts, keep reconnecting.
    OnConnect,
    /// Only the drop of a connection that lived at least this long. A peer that accepts
    /// and drops at once still uses up the schedule, so the call is not kept on a socket
    /// that cannot carry it.
    HealthyAfter(Duration),
}

/// A task's reconnect schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Waits before each retry (jittered); once spent, the task gives up.
    pub delays: &'static [Duration],
    pub reset: Reset,
}

/// Deepgram and ElevenLabs: about four seconds of retries, and a connection that lived
/// ten seconds was healthy (its failure restarts the schedule).
pub const PROVIDERS: Policy = Policy {
    delays: PROVIDER_DELAYS,
    reset: Reset::HealthyAfter(Duration::from_secs(10)),
};

/// The control channel: about twenty seconds of retries per outage (the DO may be
/// restarting), restarted by every successful connect.
pub const CONTROL: Policy = Policy {
    delays: CONTROL_DELAYS,
    reset: Reset::OnConnect,
};

/// What to do after a failed connect or a dropped connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Wait this long, then connect again.
    Wait(Duration),
    /// The schedule is spent: the peer is lost for good.
    GiveUp,
}

/// The pure reconnect decisions: attempt counting (inside [`Backoff`]), the reset rule and
/// the give-up rule. No clock: a connection's lifetime is given.
#[derive(Debug, Clone)]
pub struct Retry {
    backoff: Backoff,
    reset: Reset,
    ever_connected: bool,
}

impl Retry {
    /// A fresh schedule with its own random jitter.
    pub fn new(policy: Policy) -> Self {
        Self::with(policy, Backoff::new(policy.delays))
    }

    /// A schedule whose jitter replays from `seed` (tests).
    pub fn seeded(policy: Policy, seed: u64) -> Self {
        Self::with(policy, Backoff::seeded(policy.delays, seed))
    }

    fn with(policy: Policy, backoff: Backoff) -> Self {
        Self {
            backoff,
            reset: policy.reset,
            ever_connected: false,
        }
    }

    /// Whether any connect has succeeded yet.
    pub fn ever_connected(&self) -> bool {
        self.ever_connected
    }

    /// A connect succeeded; true if it replaces an earlier connection (a reconnect).
    pub fn connected(&mut self) -> bool {
        if self.reset == Reset::OnConnect {
            self.backoff.reset();
        }
        std::mem::replace(&mut self.ever_connected, true)
    }

    /// A connect failed.
    pub fn connect_failed(&mut self) -> Step {
        self.backoff.next_delay().map_or(Step::GiveUp, Step::Wait)
    }

    /// A connection that had been open for `lived` dropped.
    pub fn dropped(&mut self, lived: Duration) -> Step {
        if matches!(self.reset, Reset::HealthyAfter(healthy) if lived >= healthy) {
            self.backoff.reset();
        }
        self.connect_failed()
    }
}

/// How a connected socket's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The socket dropped: reconnect, per the schedule.
    Dropped,
    /// The task is over (the call ended, or the peer refused it); the link has closed
    /// the socket and told the call loop what it needed to.
    Over,
}

/// What a new socket picks up from the old one, for the reconnect log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resume {
    /// Caller frames buffered while disconnected, replayed on the new socket.
    pub buffered: Option<usize>,
    /// The last peer frame already processed (the peer resumes after it).
    pub resume_from: Option<u64>,
}

/// One socket task's own steps; [`run`] does the rest.
pub(crate) trait Link {
    /// The `provider` label of logs and metrics.
    const PROVIDER: &'static str;
    /// How log lines name the peer ("Deepgram", "control channel").
    const NAME: &'static str;
    type Socket;

    /// Opens a socket, doing whatever the task does meanwhile; `None` if the task ended
    /// while connecting (the call is over).
    async fn connect(&mut self, ever_connected: bool)
        -> Option<Result<Self::Socket, ConnectError>>;

    /// Waits `delay` before the next attempt; false if the task ended meanwhile.
    async fn wait(&mut self, delay: Duration) -> bool {
        tokio::time::sleep(delay).await;
        true
    }

    /// A new socket replaced a dropped one (before it runs); false ends the task.
    async fn reconnected(&mut self) -> bool {
        true
    }

    /// Runs a connected socket until it drops or the task is over; `reconnect` says it
    /// replaces an earlier one.
    async fn serve(&mut self, socket: &mut Self::Socket, reconnect: bool) -> Ended;

    /// The peer is lost for good: tell the call loop.
    async fn give_up(&mut self);

    /// The call this task serves, for its log lines, when they should carry it.
    fn call_id(&self) -> Option<&str> {
        None
    }

    /// What a reconnect resumes, for its log line.
    fn resume(&self) -> Resume {
        Resume::default()
    }
}

/// Connects, serves and reconnects `link` per `policy` until the task is over or the peer
/// is lost; counts each reconnect in `reconnects`.
pub(crate) fn run<L: Link>(
    mut link: L,
    policy: Policy,
    reconnects: Counter,
) -> impl Future<Output = ()> {
    // Not an `async fn`: that would keep a second copy of `link` in the future.
    let mut retry = Retry::new(policy);
    async move {
        loop {
            let Some(connected) = link.connect(retry.ever_connected()).await else {
                return;
            };
            let step = match connected {
                Err(e) => {
                    warn!(
                        provider = L::PROVIDER,
                        call_id = link.call_id(),
                        error = %e,
                        "{} connect failed",
                        L::NAME
                    );
                    retry.connect_failed()
                }
                Ok(mut socket) => {
                    let reconnect = retry.connected();
                    if reconnect {
                        reconnects.inc();
                        let r = link.resume();
                        warn!(
                            provider = L::PROVIDER,
                            call_id = link.call_id(),
                            buffered = r.buffered,
                            resume_from = r.resume_from,
                            "{} reconnected",
                            L::NAME
                        );
                        if !link.reconnected().await {
                            return;
                        }
                    }
                    let opened = Instant::now();
                    match link.serve(&mut socket, reconnect).await {
                        Ended::Over => return,
                        Ended::Dropped => {
                            debug!(
                                provider = L::PROVIDER,
                                call_id = link.call_id(),
                                "{} connection dropped",
                                L::NAME
                            );
                            retry.dropped(opened.elapsed())
                        }
                    }
                }
            };
            match step {
                Step::Wait(delay) => {
                    if !link.wait(delay).await {
                        return;
                    }
                }
                Step::GiveUp => {
                    warn!(
                        provider = L::PROVIDER,
                        call_id = link.call_id(),
                        "{} lost for good",
                        L::NAME
                    );
                    link.give_up().await;
                    return;
                }
            }
        }
    }
}

/// Runs `fut` to completion while handing everything that arrives on `rx` to `keep`;
/// `None` if `rx` closed first (the call is over).
pub async fn meanwhile<T, M>(
    fut: impl Future<Output = T>,
    rx: &mut tokio::sync::mpsc::Receiver<M>,
    mut keep: impl FnMut(M),
) -> Option<T> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            r = &mut fut => return Some(r),
            m = rx.recv() => keep(m?),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;

    use super::*;
    use crate::ws::FIRST_RETRY_SPREAD;

    const MS: Duration = Duration::from_millis(1);

    /// Whether `wait` is a jittered form of the `nominal` step.
    fn jittered(nominal: Duration, wait: Duration) -> bool {
        if nominal.is_zero() {
            wait <= FIRST_RETRY_SPREAD
        } else {
            nominal / 2 <= wait && wait <= nominal
        }
    }

    fn wait(step: Step) -> Duration {
        match step {
            Step::Wait(d) => d,
            Step::GiveUp => panic!("gave up too early"),
        }
    }

    /// A dead peer: every wait of the schedule, jittered, then the call is told. Providers:
    /// six waits (0, 0.1, 0.25, 0.5, 1, 2 s), under four seconds in all; the control
    /// channel: ten, about twenty seconds.
    #[test]
    fn a_dead_peer_is_given_up_after_its_schedule() {
        for (policy, waits, at_least, at_most) in [
            (PROVIDERS, 6, 1_925, 3_850 + 50),
            (CONTROL, 10, 9_925, 19_850 + 50),
        ] {
            assert_eq!(policy.delays.len(), waits);
            for seed in 0..200 {
                let mut r = Retry::seeded(policy, seed);
                let mut total = Duration::ZERO;
                for nominal in policy.delays {
                    let d = wait(r.connect_failed());
                    assert!(jittered(*nominal, d), "{d:?} for {nominal:?}");
                    total += d;
                }
                let ms = total.as_millis();
                assert!(at_least <= ms && ms <= at_most, "{total:?}");
                assert_eq!(r.connect_failed(), Step::GiveUp);
                assert_eq!(r.connect_failed(), Step::GiveUp, "stays given up");
                assert!(!r.ever_connected());
            }
        }
    }

    /// The first connect is not a reconnect; every later one is.
    #[test]
    fn reconnects_are_told_apart() {
        let mut r = Retry::seeded(PROVIDERS, 1);
        assert!(!r.connected(), "first connect");
        assert!(r.ever_connected());
        wait(r.dropped(Duration::ZERO));
        assert!(r.connected(), "after a drop");
        assert!(r.connected(), "and again");
    }

    /// A provider's schedule restarts only after a connection that lived ten seconds: one
    /// that accepts and drops at once still runs out, and the call is told.
    #[test]
    fn providers_reset_only_after_a_healthy_connection() {
        let mut r = Retry::seeded(PROVIDERS, 2);
        for nominal in &PROVIDER_DELAYS[..2] {
            assert!(jittered(*nominal, wait(r.connect_failed())));
        }
        r.connected();
        let d = wait(r.dropped(Duration::from_millis(9_999)));
        assert!(
            jittered(PROVIDER_DELAYS[2], d),
            "continues the schedule: {d:?}"
        );
        r.connected();
        let d = wait(r.dropped(Duration::from_secs(10)));
        assert!(d <= FIRST_RETRY_SPREAD, "healthy: starts over, {d:?}");

        let mut flapping = Retry::seeded(PROVIDERS, 3);
        flapping.connected();
        for nominal in PROVIDER_DELAYS {
            let d = wait(flapping.dropped(Duration::from_millis(500)));
            assert!(jittered(*nominal, d), "{d:?} for {nominal:?}");
            flapping.connected();
        }
        assert_eq!(flapping.dropped(Duration::ZERO), Step::GiveUp);
    }

    /// The control channel's schedule restarts at every connect: each outage gets its
    /// full twenty seconds, however short the connections between them.
    #[test]
    fn control_resets_on_every_connect() {
        let mut r = Retry::seeded(CONTROL, 4);
        for _ in 1..CONTROL_DELAYS.len() {
            wait(r.connect_failed());
        }
        r.connected();
        let d = wait(r.dropped(Duration::ZERO));
        assert!(d <= FIRST_RETRY_SPREAD, "{d:?}");
        for _ in 0..1000 {
            r.connected();
            assert!(wait(r.dropped(Duration::ZERO)) <= FIRST_RETRY_SPREAD);
        }
        for nominal in &CONTROL_DELAYS[1..] {
            assert!(jittered(*nominal, wait(r.connect_failed())));
        }
        assert_eq!(r.connect_failed(), Step::GiveUp);
    }

    /// A provider blip under 1,000 calls: their first retries are spread, not in step.
    #[test]
    fn a_blip_does_not_reconnect_calls_in_lockstep() {
        for policy in [PROVIDERS, CONTROL] {
            let firsts: std::collections::BTreeSet<Duration> = (0..1000)
                .map(|seed| {
                    let mut r = Retry::seeded(policy, seed);
                    r.connected();
                    wait(r.dropped(Duration::from_secs(60)))
                })
                .collect();
            assert!(firsts.len() > 900, "{} distinct first waits", firsts.len());
            let spread = *firsts.last().expect("max") - *firsts.first().expect("min");
            assert!(spread > FIRST_RETRY_SPREAD * 9 / 10, "{spread:?}");
        }
    }

    /// A scripted peer: what each connect and each session does, and a record of every
    /// step [`run`] took.
    #[derive(Default)]
    struct Scripted {
        /// `Some(true)` connects, `Some(false)` fails, `None` ends the task meanwhile.
        connects: VecDeque<Option<bool>>,
        serves: VecDeque<Ended>,
        refuse_reconnect: bool,
        cut_wait: bool,
        log: Rc<RefCell<Vec<String>>>,
    }

    impl Scripted {
        fn step(&self, s: String) {
            self.log.borrow_mut().push(s);
        }
    }

    impl Link for Scripted {
        const PROVIDER: &'static str = "test";
        const NAME: &'static str = "test peer";
        type Socket = ();

        async fn connect(&mut self, ever_connected: bool) -> Option<Result<(), ConnectError>> {
            self.step(format!("connect {ever_connected}"));
            let ok = self.connects.pop_front().expect("scripted connect")?;
            Some(if ok {
                Ok(())
            } else {
                Err(ConnectError::Timeout)
            })
        }

        async fn wait(&mut self, delay: Duration) -> bool {
            assert!(delay <= MS, "{delay:?}");
            self.step("wait".into());
            !self.cut_wait
        }

        async fn reconnected(&mut self) -> bool {
            self.step("reconnected".into());
            !self.refuse_reconnect
        }

        async fn serve(&mut self, (): &mut (), reconnect: bool) -> Ended {
            self.step(format!("serve {reconnect}"));
            self.serves.pop_front().expect("scripted serve")
        }

        async fn give_up(&mut self) {
            self.step("give up".into());
        }
    }

    /// Two 1 ms retries; a connection is healthy only after an hour (never, here).
    const TWO_RETRIES: Policy = Policy {
        delays: &[MS, MS],
        reset: Reset::HealthyAfter(Duration::from_secs(3600)),
    };

    /// Runs `link` to its end: the steps taken (comma-separated) and the reconnects
    /// counted.
    async fn play(link: Scripted, policy: Policy) -> (String, u64) {
        let log = Rc::clone(&link.log);
        let reconnects = Counter::default();
        run(link, policy, reconnects.clone()).await;
        let steps = log.borrow().join(", ");
        (steps, reconnects.get())
    }

    /// A peer whose connects and sessions go as scripted.
    fn script<const C: usize, const S: usize>(
        connects: [Option<bool>; C],
        serves: [Ended; S],
    ) -> Scripted {
        Scripted {
            connects: connects.into(),
            serves: serves.into(),
            ..Scripted::default()
        }
    }

    /// Failed connects wait between attempts and give up when the schedule is spent;
    /// drops reconnect, and each reconnect is counted and announced before it serves.
    #[tokio::test]
    async fn shell_retries_then_gives_up() {
        let dead = script([Some(false); 3], []);
        assert_eq!(
            play(dead, TWO_RETRIES).await,
            (
                "connect false, wait, connect false, wait, connect false, give up".into(),
                0
            )
        );
        let flapping = script([Some(true); 3], [Ended::Dropped; 3]);
        assert_eq!(
            play(flapping, TWO_RETRIES).await,
            (
                "connect false, serve false, wait, \
                 connect true, reconnected, serve true, wait, \
                 connect true, reconnected, serve true, give up"
                    .into(),
                2
            )
        );
    }

    /// With `Reset::OnConnect` a connect restores the schedule; without, it does not.
    #[tokio::test]
    async fn shell_applies_the_reset_rule() {
        let peer = || {
            script(
                [Some(false), Some(true), Some(false), Some(true)],
                [Ended::Dropped, Ended::Over],
            )
        };
        let one_retry = |reset| Policy {
            delays: &[MS],
            reset,
        };
        let (log, _) = play(peer(), one_retry(Reset::OnConnect)).await;
        assert_eq!(
            log,
            "connect false, wait, connect false, serve false, wait, connect true, give up"
        );
        let (log, _) = play(peer(), one_retry(TWO_RETRIES.reset)).await;
        assert_eq!(
            log,
            "connect false, wait, connect false, serve false, give up"
        );
    }

    /// The task ending while connecting, waiting or announcing a reconnect stops the loop
    /// quietly (no give-up); so does a session that is over.
    #[tokio::test]
    async fn shell_stops_when_the_task_is_over() {
        let gone_while_connecting = script([None], []);
        let gone_while_waiting = Scripted {
            cut_wait: true,
            ..script([Some(false)], [])
        };
        let gone_at_reconnect = Scripted {
            refuse_reconnect: true,
            ..script([Some(true); 2], [Ended::Dropped])
        };
        let over = script([Some(true)], [Ended::Over]);
        for (link, steps, reconnects) in [
            (gone_while_connecting, "connect false", 0),
            (gone_while_waiting, "connect false, wait", 0),
            (
                gone_at_reconnect,
                "connect false, serve false, wait, connect true, reconnected",
                1,
            ),
            (over, "connect false, serve false", 0),
        ] {
            assert_eq!(play(link, TWO_RETRIES).await, (steps.into(), reconnects));
        }
    }
}
