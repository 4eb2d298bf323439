//! Growing the virtual size, relocating the L1 table when it must grow.

use super::State;
use crate::error::{Error, IoContext, Result};
use crate::meta::MetaKind;
use crate::types::HostOffset;

impl State {
    pub(crate) fn resize(&mut self, new_size: u64) -> Result<()> {
        let new_size = new_size
            .checked_next_multiple_of(512)
            .ok_or_else(|| Error::arg("size overflows"))?;
        let old_size = self.meta.header.size;
        if new_size < old_size {
            return Err(Error::unsupported("shrinking an image"));
        }
        if new_size == old_size {
            return Ok(());
        }
        let geo = self.meta.geo;
        let needed = geo.l1_entries_for(new_size);
        if new_size > geo.max_virtual_size() {
            return Err(Error::arg(format!(
                "size {new_size} needs an L1 table above 32 MiB"
            )));
        }
        if needed > u64::from(self.meta.header.l1_size) {
            self.grow_l1(needed)?;
        }
        if let Some(data) = &self.meta.data_file {
            // The data file holds the guest disk at its own offsets: as large as it (grown
            // first: a crash before the header leaves only a longer file).
            let len = data.len().ctx(|| "sizing the data file".to_string())?;
            if len < new_size {
                data.set_len(new_size)
                    .ctx(|| "growing the data file".to_string())?;
            }
        }
        self.meta.header.size = new_size;
        self.meta.write_header()?;
        self.meta.sync()
    }

    /// Writes a bigger L1 at the end of the image, syncs, points the header at it, frees the old.
    fn grow_l1(&mut self, entries: u64) -> Result<()> {
        let cs = self.meta.geo.cluster_size();
        let clusters = (entries * 8).div_ceil(cs);
        let new_off = self.meta.alloc_at_end(clusters)?;
        let cb = self.meta.geo.cluster_bits;
        self.meta
            .map
            .insert(new_off.0 >> cb, clusters, MetaKind::L1)?;
        let mut table = self.meta.l1.clone();
        table.resize(entries as usize, 0);
        let mut bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        bytes.resize((clusters * cs) as usize, 0);
        self.meta.write_meta(MetaKind::L1, new_off, &bytes)?;
        self.meta.sync()?;
        let old_off = self.meta.header.l1_table_offset;
        let old_clusters = (u64::from(self.meta.header.l1_size) * 8).div_ceil(cs);
        self.meta.header.l1_table_offset = new_off.0;
        self.meta.header.l1_size = entries as u32;
        self.meta.write_header()?;
        self.meta.sync()?;
        self.meta.l1 = table;
        if old_clusters > 0 {
            self.meta.free_range(HostOffset(old_off), old_clusters);
        }
        Ok(())
    }
}
