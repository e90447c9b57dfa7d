//! The Unix datagram reader's scheduling: real-time (`SCHED_FIFO`) while it is mostly idle,
//! as between the bursts of clients that send without blocking; normal while it keeps a
//! good part of a core busy.
//!
//! A client that sends to the Unix socket without blocking loses every datagram that arrives
//! while the socket's queue (`net.unix.max_dgram_qlen`, 10 by default) is full. At normal
//! priority the reader waits for its core while a worker or the sender holds it, and a burst
//! overflows the queue meanwhile; at real-time priority it runs the moment a datagram wakes
//! it. Under sustained traffic the same preemption only adds context switches (a blocking
//! sender waits rather than losing anything), and a busy thread must not hold a core at
//! real-time priority, so the reader measures its own CPU time over each [`WINDOW`]: from
//! [`BUSY`] of the window it runs at normal priority, and back at real time once it uses
//! less than [`IDLE`] (docs/performance.md, "A real-time Unix reader").

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::time::{clock_gettime, ClockId};

use crate::log;
use crate::telemetry::Gauge;

/// How often the reader weighs its CPU time.
pub const WINDOW: Duration = Duration::from_millis(50);

/// The share of a [`WINDOW`], in percent, from which a real-time reader runs at normal
/// priority: a reader that busy is saturated, not waiting for bursts.
pub const BUSY: u32 = 25;

/// The share of a [`WINDOW`], in percent, under which a normal-priority reader returns to
/// real time.
pub const IDLE: u32 = 10;

/// What the reader's scheduling should become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    ToRealtime,
    ToNormal,
}

/// The reader's scheduling state: whether it runs at real-time priority, and where its
/// current window began, in wall time and in the thread's CPU time.
#[derive(Debug, Clone, Copy)]
pub struct Urgency {
    realtime: bool,
    window: Instant,
    cpu: Duration,
}

impl Urgency {
    /// A reader that runs at real-time priority from `now`, having used `cpu`.
    pub fn realtime_at(now: Instant, cpu: Duration) -> Urgency {
        Urgency {
            realtime: true,
            window: now,
            cpu,
        }
    }

    /// Whether it runs at real-time priority.
    pub fn is_realtime(&self) -> bool {
        self.realtime
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
        match (self.realtime, percent) {
            (true, p) if p >= BUSY => {
                self.realtime = false;
                Some(Change::ToNormal)
            }
            (false, p) if p < IDLE => {
                self.realtime = true;
                Some(Change::ToRealtime)
            }
            _ => None,
        }
    }
}

/// Real-time scheduling for the calling thread, switched as its [`Urgency`] says, and shown
/// on a gauge (`whippet_unix_reader_realtime`: 1 at real time).
#[derive(Debug)]
pub struct Scheduling<'a> {
    priority: i32,
    urgency: Urgency,
    shown: &'a Gauge,
}

impl<'a> Scheduling<'a> {
    /// Puts the calling thread at `SCHED_FIFO` `priority`; `None` for 0, or when the system
    /// refuses. A refusal is logged once, naming what to change, as information rather than
    /// a warning: whippet loses nothing it has accepted for it, and the default asks on
    /// every host. `shown` is set to 1 once the thread runs at real time.
    pub fn start(priority: u32, shown: &'a Gauge) -> Option<Scheduling<'a>> {
        if priority == 0 {
            return None;
        }
        let priority = priority.min(99) as i32;
        match set_fifo(priority) {
            Ok(()) => {
                shown.set(1);
                Some(Scheduling {
                    priority,
                    urgency: Urgency::realtime_at(Instant::now(), thread_cpu()),
                    shown,
                })
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
                None
            }
        }
    }

    /// After each receive, at `now`: switches the thread's scheduling when its urgency
    /// changes. Returns false when the system refused a switch back to real time, leaving the
    /// thread at normal priority for good.
    pub fn at(&mut self, now: Instant) -> bool {
        match self.urgency.at(now, thread_cpu) {
            None => true,
            Some(Change::ToNormal) => {
                // A thread may always leave real time for normal scheduling.
                let _ = set_normal();
                self.shown.set(0);
                true
            }
            Some(Change::ToRealtime) => match set_fifo(self.priority) {
                Ok(()) => {
                    self.shown.set(1);
                    true
                }
                Err(e) => {
                    log::info(&format!(
                        "the Unix datagram reader stays at normal priority: SCHED_FIFO \
                         priority {} was refused ({}) after it had been allowed",
                        self.priority,
                        e.desc()
                    ));
                    false
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
    fn a_reader_leaves_real_time_while_busy_and_returns_once_idle() {
        let t0 = Instant::now();
        let mut u = Urgency::realtime_at(t0, 100 * MS);
        // (wall time since t0, the thread's CPU time then, change, real time after)
        let steps: &[(Duration, Duration, Option<Change>, bool)] = &[
            // Within the first window nothing is weighed (the CPU time is not even read).
            (49 * MS, Duration::MAX, None, true),
            // 12 ms of 50: 24%, under BUSY.
            (50 * MS, 112 * MS, None, true),
            // 12.5 ms of 50: 25%, busy.
            (100 * MS, 124 * MS + MS / 2, Some(Change::ToNormal), false),
            // 6 ms of 60: 10%, not yet idle.
            (160 * MS, 130 * MS + MS / 2, None, false),
            // Still within the window that began at 160 ms.
            (200 * MS, Duration::MAX, None, false),
            // 4.9 ms of 50: under IDLE, back to real time.
            (
                210 * MS,
                135 * MS + MS * 4 / 10,
                Some(Change::ToRealtime),
                true,
            ),
            // A long idle spell at real time changes nothing.
            (2_000 * MS, 140 * MS, None, true),
            // Then a whole window of CPU: normal again.
            (2_050 * MS, 190 * MS, Some(Change::ToNormal), false),
        ];
        for (i, &(wall, cpu, change, realtime)) in steps.iter().enumerate() {
            assert_eq!(u.at(t0 + wall, || cpu), change, "step {i}");
            assert_eq!(u.is_realtime(), realtime, "step {i}");
        }
    }

    #[test]
    fn priority_zero_asks_nothing() {
        std::thread::spawn(|| {
            let shown = Gauge::default();
            assert!(Scheduling::start(0, &shown).is_none());
            assert_eq!(policy(), libc::SCHED_OTHER);
            assert_eq!(shown.get(), 0);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_thread_gets_real_time_where_the_system_allows_it_and_normal_priority_back() {
        // Whether this test process may use SCHED_FIFO is the system's to say (CAP_SYS_NICE,
        // or RLIMIT_RTPRIO); the scheduling must match it either way.
        std::thread::spawn(|| {
            // CPU time for the busy window below, spent at normal priority.
            while thread_cpu() < WINDOW * 3 / 10 {
                std::hint::black_box(thread_cpu());
            }
            let allowed = set_fifo(1).is_ok();
            set_normal().unwrap();
            assert_eq!(policy(), libc::SCHED_OTHER);
            let shown = Gauge::default();
            let s = Scheduling::start(1, &shown);
            assert_eq!(s.is_some(), allowed);
            let expected = if allowed {
                libc::SCHED_FIFO
            } else {
                libc::SCHED_OTHER
            };
            assert_eq!(policy(), expected);
            assert_eq!(shown.get(), allowed as u64);
            if let Some(mut s) = s {
                // A window in which the thread used 30% of its wall time: the CPU time was
                // spent above, and the window is made to have begun WINDOW ago with none.
                let now = Instant::now();
                s.urgency.window = now - WINDOW;
                s.urgency.cpu = Duration::ZERO;
                assert!(s.at(now));
                assert_eq!(policy(), libc::SCHED_OTHER);
                assert_eq!(shown.get(), 0);
                // A window in which it used nothing.
                s.urgency.window = now - 2 * WINDOW;
                s.urgency.cpu = thread_cpu();
                assert!(s.at(now));
                assert_eq!(policy(), libc::SCHED_FIFO);
                assert_eq!(shown.get(), 1);
            }
        })
        .join()
        .unwrap();
    }
}
