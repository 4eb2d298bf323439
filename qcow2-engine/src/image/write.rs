//! The write path: in-place overwrites, and allocation with copy-on-write at the allocation
//! unit (a cluster, or the touched subclusters with extended L2).
//!
//! A request runs in three phases:
//! 1. **plan**, under the state lock: every cluster becomes an in-place write or an
//!    allocation; allocated clusters come from the reserve and are marked busy;
//! 2. **I/O**, without the lock: copy-on-write bytes and guest data, merged into as few
//!    `pwrite`s as the host layout allows; then, if bytes were copied, a range sync of those
//!    bytes (not of the whole file);
//! 3. **link**, under the lock: the L2 entries (adjacent ones in one write), then the release
//!    of what they pointed at before, and the busy marks are cleared.
//!
//! Order of every allocating write: refcount of the new cluster (durable already: it comes from
//! the reserve) → guest data, with the COW bytes around it (synced when there are any) → L2
//! entry → release of what the entry pointed at before (deferred to a batch; see `alloc`).

use std::ops::Range;

use super::read::Piece;
use super::{Image, State};
use crate::cache::Ticket;
use crate::error::{IoContext, Result};
use crate::format::entries::{COPIED, Mapping, SubclusterBitmap};
use crate::types::{GuestOffset, HostOffset};

/// A guest cluster getting new host space (or new subclusters) from this request.
#[derive(Debug)]
pub(crate) struct Alloc {
    /// Guest cluster index: busy while this allocation is in flight.
    cluster: u64,
    /// Where the L2 entry lives, what it holds now, and what it becomes.
    slot_at: HostOffset,
    old: (u64, u64),
    new: (u64, u64),
    /// Host cluster.
    host: HostOffset,
    /// Copy-on-write sources before and after the guest data, inside the cluster.
    head: Vec<Piece>,
    tail: Vec<Piece>,
    /// Offset of the guest data in the cluster, and where it is in the request buffer.
    data_at: u64,
    src: Range<usize>,
    /// `host` came from the reserve: it durably holds zeros (which read as zeros unless the
    /// image is encrypted), and is freed if the request fails before linking it.
    fresh: bool,
    /// What the slot pointed at before, to release once the new entry is written.
    release: Option<Mapping>,
    /// Linked at planning time (see [`State::plan_write_cluster`]); its tickets are here.
    early: Option<Vec<Ticket>>,
}

/// One cluster's share of a write request.
#[derive(Debug)]
pub(crate) enum Step {
    /// The bytes go to allocated host space: `src` of the request buffer at host `at`.
    InPlace {
        at: u64,
        src: Range<usize>,
    },
    Alloc(Alloc),
}

/// Largest write planned under one lock hold.
const PLAN_CHUNK: usize = 8 << 20;

impl State {
    /// Plans the write of `src` (a part of the request buffer inside one cluster) at `off`.
    /// Returns false, planning nothing, if another request is changing that cluster.
    fn plan_write_cluster(
        &mut self,
        off: GuestOffset,
        src: Range<usize>,
        steps: &mut Vec<Step>,
    ) -> Result<bool> {
        let geo = self.meta.geo;
        let cs = geo.cluster_size();
        let sc = geo.subcluster_size();
        let cluster = off.0 >> geo.cluster_bits;
        if self.busy.contains(&cluster) {
            return Ok(false);
        }
        let in_cluster = geo.offset_in_cluster(off.0);
        let base = GuestOffset(off.0 - in_cluster);
        let len = src.len() as u64;
        let end = in_cluster + len;
        let slot = self.slot_for_write(off)?;
        let slot_at = slot.at.expect("slot_for_write gives a table");
        let mapping = slot.mapping(self)?;
        let first_sub = in_cluster / sc;
        let sub_end = end.div_ceil(sc);
        let mask = SubclusterBitmap::range_mask(first_sub, sub_end - first_sub);
        let old = SubclusterBitmap(slot.bitmap);

        // `host` None: a fresh cluster from the reserve, taken once nothing else can fail.
        let (host, unit, release, bitmap) = match mapping {
            Mapping::Data { host, .. } if !geo.extended_l2 || old.alloc() & mask == mask => {
                let at = host.0 + in_cluster;
                self.meta.check_data_write(HostOffset(at), len)?;
                steps.push(Step::InPlace { at, src });
                return Ok(true);
            }
            Mapping::Data { host, .. } => {
                // Extended L2, some touched subclusters not allocated yet. Allocated ones at the
                // edges are written in place, never copied: another request may be rewriting
                // them right now, and copying their old bytes back would undo that.
                let is_data = |i: u64| old.alloc() & (1 << i) != 0;
                let start = if is_data(first_sub) {
                    in_cluster
                } else {
                    first_sub * sc
                };
                let stop = if is_data(sub_end - 1) {
                    end
                } else {
                    sub_end * sc
                };
                let bitmap = SubclusterBitmap::from_masks(old.alloc() | mask, old.zero() & !mask);
                (Some(host), (start, stop), None, bitmap)
            }
            _ => {
                let unit = match mapping {
                    Mapping::Unallocated if geo.extended_l2 => (first_sub * sc, sub_end * sc),
                    _ => (0, cs),
                };
                let bitmap = match mapping {
                    _ if !geo.extended_l2 => SubclusterBitmap(0),
                    Mapping::Compressed { .. } => SubclusterBitmap::from_masks(u64::MAX, 0),
                    _ => SubclusterBitmap::from_masks(mask, old.zero() & !mask),
                };
                match mapping {
                    Mapping::Zero {
                        prealloc: Some(host),
                    } => (Some(host), unit, None, bitmap),
                    // An external data file holds each guest cluster at its own offset: no
                    // allocation, but the space may hold old bytes (written in full below).
                    _ if self.meta.header.has_data_file() => {
                        (Some(HostOffset(base.0)), unit, None, bitmap)
                    }
                    _ => (None, unit, Some(mapping), bitmap),
                }
            }
        };
        let mut head = Vec::new();
        let mut tail = Vec::new();
        if unit.0 < in_cluster {
            let at = GuestOffset(base.0 + unit.0);
            self.cluster_pieces(at, (in_cluster - unit.0) as usize, &mut head)?;
        }
        if end < unit.1 {
            let at = GuestOffset(base.0 + end);
            self.cluster_pieces(at, (unit.1 - end) as usize, &mut tail)?;
        }
        // Linking before the data is written is safe when the range read as zeros before and
        // the new cluster reads as zeros until then: a concurrent reader, a process crash or a
        // power loss in between all see zeros, which is the old content. It saves the write
        // from waiting for its L2 slice after its data: the slice write (shared with other
        // requests) runs while the data is written.
        let zeros = |p: &[Piece]| p.iter().all(|p| matches!(p, Piece::Zero(_)));
        // Not in an encrypted image: its fresh clusters hold zeros, which decrypt to noise.
        let encrypted = self.meta.header.crypt_method != 0;
        let link_early = host.is_none() && !encrypted && zeros(&head) && zeros(&tail) && {
            let mut old = Vec::new();
            self.cluster_pieces(off, src.len(), &mut old)?;
            zeros(&old)
        };
        let fresh = host.is_none();
        let host = match host {
            Some(h) => h,
            None => self.meta.alloc_cluster()?,
        };
        let mut planned = Alloc {
            cluster,
            slot_at,
            old: (slot.word, slot.bitmap),
            new: (host.0 | COPIED, bitmap.0),
            host,
            head,
            tail,
            data_at: in_cluster,
            src,
            fresh,
            release,
            early: None,
        };
        if let Err(e) = self
            .meta
            .check_data_write(HostOffset(host.0 + unit.0), unit.1 - unit.0)
        {
            if fresh {
                self.meta.free_range(host, 1);
            }
            return Err(e);
        }
        self.busy.insert(cluster);
        if link_early {
            let mut tickets = Vec::new();
            let linked = self.set_slots(&[(slot_at, planned.old, planned.new)], &mut tickets);
            planned.early = Some(tickets);
            if let Err(e) = linked {
                // Pushed, so the caller redeems the tickets and clears the busy mark.
                steps.push(Step::Alloc(planned));
                return Err(e);
            }
        }
        steps.push(Step::Alloc(planned));
        Ok(true)
    }

    /// Links planned allocations whose data is written: L2 entries (in the cache; the caller
    /// writes them back with the tickets), then the release of what they replaced. The busy
    /// marks stay until the entries are written.
    fn link(&mut self, steps: &[Step], tickets: &mut Vec<Ticket>) -> Result<()> {
        let updates: Vec<_> = allocs(steps)
            .filter(|a| a.early.is_none())
            .map(|a| (a.slot_at, a.old, a.new))
            .collect();
        self.set_slots(&updates, tickets)?;
        for a in allocs(steps) {
            if let Some(old) = a.release {
                self.release(old);
            }
        }
        Ok(())
    }

    /// Gives up the planned allocations nothing links yet: fresh clusters freed, busy marks
    /// cleared. Early-linked ones stay busy until their tickets are redeemed.
    fn abandon_unlinked(&mut self, steps: &[Step]) {
        for a in allocs(steps).filter(|a| a.early.is_none()) {
            if a.fresh {
                self.meta.free_range(a.host, 1);
            }
            self.busy.remove(&a.cluster);
        }
    }

    /// After linking failed, or the slices holding the new entries could not be written (a
    /// full disk, say): what storage holds decides, slot by slot. An entry still as it was
    /// gives back its fresh cluster and takes back the release of what it pointed at (if
    /// `released`); an entry that landed is kept. An entry that cannot be read back is kept
    /// too: a leak at worst, never a cluster freed while something references it.
    fn reconcile(&mut self, allocs: &[&Alloc], released: bool) {
        for a in allocs {
            if self.slot_on_storage(a.slot_at).ok() != Some(a.old) {
                continue;
            }
            if a.fresh {
                self.meta.free_range(a.host, 1);
            }
            if released && let Some(old) = a.release {
                self.unrelease(old);
            }
        }
    }

    fn clear_busy(&mut self, steps: &[Step]) {
        for a in allocs(steps) {
            self.busy.remove(&a.cluster);
        }
    }
}

/// Whether `[off, off + len)` is made of whole 512-byte sectors (the unit of encryption).
pub(crate) fn whole_sectors(off: u64, len: u64) -> bool {
    let sector = crate::crypto::luks::SECTOR;
    off.is_multiple_of(sector) && len.is_multiple_of(sector)
}

/// Tickets of allocations linked at planning time.
fn early_tickets(steps: &[Step]) -> Vec<Ticket> {
    allocs(steps)
        .filter_map(|a| a.early.as_deref())
        .flatten()
        .copied()
        .collect()
}

fn allocs(steps: &[Step]) -> impl Iterator<Item = &Alloc> {
    steps.iter().filter_map(|s| match s {
        Step::Alloc(a) => Some(a),
        Step::InPlace { .. } => None,
    })
}

/// Consecutive data writes merged into one `pwrite` when both the host offsets and the request
/// buffer ranges are contiguous.
struct Merger<'a> {
    image: &'a Image,
    buf: &'a [u8],
    run: Option<(u64, Range<usize>)>,
}

impl Merger<'_> {
    fn push(&mut self, at: u64, src: Range<usize>) -> Result<()> {
        if let Some((run_at, run_src)) = &mut self.run
            && *run_at + run_src.len() as u64 == at
            && run_src.end == src.start
        {
            run_src.end = src.end;
            return Ok(());
        }
        self.finish()?;
        self.run = Some((at, src));
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        if let Some((at, src)) = self.run.take() {
            self.image.write_host(&self.buf[src], at)?;
        }
        Ok(())
    }
}

impl Image {
    /// Writes guest bytes. The caller holds the I/O gate (and, in an encrypted image, the
    /// sector gate: exclusive unless the write covers whole sectors).
    pub(crate) fn write_inner(&self, buf: &[u8], off: GuestOffset) -> Result<()> {
        if self.crypto.is_some() && !whole_sectors(off.0, buf.len() as u64) {
            return self.write_partial_sectors(buf, off);
        }
        let cb = self.geo.cluster_bits;
        let cs = self.geo.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let mut steps = Vec::new();
            let mut wait_for = None;
            {
                let mut st = self.lock();
                let limit = (done + PLAN_CHUNK).min(buf.len());
                while done < limit {
                    let pos = off.0 + done as u64;
                    let n = ((cs - pos % cs) as usize).min(buf.len() - done);
                    match st.plan_write_cluster(GuestOffset(pos), done..done + n, &mut steps) {
                        Ok(true) => done += n,
                        Ok(false) => {
                            wait_for = Some(pos >> cb);
                            break;
                        }
                        Err(e) => {
                            self.give_up(st, &steps);
                            return Err(e);
                        }
                    }
                }
            }
            self.run_steps(buf, &steps)?;
            if let Some(cluster) = wait_for {
                drop(self.wait_idle(self.lock(), cluster));
            }
        }
        Ok(())
    }

    /// An encrypted image's write that starts or ends inside a 512-byte sector: the edge
    /// sectors are read (decrypted), the bytes laid over them, and whole sectors written.
    fn write_partial_sectors(&self, buf: &[u8], off: GuestOffset) -> Result<()> {
        let sector = crate::crypto::luks::SECTOR;
        let start = off.0 - off.0 % sector;
        let end = (off.0 + buf.len() as u64).div_ceil(sector) * sector;
        let mut sectors = vec![0u8; (end - start) as usize];
        let last = sectors.len() - sector as usize;
        if start != off.0 {
            self.read_inner(&mut sectors[..sector as usize], GuestOffset(start))?;
        }
        if end != off.0 + buf.len() as u64 && (last > 0 || start == off.0) {
            self.read_inner(&mut sectors[last..], GuestOffset(end - sector))?;
        }
        let at = (off.0 - start) as usize;
        sectors[at..at + buf.len()].copy_from_slice(buf);
        self.write_inner(&sectors, GuestOffset(start))
    }

    /// Phases 2 and 3 for planned steps. If the I/O fails, the allocations are abandoned
    /// (fresh clusters freed); if linking fails, storage decides which were linked
    /// ([`State::reconcile`]).
    fn run_steps(&self, buf: &[u8], steps: &[Step]) -> Result<()> {
        if steps.is_empty() {
            return Ok(());
        }
        let written = self.write_steps(buf, steps).and_then(|copied| {
            if copied.is_empty() {
                return Ok(());
            }
            self.data_barrier
                .sync_ranges(&**self.data()?, &copied)
                .ctx(|| "syncing copied data".to_string())
        });
        if allocs(steps).next().is_none() {
            return written;
        }
        let st = self.lock();
        if let Err(e) = written {
            self.give_up(st, steps);
            return Err(e);
        }
        let mut st = st;
        let mut tickets = early_tickets(steps);
        let linked = st.link(steps, &mut tickets);
        // The entries reach storage before anyone else may use these clusters (an in-place
        // write acknowledged before its mapping is written would not survive a crash).
        let (mut st, written_back) = self.write_back_locked(st, &tickets);
        if linked.is_err() || written_back.is_err() {
            let all: Vec<&Alloc> = allocs(steps).collect();
            st.reconcile(&all, linked.is_ok());
        }
        st.clear_busy(steps);
        self.wake(&st);
        self.note_pending(&st);
        let top_up = st.meta.wants_top_up();
        drop(st);
        if top_up {
            self.top_up_reserve();
        }
        linked.and(written_back)
    }

    /// After a failure: unlinked allocations are abandoned; early-linked ones keep their
    /// clusters (the entries may already be on storage; the range reads zeros or part of
    /// the data, as after any failed write) and stay busy until their slices are written.
    fn give_up<'a>(&'a self, mut st: std::sync::MutexGuard<'a, State>, steps: &[Step]) {
        st.abandon_unlinked(steps);
        let (mut st, written_back) = self.write_back_locked(st, &early_tickets(steps));
        if written_back.is_err() {
            let early: Vec<&Alloc> = allocs(steps).filter(|a| a.early.is_some()).collect();
            st.reconcile(&early, false);
        }
        st.clear_busy(steps);
        self.wake(&st);
    }

    /// Writes the data and copy-on-write bytes of planned steps. Returns the host ranges of
    /// bytes copied (or zeroed) that must be durable before the L2 entries point at them:
    /// otherwise a power loss could keep a new entry but not the bytes it needs, and lose
    /// data that was flushed before this write. A range sync of just those: a full sync
    /// would also write back every dirty page of the file (all the guest's buffered writes
    /// since the last flush) before each first write to a cluster of a fresh overlay.
    fn write_steps(&self, buf: &[u8], steps: &[Step]) -> Result<Vec<Range<u64>>> {
        let mut merged = Merger {
            image: self,
            buf,
            run: None,
        };
        let mut copied = Vec::new();
        for step in steps {
            match step {
                Step::InPlace { at, src } => merged.push(*at, src.clone())?,
                Step::Alloc(a) => {
                    let head_len: usize = a.head.iter().map(Piece::len).sum();
                    let tail_len: usize = a.tail.iter().map(Piece::len).sum();
                    let data_at = a.host.0 + a.data_at;
                    let copy =
                        |pieces: &[Piece]| pieces.iter().any(|p| !matches!(p, Piece::Zero(_)));
                    // In an encrypted image, zeros around the data are encrypted zeros: real
                    // bytes to write (and make durable before the entry, like copied ones).
                    let encrypted = self.crypto.is_some() && head_len + tail_len > 0;
                    if encrypted || copy(&a.head) || copy(&a.tail) {
                        // Real bytes around the data: one buffer, one write.
                        let mut unit = vec![0u8; head_len + a.src.len() + tail_len];
                        let (h, rest) = unit.split_at_mut(head_len);
                        let (d, t) = rest.split_at_mut(a.src.len());
                        self.fill(&a.head, h)?;
                        d.copy_from_slice(&buf[a.src.clone()]);
                        self.fill(&a.tail, t)?;
                        let at = data_at - head_len as u64;
                        self.write_host(&unit, at)?;
                        copied.push(at..at + unit.len() as u64);
                        continue;
                    }
                    if !a.fresh && head_len + tail_len > 0 {
                        // Zeros around the data in space that may hold old bytes.
                        let head_at = data_at - head_len as u64;
                        let tail_at = data_at + a.src.len() as u64;
                        self.zero_host(head_at, head_len as u64)?;
                        self.zero_host(tail_at, tail_len as u64)?;
                        copied.extend([
                            head_at..head_at + head_len as u64,
                            tail_at..tail_at + tail_len as u64,
                        ]);
                    }
                    merged.push(data_at, a.src.clone())?;
                }
            }
        }
        merged.finish()?;
        copied.retain(|r| !r.is_empty());
        Ok(copied)
    }

    /// Writes guest bytes to host offset `at`, encrypted there first in an encrypted image
    /// (whose writes are whole sectors, see [`Image::write_inner`]).
    fn write_host(&self, bytes: &[u8], at: u64) -> Result<()> {
        let sealed;
        let bytes = match self.data_cipher()? {
            Some(cipher) => {
                let mut copy = bytes.to_vec();
                cipher.encrypt(at, &mut copy);
                sealed = copy;
                &sealed[..]
            }
            None => bytes,
        };
        self.data()?
            .write_data(bytes, at)
            .ctx(|| format!("writing data at {at:#x}"))
    }

    /// Zeroes host bytes with `fallocate` where the filesystem can (no zero data written);
    /// in an encrypted image, writes encrypted zeros.
    fn zero_host(&self, at: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.crypto.is_some() {
            return self.write_host(&vec![0u8; len as usize], at);
        }
        self.data()?
            .write_zeroes(at, len)
            .ctx(|| format!("zeroing {len} bytes at {at:#x}"))
    }
}
