//! Allocation map of a whole chain, in the shape of `qemu-img map --output=json`.

use serde::Serialize;

use crate::error::Result;
use crate::image::{Backing, Image, LayerStatus};

/// One extent of the map (field names and meaning as `qemu-img map --output=json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapExtent {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer that provides the data (0 = this image); for unallocated ranges, the deepest
    /// layer consulted.
    pub depth: usize,
    /// Some layer allocates the range (data or zeros).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the layer's file, where the data has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// Status through the chain of the run at `off`: (length, depth, status).
fn chain_status(
    img: &Image,
    off: u64,
    len: u64,
    depth: usize,
) -> Result<(u64, usize, LayerStatus)> {
    let (n, status) = img.layer_status(off, len)?;
    if status != LayerStatus::Unallocated {
        return Ok((n, depth, status));
    }
    img.with_backing(|b| match b {
        None => Ok((n, depth, status)),
        // Past the end of a shorter backing file: not present, reported at this layer's depth
        // (as qemu-img map does).
        Some(b) if off >= b.size() => Ok((n.min(len), depth, LayerStatus::Unallocated)),
        Some(raw @ Backing::Raw(_)) => {
            let n = n.min(len).min(raw.size() - off);
            Ok((n, depth + 1, LayerStatus::Data { host: off }))
        }
        Some(Backing::Qcow2(inner)) => {
            let limit = n.min(inner.size() - off);
            chain_status(inner, off, limit, depth + 1)
        }
    })
}

/// Maps the whole image through its chain, merging adjacent extents like qemu-img.
pub fn map(img: &Image) -> Result<Vec<MapExtent>> {
    map_range(img, 0, img.size())
}

/// Maps `[start, start + len)` through the chain (what NBD block status asks for); the
/// caller keeps the range inside the image.
pub fn map_range(img: &Image, start: u64, len: u64) -> Result<Vec<MapExtent>> {
    let end = start + len;
    let mut out: Vec<MapExtent> = Vec::new();
    let mut off = start;
    while off < end {
        let (n, depth, status) = chain_status(img, off, end - off, 0)?;
        let n = n.min(end - off);
        let (present, zero, data, compressed, offset) = match status {
            LayerStatus::Unallocated => (false, true, false, false, None),
            LayerStatus::Zero { host } => (true, true, false, false, host),
            LayerStatus::Data { host } => (true, false, true, false, Some(host)),
            LayerStatus::Compressed => (true, false, true, true, None),
        };
        let ext = MapExtent {
            start: off,
            length: n,
            depth,
            present,
            zero,
            data,
            compressed,
            offset,
        };
        match out.last_mut() {
            Some(last) if mergeable(last, &ext) => last.length += n,
            _ => out.push(ext),
        }
        off += n;
    }
    Ok(out)
}

fn mergeable(a: &MapExtent, b: &MapExtent) -> bool {
    a.depth == b.depth
        && a.present == b.present
        && a.zero == b.zero
        && a.data == b.data
        && a.compressed == b.compressed
        && match (a.offset, b.offset) {
            (None, None) => true,
            (Some(x), Some(y)) => x + a.length == y,
            _ => false,
        }
}
