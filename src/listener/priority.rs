//! The Unix datagram reader's urgency: while it is mostly idle, as between the bursts of
//! clients that send without blocking, it is urgent: it runs at real-time (`SCHED_FIFO`)
//! priority and hands its batches to the workers (all but a trickle's, see
//! [`super::datagram`]). While it keeps a good part of a core busy it is saturated: it runs
//! at normal priority and parses its batches itself.
//!
//! A client that sends to the Unix socket without blocking loses every datagram that arrives
//! while the socket's queue (`net.unix.max_dgram_qlen`, 10 by default) is full. At normal
//! priority the reader waits for its core while a worker or the sender holds it, and a burst
//! overflows the queue meanwhile; at real-time priority it runs the moment a datagram wakes
//! it (docs/performance.md, "A real-time Unix reader"). Under sustained traffic the same
//! preemption only adds context switches (a blocking sender waits rather than losing
//! anything), and a busy thread must not hold a core at real-time priority. Nor does handing
//! off help a saturated reader: it finds the socket full whenever it looks, and parsing what
//! it has just copied, still in its core's cache, costs less than waking a worker to read it
//! from another core (docs/performance.md, "A Unix reader that parses while saturated").
//! So the reader measures its own CPU time over each [`WINDOW`]: from [`BUSY`] of the window
//! it is saturated, and urgent again once it uses less than [`IDLE`].

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::time::{clock_gettime, ClockId};

use crate::log;
use crate::telemetry::Gauge;

/// How often the reader weighs its CPU time.
pub const WINDOW: Duration = Duration::from_millis(50);

/// The share of a [`WINDOW`], in percent, from which an urgent reader is saturated: a reader
/// that busy is not waiting for bursts.
pub const BUSY: u32 = 25;

/// The share of a [`WINDOW`], in percent, under which a saturated reader is urgent again.
pub const IDLE: u32 = 10;

/// What the reader's urgency became.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    ToUrgent,
    ToSaturated,
}

/// The reader's urgency: whether it is urgent (or saturated), and where its current window
/// began, in wall time and in the thread's CPU time.
#[derive(Debug, Clone, Copy)]
pub struct Urgency {
    urgent: bool,
    window: Instant,
    cpu: Duration,
}

impl Urgency {
    /// A reader that is urgent from `now`, having used `cpu`.
    pub fn urgent_at(now: Instant, cpu: Duration) -> Urgency {
        Urgency {
            urgent: true,
            window: now,
            cpu,
        }
    }

    /// Whether it is urgent: mostly idle, waiting for bursts.
    pub fn is_urgent(&self) -> bool {
        self.urgent
    }

    /// At `now`: once a [`WINDOW`] has passed, weighs the thread's CPU time since the window
    /// began (`cpu` reads it, only then) and starts a new window.
    pub fn at(&mut self, now: Instant, cpu: impl FnOnce() -> Duration) -> Option<Change> {
        let wall = now.saturating_duration_since(self.window);
        if wall < WINDOW {
            return None;
        }
        let used = cpu();
        let busy = used.saturating_sub(self.cpu);
        (self.window, self.cpu) = (now, used);
        let percent = (busy.as_nanos() * 100 / wall.as_nanos().max(1)) as u32;
        match (self.urgent, percent) {
            (true, p) if p >= BUSY => {
                self.urgent = false;
                Some(Change::ToSaturated)
            }
            (false, p) if p < IDLE => {
                self.urgent = true;
                Some(Change::ToUrgent)
            }
            _ => None,
        }
    }
}

/// The calling thread's [`Urgency`], and its scheduling switched as that says: real time
/// while urgent, where asked for and allowed, shown on a gauge
/// (`whippet_unix_reader_realtime`: 1 at real time).
#[derive(Debug)]
pub struct Scheduling<'a> {
    /// The `SCHED_FIFO` priority while urgent; `None`: normal priority throughout.
    priority: Option<i32>,
    urgency: Urgency,
    shown: &'a Gauge,
}

impl<'a> Scheduling<'a> {
    /// An urgent reader, at `SCHED_FIFO` `priority` (0: at normal priority throughout). A
    /// refusal is logged once, naming what to change, as information rather than a warning:
    /// whippet loses nothing it has accepted for it, and the default asks on every host;
    /// the thread then runs at normal priority. `shown` is set to 1 once it runs at real
    /// time.
    pub fn start(priority: u32, shown: &'a Gauge) -> Scheduling<'a> {
        let urgency = Urgency::urgent_at(Instant::now(), thread_cpu());
        let asked = (priority > 0).then(|| priority.min(99) as i32);
        let priority = asked.filter(|&priority| match set_fifo(priority) {
            Ok(()) => {
                shown.set(1);
                true
            }
            Err(e) => {
                log::info(&format!(
                    "the Unix datagram reader runs at normal priority: SCHED_FIFO priority \
                     {priority} was refused ({}); allow it with CAP_SYS_NICE or an \
                     RLIMIT_RTPRIO of at least {priority} (systemd: LimitRTPRIO={priority}) \
                     and, on a kernel built with CONFIG_RT_GROUP_SCHED, a cgroup with \
                     real-time runtime; or set --unix-reader-priority 0 not to ask",
                    e.desc()
                ));
                false
            }
        });
        Scheduling {
            priority,
            urgency,
            shown,
        }
    }

    /// Whether the reader is saturated: busy enough to parse its own batches.
    pub fn saturated(&self) -> bool {
        !self.urgency.is_urgent()
    }

    /// Makes the reader saturated (or urgent) until its next window is weighed.
    #[cfg(test)]
    pub(super) fn set_saturated(&mut self, saturated: bool) {
        self.urgency.urgent = !saturated;
    }

    /// After each receive, at `now`: weighs the urgency, and switches the thread's scheduling
    /// when it changes. A refused switch back to real time leaves the thread at normal
    /// priority for good.
    pub fn at(&mut self, now: Instant) {
        let change = self.urgency.at(now, thread_cpu);
        let (Some(change), Some(priority)) = (change, self.priority) else {
            return;
        };
        match change {
            Change::ToSaturated => {
                // A thread may always leave real time for normal scheduling.
                let _ = set_normal();
                self.shown.set(0);
            }
            Change::ToUrgent => match set_fifo(priority) {
                Ok(()) => self.shown.set(1),
                Err(e) => {
                    log::info(&format!(
                        "the Unix datagram reader stays at normal priority: SCHED_FIFO \
                         priority {priority} was refused ({}) after it had been allowed",
                        e.desc()
                    ));
                    self.priority = None;
                }
            },
        }
    }
}

/// The CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

/// The calling thread at `SCHED_FIFO` `priority`.
fn set_fifo(priority: i32) -> Result<(), Errno> {
    set_scheduler(libc::SCHED_FIFO, priority)
}

/// The calling thread back at normal (`SCHED_OTHER`) scheduling.
fn set_normal() -> Result<(), Errno> {
    set_scheduler(libc::SCHED_OTHER, 0)
}

fn set_scheduler(policy: libc::c_int, priority: i32) -> Result<(), Errno> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0 is the calling
    // thread, so no other thread's scheduling changes.
    let r = unsafe { libc::sched_setscheduler(0, policy, &param) };
    Errno::result(r).map(drop)
}

/// The calling thread's scheduling policy (`SCHED_FIFO`, `SCHED_OTHER`, …).
#[cfg(test)]
fn policy() -> libc::c_int {
    // SAFETY: pid 0 is the calling thread; the call only reads its policy.
    unsafe { libc::sched_getscheduler(0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_reader_is_saturated_while_busy_and_urgent_again_once_idle() {
        let t0 = Instant::now();
        let mut u = Urgency::urgent_at(t0, 100 * MS);
        // (wall time since t0, the thread's CPU time then, change, urgent after)
        let steps: &[(Duration, Duration, Option<Change>, bool)] = &[
            // Within the first window nothing is weighed (the CPU time is not even read).
            (49 * MS, Duration::MAX, None, true),
            // 12 ms of 50: 24%, under BUSY.
            (50 * MS, 112 * MS, None, true),
            // 12.5 ms of 50: 25%, busy.
            (
                100 * MS,
                124 * MS + MS / 2,
                Some(Change::ToSaturated),
                false,
            ),
            // 6 ms of 60: 10%, not yet idle.
            (160 * MS, 130 * MS + MS / 2, None, false),
            // Still within the window that began at 160 ms.
            (200 * MS, Duration::MAX, None, false),
            // 4.9 ms of 50: under IDLE, urgent again.
            (
                210 * MS,
                135 * MS + MS * 4 / 10,
                Some(Change::ToUrgent),
                true,
            ),
            // A long idle spell changes nothing.
            (2_000 * MS, 140 * MS, None, true),
            // Then a whole window of CPU: saturated again.
            (2_050 * MS, 190 * MS, Some(Change::ToSaturated), false),
        ];
        for (i, &(wall, cpu, change, urgent)) in steps.iter().enumerate() {
            assert_eq!(u.at(t0 + wall, || cpu), change, "step {i}");
            assert_eq!(u.is_urgent(), urgent, "step {i}");
        }
    }

    /// Spends 30% of a [`WINDOW`] of the calling thread's CPU time, for a busy window.
    fn spend_a_busy_window() {
        let start = thread_cpu();
        while thread_cpu() < start + WINDOW * 3 / 10 {
            std::hint::black_box(thread_cpu());
        }
    }

    /// Makes `s`'s window have begun a [`WINDOW`] before `now` with the thread's CPU time
    /// at `cpu`.
    fn window_from(s: &mut Scheduling<'_>, now: Instant, cpu: Duration) {
        s.urgency.window = now - WINDOW;
        s.urgency.cpu = cpu;
    }

    #[test]
    fn priority_zero_asks_nothing_but_the_urgency_is_still_weighed() {
        std::thread::spawn(|| {
            let shown = Gauge::default();
            let mut s = Scheduling::start(0, &shown);
            assert_eq!(s.priority, None);
            assert_eq!(policy(), libc::SCHED_OTHER);
            assert_eq!(shown.get(), 0);
            assert!(!s.saturated());
            let before = thread_cpu();
            spend_a_busy_window();
            let now = Instant::now();
            window_from(&mut s, now, before);
            s.at(now);
            assert!(s.saturated());
            assert_eq!(policy(), libc::SCHED_OTHER);
            assert_eq!(shown.get(), 0);
            window_from(&mut s, now, thread_cpu());
            s.at(now);
            assert!(!s.saturated());
            assert_eq!(policy(), libc::SCHED_OTHER);
            assert_eq!(shown.get(), 0);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_thread_gets_real_time_where_the_system_allows_it_and_normal_priority_back() {
        // Whether this test process may use SCHED_FIFO is the system's to say (CAP_SYS_NICE,
        // or RLIMIT_RTPRIO); the scheduling must match it either way, and the urgency is
        // weighed either way.
        std::thread::spawn(|| {
            // CPU time for the busy window below, spent at normal priority.
            let before = thread_cpu();
            spend_a_busy_window();
            let allowed = set_fifo(1).is_ok();
            set_normal().unwrap();
            assert_eq!(policy(), libc::SCHED_OTHER);
            let shown = Gauge::default();
            let mut s = Scheduling::start(1, &shown);
            assert_eq!(s.priority, allowed.then_some(1));
            let (fifo, other) = (libc::SCHED_FIFO, libc::SCHED_OTHER);
            let realtime = if allowed { fifo } else { other };
            assert_eq!(policy(), realtime);
            assert_eq!(shown.get(), allowed as u64);
            assert!(!s.saturated());
            // A window in which the thread used 30% of its wall time: saturated.
            let now = Instant::now();
            window_from(&mut s, now, before);
            s.at(now);
            assert!(s.saturated());
            assert_eq!(policy(), other);
            assert_eq!(shown.get(), 0);
            // A window in which it used nothing: urgent again.
            window_from(&mut s, now, thread_cpu());
            s.at(now);
            assert!(!s.saturated());
            assert_eq!(policy(), realtime);
            assert_eq!(shown.get(), allowed as u64);
        })
        .join()
        .unwrap();
    }
}
