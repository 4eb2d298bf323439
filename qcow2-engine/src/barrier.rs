//! Group commit: threads that each need "everything I wrote is durable" share one `fdatasync`.
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
        let mut p = self.lock();
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
            drop(p);
            let result = storage.flush();
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

    /// Makes `ranges` durable ([`Storage::sync_ranges`]). Not shared with other callers: a
    /// range sync covers its own caller's ranges and nothing else. A failure poisons the
    /// barrier like a failed sync (the kernel hands a writeback error of any part of the file
    /// to whichever sync comes next, range or not).
    pub fn sync_ranges(&self, storage: &dyn Storage, ranges: &[Range<u64>]) -> io::Result<()> {
        check_poison(&self.lock())?;
        let result = storage.sync_ranges(ranges);
        if let Err(e) = &result {
            self.lock().poisoned.get_or_insert_with(|| e.to_string());
        }
        result
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
