//! Fuzz targets, shared by `cargo fuzz` (`fuzz/`) and the bounded runs in the test suite.
//!
//! - [`open_image`]: arbitrary bytes as an image file. Opening, reading, walking the
//!   allocation status and checking must never panic, hang or allocate without bound; an
//!   image that `check -r all` declares consistent must stay consistent under our writes.
//! - [`ops`]: arbitrary bytes as a geometry and an operation sequence on a fresh image, checked
//!   against an in-memory model after every read, across reopens, and by `check` at the end.

use std::sync::Arc;

use qcow2_engine::ops::check::{self, Repair};
use qcow2_engine::storage::{MemoryStorage, Storage};
use qcow2_engine::{BackingPolicy, CreateOptions, Image, OpenOptions, ZeroFlags};

/// Largest virtual range the open target reads (a hostile header may claim petabytes).
const READ_WINDOW: u64 = 4 << 20;

/// The passphrase every open tries: encrypted seeds are made with it, so their mutants get
/// as far as unlocking and decrypting.
pub const PASSPHRASE: &str = "fuzz";

fn untrusted(writable: bool) -> OpenOptions {
    OpenOptions {
        writable,
        passphrase: Some(qcow2_engine::crypto::Passphrase::new(PASSPHRASE)),
        backing: BackingPolicy::Deny,
        l2_cache_bytes: Some(256 << 10),
        refcount_cache_bytes: Some(128 << 10),
        ..OpenOptions::default()
    }
}

fn open(bytes: Vec<u8>, writable: bool) -> (Arc<MemoryStorage>, qcow2_engine::Result<Image>) {
    let storage = Arc::new(MemoryStorage::from_bytes(bytes));
    let img = Image::open_storage(storage.clone(), None, &untrusted(writable));
    (storage, img)
}

/// Reads and walks a bounded window of an opened image; errors are fine, panics are not.
fn exercise_read_only(img: &Image) {
    let size = img.size();
    let window = size.min(READ_WINDOW);
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0;
    while off < window {
        let n = (window - off).min(buf.len() as u64) as usize;
        if img.read_at(&mut buf[..n], off).is_err() {
            break;
        }
        off += n as u64;
    }
    if size > window {
        let _ = img.read_at(&mut buf[..4096.min(size as usize)], size - 4096.min(size));
    }
    let mut pos = 0;
    let mut steps = 0;
    while pos < window && steps < 4096 {
        match img.layer_status(pos, window - pos) {
            Ok((n, _)) if n > 0 => pos += n,
            _ => break,
        }
        steps += 1;
    }
}

/// The `open_image` target.
pub fn open_image(data: &[u8]) {
    let (_, img) = open(data.to_vec(), false);
    if let Ok(img) = img {
        exercise_read_only(&img);
    }
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(data.to_vec()));
    let _ = check::check(&storage, Repair::None);

    // Repair a copy; if the repair says the image is consistent, our writes must keep it so.
    let repaired = Arc::new(MemoryStorage::from_bytes(data.to_vec()));
    let dyn_repaired: Arc<dyn Storage> = repaired.clone();
    let Ok(report) = check::check(&dyn_repaired, Repair::All) else {
        return;
    };
    if report.corruptions > 0 || report.check_errors > 0 || report.leaks > 0 {
        return;
    }
    let (storage, img) = open(repaired.to_bytes(), true);
    let Ok(img) = img else {
        return;
    };
    let size = img.size();
    if size == 0 {
        return;
    }
    let pattern = [0x5au8; 5000];
    let targets = [0, size / 2, size.saturating_sub(5000)];
    for &t in &targets {
        let n = (size - t).min(pattern.len() as u64) as usize;
        if img.write_at(&pattern[..n], t).is_err() {
            return; // e.g. an L2 entry naming metadata: refused, image marked corrupt
        }
    }
    // An error means the engine refused to touch something it judged corrupt (and marked
    // the image so); only a fully successful session must leave a clean image.
    if img.discard(0, size.min(1 << 20)).is_err() || img.close().is_err() {
        return;
    }
    let after: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(storage.to_bytes()));
    let report = check::check(&after, Repair::None).expect("check of an image we wrote");
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "our writes damaged a consistent image: {:?}",
        report.messages
    );
}

/// Reads little-endian numbers off the fuzz input, then zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The `ops` target.
pub fn ops(data: &[u8]) {
    let mut input = Input(data);
    let cluster_bits = 9 + u32::from(input.byte() % 8);
    let flags = input.byte();
    let extended = flags & 1 != 0 && cluster_bits >= 14;
    let refcount_bits = 1u32 << ((flags >> 1) % 7);
    let mut size = u64::from(input.u32() % (4 << 20))
        .max(1)
        .next_multiple_of(512);
    let opts = CreateOptions {
        size: Some(size),
        cluster_size: 1 << cluster_bits,
        extended_l2: extended,
        refcount_bits,
        backing: None,
        encryption: None,
        compression: qcow2_engine::format::CompressionType::Zlib,
        data_file: None,
    };
    let storage = Arc::new(MemoryStorage::new());
    qcow2_engine::create_on(storage.clone(), None, &opts).expect("create");
    let reopen = |s: &Arc<MemoryStorage>| {
        Image::open_storage(s.clone(), None, &untrusted(true)).expect("reopen our own image")
    };
    let mut img = reopen(&storage);
    let mut model = vec![0u8; size as usize];
    let mut ops = 0;
    while !input.is_empty() && ops < 200 {
        ops += 1;
        let op = input.byte();
        let off = u64::from(input.u32()) % size;
        let len = (u64::from(input.u32()) % (256 << 10))
            .min(size - off)
            .max(1);
        let len = len.min(size - off);
        let (o, l) = (off as usize, len as usize);
        match op % 9 {
            0 | 1 => {
                let fill = input.byte();
                let bytes: Vec<u8> = (0..l).map(|i| fill.wrapping_add((i >> 9) as u8)).collect();
                img.write_at(&bytes, off).expect("write");
                model[o..o + l].copy_from_slice(&bytes);
            }
            2 => {
                img.write_zeroes(off, len, ZeroFlags { no_hole: false })
                    .expect("zero");
                model[o..o + l].fill(0);
            }
            3 => {
                img.write_zeroes(off, len, ZeroFlags { no_hole: true })
                    .expect("zero no-hole");
                model[o..o + l].fill(0);
            }
            4 => {
                img.discard(off, len).expect("discard");
                model[o..o + l].fill(0);
            }
            5 => img.flush().expect("flush"),
            6 => {
                let mut buf = vec![0u8; l];
                img.read_at(&mut buf, off).expect("read");
                assert!(buf == model[o..o + l], "read at {off:#x}+{len:#x} differs");
            }
            7 => {
                img.close().expect("close");
                img = reopen(&storage);
            }
            _ => {
                let grow = u64::from(input.u32() % (1 << 20)).next_multiple_of(512);
                if size + grow <= 8 << 20 {
                    img.resize(size + grow).expect("resize");
                    size += grow;
                    model.resize(size as usize, 0);
                }
            }
        }
    }
    let mut all = vec![0u8; size as usize];
    img.read_at(&mut all, 0).expect("read all");
    assert!(all == model, "final content differs from the model");
    img.close().expect("close");
    let dyn_storage: Arc<dyn Storage> = storage.clone();
    let report = check::check(&dyn_storage, Repair::None).expect("check");
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "{:?}",
        report.messages
    );
    let img = reopen(&storage);
    img.read_at(&mut all, 0).expect("read after reopen");
    assert!(all == model, "content differs after reopen");
}
