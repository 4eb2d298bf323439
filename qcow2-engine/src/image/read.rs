//! The read path: per cluster, per subcluster run with extended L2, through the backing chain,
//! and decompression of compressed clusters (zlib and zstd).

use std::io::Read;

use super::State;
use crate::error::{Error, IoContext, Result};
use crate::format::CompressionType;
use crate::format::entries::{Mapping, SubclusterBitmap, SubclusterState};
use crate::types::{GuestOffset, HostOffset};

impl State {
    /// Reads guest bytes, one cluster at a time.
    pub(crate) fn read(&mut self, buf: &mut [u8], off: GuestOffset) -> Result<()> {
        let cs = self.meta.geo.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off.0 + done as u64;
            let n = ((cs - pos % cs) as usize).min(buf.len() - done);
            self.read_in_cluster(&mut buf[done..done + n], GuestOffset(pos))?;
            done += n;
        }
        Ok(())
    }

    /// Reads a range that lies inside one cluster.
    pub(crate) fn read_in_cluster(&mut self, buf: &mut [u8], off: GuestOffset) -> Result<()> {
        let geo = self.meta.geo;
        let slot = self.slot(off)?;
        let in_cluster = geo.offset_in_cluster(off.0);
        match slot.mapping(self)? {
            Mapping::Compressed { host, sectors } => {
                let cluster = self.decompress(slot.word, host, sectors)?;
                buf.copy_from_slice(&cluster[in_cluster as usize..in_cluster as usize + buf.len()]);
                Ok(())
            }
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Unallocated if !geo.extended_l2 => self.read_backing(buf, off),
            Mapping::Data { host, .. } if !geo.extended_l2 => {
                self.read_host(buf, HostOffset(host.0 + in_cluster))
            }
            mapping => {
                // Extended L2: walk runs of subclusters in the same state.
                let host = match mapping {
                    Mapping::Data { host, .. } => Some(host),
                    _ => None,
                };
                let sc = geo.subcluster_size();
                let bitmap = SubclusterBitmap(slot.bitmap);
                let mut done = 0usize;
                while done < buf.len() {
                    let pos = in_cluster + done as u64;
                    let index = pos / sc;
                    let state = bitmap.state(index, host.is_some())?;
                    let mut end = (index + 1) * sc;
                    while end < in_cluster + buf.len() as u64
                        && bitmap.state(end / sc, host.is_some())? == state
                    {
                        end += sc;
                    }
                    let n = ((end - pos) as usize).min(buf.len() - done);
                    let part = &mut buf[done..done + n];
                    match (state, host) {
                        (SubclusterState::Data, Some(h)) => {
                            self.read_host(part, HostOffset(h.0 + pos))?;
                        }
                        (SubclusterState::Zero, _) => part.fill(0),
                        (SubclusterState::Unallocated, _) => {
                            self.read_backing(part, GuestOffset(off.0 - in_cluster + pos))?;
                        }
                        (SubclusterState::Data, None) => {
                            unreachable!("state() refuses data without a host cluster")
                        }
                    }
                    done += n;
                }
                Ok(())
            }
        }
    }

    fn read_host(&self, buf: &mut [u8], at: HostOffset) -> Result<()> {
        self.meta
            .storage
            .read_at(buf, at.0)
            .ctx(|| format!("reading data at {at}"))
    }

    /// Reads from the backing layer, or zeros without one.
    pub(crate) fn read_backing(&self, buf: &mut [u8], off: GuestOffset) -> Result<()> {
        match &self.backing {
            Some(b) => b.read_at(buf, off.0),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Whether `[off, off + len)` (inside one cluster) is served by a backing layer that has
    /// bytes there, i.e. whether an unallocated range might read as non-zero.
    pub(crate) fn backing_covers(&self, off: GuestOffset) -> bool {
        self.backing.as_ref().is_some_and(|b| off.0 < b.size())
    }

    /// Decompresses a compressed cluster; the last one is cached (sequential readers of a
    /// compressed cluster ask for it many times).
    pub(crate) fn decompress(&mut self, key: u64, host: HostOffset, sectors: u64) -> Result<&[u8]> {
        if self.compressed.as_ref().is_none_or(|(k, _)| *k != key) {
            let cs = self.meta.geo.cluster_size() as usize;
            let len = (sectors * 512 - (host.0 & 511)) as usize;
            let mut input = vec![0u8; len];
            self.read_host(&mut input, host)?;
            let mut out = vec![0u8; cs].into_boxed_slice();
            let bad =
                |what: String| Error::corrupt(format!("compressed cluster at {host}: {what}"));
            match self.meta.header.compression_type {
                CompressionType::Zlib => {
                    let mut d = flate2::Decompress::new(false);
                    d.decompress(&input, &mut out, flate2::FlushDecompress::Finish)
                        .map_err(|e| bad(e.to_string()))?;
                    if d.total_out() as usize != cs {
                        return Err(bad(format!(
                            "inflated to {} bytes, expected {cs}",
                            d.total_out()
                        )));
                    }
                }
                CompressionType::Zstd => {
                    let mut dec = ruzstd::decoding::StreamingDecoder::new(&input[..])
                        .map_err(|e| bad(e.to_string()))?;
                    dec.read_exact(&mut out).map_err(|e| bad(e.to_string()))?;
                }
            }
            self.compressed = Some((key, out));
        }
        Ok(&self.compressed.as_ref().expect("just filled").1)
    }
}
