//! The hand-off from a connection's reader to its workers: a bounded FIFO that never spins.
//!
//! A lock-free channel (crossbeam's) lets a receiver that finds the queue empty spin and
//! `sched_yield` before it sleeps; with 32 workers on 2 cores that was 5–6 `sched_yield`
//! calls per request (`hack/profile_nbd.py`), time taken from the very threads doing the
//! I/O. Here a worker with nothing to do sleeps on a condition variable at once, and the
//! reader wakes one only when one is asleep: a request costs one lock round and at most one
//! futex wake.

use qcow2_engine::sync::Recover;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

/// See the module docs.
#[derive(Debug)]
pub(crate) struct JobQueue<T> {
    state: Mutex<State<T>>,
    /// Signalled when a job is queued (or the queue closes).
    ready: Condvar,
    /// Signalled when a full queue has room again.
    room: Condvar,
    capacity: usize,
}

#[derive(Debug)]
struct State<T> {
    jobs: VecDeque<T>,
    /// Workers asleep waiting for a job.
    idle: usize,
    /// The reader is asleep waiting for room.
    blocked: bool,
    /// No more jobs will come: workers drain what is queued and stop.
    closed: bool,
}

impl<T> JobQueue<T> {
    /// A queue holding at most `capacity` jobs (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                jobs: VecDeque::with_capacity(capacity.max(1)),
                idle: 0,
                blocked: false,
                closed: false,
            }),
            ready: Condvar::new(),
            room: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    /// Queues a job, waiting while the queue is full.
    pub fn send(&self, job: T) {
        let mut s = self.state.lock().recover();
        while s.jobs.len() >= self.capacity {
            s.blocked = true;
            s = self.room.wait(s).recover();
        }
        s.jobs.push_back(job);
        let wake = s.idle > 0;
        drop(s);
        if wake {
            self.ready.notify_one();
        }
    }

    /// The next job, waiting for one; `None` once the queue is closed and empty.
    pub fn recv(&self) -> Option<T> {
        let mut s = self.state.lock().recover();
        loop {
            if let Some(job) = s.jobs.pop_front() {
                let unblock = std::mem::take(&mut s.blocked);
                drop(s);
                if unblock {
                    self.room.notify_one();
                }
                return Some(job);
            }
            if s.closed {
                return None;
            }
            s.idle += 1;
            s = self.ready.wait(s).recover();
            s.idle -= 1;
        }
    }

    /// No more jobs: every worker returns `None` once the queue is empty.
    pub fn close(&self) {
        self.state.lock().recover().closed = true;
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn every_job_is_received_once_in_order_per_worker_and_close_drains() {
        let q = Arc::new(JobQueue::new(4));
        let sum = Arc::new(AtomicU64::new(0));
        let count = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let (q, sum, count) = (q.clone(), sum.clone(), count.clone());
                std::thread::spawn(move || {
                    let mut last = 0u64;
                    while let Some(j) = q.recv() {
                        // One reader queues in order, and a worker takes from the front.
                        assert!(j > last, "job {j} after {last}");
                        last = j;
                        sum.fetch_add(j, Ordering::Relaxed);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let n = 100_000u64;
        for j in 1..=n {
            q.send(j);
        }
        q.close();
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(count.load(Ordering::Relaxed), n);
        assert_eq!(sum.load(Ordering::Relaxed), n * (n + 1) / 2);
    }

    #[test]
    fn a_full_queue_holds_the_sender_until_a_worker_takes_a_job() {
        let q = Arc::new(JobQueue::new(1));
        q.send(1);
        let sender = {
            let q = q.clone();
            std::thread::spawn(move || q.send(2))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!sender.is_finished(), "sent past the capacity");
        assert_eq!(q.recv(), Some(1));
        sender.join().unwrap();
        assert_eq!(q.recv(), Some(2));
        q.close();
        assert_eq!(q.recv(), None);
    }
}
