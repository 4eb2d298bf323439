//! A staged volume's head layer as a block device whose image can be swapped while it is
//! served: CreateSnapshot of a staged volume freezes the head and pivots the export onto a
//! new head on top of it, and the block device above never sees an error.
//!
//! Every request holds a read guard for its duration; [`LiveImage::pivot`] takes the write
//! guard, so it waits for the requests in flight (the quiesce), and new ones wait for it.
//! The old head is flushed and closed before the new one opens it as its backing file (its
//! write lock must be gone first).

use qcow2_engine::sync::Recover;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use qcow2_engine::{Image, OpenOptions};

use crate::error::{Error, Result};
use crate::nbd::device::{BlockDevice, DeviceError, DeviceResult, Extent};
use crate::nbd::proto::errno;

/// The head layer a staged volume serves.
#[derive(Debug)]
pub struct LiveImage {
    current: RwLock<Option<Image>>,
    /// The image's size, readable without the lock (the server checks ranges with it).
    size: AtomicU64,
    writable: bool,
}

impl LiveImage {
    pub fn new(image: Image) -> LiveImage {
        LiveImage {
            size: AtomicU64::new(image.size()),
            writable: image.is_writable(),
            current: RwLock::new(Some(image)),
        }
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
            .map_err(|e| Error::Internal(format!("growing the image: {e}")))?;
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
            return Err(Error::Internal(format!("flushing before a handover: {e}")));
        }
        image
            .close()
            .map_err(|e| Error::Internal(format!("closing before a handover: {e}")))
    }

    /// Opens `path` again after [`LiveImage::close`] (a handover that did not happen).
    pub fn reopen_at(&self, path: &Path, opts: &OpenOptions) -> Result<()> {
        let mut g = self.current.write().recover();
        if g.is_none() {
            let image = Image::open(path, opts)
                .map_err(|e| Error::Internal(format!("reopening {}: {e}", path.display())))?;
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
        let mut g = self.current.write().recover();
        let old = g
            .take()
            .ok_or_else(|| Error::Internal("the volume has no open head layer".into()))?;
        if let Err(e) = old.flush() {
            *g = Some(old);
            return Err(Error::Internal(format!("flushing before a reopen: {e}")));
        }
        if let Err(e) = old.close() {
            // Closing failed after a good flush: the data is safe; go on.
            tracing::warn!(error = %e, "closing the head at a reopen");
        }
        let opened = between().and_then(|()| {
            Image::open(next, opts)
                .map_err(|e| Error::Internal(format!("opening {}: {e}", next.display())))
        });
        match opened {
            Ok(new) => {
                self.size.store(new.size(), Ordering::SeqCst);
                *g = Some(new);
                Ok(())
            }
            Err(e) => {
                let reopened = Image::open(current, opts);
                let back = reopened.is_ok();
                *g = reopened.ok();
                Err(Error::Internal(format!(
                    "{e}{}",
                    if back {
                        ""
                    } else {
                        "; the old head did not reopen either: the volume fails I/O"
                    }
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
    fn write_at(&self, buf: &[u8], offset: u64) -> DeviceResult {
        super::failpoint("volume-write"); // a slow storage request, in tests
        BlockDevice::write_at(self.image()?.get(), buf, offset)
    }
    fn flush(&self) -> DeviceResult {
        BlockDevice::flush(self.image()?.get())
    }
    fn trim(&self, offset: u64, len: u64) -> DeviceResult {
        self.image()?.get().trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> DeviceResult {
        BlockDevice::write_zeroes(self.image()?.get(), offset, len, no_hole)
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
}
