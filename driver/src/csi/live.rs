//! A staged volume's head layer as a block device whose image can be swapped while it is
//! served: CreateSnapshot of a staged volume freezes the head and pivots the export onto a
//! new head on top of it, and the block device above never sees an error.
//!
//! Every request holds a read guard for its duration; [`LiveImage::pivot`] takes the write
//! guard, so it waits for the requests in flight (the quiesce), and new ones wait for it.
//! The old head is flushed and closed before the new one opens it as its backing file (its
//! write lock must be gone first).
//!
//! **A full host filesystem pauses writes** (QEMU's `werror=enospc`): a write, zeroing,
//! trim or flush that meets `ENOSPC` (or `EDQUOT`) is held, not failed, and tried again every
//! [`RETRY`] until space returns; the guest sees a slow write, not an I/O error that would
//! turn its filesystem read-only. The engine leaves the image consistent after each failed
//! attempt (`tests/full_disk.rs`). While any write waits, the volume condition says so.
//! Held writes fail after all (with `ENOSPC`) when the volume is unstaged or handed over to a
//! new plugin process, whose requests must all be answered first.

use qcow2_engine::sync::Recover;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use qcow2_engine::{Image, OpenOptions};

use crate::error::{Error, Result};
use crate::metrics::plugin::{PluginMetrics, Reason};
use crate::nbd::device::{BlockDevice, DeviceError, DeviceResult, Extent};
use crate::nbd::proto::errno;

/// How often a write held by a full disk is tried again.
pub const RETRY: Duration = Duration::from_secs(1);

/// The head layer a staged volume serves.
#[derive(Debug)]
pub struct LiveImage {
    current: RwLock<Option<Image>>,
    /// The image's size, readable without the lock (the server checks ranges with it).
    size: AtomicU64,
    writable: bool,
    /// The volume, for the log.
    name: String,
    full: FullDisk,
    /// Where full-disk pauses are counted and the volume's condition tracked.
    metrics: Option<Arc<PluginMetrics>>,
}

/// Writes held by a full host filesystem (see the module docs).
#[derive(Debug, Default)]
struct FullDisk {
    state: Mutex<Held>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Held {
    /// Requests waiting for space now.
    waiting: usize,
    /// Since when some request has waited, and the error it met.
    since: Option<(Instant, String)>,
    /// Pausing has ended (unstage, handover): full-disk errors fail at once.
    ended: bool,
}

impl FullDisk {
    /// Counts a request that met `error` as held, unless pausing has ended (false: it fails
    /// now). A held request ends with [`FullDisk::release`].
    fn enter(&self, name: &str, error: &DeviceError, metrics: Option<&PluginMetrics>) -> bool {
        let mut st = self.state.lock().recover();
        if st.ended {
            return false;
        }
        st.waiting += 1;
        if st.since.is_none() {
            tracing::warn!(volume = %name, error = %error.message, "the node's filesystem is full: writes to this volume are paused until space is freed");
            st.since = Some((Instant::now(), error.message.clone()));
            if let Some(m) = metrics {
                m.full_disk_paused();
                m.condition(name, Some(Reason::Full), &error.message);
            }
        }
        true
    }

    /// Waits [`RETRY`] (true: try again) or until pausing ends (false: fail now).
    fn wait(&self) -> bool {
        let st = self.state.lock().recover();
        if st.ended {
            return false;
        }
        let (st, _) = self.changed.wait_timeout(st, RETRY).recover();
        !st.ended
    }

    /// A held request ends (`ok`: it went through).
    fn release(&self, name: &str, ok: bool, metrics: Option<&PluginMetrics>) {
        let mut st = self.state.lock().recover();
        st.waiting -= 1;
        if st.waiting == 0
            && let Some((since, _)) = st.since.take()
        {
            if let Some(m) = metrics {
                m.clear_condition(name, Reason::Full);
            }
            let paused = since.elapsed();
            if ok {
                tracing::info!(volume = %name, ?paused, "space is back: paused writes resumed");
            } else {
                tracing::warn!(volume = %name, ?paused, "paused writes failed (the volume is going away)");
            }
        }
    }
}

impl LiveImage {
    pub fn new(image: Image) -> LiveImage {
        LiveImage {
            size: AtomicU64::new(image.size()),
            writable: image.is_writable(),
            current: RwLock::new(Some(image)),
            name: String::new(),
            full: FullDisk::default(),
            metrics: None,
        }
    }

    /// Names the volume in the log.
    pub fn named(mut self, name: &str) -> LiveImage {
        self.name = name.to_string();
        self
    }

    /// Counts full-disk pauses in `metrics` and tracks the volume's condition there.
    pub fn counted(mut self, metrics: Arc<PluginMetrics>) -> LiveImage {
        self.metrics = Some(metrics);
        self
    }

    /// Runs a write-like request; one that meets a full host filesystem is held and run again
    /// until it goes through or pausing ends. The image guard is dropped while it waits, so
    /// a snapshot's pivot is not held up (the retry then goes to the new head).
    fn pausing(&self, op: impl Fn(&Image) -> DeviceResult) -> DeviceResult {
        let mut held = false;
        loop {
            let result = self.image().and_then(|g| op(g.get()));
            let full = matches!(&result, Err(e) if e.errno == errno::ENOSPC);
            if full && !held {
                let Err(e) = &result else { unreachable!() };
                held = self.full.enter(&self.name, e, self.metrics.as_deref());
            }
            if full && held && self.full.wait() {
                continue;
            }
            if held {
                self.full
                    .release(&self.name, result.is_ok(), self.metrics.as_deref());
            }
            return result;
        }
    }

    /// Writes held by a full disk now.
    pub fn paused_writes(&self) -> usize {
        self.full.state.lock().recover().waiting
    }

    /// Why writes are paused, if they are: for the volume condition.
    pub fn paused(&self) -> Option<String> {
        let st = self.full.state.lock().recover();
        st.since.as_ref().map(|(since, error)| {
            format!(
                "{} writes paused for {} s: the node's filesystem is full ({error}); they resume once space is freed",
                st.waiting,
                since.elapsed().as_secs()
            )
        })
    }

    /// Held writes fail now, and later ones fail at once on a full disk (the volume is being
    /// unstaged or handed over). [`LiveImage::reopen_at`] pauses again.
    pub fn end_pauses(&self) {
        self.full.state.lock().recover().ended = true;
        self.full.changed.notify_all();
    }

    fn image(&self) -> DeviceResult<ImageGuard<'_>> {
        let guard = self.current.read().recover();
        if guard.is_none() {
            return Err(DeviceError::new(
                errno::EIO,
                "the volume's head layer could not be reopened after a pivot",
            ));
        }
        Ok(ImageGuard(guard))
    }

    /// Grows the image (NodeExpandVolume).
    pub fn resize(&self, size: u64) -> Result<()> {
        let g = self
            .image()
            .map_err(|e| Error::Internal(e.message.clone()))?;
        g.get()
            .resize(size)
            .and_then(|()| g.get().flush())
            .map_err(|e| Error::engine("growing the image", e))?;
        self.size.store(size, Ordering::SeqCst);
        Ok(())
    }

    /// Flushes and closes the image, so that another process can open it (a handover);
    /// requests fail with EIO until [`LiveImage::reopen_at`]. Nothing may be in flight.
    pub fn close(&self) -> Result<()> {
        let mut g = self.current.write().recover();
        let Some(image) = g.take() else {
            return Ok(());
        };
        if let Err(e) = image.flush() {
            *g = Some(image);
            return Err(Error::engine("flushing before a handover", e));
        }
        image
            .close()
            .map_err(|e| Error::engine("closing before a handover", e))
    }

    /// Opens `path` again after [`LiveImage::close`] (a handover that did not happen).
    pub fn reopen_at(&self, path: &Path, opts: &OpenOptions) -> Result<()> {
        self.full.state.lock().recover().ended = false;
        let mut g = self.current.write().recover();
        if g.is_none() {
            let image = Image::open(path, opts)
                .map_err(|e| Error::engine(format!("reopening {}", path.display()), e))?;
            self.size.store(image.size(), Ordering::SeqCst);
            *g = Some(image);
        }
        Ok(())
    }

    /// Swaps the image for the one at `new_head` (whose backing file is the current image's
    /// file): waits for requests in flight, flushes and closes the current image, opens the
    /// new one with `opts`. If the new one does not open, the old one is reopened from
    /// `old_head` and the error returned; the volume goes on as before.
    pub fn pivot(&self, old_head: &Path, new_head: &Path, opts: &OpenOptions) -> Result<()> {
        self.reopen(old_head, new_head, opts, || Ok(()))
    }

    /// Closes the image (after the requests in flight and a flush), runs `between` while
    /// nothing has the head open, and opens `next` (or, if `between` or that fails,
    /// `current` again, returning the error).
    pub fn reopen(
        &self,
        current: &Path,
        next: &Path,
        opts: &OpenOptions,
        between: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        self.quiesce().reopen(current, next, opts, between)
    }

    /// Waits for the requests in flight and holds every new one until the [`Quiesced`] is
    /// dropped: a group snapshot quiesces all its members before it pivots any.
    pub fn quiesce(&self) -> Quiesced<'_> {
        Quiesced {
            live: self,
            image: self.current.write().recover(),
        }
    }
}

/// A [`LiveImage`] with no request running and new ones held ([`LiveImage::quiesce`]).
#[derive(Debug)]
pub struct Quiesced<'a> {
    live: &'a LiveImage,
    image: RwLockWriteGuard<'a, Option<Image>>,
}

impl Quiesced<'_> {
    /// [`LiveImage::pivot`], quiesced already.
    pub fn pivot(&mut self, old_head: &Path, new_head: &Path, opts: &OpenOptions) -> Result<()> {
        self.reopen(old_head, new_head, opts, || Ok(()))
    }

    /// [`LiveImage::reopen`], quiesced already.
    pub fn reopen(
        &mut self,
        current: &Path,
        next: &Path,
        opts: &OpenOptions,
        between: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let g = &mut self.image;
        let old = g
            .take()
            .ok_or_else(|| Error::Internal("the volume has no open head layer".into()))?;
        if let Err(e) = old.flush() {
            **g = Some(old);
            return Err(Error::engine("flushing before a reopen", e));
        }
        if let Err(e) = old.close() {
            // Closing failed after a good flush: the data is safe; go on.
            tracing::warn!(error = %e, "closing the head at a reopen");
        }
        let opened = between().and_then(|()| {
            Image::open(next, opts)
                .map_err(|e| Error::engine(format!("opening {}", next.display()), e))
        });
        match opened {
            Ok(new) => {
                self.live.size.store(new.size(), Ordering::SeqCst);
                **g = Some(new);
                Ok(())
            }
            Err(e) => {
                let reopened = Image::open(current, opts);
                let back = reopened.is_ok();
                **g = reopened.ok();
                if back {
                    return Err(e);
                }
                Err(Error::Internal(format!(
                    "{e}; the old head did not reopen either: the volume fails I/O"
                )))
            }
        }
    }
}

struct ImageGuard<'a>(RwLockReadGuard<'a, Option<Image>>);

impl ImageGuard<'_> {
    fn get(&self) -> &Image {
        self.0.as_ref().expect("checked when taken")
    }
}

impl BlockDevice for LiveImage {
    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }
    fn read_only(&self) -> bool {
        !self.writable
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DeviceResult {
        BlockDevice::read_at(self.image()?.get(), buf, offset)
    }
    fn read_batch(&self, reads: &mut [(&mut [u8], u64)]) -> Vec<DeviceResult> {
        match self.image() {
            Ok(g) => BlockDevice::read_batch(g.get(), reads),
            Err(e) => reads.iter().map(|_| Err(e.clone())).collect(),
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DeviceResult {
        super::failpoint("volume-write"); // a slow storage request, in tests
        self.pausing(|img| BlockDevice::write_at(img, buf, offset))
    }
    fn flush(&self) -> DeviceResult {
        self.pausing(BlockDevice::flush)
    }
    fn trim(&self, offset: u64, len: u64) -> DeviceResult {
        self.pausing(|img| img.trim(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> DeviceResult {
        self.pausing(|img| BlockDevice::write_zeroes(img, offset, len, no_hole))
    }
    fn zeroes_are_fast(&self, offset: u64, len: u64) -> bool {
        self.image()
            .is_ok_and(|g| g.get().zeroes_are_fast(offset, len))
    }
    fn block_status(&self, offset: u64, len: u64, most: usize) -> DeviceResult<Vec<Extent>> {
        self.image()?.get().block_status(offset, len, most)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2_engine::{BackingFormat, BackingPolicy, CreateOptions, create};
    use std::sync::Arc;

    #[test]
    fn a_pivot_keeps_every_write_and_freezes_the_old_head() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
        create(
            &a,
            &CreateOptions {
                size: Some(4 << 20),
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let opts = OpenOptions {
            writable: true,
            backing: BackingPolicy::ConfineTo(dir.path().to_path_buf()),
            ..OpenOptions::default()
        };
        let live = Arc::new(LiveImage::new(Image::open(&a, &opts).unwrap()));
        // Writers run through the pivot.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..4u8)
            .map(|w| {
                let (live, stop) = (live.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let off = (u64::from(w) * 256 + n % 256) * 4096;
                        live.write_at(&[w + 1; 4096], off).unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(50));
        create(
            &b,
            &CreateOptions {
                size: Some(4 << 20),
                backing: Some(("a.qcow2".into(), BackingFormat::Qcow2)),
                ..CreateOptions::default()
            },
        )
        .unwrap();
        live.pivot(&a, &b, &opts).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        stop.store(true, Ordering::SeqCst);
        let counts: Vec<u64> = writers.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(counts.iter().all(|&n| n > 0));
        // Every writer's blocks read back through the new head.
        let mut buf = vec![0u8; 4096];
        for w in 0..4u8 {
            live.read_at(&mut buf, u64::from(w) * 256 * 4096).unwrap();
            assert_eq!(buf, vec![w + 1; 4096]);
        }
        // The old head is frozen: writes after the pivot went to b.
        live.write_at(&[0xee; 4096], 0).unwrap();
        live.flush().unwrap();
        let frozen = Image::open(&a, &OpenOptions::default()).unwrap();
        let mut old = vec![0u8; 4096];
        frozen.read_at(&mut old, 0).unwrap();
        assert_eq!(old, vec![1; 4096]);
        live.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![0xee; 4096]);
    }

    #[test]
    fn a_failed_pivot_reopens_the_old_head_and_the_volume_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.qcow2");
        create(
            &a,
            &CreateOptions {
                size: Some(1 << 20),
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let opts = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        let live = LiveImage::new(Image::open(&a, &opts).unwrap());
        live.write_at(&[5; 512], 0).unwrap();
        let e = live
            .pivot(&a, &dir.path().join("missing.qcow2"), &opts)
            .unwrap_err();
        assert!(e.to_string().contains("missing.qcow2"), "{e}");
        let mut buf = [0u8; 512];
        live.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [5; 512]);
        live.write_at(&[6; 512], 512).unwrap();
    }

    #[test]
    fn a_write_on_a_full_disk_waits_for_space_and_then_lands() {
        use qcow2_engine::storage::{FaultPlan, FaultStorage, MemoryStorage};
        let mem = Arc::new(MemoryStorage::new());
        let opts = CreateOptions {
            size: Some(16 << 20),
            ..CreateOptions::default()
        };
        qcow2_engine::create_on(mem.clone(), None, &opts).unwrap();
        let fault = Arc::new(FaultStorage::new(mem.to_bytes(), FaultPlan::None));
        let open = OpenOptions::writable();
        let img = Image::open_storage(fault.clone(), None, &open).unwrap();
        let live = Arc::new(LiveImage::new(img).named("vol-full"));
        assert!(live.paused().is_none());

        // Full: the write is held, and the condition says why.
        fault.set_plan(FaultPlan::FullFromMutation(fault.mutations()));
        let writer = {
            let live = live.clone();
            std::thread::spawn(move || BlockDevice::write_at(&*live, &[7u8; 65536], 1 << 20))
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !writer.is_finished(),
            "a write on a full disk failed instead of waiting"
        );
        let why = live
            .paused()
            .expect("the volume says its writes are paused");
        assert!(
            why.contains("1 writes paused") && why.contains("full"),
            "{why}"
        );

        // Space returns: the write lands within a retry.
        let freed = Instant::now();
        fault.set_plan(FaultPlan::None);
        writer.join().unwrap().unwrap();
        assert!(freed.elapsed() < RETRY + Duration::from_millis(500));
        assert!(live.paused().is_none());
        let mut back = vec![0u8; 65536];
        BlockDevice::read_at(&*live, &mut back, 1 << 20).unwrap();
        assert!(back.iter().all(|&b| b == 7));

        // Full again, and the volume goes away: the held write fails at once.
        fault.set_plan(FaultPlan::FullFromMutation(fault.mutations()));
        let writer = {
            let live = live.clone();
            std::thread::spawn(move || BlockDevice::write_at(&*live, &[8u8; 65536], 4 << 20))
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(!writer.is_finished());
        let ended = Instant::now();
        live.end_pauses();
        let e = writer.join().unwrap().unwrap_err();
        assert_eq!(e.errno, errno::ENOSPC);
        assert!(
            ended.elapsed() < Duration::from_millis(200),
            "{:?}",
            ended.elapsed()
        );
        assert!(live.paused().is_none());
        // Later ones fail at once, until the volume is opened again.
        let e = BlockDevice::write_at(&*live, &[9u8; 65536], 8 << 20).unwrap_err();
        assert_eq!(e.errno, errno::ENOSPC);
    }
}
