//! Storage in memory: for tests and scratch images.

use crate::sync::Recover;
use std::io;
use std::sync::RwLock;

use super::Storage;

/// A growable byte vector behind a lock.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    bytes: RwLock<Vec<u8>>,
}

impl MemoryStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            bytes: RwLock::new(bytes),
        }
    }

    /// A copy of the current contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.read().recover().clone()
    }

    fn range(offset: u64, len: usize) -> io::Result<(usize, usize)> {
        let start = usize::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
        let end = start
            .checked_add(len)
            .ok_or_else(|| io::Error::other("range overflow"))?;
        Ok((start, end))
    }
}

impl Storage for MemoryStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.read().recover();
        let (start, end) = Self::range(offset, buf.len())?;
        let avail = end.min(bytes.len()).saturating_sub(start);
        if avail > 0 {
            buf[..avail].copy_from_slice(&bytes[start..start + avail]);
        }
        buf[avail..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write().recover();
        let (start, end) = Self::range(offset, buf.len())?;
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write().recover();
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        let (start, end) = Self::range(offset, len)?;
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].fill(0);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write().recover();
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        let (start, end) = Self::range(offset, len)?;
        let end = end.min(bytes.len());
        if start < end {
            bytes[start..end].fill(0);
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().recover().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        self.bytes.write().recover().resize(len, 0);
        Ok(())
    }
}
