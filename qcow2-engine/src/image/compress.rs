//! Writing compressed clusters (`qcow2util dd -c`, QEMU's `convert -c`): whole guest
//! clusters, deflated (zlib's raw deflate with QEMU's 4 KiB window) or zstd-compressed as
//! the header's compression type says, packed one after another into host clusters.
//!
//! A host cluster holding several compressed streams is referenced once by each: its
//! refcount is the number of streams in it, so releasing each stream (a rewrite, a discard)
//! frees it with the last. A batch is planned under one hold of the state lock; its host
//! clusters come from the reserve (refcount 1, the first stream) and each further stream
//! adds a reference. The streams and those refcount changes are synced before the L2
//! entries are written, like copied bytes: a power loss cannot leave an entry pointing at
//! bytes or counts that are not there.

use super::Image;
use crate::error::{Error, IoContext, Result};
use crate::format::CompressionType;
use crate::format::entries::{L2Entry, Mapping};
use crate::types::{GuestOffset, HostOffset};

/// One guest cluster's compressed stream, placed.
struct Packed {
    slot_at: HostOffset,
    old: (u64, u64),
    host: HostOffset,
    stream: Vec<u8>,
}

/// Compresses one cluster as QEMU does for `kind`; `None` when that saves nothing.
fn compress(kind: CompressionType, cluster: &[u8]) -> Result<Option<Vec<u8>>> {
    let out = match kind {
        CompressionType::Zlib => {
            // Raw deflate, 4 KiB window: QEMU inflates with windowBits -12.
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(cluster.len());
            c.compress_vec(cluster, &mut out, flate2::FlushCompress::Finish)
                .map_err(|e| Error::arg(format!("deflating a cluster: {e}")))?;
            if c.total_in() as usize != cluster.len() {
                return Ok(None); // the output did not fit in a cluster: not worth it
            }
            out
        }
        CompressionType::Zstd => {
            ruzstd::encoding::compress_to_vec(cluster, ruzstd::encoding::CompressionLevel::Fastest)
        }
    };
    Ok((out.len() < cluster.len()).then_some(out))
}

impl Image {
    /// Writes whole clusters at `off` (cluster-aligned) compressed. A cluster that does not
    /// compress, or that this layer has allocated already, is written as usual. Not for
    /// encrypted images.
    pub fn write_compressed(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, buf.len() as u64)?;
        let cs = self.geo.cluster_size();
        if !off.is_multiple_of(cs) || !(buf.len() as u64).is_multiple_of(cs) {
            return Err(Error::arg("compressed writes are whole, aligned clusters"));
        }
        if self.crypto.is_some() {
            return Err(Error::unsupported(
                "compressed clusters in an encrypted image",
            ));
        }
        if self.lock().meta.header.has_data_file() {
            return Err(Error::unsupported(
                "compressed clusters in an image with an external data file",
            ));
        }
        let kind = self.lock().meta.header.compression_type;
        let mut streams = Vec::new();
        let mut plain = Vec::new();
        for (i, chunk) in buf.chunks(cs as usize).enumerate() {
            let at = off + i as u64 * cs;
            match compress(kind, chunk)? {
                Some(s) => streams.push((at, s)),
                None => plain.push((at, chunk)),
            }
        }
        {
            let _io = self.io_shared();
            let allocated = self.write_streams(streams)?;
            for at in allocated {
                let i = ((at - off) / cs) as usize;
                plain.push((at, &buf[i * cs as usize..(i + 1) * cs as usize]));
            }
            for (at, chunk) in plain {
                self.write_inner(chunk, GuestOffset(at))?;
            }
        }
        self.release_if_due()
    }

    /// Places, writes, syncs and links compressed streams. Returns the guest offsets whose
    /// clusters this layer had allocated already (to be written as usual).
    fn write_streams(&self, streams: Vec<(u64, Vec<u8>)>) -> Result<Vec<u64>> {
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        // Mark every cluster busy (waiting for requests changing them), then find the
        // entries: only unallocated ones (or zero ones without a host cluster) take a stream.
        let mut st = self.lock();
        let marked: Vec<u64> = streams.iter().map(|(at, _)| at >> cb).collect();
        for &c in &marked {
            st = self.wait_idle(st, c);
            st.busy.insert(c);
        }
        let mut skipped = Vec::new();
        let mut targets = Vec::new();
        let found = streams.into_iter().try_for_each(|(at, stream)| {
            let slot = st.slot_for_write(GuestOffset(at))?;
            let slot_at = slot.at.expect("slot_for_write gives a table");
            match slot.mapping(&mut st)? {
                Mapping::Unallocated | Mapping::Zero { prealloc: None } => {
                    targets.push((slot_at, (slot.word, slot.bitmap), stream));
                }
                _ => skipped.push(at),
            }
            Ok::<_, Error>(())
        });
        // Place the streams, recording the refcount changes to sync.
        let mut packed: Vec<Packed> = Vec::new();
        let placed = found.and_then(|()| {
            st.meta.recording(|m| {
                let mut cursor: Option<u64> = None;
                for (slot_at, old, stream) in targets {
                    let n = stream.len() as u64;
                    let shared = match cursor {
                        Some(c) if c % cs != 0 && c % cs + n <= cs => {
                            m.add_reference(c >> cb)?.then_some(c)
                        }
                        _ => None,
                    };
                    let host = match shared {
                        Some(h) => h,
                        None => m.alloc_cluster()?.0,
                    };
                    if let Err(e) = m.check_data_write(HostOffset(host), n) {
                        if shared.is_none() {
                            m.free_range(HostOffset(host), 1);
                        }
                        return Err(e);
                    }
                    cursor = Some(host + n);
                    packed.push(Packed {
                        slot_at,
                        old,
                        host: HostOffset(host),
                        stream,
                    });
                }
                Ok(())
            })
        });
        let done = |mut st: std::sync::MutexGuard<'_, super::State>, unlink: bool| {
            for p in &packed {
                if unlink {
                    st.release(self.stream_mapping(p));
                }
            }
            // Every cluster marked, whether it was placed, skipped or never reached.
            for c in &marked {
                st.busy.remove(c);
            }
            self.wake(&st);
            self.note_pending(&st);
        };
        let changed = match placed {
            Ok(((), changed)) => changed,
            Err(e) => {
                done(st, true);
                return Err(e);
            }
        };
        drop(st);

        // The streams, then one range sync of them and of the refcounts changed.
        let synced = packed
            .iter()
            .try_for_each(|p| {
                self.storage
                    .write_data(&p.stream, p.host.0)
                    .ctx(|| format!("writing a compressed cluster at {}", p.host))
            })
            .and_then(|()| {
                let mut ranges = changed;
                ranges.extend(
                    packed
                        .iter()
                        .map(|p| p.host.0..p.host.0 + p.stream.len() as u64),
                );
                self.barrier
                    .sync_ranges(&*self.storage, &ranges)
                    .ctx(|| "syncing compressed clusters".to_string())
            });
        let st = self.lock();
        if let Err(e) = synced {
            done(st, true);
            return Err(e);
        }
        let mut st = st;
        let updates: Vec<_> = packed
            .iter()
            .map(|p| {
                let word = L2Entry::compressed_at(p.host, p.stream.len() as u64, &self.geo).0;
                (p.slot_at, p.old, (word, 0))
            })
            .collect();
        let mut tickets = Vec::new();
        let linked = st.set_slots(&updates, &mut tickets);
        let (mut st, written_back) = self.write_back_locked(st, &tickets);
        if linked.is_err() || written_back.is_err() {
            // An entry still as it was on storage gives its stream's references back.
            for p in &packed {
                if st.slot_on_storage(p.slot_at).ok() == Some(p.old) {
                    st.release(self.stream_mapping(p));
                }
            }
        }
        done(st, false);
        linked.and(written_back)?;
        Ok(skipped)
    }

    /// The mapping a placed stream's entry describes (to release it).
    fn stream_mapping(&self, p: &Packed) -> Mapping {
        let word = L2Entry::compressed_at(p.host, p.stream.len() as u64, &self.geo);
        let (host, sectors) = word.compressed(&self.geo).expect("a compressed entry");
        Mapping::Compressed { host, sectors }
    }
}
