//! Group commit: threads that each need "everything I wrote is durable" share one `fdatasync`,
//! and threads that each need "these ranges are durable" share one range sync.
//!
//! A caller needs a sync that *starts* after its writes completed. If one is already running it
//! may have started too early, so the caller waits for the next one; every thread waiting at
//! that point is covered by that same next sync. At queue depth 32 that turns 32 syncs into
//! about two.
//!
//! A failed sync poisons the barrier: after an `fdatasync` error the kernel may already have
//! dropped the dirty pages it could not write, and a later sync that succeeds would claim
//! durability for data that is gone (QEMU refuses further flushes for the same reason). Every
//! later sync fails; reopening the image (which repairs it) is the way back.

use crate::sync::Recover;
use std::io;
use std::ops::Range;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::storage::Storage;

#[derive(Debug, Default)]
struct Progress {
    /// Syncs started so far.
    started: u64,
    /// The latest sync known to have completed successfully (a generation number).
    completed: u64,
    running: bool,
    poisoned: Option<String>,
    /// What the next sync must cover: everything (a caller of [`Barrier::sync`] is waiting),
    /// or the ranges of the [`Barrier::sync_ranges`] callers waiting for it.
    whole: bool,
    ranges: Vec<Range<u64>>,
}

/// Sorted ranges with overlapping and touching ones merged: one range sync each.
fn coalesce(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Barrier {
    progress: Mutex<Progress>,
    finished: Condvar,
}

fn check_poison(p: &Progress) -> io::Result<()> {
    match &p.poisoned {
        Some(why) => Err(io::Error::other(format!(
            "an earlier flush failed ({why}); written data may be lost, reopen the image"
        ))),
        None => Ok(()),
    }
}

impl Barrier {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().recover()
    }

    /// Returns once a sync that started after this call has completed.
    pub fn sync(&self, storage: &dyn Storage) -> io::Result<()> {
        self.wait_for(storage, None)
    }

    /// Returns once `ranges` are durable ([`Storage::sync_ranges`]). Callers group-commit
    /// like [`Barrier::sync`]: one sync covers the ranges of every caller waiting when it
    /// starts (a whole-file sync, if one of them asked for that). A failure poisons the
    /// barrier like a failed sync: the kernel hands a writeback error of any part of the
    /// file to whichever sync comes next, range or not.
    pub fn sync_ranges(&self, storage: &dyn Storage, ranges: &[Range<u64>]) -> io::Result<()> {
        self.wait_for(storage, Some(ranges))
    }

    fn wait_for(&self, storage: &dyn Storage, ranges: Option<&[Range<u64>]>) -> io::Result<()> {
        let mut p = self.lock();
        check_poison(&p)?;
        // Registered for the next sync to start: it takes what is pending when it starts.
        match ranges {
            None => p.whole = true,
            Some(r) => p.ranges.extend_from_slice(r),
        }
        let need = p.started + 1;
        loop {
            check_poison(&p)?;
            if p.completed >= need {
                return Ok(());
            }
            if p.running {
                p = self.finished.wait(p).recover();
                continue;
            }
            p.running = true;
            p.started += 1;
            let generation = p.started;
            let whole = std::mem::take(&mut p.whole);
            let ranges = coalesce(std::mem::take(&mut p.ranges));
            drop(p);
            let result = if whole {
                storage.flush()
            } else {
                storage.sync_ranges(&ranges)
            };
            p = self.lock();
            p.running = false;
            match &result {
                Ok(()) => p.completed = generation,
                Err(e) => p.poisoned = Some(e.to_string()),
            }
            self.finished.notify_all();
            result?;
        }
    }

    /// Syncs started so far (for tests and statistics).
    #[cfg(test)]
    pub fn started(&self) -> u64 {
        self.lock().started
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::storage::{FaultPlan, FaultStorage, MemoryStorage};

    /// Storage whose flush is slow and counted, to make callers pile up.
    #[derive(Debug, Default)]
    struct SlowFlush {
        inner: MemoryStorage,
        flushes: AtomicU64,
        range_syncs: Mutex<Vec<Vec<Range<u64>>>>,
    }

    impl Storage for SlowFlush {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
            self.inner.write_zeroes(offset, len)
        }
        fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
            self.inner.punch_hole(offset, len)
        }
        fn flush(&self) -> io::Result<()> {
            std::thread::sleep(Duration::from_millis(20));
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn sync_ranges(&self, ranges: &[Range<u64>]) -> io::Result<()> {
            std::thread::sleep(Duration::from_millis(20));
            self.range_syncs.lock().unwrap().push(ranges.to_vec());
            Ok(())
        }
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)
        }
    }

    #[test]
    fn concurrent_callers_share_syncs() {
        let storage = Arc::new(SlowFlush::default());
        let barrier = Arc::new(Barrier::default());
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (s, b) = (storage.clone(), barrier.clone());
                std::thread::spawn(move || b.sync(&*s).unwrap())
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = storage.flushes.load(Ordering::SeqCst);
        assert!(n >= 1, "at least one sync ran");
        assert!(n <= 8, "16 callers needed {n} syncs: they did not share");
        assert_eq!(barrier.started(), n);
    }

    /// 16 callers at once, caller `whole` (if any) asking for a whole-file sync, the others
    /// for overlapping ranges (`i * 100..i * 100 + 150`).
    fn pile_up(whole: Option<u64>) -> (Arc<SlowFlush>, Arc<Barrier>) {
        let storage = Arc::new(SlowFlush::default());
        let barrier = Arc::new(Barrier::default());
        let threads: Vec<_> = (0..16u64)
            .map(|i| {
                let (s, b) = (storage.clone(), barrier.clone());
                std::thread::spawn(move || {
                    if Some(i) == whole {
                        b.sync(&*s).unwrap();
                    } else {
                        b.sync_ranges(&*s, std::slice::from_ref(&(i * 100..i * 100 + 150)))
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        (storage, barrier)
    }

    #[test]
    fn range_syncs_are_shared_merged_and_cover_every_caller() {
        let (storage, barrier) = pile_up(None);
        let syncs = storage.range_syncs.lock().unwrap().clone();
        assert_eq!(storage.flushes.load(Ordering::SeqCst), 0);
        assert!(syncs.len() <= 8, "16 callers needed {} syncs", syncs.len());
        assert_eq!(barrier.started(), syncs.len() as u64);
        for ranges in &syncs {
            assert!(
                ranges.windows(2).all(|w| w[0].end < w[1].start),
                "{ranges:?}"
            );
        }
        for i in 0..16 {
            let want = i * 100..i * 100 + 150;
            assert!(
                syncs
                    .iter()
                    .flatten()
                    .any(|r| r.start <= want.start && want.end <= r.end),
                "caller {i} was never synced: {syncs:?}"
            );
        }
    }

    #[test]
    fn a_whole_file_caller_among_range_callers_gets_a_whole_file_sync() {
        let (storage, barrier) = pile_up(Some(7));
        let flushes = storage.flushes.load(Ordering::SeqCst);
        let syncs = storage.range_syncs.lock().unwrap().len() as u64;
        assert_eq!(flushes, 1);
        assert!(
            flushes + syncs <= 8,
            "16 callers needed {} syncs",
            flushes + syncs
        );
        assert_eq!(barrier.started(), flushes + syncs);
    }

    #[test]
    fn a_sync_started_earlier_does_not_count() {
        // Sequential callers each get their own sync: no caller is covered by an older one.
        let storage = SlowFlush::default();
        let barrier = Barrier::default();
        for _ in 0..3 {
            barrier.sync(&storage).unwrap();
        }
        assert_eq!(storage.flushes.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_failed_sync_poisons_every_later_one() {
        let storage = FaultStorage::new(vec![0; 4096], FaultPlan::FailFlush);
        let barrier = Barrier::default();
        assert!(barrier.sync(&storage).is_err());
        storage.set_plan(FaultPlan::None);
        let err = barrier.sync(&storage).unwrap_err();
        assert!(err.to_string().contains("earlier flush failed"), "{err}");
    }
}
