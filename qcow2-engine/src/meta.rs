//! The metadata state of an open image and the single place every metadata write goes through.
//!
//! [`Meta`] holds the header, the L1 table (always in memory: at most 32 MiB by validation, 64 KiB
//! for 4 TiB), the refcount table and the two slice caches. [`Meta::write_meta`] is the only
//! path by which metadata reaches storage, so the overlap check of a later order guards all of it.

use std::sync::Arc;

use crate::cache::SliceCache;
use crate::error::{Error, IoContext, Result};
use crate::format::Header;
use crate::storage::Storage;
use crate::types::{Geometry, HostOffset};

/// What a metadata write is, for error messages and (later) overlap checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaKind {
    Header,
    L1,
    L2,
    RefTable,
    RefBlock,
}

impl MetaKind {
    fn name(self) -> &'static str {
        match self {
            MetaKind::Header => "header",
            MetaKind::L1 => "L1 table",
            MetaKind::L2 => "L2 table",
            MetaKind::RefTable => "refcount table",
            MetaKind::RefBlock => "refcount block",
        }
    }
}

/// Metadata of an open image. See the module docs.
#[derive(Debug)]
pub(crate) struct Meta {
    pub storage: Arc<dyn Storage>,
    pub header: Header,
    pub geo: Geometry,
    pub l1: Vec<u64>,
    pub l2_cache: SliceCache,
    pub rc_cache: SliceCache,
    pub reftable: Vec<u64>,
    /// No cluster below this index is free.
    pub free_hint: u64,
    /// One past the last cluster that may be in use (file length rounded up, or more).
    pub end_cluster: u64,
}

impl Meta {
    /// Writes metadata bytes to storage. Every metadata write of the engine comes here.
    pub fn write_meta(&mut self, kind: MetaKind, offset: HostOffset, bytes: &[u8]) -> Result<()> {
        if offset.0 < self.geo.cluster_size() && kind != MetaKind::Header {
            return Err(Error::corrupt(format!(
                "refusing to write {} over the image header at {offset}",
                kind.name()
            )));
        }
        self.storage
            .write_at(bytes, offset.0)
            .ctx(|| format!("writing {} at {offset}", kind.name()))
    }

    /// Writes guest data to a host cluster.
    pub fn write_data(&self, offset: HostOffset, bytes: &[u8]) -> Result<()> {
        if offset.0 < self.geo.cluster_size() {
            return Err(Error::corrupt(format!(
                "refusing to write guest data over the header at {offset}"
            )));
        }
        self.storage
            .write_at(bytes, offset.0)
            .ctx(|| format!("writing data at {offset}"))
    }

    /// Rewrites cluster 0 from `self.header`.
    pub fn write_header(&mut self) -> Result<()> {
        let bytes = self.header.to_bytes()?;
        // Only the bytes up to the end of the extension area matter, but qemu-img writes the
        // header cluster whole; so do we, in one write.
        self.write_meta(MetaKind::Header, HostOffset(0), &bytes)
    }

    /// `fdatasync` the image file.
    pub fn sync(&self) -> Result<()> {
        self.storage
            .flush()
            .ctx(|| "flushing the image file".to_string())
    }
}
