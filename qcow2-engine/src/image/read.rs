//! The read path. Under the state lock a guest range becomes a list of [`Piece`]s (host bytes,
//! zeros, backing bytes, decompressed bytes); the data I/O then runs without the lock.
//! Adjacent pieces merge, so a long read of contiguous clusters is one `pread`.

use std::io::Read;

use super::{Image, State};
use crate::error::{Error, IoContext, Result};
use crate::format::CompressionType;
use crate::format::entries::{Mapping, SubclusterBitmap, SubclusterState};
use crate::storage::DataRead;
use crate::types::{GuestOffset, HostOffset};

/// Where the bytes of one part of a guest range come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Bytes of the image file.
    Host { at: u64, len: usize },
    /// Zeros.
    Zero(usize),
    /// The backing layer at this guest offset (zeros without one).
    Backing { off: u64, len: usize },
    /// Bytes already in memory (from a decompressed cluster).
    Bytes(Vec<u8>),
}

impl Piece {
    pub fn len(&self) -> usize {
        match self {
            Piece::Host { len, .. } | Piece::Zero(len) | Piece::Backing { len, .. } => *len,
            Piece::Bytes(b) => b.len(),
        }
    }
}

/// Appends a piece, merging it into the last one when they are contiguous.
pub(crate) fn push_piece(pieces: &mut Vec<Piece>, piece: Piece) {
    if piece.len() == 0 {
        return;
    }
    match (pieces.last_mut(), &piece) {
        (Some(Piece::Host { at, len }), Piece::Host { at: a, len: n })
            if *at + *len as u64 == *a =>
        {
            *len += n;
        }
        (Some(Piece::Zero(len)), Piece::Zero(n)) => *len += n,
        (Some(Piece::Backing { off, len }), Piece::Backing { off: o, len: n })
            if *off + *len as u64 == *o =>
        {
            *len += n;
        }
        _ => pieces.push(piece),
    }
}

impl State {
    /// The pieces of `len` bytes at `off` (any alignment, any number of clusters).
    pub(crate) fn plan_read(
        &mut self,
        off: GuestOffset,
        len: usize,
        out: &mut Vec<Piece>,
    ) -> Result<()> {
        let cs = self.meta.geo.cluster_size();
        let mut done = 0usize;
        while done < len {
            let pos = off.0 + done as u64;
            let n = ((cs - pos % cs) as usize).min(len - done);
            self.cluster_pieces(GuestOffset(pos), n, out)?;
            done += n;
        }
        Ok(())
    }

    /// The pieces of a range that lies inside one cluster.
    pub(crate) fn cluster_pieces(
        &mut self,
        off: GuestOffset,
        len: usize,
        out: &mut Vec<Piece>,
    ) -> Result<()> {
        let geo = self.meta.geo;
        let slot = self.slot(off)?;
        let in_cluster = geo.offset_in_cluster(off.0);
        let mapping = slot.mapping(self)?;
        match mapping {
            Mapping::Compressed { .. } if self.meta.header.crypt_method != 0 => {
                return Err(Error::unsupported(
                    "a compressed cluster in an encrypted image",
                ));
            }
            Mapping::Compressed { host, sectors } => {
                let cluster = self.decompress(slot.word, host, sectors)?;
                let at = in_cluster as usize;
                push_piece(out, Piece::Bytes(cluster[at..at + len].to_vec()));
            }
            Mapping::Zero { .. } => push_piece(out, Piece::Zero(len)),
            Mapping::Unallocated if !geo.extended_l2 => {
                push_piece(out, self.backing_piece(off.0, len));
            }
            Mapping::Data { host, .. } if !geo.extended_l2 => push_piece(
                out,
                Piece::Host {
                    at: host.0 + in_cluster,
                    len,
                },
            ),
            _ => {
                // Extended L2: runs of subclusters in the same state.
                let host = match mapping {
                    Mapping::Data { host, .. } => Some(host),
                    _ => None,
                };
                let sc = geo.subcluster_size();
                let bitmap = SubclusterBitmap(slot.bitmap);
                let end = in_cluster + len as u64;
                let mut pos = in_cluster;
                while pos < end {
                    let index = pos / sc;
                    let state = bitmap.state(index, host.is_some())?;
                    let run_end = ((index + 1) * sc).min(end);
                    let n = (run_end - pos) as usize;
                    let piece = match (state, host) {
                        (SubclusterState::Data, Some(h)) => Piece::Host {
                            at: h.0 + pos,
                            len: n,
                        },
                        (SubclusterState::Zero, _) => Piece::Zero(n),
                        (SubclusterState::Unallocated, _) => {
                            self.backing_piece(off.0 - in_cluster + pos, n)
                        }
                        (SubclusterState::Data, None) => {
                            unreachable!("state() refuses data without a host cluster")
                        }
                    };
                    push_piece(out, piece);
                    pos = run_end;
                }
            }
        }
        Ok(())
    }

    /// Unallocated bytes: the backing layer's where it has any, zeros beyond it.
    fn backing_piece(&self, off: u64, len: usize) -> Piece {
        match self.backing_size {
            Some(size) if off < size => Piece::Backing { off, len },
            _ => Piece::Zero(len),
        }
    }

    /// Whether a backing layer has bytes at `off`, i.e. whether an unallocated range there
    /// might read as non-zero.
    pub(crate) fn backing_covers(&self, off: GuestOffset) -> bool {
        self.backing_size.is_some_and(|size| off.0 < size)
    }

    /// Decompresses a compressed cluster; the last one is cached (sequential readers of a
    /// compressed cluster ask for it many times).
    pub(crate) fn decompress(&mut self, key: u64, host: HostOffset, sectors: u64) -> Result<&[u8]> {
        if self.compressed.as_ref().is_none_or(|(k, _)| *k != key) {
            let cs = self.meta.geo.cluster_size() as usize;
            let len = (sectors * 512 - (host.0 & 511)) as usize;
            let mut input = vec![0u8; len];
            self.meta
                .storage
                .read_at(&mut input, host.0)
                .ctx(|| format!("reading compressed data at {host}"))?;
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

/// Largest read planned under one lock hold: bounds the piece list and the lock hold time of
/// a huge request.
const PLAN_CHUNK: usize = 8 << 20;

impl Image {
    /// Reads guest bytes: plan under the lock, I/O without it. The caller holds the I/O gate.
    pub(crate) fn read_inner(&self, buf: &mut [u8], off: GuestOffset) -> Result<()> {
        if let Some(data) = self.raw_data_file() {
            return data
                .read_data(buf, off.0)
                .ctx(|| format!("reading the data file at {:#x}", off.0));
        }
        let mut pieces = Vec::new();
        for (i, chunk) in buf.chunks_mut(PLAN_CHUNK).enumerate() {
            let at = GuestOffset(off.0 + (i * PLAN_CHUNK) as u64);
            pieces.clear();
            self.lock().plan_read(at, chunk.len(), &mut pieces)?;
            self.fill(&pieces, chunk)?;
        }
        Ok(())
    }

    /// Fills `buf` from planned pieces (their lengths add up to `buf.len()`).
    pub(crate) fn fill(&self, pieces: &[Piece], buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        for piece in pieces {
            self.fill_piece(piece, &mut buf[done..done + piece.len()])?;
            done += piece.len();
        }
        debug_assert_eq!(done, buf.len());
        Ok(())
    }

    /// Fills `part` (as long as the piece) with one planned piece's bytes.
    fn fill_piece(&self, piece: &Piece, part: &mut [u8]) -> Result<()> {
        match piece {
            Piece::Host { at, .. } => match self.data_cipher()? {
                None => self
                    .data()?
                    .read_data(part, *at)
                    .ctx(|| format!("reading data at {at:#x}"))?,
                Some(cipher) => self.read_decrypted(cipher, part, *at)?,
            },
            Piece::Zero(_) => part.fill(0),
            Piece::Backing { off, .. } => match &self.backing {
                Some(b) => b.read_at(part, *off)?,
                None => part.fill(0),
            },
            Piece::Bytes(bytes) => part.copy_from_slice(bytes),
        }
        Ok(())
    }
}

impl Image {
    /// Reads `part` at host offset `at` of an encrypted image: the whole 512-byte sectors
    /// around it are read and decrypted (their tweaks come from their host offsets).
    fn read_decrypted(
        &self,
        cipher: &crate::crypto::Cipher,
        part: &mut [u8],
        at: u64,
    ) -> Result<()> {
        let sector = crate::crypto::luks::SECTOR;
        let start = at - at % sector;
        let end = (at + part.len() as u64).div_ceil(sector) * sector;
        let mut sectors = vec![0u8; (end - start) as usize];
        self.data()?
            .read_data(&mut sectors, start)
            .ctx(|| format!("reading encrypted data at {start:#x}"))?;
        cipher.decrypt(start, &mut sectors);
        let skip = (at - start) as usize;
        part.copy_from_slice(&sectors[skip..skip + part.len()]);
        Ok(())
    }
}

/// One guest read of a batch (see [`Image::read_batch`]).
#[derive(Debug)]
pub struct ReadRequest<'a> {
    pub offset: u64,
    pub buf: &'a mut [u8],
    /// Set by [`Image::read_batch`].
    pub result: Result<()>,
}

impl<'a> ReadRequest<'a> {
    /// A read of `buf.len()` bytes at guest offset `offset`, not yet done.
    pub fn new(buf: &'a mut [u8], offset: u64) -> Self {
        Self {
            offset,
            buf,
            result: Ok(()),
        }
    }
}

impl Image {
    /// Reads several guest ranges, setting each request's `result`: all planned under one
    /// hold of the state lock, then their bytes in the image file read together (one
    /// io_uring submission where the kernel allows it, see `storage::uring`). The same
    /// guarantees as [`Image::read_at`] for each; one thread keeps many reads in flight
    /// without a thread per read.
    pub fn read_batch(&self, reqs: &mut [ReadRequest<'_>]) {
        if self.crypto.is_some() {
            // Encrypted data is decrypted sector by sector: one read at a time.
            for r in reqs.iter_mut() {
                r.result = self.read_at(r.buf, r.offset);
            }
            return;
        }
        let data = match self.data() {
            Ok(d) => d.clone(),
            Err(_) => {
                for r in reqs.iter_mut() {
                    r.result = self.read_at(r.buf, r.offset);
                }
                return;
            }
        };
        for r in reqs.iter_mut() {
            r.result = self.check_range(r.offset, r.buf.len() as u64);
        }
        let _io = self.io_shared();
        if let Some(raw) = self.raw_data_file() {
            // The raw data file is the disk: every read goes straight to it, in one batch.
            let mut results = Vec::with_capacity(reqs.len());
            {
                let mut reads: Vec<DataRead<'_>> = reqs
                    .iter_mut()
                    .filter(|r| r.result.is_ok())
                    .map(|r| DataRead::new(&mut *r.buf, r.offset))
                    .collect();
                raw.read_data_batch(&mut reads);
                results.extend(reads.into_iter().map(|d| (d.offset, d.result)));
            }
            let mut results = results.into_iter();
            for r in reqs.iter_mut().filter(|r| r.result.is_ok()) {
                let (at, result) = results.next().expect("one result per read");
                r.result = result.ctx(|| format!("reading the data file at {at:#x}"));
            }
            return;
        }
        // Each request's pieces; `None`: failed already, or too large to plan with the rest.
        let mut plans: Vec<Option<Vec<Piece>>> = Vec::with_capacity(reqs.len());
        {
            let mut st = self.lock();
            for r in reqs.iter_mut() {
                if r.result.is_err() || r.buf.len() > PLAN_CHUNK {
                    plans.push(None);
                    continue;
                }
                let mut pieces = Vec::new();
                match st.plan_read(GuestOffset(r.offset), r.buf.len(), &mut pieces) {
                    Ok(()) => plans.push(Some(pieces)),
                    Err(e) => {
                        r.result = Err(e);
                        plans.push(None);
                    }
                }
            }
        }
        let mut failed: Vec<Option<Error>> = (0..reqs.len()).map(|_| None).collect();
        let mut owner = Vec::new();
        let mut io_results = Vec::new();
        {
            let mut host = Vec::new();
            for (i, (r, plan)) in reqs.iter_mut().zip(&plans).enumerate() {
                let Some(pieces) = plan else { continue };
                let mut rest: &mut [u8] = &mut *r.buf;
                for piece in pieces {
                    let (part, tail) = std::mem::take(&mut rest).split_at_mut(piece.len());
                    rest = tail;
                    // Image-file bytes are read together below; the rest is filled now.
                    if let Piece::Host { at, .. } = piece {
                        host.push(DataRead::new(part, *at));
                        owner.push(i);
                    } else if let Err(e) = self.fill_piece(piece, part) {
                        failed[i].get_or_insert(e);
                    }
                }
            }
            data.read_data_batch(&mut host);
            io_results.extend(host.into_iter().map(|r| (r.offset, r.result)));
        }
        for (i, (at, result)) in owner.into_iter().zip(io_results) {
            if let Err(e) = result.ctx(|| format!("reading data at {at:#x}")) {
                failed[i].get_or_insert(e);
            }
        }
        for ((r, plan), failed) in reqs.iter_mut().zip(&plans).zip(failed) {
            if let Some(e) = failed {
                r.result = Err(e);
            } else if plan.is_none() && r.result.is_ok() {
                r.result = self.read_inner(r.buf, GuestOffset(r.offset));
            }
        }
    }
}
