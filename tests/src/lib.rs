//! Shared helpers for the workspace tests: qemu-img/qemu-io as the oracle.

pub mod fuzz;
pub mod oplog;
pub mod qemu;

use std::fs::File;
use std::os::unix::fs::FileExt;

use qcow2_engine::Image;

/// Reads `[start, start + len)` through the engine and asserts it equals the same range of
/// a raw file (the reference written by qemu-img or by the test itself).
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
}
