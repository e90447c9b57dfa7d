//! The packet queue: the bounded channel from the readers to the workers, and when a worker
//! is woken for what waits in it.
//!
//! A worker that finds the queue empty sleeps on the queue's bell. A reader rings it when no
//! worker is awake, or when more batches wait than the awake workers can be expected to take
//! next ([`BACKLOG_PER_WORKER`] each). So the workers that run follow the load, not
//! `--workers`: steady traffic that one worker keeps up with wakes one worker, and only a
//! backlog wakes more, up to all of them. A worker that is already awake takes the next
//! batch without being woken, and no worker spins or yields while it waits, which on a small
//! machine takes the CPU the reader needs.
//!
//! A datagram reader that goes on reading after it queues a batch ([`Wake::Deferred`]) lets
//! up to [`DEFERRED_BATCHES`] wait before it wakes a sleeping worker, so that one wakeup
//! takes several batches, and it calls [`QueueSender::before_wait`] before it waits for
//! anything (the socket, an admission, room in the queue): no batch is left queued while
//! every worker sleeps and the reader does too.

use std::sync::atomic::{fence, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crossbeam_channel::{Receiver, RecvError, SendError, Sender, TryRecvError, TrySendError};

use super::Batch;

/// Batches that may wait per awake worker before a reader wakes another.
pub const BACKLOG_PER_WORKER: usize = 1;

/// Batches that may wait for a sleeping worker while their reader goes on reading
/// ([`Wake::Deferred`]).
pub const DEFERRED_BATCHES: usize = 4;

/// When a queued batch wakes a sleeping worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// At once, unless the awake workers will take it.
    Now,
    /// Once [`DEFERRED_BATCHES`] wait, or when the reader is about to wait
    /// ([`QueueSender::before_wait`]).
    Deferred,
}

/// A queue of `capacity` batches for `workers` workers: the readers' end, and the workers'.
pub fn queue(capacity: usize, workers: usize) -> (QueueSender, QueueReceiver) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let bell = Arc::new(Bell {
        workers: workers.max(1),
        asleep: AtomicUsize::new(0),
        gone: AtomicUsize::new(0),
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
    });
    let sender = QueueSender(Arc::new(SendEnd {
        tx,
        bell: bell.clone(),
    }));
    (sender, QueueReceiver { rx, bell })
}

/// Where the workers sleep while the queue is empty.
struct Bell {
    workers: usize,
    /// Workers asleep; kept beside `state` so that a reader reads it without the lock.
    asleep: AtomicUsize,
    /// Workers that have taken the queue's end (their receive said it is closed and empty).
    gone: AtomicUsize,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    asleep: usize,
    /// Wakeups rung and not yet taken by a sleeping worker.
    calls: usize,
    /// Every reader's end is gone: nothing more will be queued.
    closed: bool,
}

impl Bell {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// After a batch is queued (and `queued` wait): wakes a worker when the backlog is more
    /// than the awake workers take next, and with [`Wake::Deferred`], only once a sleeping
    /// worker has [`DEFERRED_BATCHES`] to take.
    #[inline]
    fn after_send(&self, queued: usize, wake: Wake) {
        // Pairs with the fence in `sleep`: either this reads the sleeper's count, or the
        // sleeper's last look at the queue sees the batch just queued.
        fence(SeqCst);
        let asleep = self.asleep.load(SeqCst);
        if asleep == 0 {
            return;
        }
        let awake = self.workers.saturating_sub(asleep);
        let mut enough = awake * BACKLOG_PER_WORKER + 1;
        if wake == Wake::Deferred {
            enough = enough.max(DEFERRED_BATCHES);
        }
        if queued >= enough {
            self.ring();
        }
    }

    fn ring(&self) {
        let mut s = self.state();
        if s.asleep > s.calls {
            s.calls += 1;
            drop(s);
            self.wake.notify_one();
        }
    }

    fn close(&self) {
        self.state().closed = true;
        self.wake.notify_all();
    }

    /// Sleeps until rung, or until something is queued or the queue closes. Returns whether
    /// the queue is closed.
    fn sleep(&self, rx: &Receiver<Batch>) -> bool {
        let mut s = self.state();
        s.asleep += 1;
        self.asleep.store(s.asleep, SeqCst);
        fence(SeqCst);
        while !s.closed && rx.is_empty() {
            if s.calls > 0 {
                s.calls -= 1;
                break;
            }
            s = self.wake.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.asleep -= 1;
        self.asleep.store(s.asleep, SeqCst);
        s.closed
    }
}

/// The readers' end: cloned for each reader; the queue closes when the last clone is gone.
#[derive(Clone)]
pub struct QueueSender(Arc<SendEnd>);

struct SendEnd {
    tx: Sender<Batch>,
    bell: Arc<Bell>,
}

impl Drop for SendEnd {
    fn drop(&mut self) {
        // `tx` is dropped after this: a worker woken here finds the queue not yet
        // disconnected, and so waits on the channel itself from now on.
        self.bell.close();
    }
}

impl QueueSender {
    /// Queues a batch if there is room, waking a worker by `wake` (see the module doc).
    pub fn try_send(&self, batch: Batch, wake: Wake) -> Result<(), TrySendError<Batch>> {
        self.0.tx.try_send(batch)?;
        self.0.bell.after_send(self.0.tx.len(), wake);
        Ok(())
    }

    /// Queues a batch, waiting for room (after waking a worker for what waits).
    pub fn send(&self, batch: Batch, wake: Wake) -> Result<(), SendError<Batch>> {
        match self.try_send(batch, wake) {
            Ok(()) => Ok(()),
            Err(TrySendError::Disconnected(b)) => Err(SendError(b)),
            Err(TrySendError::Full(b)) => {
                self.before_wait();
                self.0.tx.send(b)?;
                self.0.bell.after_send(self.0.tx.len(), wake);
                Ok(())
            }
        }
    }

    /// Wakes a worker for what waits, unless the awake ones will take it: what a reader that
    /// defers waking ([`Wake::Deferred`]) calls before it waits for anything.
    pub fn before_wait(&self) {
        self.0.bell.after_send(self.0.tx.len(), Wake::Now);
    }
}

/// The workers' end (and the status endpoint's view of the depth).
#[derive(Clone)]
pub struct QueueReceiver {
    rx: Receiver<Batch>,
    bell: Arc<Bell>,
}

impl QueueReceiver {
    /// The next batch, sleeping while the queue is empty; an error once it is closed and
    /// empty.
    pub fn recv(&self) -> Result<Batch, RecvError> {
        let got = self.next_batch();
        if got.is_err() {
            self.bell.gone.fetch_add(1, SeqCst);
        }
        got
    }

    fn next_batch(&self) -> Result<Batch, RecvError> {
        loop {
            match self.rx.try_recv() {
                Ok(batch) => return Ok(batch),
                Err(TryRecvError::Disconnected) => return Err(RecvError),
                Err(TryRecvError::Empty) => {
                    if self.bell.sleep(&self.rx) {
                        // Closed: nothing more is queued after what is there now, and the
                        // channel says when that is taken.
                        return self.rx.recv();
                    }
                }
            }
        }
    }

    /// Batches waiting.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// Whether no batch waits.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Workers asleep on the bell now.
    pub fn asleep(&self) -> usize {
        self.bell.asleep.load(SeqCst)
    }

    /// Workers awake now: neither asleep on the bell nor gone after the queue closed.
    pub fn awake(&self) -> usize {
        let b = &self.bell;
        let idle = b.asleep.load(SeqCst) + b.gone.load(SeqCst);
        b.workers.saturating_sub(idle)
    }
}

impl Iterator for QueueReceiver {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        self.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn batch() -> Batch {
        Batch::new(64)
    }

    /// Waits, up to a deadline, until `n` workers are asleep on the queue's bell.
    fn until_asleep(rx: &QueueReceiver, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while rx.asleep() != n {
            assert!(Instant::now() < deadline, "{} asleep, not {n}", rx.asleep());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_sleeping_worker_is_woken_for_a_batch() {
        let (tx, rx) = queue(4, 1);
        let worker = {
            let rx = rx.clone();
            std::thread::spawn(move || rx.recv().map(|b| b.packet_count()))
        };
        until_asleep(&rx, 1);
        tx.try_send(batch(), Wake::Now).unwrap();
        assert_eq!(worker.join().unwrap(), Ok(0));
        assert_eq!((rx.asleep(), rx.awake()), (0, 1));
    }

    #[test]
    fn a_reader_rings_only_when_no_worker_is_awake_or_the_backlog_outgrows_the_awake_ones() {
        let (tx, rx) = queue(8, 2);
        // Both workers asleep: the first batch rings.
        tx.0.bell.state().asleep = 2;
        tx.0.bell.asleep.store(2, SeqCst);
        tx.try_send(batch(), Wake::Now).unwrap();
        assert_eq!(tx.0.bell.state().calls, 1);
        // One called and awake: one batch waiting is its to take, so no second call...
        tx.0.bell.state().asleep = 1;
        tx.0.bell.asleep.store(1, SeqCst);
        tx.0.bell.state().calls = 0;
        rx.rx.try_recv().unwrap();
        tx.try_send(batch(), Wake::Now).unwrap();
        assert_eq!(tx.0.bell.state().calls, 0);
        // ...but two waiting are more than one awake worker takes next: the other is called.
        tx.try_send(batch(), Wake::Now).unwrap();
        assert_eq!(tx.0.bell.state().calls, 1);
        // No worker asleep: nothing to ring, whatever waits.
        tx.0.bell.state().asleep = 0;
        tx.0.bell.asleep.store(0, SeqCst);
        tx.0.bell.state().calls = 0;
        tx.try_send(batch(), Wake::Now).unwrap();
        assert_eq!(tx.0.bell.state().calls, 0);
        assert_eq!(rx.len(), 3);
    }

    #[test]
    fn a_reader_that_defers_rings_for_several_batches_or_before_it_waits() {
        let (tx, rx) = queue(8, 1);
        tx.0.bell.state().asleep = 1;
        tx.0.bell.asleep.store(1, SeqCst);
        for _ in 1..DEFERRED_BATCHES {
            tx.try_send(batch(), Wake::Deferred).unwrap();
        }
        assert_eq!(tx.0.bell.state().calls, 0);
        tx.try_send(batch(), Wake::Deferred).unwrap();
        assert_eq!(tx.0.bell.state().calls, 1);
        // One batch, and the reader about to wait: rung at once.
        tx.0.bell.state().calls = 0;
        while rx.rx.len() > 1 {
            rx.rx.try_recv().unwrap();
        }
        tx.try_send(batch(), Wake::Deferred).unwrap();
        rx.rx.try_recv().unwrap();
        assert_eq!(tx.0.bell.state().calls, 0);
        tx.before_wait();
        assert_eq!(tx.0.bell.state().calls, 1);
        // A send that finds the queue full rings before it waits for room.
        let (tx, rx) = queue(1, 1);
        tx.0.bell.state().asleep = 1;
        tx.0.bell.asleep.store(1, SeqCst);
        tx.try_send(batch(), Wake::Deferred).unwrap();
        let taker = rx.clone();
        let taker = std::thread::spawn(move || {
            let rx = taker;
            let deadline = Instant::now() + Duration::from_secs(10);
            while rx.bell.state().calls == 0 {
                assert!(Instant::now() < deadline, "never rung");
                std::thread::sleep(Duration::from_millis(1));
            }
            rx.rx.try_recv().unwrap();
        });
        tx.send(batch(), Wake::Deferred).unwrap();
        taker.join().unwrap();
        assert_eq!(rx.len(), 1);
    }

    #[test]
    fn closing_wakes_every_sleeping_worker_after_what_was_queued() {
        let (tx, rx) = queue(4, 3);
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let rx = rx.clone();
                std::thread::spawn(move || rx.map(|_| 1).sum::<usize>())
            })
            .collect();
        until_asleep(&rx, 3);
        tx.send(batch(), Wake::Now).unwrap();
        drop(tx);
        let got: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
        assert_eq!(got, 1);
        assert_eq!((rx.asleep(), rx.awake()), (0, 0));
    }

    #[test]
    fn a_batch_queued_as_the_worker_falls_asleep_is_never_missed() {
        // One batch at a time, each sent just as the worker runs out of work and goes to
        // sleep: the race between its last look at the queue and the reader's look at the
        // sleepers, many times over.
        const ROUNDS: usize = 20_000;
        let (tx, rx) = queue(4, 1);
        let taken = Arc::new(AtomicUsize::new(0));
        let worker = {
            let (rx, taken) = (rx.clone(), taken.clone());
            std::thread::spawn(move || {
                for _ in rx {
                    taken.fetch_add(1, SeqCst);
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in 0..ROUNDS {
            tx.send(batch(), Wake::Now).unwrap();
            while taken.load(SeqCst) != n + 1 {
                assert!(
                    Instant::now() < deadline,
                    "batch {n} missed: {} waiting, {} asleep",
                    rx.len(),
                    rx.asleep()
                );
                std::hint::spin_loop();
            }
        }
        drop(tx);
        worker.join().unwrap();
        assert_eq!(taken.load(SeqCst), ROUNDS);
    }

    #[test]
    fn no_batch_waits_unseen_while_workers_sleep() {
        // Four workers and two readers, with no closing to rescue a lost wakeup: the count
        // must reach every batch sent while the readers' ends are still open.
        const EACH: usize = 20_000;
        let (tx, rx) = queue(8, 4);
        let taken = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (rx, taken) = (rx.clone(), taken.clone());
                std::thread::spawn(move || {
                    for _ in rx {
                        taken.fetch_add(1, SeqCst);
                    }
                })
            })
            .collect();
        let readers: Vec<_> = (0..2)
            .map(|i| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for n in 0..EACH {
                        // One reader waits for room, the other drops when full (and retries),
                        // as the Unix and UDP readers do; every few batches it pauses, so
                        // workers go to sleep and must be woken.
                        let mut b = batch();
                        loop {
                            match (i, tx.try_send(b, Wake::Deferred)) {
                                (_, Ok(())) => break,
                                (0, Err(TrySendError::Full(back))) => {
                                    tx.send(back, Wake::Deferred).unwrap();
                                    break;
                                }
                                (_, Err(TrySendError::Full(back))) => b = back,
                                (_, Err(e)) => panic!("{e}"),
                            }
                        }
                        if n % 64 == 0 {
                            tx.before_wait();
                            std::thread::sleep(Duration::from_micros(50));
                        }
                    }
                    tx.before_wait();
                })
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while taken.load(SeqCst) != 2 * EACH {
            assert!(
                Instant::now() < deadline,
                "{} of {} taken, {} waiting, {} workers asleep",
                taken.load(SeqCst),
                2 * EACH,
                rx.len(),
                rx.asleep()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(tx);
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(taken.load(SeqCst), 2 * EACH);
    }
}
