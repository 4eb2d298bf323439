//! A host file as storage: `pread`/`pwrite`, `fallocate`, `fdatasync`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use rustix::fs::FallocateFlags;

use super::{Storage, write_zeroes_by_writing};

/// A regular file accessed with positioned I/O (never seek + read: that races between threads).
#[derive(Debug)]
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    /// Opens an existing file, read-only or read-write, and takes QEMU-compatible locks (see
    /// [`super::lock`]): fails with `WouldBlock` if another user of the file conflicts.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        super::lock::lock(&file, writable)?;
        Ok(Self { file })
    }

    /// Opens an existing file read-only without taking or honouring locks (qemu-img's
    /// `--force-share`): for inspecting an image somebody is using; reads may be inconsistent.
    pub fn open_unlocked(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).open(path)?;
        Ok(Self { file })
    }

    /// Creates a new file, locked for writing; fails if it exists (never clobber somebody's
    /// image).
    pub fn create_new(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        super::lock::lock(&file, true)?;
        Ok(Self { file })
    }

    /// Wraps an already opened file.
    pub fn from_file(file: File) -> Self {
        Self { file }
    }

    fn fallocate_or(
        &self,
        flags: FallocateFlags,
        offset: u64,
        len: u64,
        fallback: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match rustix::fs::fallocate(&self.file, flags, offset, len) {
            Ok(()) => Ok(()),
            Err(e)
                if e == rustix::io::Errno::OPNOTSUPP
                    || e == rustix::io::Errno::NOSYS
                    || e == rustix::io::Errno::INVAL =>
            {
                fallback()
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::other("range overflow"))?;
        // ZERO_RANGE would extend the file; only use it inside the current length.
        let file_len = self.len()?;
        let inside = end.min(file_len).saturating_sub(offset);
        self.fallocate_or(
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            offset,
            inside,
            || write_zeroes_by_writing(self, offset, inside),
        )?;
        if end > file_len {
            let start = offset.max(file_len);
            write_zeroes_by_writing(self, start, end - start)?;
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let file_len = self.len()?;
        let len = len.min(file_len.saturating_sub(offset));
        self.fallocate_or(
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
            || write_zeroes_by_writing(self, offset, len),
        )
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.file.metadata()?.blocks() * 512))
    }
}
