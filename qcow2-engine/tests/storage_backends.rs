//! The engine over the in-memory and fault-injecting storages: no files, no qemu.

use std::sync::Arc;

use qcow2_engine::storage::{FaultPlan, FaultStorage, MemoryStorage};
use qcow2_engine::{CreateOptions, Error, Image, OpenOptions, ZeroFlags, create_on};

fn fresh(extended_l2: bool) -> Vec<u8> {
    let mem = Arc::new(MemoryStorage::new());
    let opts = CreateOptions {
        size: Some(256 << 20),
        extended_l2,
        ..CreateOptions::default()
    };
    create_on(mem.clone(), None, &opts).unwrap();
    mem.to_bytes()
}

#[test]
fn memory_storage_serves_reads_writes_zeroes_and_discards() {
    for ext in [false, true] {
        let mem = Arc::new(MemoryStorage::from_bytes(fresh(ext)));
        let img = Image::open_storage(mem.clone(), None, &OpenOptions::writable()).unwrap();
        img.write_at(&[0x5a; 10_000], 3000).unwrap();
        img.write_zeroes(4096, 2048, ZeroFlags::default()).unwrap();
        img.discard(0, 65536 * 2).unwrap();
        img.write_at(&[0x77; 512], (256 << 20) - 512).unwrap();
        let mut buf = vec![0xffu8; 13_000];
        img.read_at(&mut buf, 0).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "discarded range reads zeros (ext {ext})"
        );
        let mut tail = [0u8; 512];
        img.read_at(&mut tail, (256 << 20) - 512).unwrap();
        assert_eq!(tail, [0x77; 512]);
        img.close().unwrap();
        // Reopen from the bytes alone: everything needed was written through.
        let again = Image::open_storage(
            Arc::new(MemoryStorage::from_bytes(mem.to_bytes())),
            None,
            &OpenOptions::default(),
        )
        .unwrap();
        again.read_at(&mut tail, (256 << 20) - 512).unwrap();
        assert_eq!(tail, [0x77; 512]);
    }
}

#[test]
fn out_of_range_and_read_only_requests_fail_cleanly() {
    let mem = Arc::new(MemoryStorage::from_bytes(fresh(false)));
    let ro = Image::open_storage(mem.clone(), None, &OpenOptions::default()).unwrap();
    assert!(matches!(ro.write_at(&[1], 0), Err(Error::ReadOnly(_))));
    let rw = Image::open_storage(mem, None, &OpenOptions::writable()).unwrap();
    assert!(matches!(
        rw.write_at(&[1; 2], (256 << 20) - 1),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        rw.read_at(&mut [0; 1], u64::MAX),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        rw.discard(u64::MAX - 1, 10),
        Err(Error::InvalidArgument(_))
    ));
}

/// Every failing storage write surfaces as an error (never a panic), and whatever was
/// acknowledged before the failure reads back after reopening the surviving bytes.
#[test]
fn a_failed_write_is_an_error_and_acknowledged_data_survives() {
    let image = fresh(false);
    let mut n = 0;
    loop {
        let fault = Arc::new(FaultStorage::new(
            image.clone(),
            FaultPlan::CrashAtMutation(n),
        ));
        let img = Image::open_storage(fault.clone(), None, &OpenOptions::writable()).unwrap();
        let mut acked = Vec::new();
        let mut failed = false;
        for i in 0..6u64 {
            let off = i * 200_000 + 1000;
            match img.write_at(&[i as u8 + 1; 70_000], off) {
                Ok(()) => acked.push((off, i as u8 + 1)),
                Err(e) => {
                    assert!(e.to_string().contains("injected"), "{e}");
                    failed = true;
                    break;
                }
            }
        }
        drop(img);
        let survivor = Image::open_storage(
            Arc::new(MemoryStorage::from_bytes(fault.live())),
            None,
            &OpenOptions::default(),
        )
        .unwrap();
        for (off, byte) in acked {
            let mut buf = vec![0u8; 70_000];
            survivor.read_at(&mut buf, off).unwrap();
            assert!(
                buf.iter().all(|&b| b == byte),
                "acknowledged write at {off} lost (crash at mutation {n})"
            );
        }
        if !failed {
            break;
        }
        n += 1;
    }
    assert!(n > 10, "the loop must have crashed at many points ({n})");
}
