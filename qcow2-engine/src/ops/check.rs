//! Consistency check and repair, with `qemu-img check`'s findings, messages and counters.
//!
//! The check walks the metadata straight from storage (it must work on images the handle
//! refuses to open), computes the refcount every cluster should have (header, L1, L2 tables,
//! data, snapshot tables, bitmaps, refcount table and blocks), and compares it with the stored
//! one: stored > expected is a *leak* (wasted space), stored < expected a *corruption* (a
//! cluster in use could be handed out again). It also reports entries with reserved bits,
//! misaligned offsets, invalid subcluster bitmaps and wrong `COPIED` flags.
//!
//! Repair: leaks are fixed in place (refcount lowered, cluster punched, free tail trimmed).
//! With [`Repair::All`], wrong `COPIED` flags are rewritten, and any refcount that is too low
//! (or a refcount block that is unusable) makes the whole refcount structure be rebuilt from
//! the computed counts at the end of the file, switched in by one header write. A repair that
//! leaves no corruption clears the dirty and corrupt bits.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::format::entries::{
    COMPRESSED, COPIED, L1_RESERVED, L2_RESERVED, L2Entry, OFFSET_MASK, ZERO,
};
use crate::format::header::{autoclear, incompat};
use crate::format::{Header, refcount};
use crate::image::{read_header, read_table};
use crate::storage::Storage;
use crate::types::Geometry;

/// What to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Repair {
    /// Report only.
    #[default]
    None,
    /// Fix leaked clusters.
    Leaks,
    /// Fix leaks and the corruptions that can be fixed.
    All,
}

/// The result of a check, with `qemu-img check --output=json`'s keys.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    #[serde(skip_serializing_if = "is_zero")]
    pub image_end_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub total_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions: u64,
    pub check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub allocated_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub fragmented_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub compressed_clusters: u64,
    /// One line per finding, as qemu-img prints them on stderr.
    #[serde(skip)]
    pub messages: Vec<String>,
    /// Whether a repair rebuilt the refcount structure.
    #[serde(skip)]
    pub rebuilt: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl CheckReport {
    /// `qemu-img check`'s exit status for this result: 0 clean, 1 check errors, 2
    /// corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// The human summary `qemu-img check` prints on stdout.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        if self.leaks_fixed > 0 || self.corruptions_fixed > 0 {
            s += &format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                self.leaks_fixed, self.corruptions_fixed
            );
        }
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            s += "No errors were found on the image.\n";
        } else {
            if self.corruptions > 0 {
                s += &format!(
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                    self.corruptions
                );
            }
            if self.leaks > 0 {
                s += &format!(
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                    self.leaks
                );
            }
            if self.check_errors > 0 {
                s += &format!(
                    "\n{} internal errors have occurred during the check.\n",
                    self.check_errors
                );
            }
        }
        if self.total_clusters > 0 {
            let pct = |n: u64, of: u64| {
                if of == 0 {
                    0.0
                } else {
                    n as f64 * 100.0 / of as f64
                }
            };
            s += &format!(
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
                self.allocated_clusters,
                self.total_clusters,
                pct(self.allocated_clusters, self.total_clusters),
                pct(self.fragmented_clusters, self.allocated_clusters),
                pct(self.compressed_clusters, self.allocated_clusters),
            );
        }
        if self.image_end_offset > 0 {
            s += &format!("Image end offset: {}\n", self.image_end_offset);
        }
        s
    }
}

/// Checks the image in `storage` and repairs what `repair` asks for. The storage must be
/// writable for a repair, and nobody else may be using the image.
pub fn check(storage: &Arc<dyn Storage>, repair: Repair) -> Result<CheckReport> {
    let first = Pass::run(storage)?;
    if repair == Repair::None || (first.report.leaks == 0 && first.report.corruptions == 0) {
        return Ok(first.report);
    }
    let mut messages = first.report.messages.clone();
    let (leaks_fixed, corruptions_fixed, rebuilt) = first.repair(repair, &mut messages)?;
    let mut again = Pass::run(storage)?;
    if again.report.corruptions == 0 && again.report.check_errors == 0 {
        mark_consistent(storage, again.report.leaks == 0)?;
    }
    messages.append(&mut again.report.messages);
    again.report.messages = messages;
    again.report.leaks_fixed = leaks_fixed;
    again.report.corruptions_fixed = corruptions_fixed;
    again.report.rebuilt = rebuilt;
    Ok(again.report)
}

/// Clears the corrupt bit, and the dirty bit when no leak remains, after a successful repair.
fn mark_consistent(storage: &Arc<dyn Storage>, clean: bool) -> Result<()> {
    let mut header = read_header(&**storage)?;
    let before = header.incompatible_features;
    header.incompatible_features &= !incompat::CORRUPT;
    if clean {
        header.incompatible_features &= !incompat::DIRTY;
    }
    if header.incompatible_features != before {
        storage
            .write_at(&header.to_bytes()?, 0)
            .ctx(|| "rewriting the header".to_string())?;
        storage.flush().ctx(|| "flushing the image".to_string())?;
    }
    Ok(())
}

/// Header extension magic of persistent dirty bitmaps.
pub(crate) const EXT_BITMAPS: u32 = 0x2385_2875;

/// The host ranges that persistent bitmaps occupy (directory, tables, data clusters), when the
/// autoclear bit says the bitmap extension is valid; empty otherwise.
pub(crate) fn bitmap_extents(storage: &dyn Storage, header: &Header) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    if header.autoclear_features & autoclear::BITMAPS == 0 {
        return Ok(out);
    }
    let Some(ext) = header
        .unknown_extensions
        .iter()
        .find(|e| e.kind == EXT_BITMAPS)
    else {
        return Ok(out);
    };
    let d = &ext.data;
    if d.len() < 24 {
        return Err(Error::invalid("bitmap extension is too short"));
    }
    let be32 = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("4 bytes"));
    let be64 = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
    let nb = be32(&d[0..4]);
    let dir_size = be64(&d[8..16]);
    let dir_off = be64(&d[16..24]);
    if dir_size > 64 << 20 || nb > 65535 {
        return Err(Error::invalid("bitmap directory is too large"));
    }
    let mut dir = vec![0u8; dir_size as usize];
    storage
        .read_at(&mut dir, dir_off)
        .ctx(|| "reading the bitmap directory".to_string())?;
    out.push((dir_off, dir_size));
    let mut pos = 0usize;
    for _ in 0..nb {
        let Some(e) = dir.get(pos..pos + 24) else {
            return Err(Error::invalid("bitmap directory is truncated"));
        };
        let table = be64(&e[0..8]);
        let size = u64::from(be32(&e[8..12]));
        let name = usize::from(u16::from_be_bytes([e[14], e[15]]));
        let extra = be32(&e[16..20]) as usize;
        if size > (64 << 20) / 8 {
            return Err(Error::invalid("bitmap table is too large"));
        }
        out.push((table, size * 8));
        let mut raw = vec![0u8; (size * 8) as usize];
        storage
            .read_at(&mut raw, table)
            .ctx(|| "reading a bitmap table".to_string())?;
        for entry in raw.chunks_exact(8).map(be64) {
            let off = entry & OFFSET_MASK;
            if off != 0 {
                out.push((off, header.cluster_size()));
            }
        }
        pos += (24 + extra + name).next_multiple_of(8);
    }
    Ok(out)
}

/// A place that holds a `COPIED` flag that disagrees with the refcount.
#[derive(Debug, Clone, Copy)]
struct CopiedFix {
    at: u64,
    entry: u64,
}

/// One walk over the metadata.
struct Pass {
    storage: Arc<dyn Storage>,
    header: Header,
    geo: Geometry,
    file_clusters: u64,
    /// Expected refcounts of the clusters of the file.
    expected: Vec<u32>,
    /// Refcount table entries that cannot be used (misaligned, outside the image, overlapping).
    bad_refblocks: Vec<u64>,
    /// Clusters of the current refcount table and blocks (free after a rebuild).
    refstruct: Vec<u64>,
    copied_fixes: Vec<CopiedFix>,
    /// `COPIED` findings (among `report.corruptions`).
    copied_errors: u64,
    /// Clusters whose stored refcount exceeds the expected one: (cluster, expected).
    leaked: Vec<(u64, u64)>,
    /// Some refcount is lower than expected.
    too_low: bool,
    /// The last cluster with a stored refcount.
    highest_stored: u64,
    /// Bytes of tables the walk may still read.
    budget: u64,
    /// L2 tables named by L1 entries, with how often.
    l2_refs: HashMap<u64, u32>,
    /// Active L2 tables in guest order.
    active_order: Vec<u64>,
    /// The first guest offset each active L2 table maps (images with an external data file
    /// check that every entry names its own guest offset).
    l2_guest: HashMap<u64, u64>,
    next_contiguous: u64,
    report: CheckReport,
}

impl Pass {
    fn run(storage: &Arc<dyn Storage>) -> Result<Pass> {
        let header = read_header(&**storage)?;
        let geo = header.geometry();
        let file_len = storage.len().ctx(|| "sizing the image".to_string())?;
        let file_clusters = file_len.div_ceil(geo.cluster_size());
        let mut pass = Pass {
            storage: storage.clone(),
            geo,
            file_clusters,
            expected: vec![0; file_clusters as usize],
            bad_refblocks: Vec::new(),
            refstruct: Vec::new(),
            copied_fixes: Vec::new(),
            copied_errors: 0,
            leaked: Vec::new(),
            too_low: false,
            highest_stored: 0,
            next_contiguous: 0,
            budget: (256 << 20) + file_len.saturating_mul(16),
            l2_refs: HashMap::new(),
            active_order: Vec::new(),
            l2_guest: HashMap::new(),
            report: CheckReport {
                total_clusters: header.size.div_ceil(geo.cluster_size()),
                ..Default::default()
            },
            header,
        };
        pass.walk()?;
        Ok(pass)
    }

    fn corruption(&mut self, msg: String) {
        self.report.corruptions += 1;
        self.report.messages.push(msg);
    }

    /// Counts one reference to every cluster of `[offset, offset + len)`. A region reaching a
    /// cluster past the end of the file is a corruption and is not counted (as in qemu-img:
    /// nothing valid lives there, and counting it would let a repair write there).
    /// Returns whether the region was counted (lies inside the file).
    fn inc(&mut self, offset: u64, len: u64) -> bool {
        self.inc_by(offset, len, 1)
    }

    /// [`Pass::inc`], `times` references at once.
    fn inc_by(&mut self, offset: u64, len: u64, times: u32) -> bool {
        if len == 0 {
            return true;
        }
        let cb = self.geo.cluster_bits;
        let first = offset >> cb;
        let last = offset.saturating_add(len - 1) >> cb;
        if last >= self.file_clusters {
            self.corruption(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {len:#x}"
            ));
            return false;
        }
        for c in first..=last {
            let n = &mut self.expected[c as usize];
            *n = n.saturating_add(times);
        }
        true
    }

    fn expected(&self, c: u64) -> u64 {
        self.expected.get(c as usize).map_or(0, |&n| u64::from(n))
    }

    fn read_u64s(&mut self, offset: u64, count: u64, what: &str) -> Result<Vec<u64>> {
        // Tables can be named many times over (snapshots share them); a hostile image could
        // make that endless. Legitimate images stay far below this budget.
        self.budget = self.budget.checked_sub(count * 8).ok_or_else(|| {
            Error::unsupported(
                "the image names more metadata than a check reads for a file of its size",
            )
        })?;
        read_table(&*self.storage, offset, count * 8, what)
    }

    fn walk(&mut self) -> Result<()> {
        let cs = self.geo.cluster_size();
        self.inc(0, cs);
        let (l1_off, l1_size) = (self.header.l1_table_offset, self.header.l1_size);
        self.walk_l1(l1_off, u64::from(l1_size), true)?;
        self.walk_snapshots()?;
        self.walk_tables()?;
        self.walk_bitmaps()?;
        self.walk_encryption();
        let rt_off = self.header.refcount_table_offset;
        let rt_clusters = u64::from(self.header.refcount_table_clusters);
        self.inc(rt_off, rt_clusters * cs);
        let first = rt_off >> self.geo.cluster_bits;
        self.refstruct.extend(first..first + rt_clusters);
        self.walk_refblocks()?;
        self.compare()?;
        self.check_copied()?;
        // Like qemu-img: the end of whatever is in use or still refcounted.
        let stored_end = (self.highest_stored + 1) << self.geo.cluster_bits;
        self.report.image_end_offset = self.image_end().max(stored_end);
        Ok(())
    }

    fn walk_l1(&mut self, offset: u64, entries: u64, active: bool) -> Result<()> {
        if !self.inc(offset, entries * 8) {
            return Ok(());
        }
        let l1 = self.read_u64s(offset, entries, "L1 table")?;
        let per_table =
            self.geo.cluster_size() / self.geo.l2_entry_size() * self.geo.cluster_size();
        for (index, e) in l1.into_iter().enumerate() {
            let off = e & OFFSET_MASK;
            if active && off != 0 {
                self.l2_guest.entry(off).or_insert(index as u64 * per_table);
            }
            if off == 0 {
                continue;
            }
            if e & L1_RESERVED != 0 {
                self.corruption(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
                continue;
            }
            if !self.geo.is_aligned(off) {
                self.corruption(format!(
                    "ERROR l2_offset={off:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                continue;
            }
            if self.inc(off, self.geo.cluster_size()) {
                // Walked once later, however many L1 entries name it (snapshots share).
                let n = self.l2_refs.entry(off).or_insert(0);
                if *n == 0 && active {
                    self.active_order.push(off);
                }
                *n += 1;
            }
        }
        Ok(())
    }

    /// Walks every L2 table once, counting its references as many times as it is named:
    /// active tables first in guest order (for the fragmentation figures), then the others.
    fn walk_tables(&mut self) -> Result<()> {
        let active = std::mem::take(&mut self.active_order);
        for &off in &active {
            let times = self.l2_refs.remove(&off).unwrap_or(1);
            self.walk_l2(off, true, times)?;
        }
        let mut rest: Vec<(u64, u32)> = self.l2_refs.drain().collect();
        rest.sort_unstable();
        for (off, times) in rest {
            self.walk_l2(off, false, times)?;
        }
        Ok(())
    }

    /// Reads an L2 table as (word, bitmap) pairs.
    fn read_l2(&mut self, offset: u64) -> Result<Vec<(u64, u64)>> {
        let words = self.read_u64s(offset, self.geo.cluster_size() / 8, "L2 table")?;
        Ok(if self.geo.extended_l2 {
            words.chunks_exact(2).map(|p| (p[0], p[1])).collect()
        } else {
            words.into_iter().map(|w| (w, 0)).collect()
        })
    }

    fn walk_l2(&mut self, table: u64, active: bool, times: u32) -> Result<()> {
        let cs = self.geo.cluster_size();
        let data_file = self.header.has_data_file();
        let guest_base = self.l2_guest.get(&table).copied();
        for (i, (word, bitmap)) in self.read_l2(table)?.into_iter().enumerate() {
            if data_file {
                self.walk_data_file_entry(table, i, word, bitmap, active, guest_base);
                continue;
            }
            if let Some((host, sectors)) = L2Entry(word).compressed(&self.geo) {
                if self.geo.extended_l2 && bitmap != 0 {
                    self.corruption(format!(
                        "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={word:#x}"
                    ));
                }
                if word & COPIED != 0 {
                    self.corruption(format!(
                        "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                        word & !COPIED
                    ));
                }
                if active {
                    self.report.allocated_clusters += 1;
                    self.report.compressed_clusters += 1;
                    self.report.fragmented_clusters += 1;
                }
                self.inc_by(host.0 & !511, sectors * 512, times);
                continue;
            }
            let off = word & OFFSET_MASK;
            if word & L2_RESERVED != 0 {
                self.corruption(format!(
                    "ERROR found L2 entry with reserved bits set: {word:x}"
                ));
                continue;
            }
            if self.geo.extended_l2 {
                if !self.bitmap_valid(table, i, bitmap, off != 0) {
                    continue;
                }
            } else if word & ZERO != 0 && self.header.version < 3 {
                self.corruption(format!(
                    "ERROR: zero cluster in a version 2 image (L2 offset: {table:#x}, L2 index: {i:#x})"
                ));
                continue;
            }
            if off == 0 {
                continue;
            }
            if !self.geo.is_aligned(off) {
                self.corruption(format!(
                    "ERROR offset={off:x}: Cluster is not properly aligned; L2 entry corrupted."
                ));
                continue;
            }
            if active {
                self.report.allocated_clusters += 1;
                if self.next_contiguous != 0 && off != self.next_contiguous {
                    self.report.fragmented_clusters += 1;
                }
                self.next_contiguous = off + cs;
            }
            self.inc_by(off, cs, times);
        }
        Ok(())
    }

    /// Whether an extended L2 entry's subcluster bitmap is consistent (no subcluster both
    /// allocated and zero, none allocated without a host cluster); reports it if not.
    fn bitmap_valid(&mut self, table: u64, i: usize, bitmap: u64, has_host: bool) -> bool {
        let (alloc, zero) = (bitmap & 0xffff_ffff, bitmap >> 32);
        if alloc & zero != 0 || (!has_host && alloc != 0) {
            self.corruption(format!(
                "ERROR: Invalid cluster entry found  (L2 offset: {table:#x}, L2 index: {i:#x})"
            ));
            return false;
        }
        true
    }

    /// An L2 entry of an image with an external data file: its data cluster is in the data
    /// file and not refcounted, but it must name its own guest offset, and cannot be
    /// compressed.
    fn walk_data_file_entry(
        &mut self,
        table: u64,
        i: usize,
        word: u64,
        bitmap: u64,
        active: bool,
        guest_base: Option<u64>,
    ) {
        use crate::format::entries::Mapping;
        let guest = guest_base.map(|b| b + i as u64 * self.geo.cluster_size());
        let mapping = match L2Entry(word).decode_in(&self.geo, true) {
            Ok(Mapping::Compressed { .. }) => {
                return self.corruption(format!(
                    "ERROR compressed cluster in an image with an external data file (L2 offset: {table:#x}, L2 index: {i:#x})"
                ));
            }
            Ok(m) => m,
            Err(e) => {
                return self.corruption(format!(
                    "ERROR {e} (L2 offset: {table:#x}, L2 index: {i:#x})"
                ));
            }
        };
        let has_host = matches!(mapping, Mapping::Data { .. });
        if self.geo.extended_l2 && !self.bitmap_valid(table, i, bitmap, has_host) {
            return;
        }
        let host = match mapping {
            Mapping::Data { host, .. }
            | Mapping::Zero {
                prealloc: Some(host),
            } => host.0,
            _ => return,
        };
        if let Some(guest) = guest
            && host != guest
        {
            return self.corruption(format!(
                "ERROR data cluster of guest offset {guest:#x} at {host:#x} of the external data file (L2 offset: {table:#x}, L2 index: {i:#x})"
            ));
        }
        if active {
            self.report.allocated_clusters += 1;
        }
    }

    fn walk_snapshots(&mut self) -> Result<()> {
        let n = self.header.nb_snapshots;
        if n == 0 {
            return Ok(());
        }
        let mut pos = self.header.snapshots_offset;
        let start = pos;
        for _ in 0..n {
            let mut fixed = [0u8; 40];
            self.storage
                .read_at(&mut fixed, pos)
                .ctx(|| "reading the snapshot table".to_string())?;
            let l1_off = u64::from_be_bytes(fixed[0..8].try_into().expect("8"));
            let l1_size = u64::from(u32::from_be_bytes(fixed[8..12].try_into().expect("4")));
            let id_len = u64::from(u16::from_be_bytes(fixed[12..14].try_into().expect("2")));
            let name_len = u64::from(u16::from_be_bytes(fixed[14..16].try_into().expect("2")));
            let extra = u64::from(u32::from_be_bytes(fixed[36..40].try_into().expect("4")));
            if l1_size > (32 << 20) / 8 || !self.geo.is_aligned(l1_off) || extra > 1024 {
                self.corruption(format!(
                    "ERROR snapshot table entry at {pos:#x} is invalid (L1 {l1_off:#x}, {l1_size} entries)"
                ));
                return Ok(());
            }
            self.walk_l1(l1_off, l1_size, false)?;
            pos += (40 + extra + id_len + name_len).next_multiple_of(8);
        }
        self.inc(start, pos - start);
        Ok(())
    }

    /// Persistent bitmaps count only while the autoclear bit says the extension is valid.
    fn walk_bitmaps(&mut self) -> Result<()> {
        match bitmap_extents(&*self.storage, &self.header) {
            Ok(extents) => {
                for (off, len) in extents {
                    self.inc(off, len);
                }
            }
            Err(Error::InvalidImage(m)) => self.corruption(format!("ERROR {m}")),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// The encryption header region of a LUKS-encrypted image is metadata: counted once.
    fn walk_encryption(&mut self) {
        if self.header.crypt_method == 0 {
            return;
        }
        match crate::crypto::region(&self.header) {
            Ok(Some((offset, len))) => {
                // A region past the end of the file is reported by `inc`.
                self.inc(offset, len);
            }
            Ok(None) => self.corruption(
                "ERROR the image is encrypted but names no encryption header".to_string(),
            ),
            Err(e) => self.corruption(format!("ERROR {e}")),
        }
    }

    fn reftable(&self) -> Result<Vec<u64>> {
        let cs = self.geo.cluster_size();
        let clusters = u64::from(self.header.refcount_table_clusters);
        read_table(
            &*self.storage,
            self.header.refcount_table_offset,
            clusters * cs,
            "refcount table",
        )
    }

    fn walk_refblocks(&mut self) -> Result<()> {
        let cb = self.geo.cluster_bits;
        for (i, e) in self.reftable()?.into_iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 && e == 0 {
                continue;
            }
            if e & 0x1ff != 0 || !self.geo.is_aligned(off) || off == 0 {
                self.corruption(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                self.bad_refblocks.push(i as u64);
                continue;
            }
            if off >> cb >= self.file_clusters {
                self.corruption(format!("ERROR refcount block {i} is outside image"));
                self.bad_refblocks.push(i as u64);
                continue;
            }
            self.inc(off, self.geo.cluster_size());
            self.refstruct.push(off >> cb);
            let n = self.expected(off >> cb);
            if n != 1 {
                self.corruption(format!("ERROR refcount block {i} refcount={n}"));
                self.bad_refblocks.push(i as u64);
            }
        }
        Ok(())
    }

    /// Stored refcounts, one refcount block at a time.
    fn stored(&self, reftable: &[u64], group: u64) -> Result<Option<Vec<u8>>> {
        if self.bad_refblocks.contains(&group) {
            return Ok(None);
        }
        let off = reftable.get(group as usize).copied().unwrap_or(0) & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        let mut block = vec![0u8; self.geo.cluster_size() as usize];
        self.storage
            .read_at(&mut block, off)
            .ctx(|| format!("reading refcount block {group}"))?;
        Ok(Some(block))
    }

    fn compare(&mut self) -> Result<()> {
        let reftable = self.reftable()?;
        let per = self.geo.refblock_entries();
        let order = self.geo.refcount_order;
        let mut block: Option<(u64, Option<Vec<u8>>)> = None;
        for c in 0..self.file_clusters {
            let group = c / per;
            if block.as_ref().is_none_or(|(g, _)| *g != group) {
                block = Some((group, self.stored(&reftable, group)?));
            }
            let stored = match &block {
                Some((_, Some(b))) => refcount::get(b, order, (c % per) as usize),
                _ => 0,
            };
            let expected = self.expected(c);
            if stored > 0 {
                self.highest_stored = self.highest_stored.max(c);
            }
            if stored == expected {
                continue;
            }
            if stored > expected {
                self.report.leaks += 1;
                self.leaked.push((c, expected));
                self.report.messages.push(format!(
                    "Leaked cluster {c} refcount={stored} reference={expected}"
                ));
            } else {
                self.too_low = true;
                self.corruption(format!(
                    "ERROR cluster {c} refcount={stored} reference={expected}"
                ));
            }
        }
        Ok(())
    }

    /// `COPIED` must be set exactly on active entries whose cluster has refcount 1.
    fn check_copied(&mut self) -> Result<()> {
        let reftable = self.reftable()?;
        let cb = self.geo.cluster_bits;
        let l1_off = self.header.l1_table_offset;
        let l1 = self.read_u64s(l1_off, u64::from(self.header.l1_size), "L1 table")?;
        let mut cache: Option<(u64, Option<Vec<u8>>)> = None;
        let per = self.geo.refblock_entries();
        let mut refcount_of = |pass: &Pass, c: u64| -> Result<u64> {
            if cache.as_ref().is_none_or(|(g, _)| *g != c / per) {
                cache = Some((c / per, pass.stored(&reftable, c / per)?));
            }
            Ok(match &cache {
                Some((_, Some(b))) => refcount::get(b, pass.geo.refcount_order, (c % per) as usize),
                _ => 0,
            })
        };
        let mut seen = std::collections::HashSet::new();
        for (i, &e) in l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 || e & L1_RESERVED != 0 || !self.geo.is_aligned(off) {
                continue;
            }
            let rc = refcount_of(self, off >> cb)?;
            if (rc == 1) != (e & COPIED != 0) {
                self.copied_errors += 1;
                self.corruption(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                ));
                self.push_copied_fix(l1_off + i as u64 * 8, e, off >> cb);
            }
            if !seen.insert(off) {
                continue; // a table named twice is checked once
            }
            if self.header.has_data_file() {
                continue; // data-file clusters are not refcounted
            }
            let entry_size = self.geo.l2_entry_size();
            for (j, (word, _)) in self.read_l2(off)?.into_iter().enumerate() {
                let host = word & OFFSET_MASK;
                if word & COMPRESSED != 0
                    || host == 0
                    || word & L2_RESERVED != 0
                    || !self.geo.is_aligned(host)
                {
                    continue;
                }
                let rc = refcount_of(self, host >> cb)?;
                if (rc == 1) != (word & COPIED != 0) {
                    self.copied_errors += 1;
                    self.corruption(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={word:x} refcount={rc}"
                    ));
                    self.push_copied_fix(off + j as u64 * entry_size, word, host >> cb);
                }
            }
        }
        Ok(())
    }

    /// Records the fix of a `COPIED` flag, judged by the refcount the cluster will have after
    /// the repair (the expected one).
    fn push_copied_fix(&mut self, at: u64, entry: u64, cluster: u64) {
        let fixed = if self.expected(cluster) == 1 {
            entry | COPIED
        } else {
            entry & !COPIED
        };
        if fixed != entry {
            self.copied_fixes.push(CopiedFix { at, entry: fixed });
        }
    }

    /// One past the last cluster in use, in bytes.
    fn image_end(&self) -> u64 {
        let last = self.expected.iter().rposition(|&n| n > 0).unwrap_or(0) as u64;
        (last + 1) << self.geo.cluster_bits
    }

    /// Applies the fixes `repair` allows; returns (leaks fixed, corruptions fixed, rebuilt).
    fn repair(&self, repair: Repair, messages: &mut Vec<String>) -> Result<(u64, u64, bool)> {
        let needs_rebuild = self.too_low || !self.bad_refblocks.is_empty();
        if needs_rebuild && repair != Repair::All {
            messages.push("ERROR need to rebuild refcount structures".to_string());
            return Err(Error::corrupt(
                "the refcount structure must be rebuilt (use -r all)",
            ));
        }
        let mut corruptions_fixed = 0;
        if repair == Repair::All {
            for fix in &self.copied_fixes {
                self.storage
                    .write_at(&fix.entry.to_be_bytes(), fix.at)
                    .ctx(|| format!("fixing the entry at {:#x}", fix.at))?;
                corruptions_fixed += 1;
            }
        }
        if needs_rebuild {
            messages.push("Rebuilding refcount structure".to_string());
            self.rebuild()?;
            let refcount_errors = self.report.corruptions - self.copied_errors;
            return Ok((self.report.leaks, corruptions_fixed + refcount_errors, true));
        }
        self.fix_leaks(messages)?;
        Ok((self.report.leaks, corruptions_fixed, false))
    }

    /// Lowers leaked refcounts in place, punches what became free and trims the free tail.
    fn fix_leaks(&self, messages: &mut Vec<String>) -> Result<()> {
        let reftable = self.reftable()?;
        let per = self.geo.refblock_entries();
        let cb = self.geo.cluster_bits;
        let order = self.geo.refcount_order;
        for run in self.leaked.chunk_by(|a, b| a.0 / per == b.0 / per) {
            let group = run[0].0 / per;
            let Some(mut block) = self.stored(&reftable, group)? else {
                continue;
            };
            for &(c, expected) in run {
                let old = refcount::get(&block, order, (c % per) as usize);
                messages.push(format!(
                    "Repairing cluster {c} refcount={old} reference={expected}"
                ));
                refcount::set(&mut block, order, (c % per) as usize, expected);
            }
            let off = reftable[group as usize] & OFFSET_MASK;
            self.storage
                .write_at(&block, off)
                .ctx(|| format!("writing refcount block {group}"))?;
        }
        self.storage
            .flush()
            .ctx(|| "flushing the image".to_string())?;
        // Give the space of what became free back to the host, one call per run.
        let freed: Vec<u64> = self
            .leaked
            .iter()
            .filter(|&&(_, expected)| expected == 0)
            .map(|&(c, _)| c)
            .collect();
        for run in freed.chunk_by(|a, b| a + 1 == *b) {
            let (first, n) = (run[0], run.len() as u64);
            self.storage
                .punch_hole(first << cb, n << cb)
                .ctx(|| format!("punching {n} clusters at cluster {first}"))?;
        }
        self.trim_tail()
    }

    /// Cuts free clusters off the end of the file, like qemu-img does after a repair.
    fn trim_tail(&self) -> Result<()> {
        let end = self.image_end();
        let len = self.storage.len().ctx(|| "sizing the image".to_string())?;
        if end < len {
            self.storage
                .set_len(end)
                .ctx(|| format!("trimming the image to {end} bytes"))?;
        }
        self.storage
            .flush()
            .ctx(|| "flushing the image".to_string())
    }

    /// Writes a new refcount table and blocks from the expected counts after the last used
    /// cluster, syncs, and switches the header to them in one write.
    fn rebuild(&self) -> Result<()> {
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let per = self.geo.refblock_entries();
        let order = self.geo.refcount_order;
        let max = self.geo.refcount_max();
        let start = (self.image_end() >> cb).max(self.file_clusters);
        let old: std::collections::HashSet<u64> = self.refstruct.iter().copied().collect();
        // Fixed point: the structure must count (and be covered by) itself.
        let (mut blocks, mut table_clusters) = (0u64, 1u64);
        loop {
            let end = start + table_clusters + blocks;
            let groups = end.div_ceil(per);
            let new_table = (groups * 8).div_ceil(cs).max(1);
            if groups == blocks && new_table == table_clusters {
                break;
            }
            blocks = groups;
            table_clusters = new_table;
        }
        if table_clusters * cs > 8 << 20 {
            return Err(Error::unsupported(
                "rebuilt refcount table would exceed 8 MiB",
            ));
        }
        let table_at = start;
        let blocks_at = start + table_clusters;
        let mut table = vec![0u64; (table_clusters * cs / 8) as usize];
        for g in 0..blocks {
            let mut block = vec![0u8; cs as usize];
            for c in g * per..(g + 1) * per {
                let n = if c >= start && c < blocks_at + blocks {
                    1
                } else if old.contains(&c) {
                    0 // the old structure is free once the header points at the new one
                } else {
                    self.expected(c)
                };
                if n > max {
                    return Err(Error::unsupported(format!(
                        "cluster {c} needs refcount {n}, above the {}-bit maximum",
                        self.geo.refcount_bits()
                    )));
                }
                if n > 0 {
                    refcount::set(&mut block, order, (c % per) as usize, n);
                }
            }
            let at = (blocks_at + g) << cb;
            self.storage
                .write_at(&block, at)
                .ctx(|| format!("writing rebuilt refcount block {g}"))?;
            table[g as usize] = at;
        }
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.storage
            .write_at(&bytes, table_at << cb)
            .ctx(|| "writing the rebuilt refcount table".to_string())?;
        self.storage
            .flush()
            .ctx(|| "flushing the image".to_string())?;
        let mut header = self.header.clone();
        header.refcount_table_offset = table_at << cb;
        header.refcount_table_clusters = table_clusters as u32;
        self.storage
            .write_at(&header.to_bytes()?, 0)
            .ctx(|| "switching the header to the rebuilt refcount table".to_string())?;
        self.storage
            .flush()
            .ctx(|| "flushing the image".to_string())?;
        for &c in &old {
            if self.expected(c) == 1 {
                self.storage
                    .punch_hole(c << cb, cs)
                    .ctx(|| format!("punching old refcount cluster {c}"))?;
            }
        }
        Ok(())
    }
}
