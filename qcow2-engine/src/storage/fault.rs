//! A fault-injecting storage for crash-safety and error-path tests.
//!
//! It keeps two images in memory: the *live* bytes (what a process sees, i.e. the OS page cache)
//! and the *durable* bytes (what survived the last `flush`), plus the log of mutations since
//! that flush. A plan can make the N-th mutation fail with `EIO`, or "crash" at the N-th
//! mutation or the N-th flush: that event and every later one is dropped and fails, as if the
//! process had died there. After a crash, [`FaultStorage::live`] is what a process crash leaves;
//! [`FaultStorage::power_loss`] builds what a power loss leaves: the durable bytes plus any
//! subset of the unflushed mutations (a disk may persist them in any order).
//!
//! A range sync ([`Storage::sync_ranges`]) makes durable exactly what it promises and no more:
//! the parts of unflushed writes and zeroings inside its ranges, and every length change. The
//! parts outside stay unflushed, so a barrier that forgets a range shows up as a power loss
//! that keeps the metadata but not what it depends on.

use crate::sync::Recover;
use std::io;
use std::ops::Range;
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
    /// Crash at the flush with this 0-based index: it does not happen, and everything after
    /// fails.
    CrashAtFlush(u64),
    /// Every flush fails with `EIO` (the data stays in the "page cache").
    FailFlush,
    /// A full disk from the mutation with this 0-based index on: every write and zero-write
    /// fails with `ENOSPC` (nothing of it lands) until the plan changes; hole punching,
    /// which frees space, and length changes still succeed.
    FullFromMutation(u64),
}

/// One mutation not yet covered by a flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Bytes written at an offset.
    Write(u64, Vec<u8>),
    /// A range made to read as zeros (write-zeroes or punch).
    Zero(u64, u64),
    /// The length changed.
    SetLen(u64),
}

/// Storage that fails on purpose. See the module docs.
#[derive(Debug)]
pub struct FaultStorage {
    live: MemoryStorage,
    durable: Mutex<Vec<u8>>,
    unflushed: Mutex<Vec<Mutation>>,
    shared: std::sync::Arc<Counters>,
}

/// The plan and its counters, shared by the files of one process (an image and its data
/// file): mutations and flushes are counted across them, and a crash stops them all.
#[derive(Debug)]
struct Counters {
    plan: Mutex<FaultPlan>,
    mutations: AtomicU64,
    flushes: AtomicU64,
    crashed: std::sync::atomic::AtomicBool,
}

impl FaultStorage {
    /// Wraps `initial` bytes (considered durable) with a plan.
    pub fn new(initial: Vec<u8>, plan: FaultPlan) -> Self {
        Self::with_counters(
            initial,
            std::sync::Arc::new(Counters {
                plan: Mutex::new(plan),
                mutations: AtomicU64::new(0),
                flushes: AtomicU64::new(0),
                crashed: std::sync::atomic::AtomicBool::new(false),
            }),
        )
    }

    /// Another file of the same process as `other`: one plan, counted across both (so
    /// "crash at mutation N" is the N-th mutation of either), and one crash for both.
    pub fn sharing(initial: Vec<u8>, other: &FaultStorage) -> Self {
        Self::with_counters(initial, other.shared.clone())
    }

    fn with_counters(initial: Vec<u8>, shared: std::sync::Arc<Counters>) -> Self {
        Self {
            live: MemoryStorage::from_bytes(initial.clone()),
            durable: Mutex::new(initial),
            unflushed: Mutex::new(Vec::new()),
            shared,
        }
    }

    /// How many flushes were attempted so far.
    pub fn flushes(&self) -> u64 {
        self.shared.flushes.load(Ordering::SeqCst)
    }

    /// Whether the plan's crash happened.
    pub fn has_crashed(&self) -> bool {
        self.shared.crashed.load(Ordering::SeqCst)
    }

    /// The mutations since the last successful flush, in order.
    pub fn unflushed(&self) -> Vec<Mutation> {
        self.unflushed.lock().recover().clone()
    }

    /// What a power loss leaves when the disk persisted exactly the unflushed mutations for
    /// which `keep(index)` is true (applied in order over the durable bytes).
    pub fn power_loss(&self, mut keep: impl FnMut(usize) -> bool) -> Vec<u8> {
        let img = MemoryStorage::from_bytes(self.durable());
        for (i, m) in self.unflushed().into_iter().enumerate() {
            if !keep(i) {
                continue;
            }
            let done = match m {
                Mutation::Write(off, data) => img.write_at(&data, off),
                Mutation::Zero(off, len) => img.write_zeroes(off, len),
                Mutation::SetLen(len) => img.set_len(len),
            };
            done.expect("memory storage accepts replayed mutations");
        }
        img.to_bytes()
    }

    fn log(&self, m: Mutation) {
        self.unflushed.lock().recover().push(m);
    }

    /// Replaces the plan; the mutation counter keeps counting.
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.shared.plan.lock().recover() = plan;
    }

    /// How many mutations (writes, zeroes, punches, resizes) were attempted so far.
    pub fn mutations(&self) -> u64 {
        self.shared.mutations.load(Ordering::SeqCst)
    }

    /// What a process crash leaves: every completed mutation.
    pub fn live(&self) -> Vec<u8> {
        self.live.to_bytes()
    }

    /// What a power loss leaves: the contents as of the last successful flush.
    pub fn durable(&self) -> Vec<u8> {
        self.durable.lock().recover().clone()
    }

    fn crashed(&self) -> bool {
        self.has_crashed()
    }

    /// Counts a flush or range sync and fails it as the plan says.
    fn check_flush(&self) -> io::Result<()> {
        if self.crashed() {
            return Err(injected("crashed"));
        }
        let index = self.shared.flushes.fetch_add(1, Ordering::SeqCst);
        match *self.shared.plan.lock().recover() {
            FaultPlan::FailFlush => Err(injected("flush")),
            FaultPlan::CrashAtFlush(n) if index >= n => {
                self.shared.crashed.store(true, Ordering::SeqCst);
                Err(injected("crashed"))
            }
            _ => Ok(()),
        }
    }

    /// Counts a mutation and fails it as the plan says; `fills` when it needs new space.
    fn check_mutation(&self, fills: bool) -> io::Result<()> {
        if self.crashed() {
            return Err(injected("crashed"));
        }
        let index = self.shared.mutations.fetch_add(1, Ordering::SeqCst);
        match *self.shared.plan.lock().recover() {
            FaultPlan::FailMutation(n) if n == index => Err(injected("write")),
            FaultPlan::FullFromMutation(n) if fills && index >= n => {
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            FaultPlan::CrashAtMutation(n) if index >= n => {
                self.shared.crashed.store(true, Ordering::SeqCst);
                Err(injected("crashed"))
            }
            _ => Ok(()),
        }
    }
}

/// `r` cut at the edges of `ranges`: each part, and whether it lies inside one of them.
fn split(r: Range<u64>, ranges: &[Range<u64>]) -> Vec<(Range<u64>, bool)> {
    let mut cuts: Vec<u64> = ranges
        .iter()
        .flat_map(|x| [x.start, x.end])
        .filter(|&c| c > r.start && c < r.end)
        .chain([r.start, r.end])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2)
        .map(|w| {
            let inside = ranges.iter().any(|x| x.start <= w[0] && w[1] <= x.end);
            (w[0]..w[1], inside)
        })
        .collect()
}

/// Drops the parts of unflushed writes and zeroings at or past `len`.
fn clip(rest: &mut Vec<Mutation>, len: u64) {
    rest.retain_mut(|m| match m {
        Mutation::Write(off, data) => {
            data.truncate(len.saturating_sub(*off) as usize);
            !data.is_empty()
        }
        Mutation::Zero(off, n) => {
            *n = (*n).min(len.saturating_sub(*off));
            *n > 0
        }
        Mutation::SetLen(_) => true,
    });
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
        self.check_mutation(true)?;
        self.live.write_at(buf, offset)?;
        self.log(Mutation::Write(offset, buf.to_vec()));
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_mutation(true)?;
        self.live.write_zeroes(offset, len)?;
        self.log(Mutation::Zero(offset, len));
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_mutation(false)?;
        self.live.punch_hole(offset, len)?;
        self.log(Mutation::Zero(offset, len));
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.check_flush()?;
        *self.durable.lock().recover() = self.live.to_bytes();
        self.unflushed.lock().recover().clear();
        Ok(())
    }

    fn sync_ranges(&self, ranges: &[Range<u64>]) -> io::Result<()> {
        self.check_flush()?;
        let mut unflushed = self.unflushed.lock().recover();
        let mut durable = self.durable.lock().recover();
        let img = MemoryStorage::from_bytes(std::mem::take(&mut *durable));
        let mut rest = Vec::new();
        for m in unflushed.drain(..) {
            let applied = match m {
                Mutation::Write(off, data) => {
                    for (part, inside) in split(off..off + data.len() as u64, ranges) {
                        let bytes =
                            data[(part.start - off) as usize..(part.end - off) as usize].to_vec();
                        if inside {
                            img.write_at(&bytes, part.start)?;
                        } else {
                            rest.push(Mutation::Write(part.start, bytes));
                        }
                    }
                    Ok(())
                }
                Mutation::Zero(off, len) => {
                    for (part, inside) in split(off..off + len, ranges) {
                        if inside {
                            img.write_zeroes(part.start, part.end - part.start)?;
                        } else {
                            rest.push(Mutation::Zero(part.start, part.end - part.start));
                        }
                    }
                    Ok(())
                }
                Mutation::SetLen(len) => {
                    // What a shorter file cut off cannot come back.
                    clip(&mut rest, len);
                    img.set_len(len)
                }
            };
            applied.expect("memory storage accepts replayed mutations");
        }
        *durable = img.to_bytes();
        *unflushed = rest;
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.live.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_mutation(false)?;
        self.live.set_len(len)?;
        self.log(Mutation::SetLen(len));
        Ok(())
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
        assert_eq!(s.power_loss(|_| true), vec![1, 2, 0, 0]);
        assert_eq!(s.power_loss(|_| false), vec![1, 0, 0, 0]);
    }

    #[test]
    fn a_range_sync_makes_durable_only_what_lies_in_its_ranges() {
        let s = FaultStorage::new(vec![0; 8], FaultPlan::None);
        s.write_at(&[1, 1, 1, 1], 0).unwrap();
        s.punch_hole(6, 2).unwrap();
        s.write_at(&[2, 2], 5).unwrap();
        s.sync_ranges(&[1..3, 6..7]).unwrap();
        assert_eq!(s.durable(), vec![0, 1, 1, 0, 0, 0, 2, 0]);
        // What is left unflushed: the parts outside the ranges, in their order.
        assert_eq!(
            s.unflushed(),
            vec![
                Mutation::Write(0, vec![1]),
                Mutation::Write(3, vec![1]),
                Mutation::Zero(7, 1),
                Mutation::Write(5, vec![2]),
            ]
        );
        assert_eq!(s.power_loss(|_| true), s.live());
        // A shorter length is durable at once, and what it cut off cannot come back.
        s.write_at(&[3], 7).unwrap();
        s.set_len(6).unwrap();
        s.sync_ranges(std::slice::from_ref(&(0..1))).unwrap();
        assert_eq!(s.durable(), vec![1, 1, 1, 0, 0, 0]);
        assert_eq!(s.power_loss(|_| true), s.live());
        assert_eq!(s.flushes(), 2);
    }

    #[test]
    fn a_range_sync_is_a_flush_for_the_plan() {
        let s = FaultStorage::new(vec![0; 4], FaultPlan::CrashAtFlush(0));
        s.write_at(&[1], 0).unwrap();
        assert!(s.sync_ranges(std::slice::from_ref(&(0..1))).is_err());
        assert!(s.has_crashed());
        assert_eq!(s.durable(), vec![0; 4]);
    }

    #[test]
    fn power_loss_applies_any_subset_of_unflushed_mutations_in_order() {
        let s = FaultStorage::new(vec![0; 4], FaultPlan::CrashAtFlush(1));
        s.write_at(&[9, 9], 0).unwrap();
        s.flush().unwrap();
        s.write_at(&[1], 2).unwrap();
        s.punch_hole(0, 1).unwrap();
        s.set_len(6).unwrap();
        assert!(s.flush().is_err(), "flush 1 is the crash point");
        assert!(s.has_crashed());
        assert!(s.write_at(&[5], 3).is_err());
        assert_eq!(s.unflushed().len(), 3);
        assert_eq!(s.power_loss(|i| i == 1), vec![0, 9, 0, 0]);
        assert_eq!(s.power_loss(|i| i != 1), vec![9, 9, 1, 0, 0, 0]);
    }
}
