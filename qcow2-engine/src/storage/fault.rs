//! A fault-injecting storage for crash-safety and error-path tests.
//!
//! It keeps two images in memory: the *live* bytes (what a process sees, i.e. the OS page cache)
//! and the *durable* bytes (what survived the last `flush`). A plan can make the N-th mutation
//! fail with `EIO`, or "crash" at the N-th mutation: that mutation and every later one is
//! dropped and fails, as if the process had died there. After a crash, [`FaultStorage::live`]
//! is what a process crash leaves and [`FaultStorage::durable`] what a power loss leaves.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{MemoryStorage, Storage};

/// When and how to fail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FaultPlan {
    /// Never fail.
    #[default]
    None,
    /// The mutation with this 0-based index fails with `EIO`; later ones succeed.
    FailMutation(u64),
    /// Crash before the mutation with this 0-based index: it and all later mutations fail.
    CrashAtMutation(u64),
    /// Every flush fails with `EIO` (the data stays in the "page cache").
    FailFlush,
}

/// Storage that fails on purpose. See the module docs.
#[derive(Debug)]
pub struct FaultStorage {
    live: MemoryStorage,
    durable: Mutex<Vec<u8>>,
    plan: Mutex<FaultPlan>,
    mutations: AtomicU64,
}

impl FaultStorage {
    /// Wraps `initial` bytes (considered durable) with a plan.
    pub fn new(initial: Vec<u8>, plan: FaultPlan) -> Self {
        Self {
            live: MemoryStorage::from_bytes(initial.clone()),
            durable: Mutex::new(initial),
            plan: Mutex::new(plan),
            mutations: AtomicU64::new(0),
        }
    }

    /// Replaces the plan; the mutation counter keeps counting.
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.plan.lock().unwrap_or_else(|e| e.into_inner()) = plan;
    }

    /// How many mutations (writes, zeroes, punches, resizes) were attempted so far.
    pub fn mutations(&self) -> u64 {
        self.mutations.load(Ordering::SeqCst)
    }

    /// What a process crash leaves: every completed mutation.
    pub fn live(&self) -> Vec<u8> {
        self.live.to_bytes()
    }

    /// What a power loss leaves: the contents as of the last successful flush.
    pub fn durable(&self) -> Vec<u8> {
        self.durable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn crashed(&self) -> bool {
        matches!(*self.plan.lock().unwrap_or_else(|e| e.into_inner()),
            FaultPlan::CrashAtMutation(n) if self.mutations() > n)
    }

    fn check_mutation(&self) -> io::Result<()> {
        let index = self.mutations.fetch_add(1, Ordering::SeqCst);
        match *self.plan.lock().unwrap_or_else(|e| e.into_inner()) {
            FaultPlan::FailMutation(n) if n == index => Err(injected("write")),
            FaultPlan::CrashAtMutation(n) if index >= n => Err(injected("crashed")),
            _ => Ok(()),
        }
    }
}

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("injected fault: {what}"))
}

impl Storage for FaultStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.crashed() {
            return Err(injected("crashed"));
        }
        self.live.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_mutation()?;
        self.live.write_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_mutation()?;
        self.live.write_zeroes(offset, len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_mutation()?;
        self.live.punch_hole(offset, len)
    }

    fn flush(&self) -> io::Result<()> {
        let plan = *self.plan.lock().unwrap_or_else(|e| e.into_inner());
        if plan == FaultPlan::FailFlush || self.crashed() {
            return Err(injected("flush"));
        }
        *self.durable.lock().unwrap_or_else(|e| e.into_inner()) = self.live.to_bytes();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.live.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_mutation()?;
        self.live.set_len(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_mutation_changes_nothing_and_later_ones_succeed() {
        let s = FaultStorage::new(vec![0; 8], FaultPlan::FailMutation(1));
        s.write_at(&[1], 0).unwrap();
        assert!(s.write_at(&[2], 1).is_err());
        s.write_at(&[3], 2).unwrap();
        assert_eq!(s.live(), vec![1, 0, 3, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn crash_drops_everything_after_and_power_loss_drops_unflushed() {
        let s = FaultStorage::new(vec![0; 4], FaultPlan::CrashAtMutation(2));
        s.write_at(&[1], 0).unwrap();
        s.flush().unwrap();
        s.write_at(&[2], 1).unwrap();
        assert!(s.write_at(&[3], 2).is_err());
        assert!(s.write_at(&[4], 3).is_err());
        assert!(s.flush().is_err());
        assert_eq!(s.live(), vec![1, 2, 0, 0]);
        assert_eq!(s.durable(), vec![1, 0, 0, 0]);
    }
}
