//! Seeded random op logs replayed through our engine, through qemu-io and on a raw file.
//!
//! Offsets and lengths come from a "nasty" set: around 512 B, 2 KiB, 4 KiB, 64 KiB, the L2
//! table boundaries and the image end, so that sector, subcluster, cluster and table edges are
//! all crossed. Discard is defined by the engine as "deallocate whole units, zero the partial
//! ones"; QEMU ignores partial-cluster discards, so the qemu-io replay zeroes those edges
//! explicitly and the contents of all three must agree.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Fill `[off, off + len)` with `byte`.
    Write { off: u64, len: u64, byte: u8 },
    /// Zero the range; `unmap` allows deallocation.
    Zero { off: u64, len: u64, unmap: bool },
    /// Discard the range.
    Discard { off: u64, len: u64 },
    /// Flush.
    Flush,
    /// Close and reopen (engine only; a no-op for the others).
    Reopen,
}

/// Interesting offsets for an image of `size` bytes with L2 tables covering `l2_span`.
pub fn nasty_offsets(size: u64, l2_span: u64) -> Vec<u64> {
    let mut v = vec![
        0,
        511,
        512,
        2047,
        2048,
        4095,
        4096,
        65535,
        65536,
        65537,
        3 * 65536 - 512,
    ];
    let mut b = l2_span;
    while b < size {
        for d in [-65537i64, -4096, -1, 0, 1, 2048, 65536] {
            let o = b as i64 + d;
            if o >= 0 && (o as u64) < size {
                v.push(o as u64);
            }
        }
        b += l2_span;
    }
    for d in [1, 512, 2048, 4096, 65536, 65536 + 2048] {
        if d <= size {
            v.push(size - d);
        }
    }
    v
}

const NASTY_LENGTHS: &[u64] = &[
    1,
    511,
    512,
    513,
    2047,
    2048,
    2049,
    4096,
    6144,
    65535,
    65536,
    65537,
    131072 + 2048,
    300_000,
];

/// Generates `count` ops for an image of `size` bytes.
pub fn generate(seed: u64, count: usize, size: u64, l2_span: u64) -> Vec<Op> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let offsets = nasty_offsets(size, l2_span);
    let mut ops = Vec::with_capacity(count);
    for i in 0..count {
        let off = if rng.random_bool(0.7) {
            offsets[rng.random_range(0..offsets.len())]
        } else {
            rng.random_range(0..size)
        };
        let len = NASTY_LENGTHS[rng.random_range(0..NASTY_LENGTHS.len())]
            .min(size - off)
            .max(1);
        let op = match rng.random_range(0..100) {
            0..=59 => Op::Write {
                off,
                len,
                byte: (i % 251 + 1) as u8,
            },
            60..=74 => Op::Zero {
                off,
                len,
                unmap: rng.random_bool(0.5),
            },
            75..=89 => Op::Discard { off, len },
            90..=96 => Op::Flush,
            _ => Op::Reopen,
        };
        ops.push(op);
    }
    ops
}

/// The qemu-io script for `ops` on an image with clusters of `cluster` bytes.
pub fn qemu_io_script(ops: &[Op], cluster: u64) -> String {
    let mut s = String::new();
    for op in ops {
        match *op {
            Op::Write { off, len, byte } => {
                s.push_str(&format!("write -q -P {byte} {off} {len}\n"));
            }
            Op::Zero { off, len, unmap } => {
                s.push_str(&format!(
                    "write -q -z {}{off} {len}\n",
                    if unmap { "-u " } else { "" }
                ));
            }
            Op::Discard { off, len } => {
                let start = off.next_multiple_of(cluster);
                let end = (off + len) / cluster * cluster;
                if start < end {
                    if off < start {
                        s.push_str(&format!("write -q -z {off} {}\n", start - off));
                    }
                    s.push_str(&format!("discard -q {start} {}\n", end - start));
                    if end < off + len {
                        s.push_str(&format!("write -q -z {end} {}\n", off + len - end));
                    }
                } else {
                    s.push_str(&format!("write -q -z {off} {len}\n"));
                }
            }
            Op::Flush => s.push_str("flush\n"),
            Op::Reopen => {}
        }
    }
    s
}

/// Applies `ops` to a raw file (discard and zero both leave zeros).
pub fn apply_raw(file: &std::fs::File, ops: &[Op]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    for op in ops {
        match *op {
            Op::Write { off, len, byte } => file.write_all_at(&vec![byte; len as usize], off)?,
            Op::Zero { off, len, .. } | Op::Discard { off, len } => {
                file.write_all_at(&vec![0; len as usize], off)?;
            }
            Op::Flush | Op::Reopen => {}
        }
    }
    Ok(())
}
