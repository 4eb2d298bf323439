//! Shared helpers for the workspace tests: qemu-img/qemu-io as the oracle.

pub mod fuzz;
pub mod oplog;
pub mod qemu;

use std::fs::File;
use std::os::unix::fs::FileExt;

use qcow2_engine::Image;
use qcow2_engine::image::ReadRequest;

/// Reads `[start, start + len)` through the engine and asserts it equals the same range of
/// a raw file (the reference written by qemu-img or by the test itself), read one range at a
/// time and again in batches.
pub fn assert_engine_matches_raw(img: &Image, raw: &File, start: u64, len: u64) {
    const CHUNK: u64 = 1 << 20;
    let mut ours = vec![0u8; CHUNK as usize];
    let mut theirs = vec![0u8; CHUNK as usize];
    let mut off = start;
    while off < start + len {
        let n = (start + len - off).min(CHUNK) as usize;
        img.read_at(&mut ours[..n], off)
            .unwrap_or_else(|e| panic!("engine read at {off:#x}: {e}"));
        raw.read_exact_at(&mut theirs[..n], off)
            .unwrap_or_else(|e| panic!("raw read at {off:#x}: {e}"));
        if let Some(i) = ours[..n].iter().zip(&theirs[..n]).position(|(x, y)| x != y) {
            panic!(
                "content differs at {:#x}: engine {:#x}, reference {:#x}",
                off + i as u64,
                ours[i],
                theirs[i]
            );
        }
        off += n as u64;
    }
    assert_batch_reads_match_raw(img, raw, start, len);
}

/// Reads `[start, start + len)` again with [`Image::read_batch`]: pieces of assorted sizes
/// and alignments (inside a cluster, across clusters, a byte), 32 per batch, each compared
/// with the reference file.
pub fn assert_batch_reads_match_raw(img: &Image, raw: &File, start: u64, len: u64) {
    const SIZES: [usize; 8] = [4096, 512, 65536, 3 * 4096 + 512, 1, 135168, 8192, 70000];
    let end = start + len;
    let mut off = start;
    let mut k = 0;
    while off < end {
        let mut ranges = Vec::new();
        while off < end && ranges.len() < 32 {
            let n = (SIZES[k % SIZES.len()] as u64).min(end - off) as usize;
            ranges.push((off, n));
            off += n as u64;
            k += 1;
        }
        let mut bufs: Vec<Vec<u8>> = ranges.iter().map(|&(_, n)| vec![0x5a; n]).collect();
        let mut reqs: Vec<ReadRequest<'_>> = bufs
            .iter_mut()
            .zip(&ranges)
            .map(|(b, &(at, _))| ReadRequest::new(b, at))
            .collect();
        img.read_batch(&mut reqs);
        for (r, &(at, n)) in reqs.iter().zip(&ranges) {
            if let Err(e) = &r.result {
                panic!("batch read at {at:#x}+{n:#x}: {e}");
            }
            let mut theirs = vec![0u8; n];
            raw.read_exact_at(&mut theirs, at)
                .unwrap_or_else(|e| panic!("raw read at {at:#x}: {e}"));
            if let Some(i) = r.buf.iter().zip(&theirs).position(|(x, y)| x != y) {
                panic!(
                    "batch read at {at:#x}+{n:#x} differs at {:#x}: engine {:#x}, reference {:#x}",
                    at + i as u64,
                    r.buf[i],
                    theirs[i]
                );
            }
        }
    }
}
