//! Deterministic races: a storage that parks a chosen data read or write lets a test line up
//! exactly the interleaving a random stress test would only hit by luck.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use qcow2_engine::image::ReadRequest;
use qcow2_engine::storage::{MemoryStorage, Storage};
use qcow2_engine::{CreateOptions, Image, LayerStatus, OpenOptions, create_on};

const CS: u64 = 65536;

/// Which data request to park.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trap {
    None,
    /// The next data read that covers this host offset.
    ReadAt(u64),
    /// The next data write, wherever it goes.
    NextWrite,
}

#[derive(Debug, Default)]
struct Gate {
    trap: Option<Trap>,
    parked: bool,
    released: bool,
}

/// Memory storage whose data path can park one request until the test releases it.
#[derive(Debug)]
struct Parking {
    inner: MemoryStorage,
    gate: Mutex<Gate>,
    changed: Condvar,
}

impl Parking {
    fn new(bytes: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryStorage::from_bytes(bytes),
            gate: Mutex::new(Gate::default()),
            changed: Condvar::new(),
        })
    }

    fn arm(&self, trap: Trap) {
        *self.gate.lock().unwrap() = Gate {
            trap: Some(trap),
            ..Gate::default()
        };
    }

    /// Parks the caller if `hit` says the armed trap matches.
    fn maybe_park(&self, hit: impl Fn(Trap) -> bool) {
        let mut g = self.gate.lock().unwrap();
        if !g.trap.is_some_and(&hit) {
            return;
        }
        g.trap = Some(Trap::None);
        g.parked = true;
        self.changed.notify_all();
        while !g.released {
            g = self.changed.wait(g).unwrap();
        }
    }

    fn wait_parked(&self) {
        let mut g = self.gate.lock().unwrap();
        while !g.parked {
            g = self.changed.wait(g).unwrap();
        }
    }

    fn release(&self) {
        self.gate.lock().unwrap().released = true;
        self.changed.notify_all();
    }
}

impl Storage for Parking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn read_data(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        self.maybe_park(|t| matches!(t, Trap::ReadAt(at) if at >= offset && at < end));
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn write_data(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.maybe_park(|t| t == Trap::NextWrite);
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

fn fresh_image() -> (Arc<Parking>, Image) {
    let mem = Arc::new(MemoryStorage::new());
    let opts = CreateOptions {
        size: Some(64 << 20),
        ..CreateOptions::default()
    };
    create_on(mem.clone(), None, &opts).unwrap();
    let storage = Parking::new(mem.to_bytes());
    let img = Image::open_storage(storage.clone(), None, &OpenOptions::writable()).unwrap();
    (storage, img)
}

fn host_of(img: &Image, guest: u64) -> u64 {
    match img.layer_status(guest, 512).unwrap().1 {
        LayerStatus::Data { host } => host,
        other => panic!("guest {guest:#x} is not data: {other:?}"),
    }
}

#[test]
fn image_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Image>();
}

#[test]
fn a_cluster_freed_under_a_read_in_flight_is_not_reused_until_the_read_ends() {
    freed_under_a_read(false);
}

#[test]
fn a_cluster_freed_under_a_batch_read_in_flight_is_not_reused_until_the_batch_ends() {
    freed_under_a_read(true);
}

/// A read of guest cluster 0 parks while its cluster is discarded and released; `batch`
/// reads it in a batch with another cluster ([`Image::read_batch`]), else with `read_at`.
fn freed_under_a_read(batch: bool) {
    let (storage, img) = fresh_image();
    img.write_at(&vec![0xaa; CS as usize], 0).unwrap();
    let victim = host_of(&img, 0);
    storage.arm(Trap::ReadAt(victim));
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut buf = vec![0u8; CS as usize];
            if batch {
                let mut other = vec![0u8; 4096];
                let mut reqs = [
                    ReadRequest::new(&mut other, 7 * CS),
                    ReadRequest::new(&mut buf, 0),
                ];
                img.read_batch(&mut reqs);
                for r in reqs {
                    r.result.unwrap();
                }
            } else {
                img.read_at(&mut buf, 0).unwrap();
            }
            buf
        });
        storage.wait_parked();
        // The reader has looked up the victim cluster and is reading it. Unlink it, release
        // it, and allocate enough new clusters that a released victim would be reused.
        img.discard(0, CS).unwrap();
        let flusher = s.spawn(|| img.flush().unwrap());
        let writer = s.spawn(|| {
            for i in 1..200u64 {
                img.write_at(&vec![0xbb; CS as usize], i * CS).unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !flusher.is_finished(),
            "the release did not wait for the read in flight"
        );
        storage.release();
        let buf = reader.join().unwrap();
        assert!(
            buf.iter().all(|&b| b == 0xaa) || buf.iter().all(|&b| b == 0),
            "a read in flight saw another guest cluster's data"
        );
        flusher.join().unwrap();
        writer.join().unwrap();
    });
    let mut buf = vec![0u8; CS as usize];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "discarded cluster reads zeros");
    img.read_at(&mut buf, 5 * CS).unwrap();
    assert!(buf.iter().all(|&b| b == 0xbb));
}

#[test]
fn two_writers_to_one_unallocated_cluster_allocate_it_once() {
    let (storage, img) = fresh_image();
    storage.arm(Trap::NextWrite);
    std::thread::scope(|s| {
        let first = s.spawn(|| img.write_at(&[0x11; 4096], 0).unwrap());
        storage.wait_parked();
        // The first writer owns the allocation of guest cluster 0 and is writing its data.
        let second = s.spawn(|| img.write_at(&[0x22; 4096], 8192).unwrap());
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !second.is_finished(),
            "the second writer did not wait for the allocation in flight"
        );
        storage.release();
        first.join().unwrap();
        second.join().unwrap();
    });
    assert_eq!(
        host_of(&img, 0),
        host_of(&img, 8192) - 8192,
        "one host cluster"
    );
    let mut buf = vec![0u8; 12288];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0x11));
    assert!(buf[4096..8192].iter().all(|&b| b == 0));
    assert!(buf[8192..].iter().all(|&b| b == 0x22));
}

#[test]
fn writers_to_different_clusters_do_not_wait_for_each_other() {
    let (storage, img) = fresh_image();
    storage.arm(Trap::NextWrite);
    std::thread::scope(|s| {
        let first = s.spawn(|| img.write_at(&[0x11; 4096], 0).unwrap());
        storage.wait_parked();
        // Another cluster, another L2 entry in the same slice: this one must complete while
        // the first write is still parked in the middle of its data I/O.
        img.write_at(&[0x22; 4096], 3 * CS).unwrap();
        let mut buf = [0u8; 4096];
        img.read_at(&mut buf, 3 * CS).unwrap();
        assert_eq!(buf, [0x22; 4096]);
        storage.release();
        first.join().unwrap();
    });
    let mut buf = [0u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x11; 4096]);
}
