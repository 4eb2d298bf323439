//! Allocation status of one layer (what `qemu-img map` composes across a chain).

use super::State;
use crate::error::Result;
use crate::format::entries::{L1Entry, Mapping, SubclusterBitmap, SubclusterState};
use crate::types::GuestOffset;

/// What one layer says about a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerStatus {
    /// Not here: look below.
    Unallocated,
    /// Reads as zeros; `host` when a host cluster stays reserved.
    Zero {
        /// Host offset of the reserved bytes.
        host: Option<u64>,
    },
    /// Data at this host offset.
    Data {
        /// Host offset of the first byte.
        host: u64,
    },
    /// Compressed data.
    Compressed,
}

impl LayerStatus {
    /// The same status `n` bytes further on (host offsets advance with the guest offset).
    pub fn advance(self, n: u64) -> LayerStatus {
        match self {
            LayerStatus::Data { host } => LayerStatus::Data { host: host + n },
            LayerStatus::Zero { host: Some(h) } => LayerStatus::Zero { host: Some(h + n) },
            other => other,
        }
    }
}

impl State {
    /// Status of the run starting at `off` (at most `len` bytes, never crossing a cluster
    /// boundary except across unmapped L2 ranges, which are reported whole).
    pub(crate) fn layer_status(
        &mut self,
        off: GuestOffset,
        len: u64,
    ) -> Result<(u64, LayerStatus)> {
        let geo = self.meta.geo;
        let cs = geo.cluster_size();
        let in_cluster = geo.offset_in_cluster(off.0);
        let l1 = self.meta.l1[geo.l1_index(off) as usize];
        if L1Entry(l1).l2_offset(&geo)?.is_none() {
            let to_boundary = geo.l2_coverage() - off.0 % geo.l2_coverage();
            return Ok((to_boundary.min(len), LayerStatus::Unallocated));
        }
        let slot = self.slot(off)?;
        let in_cluster_len = (cs - in_cluster).min(len);
        let cluster_status = match slot.mapping(self)? {
            Mapping::Unallocated if !geo.extended_l2 => LayerStatus::Unallocated,
            Mapping::Zero { prealloc } => LayerStatus::Zero {
                host: prealloc.map(|h| h.0 + in_cluster),
            },
            Mapping::Compressed { .. } => LayerStatus::Compressed,
            Mapping::Data { host, .. } if !geo.extended_l2 => LayerStatus::Data {
                host: host.0 + in_cluster,
            },
            mapping => {
                let host = match mapping {
                    Mapping::Data { host, .. } => Some(host.0),
                    _ => None,
                };
                let sc = geo.subcluster_size();
                let bitmap = SubclusterBitmap(slot.bitmap);
                let first = in_cluster / sc;
                let state = bitmap.state(first, host.is_some())?;
                let mut end = (first + 1) * sc;
                while end < in_cluster + in_cluster_len
                    && bitmap.state(end / sc, host.is_some())? == state
                {
                    end += sc;
                }
                let n = (end - in_cluster).min(in_cluster_len);
                let status = match (state, host) {
                    (SubclusterState::Data, Some(h)) => LayerStatus::Data {
                        host: h + in_cluster,
                    },
                    (SubclusterState::Zero, _) => LayerStatus::Zero { host: None },
                    _ => LayerStatus::Unallocated,
                };
                return Ok((n, status));
            }
        };
        Ok((in_cluster_len, cluster_status))
    }
}
