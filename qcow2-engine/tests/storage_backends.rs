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

/// Batched reads through a real file, page cache and `O_DIRECT`: aligned requests (the ring
/// takes them), unaligned ones (read_data's own path), zeros, one past the end (an error for
/// it alone) all give what `read_at` gives.
#[test]
fn batch_reads_of_a_file_match_single_reads_in_both_cache_modes() {
    use qcow2_engine::CacheMode;
    use qcow2_engine::image::ReadRequest;
    use qcow2_engine::storage::AlignedBuf;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    let size = 8u64 << 20;
    let opts = CreateOptions {
        size: Some(size),
        ..CreateOptions::default()
    };
    qcow2_engine::create(&path, &opts).unwrap();
    {
        let img = Image::open(&path, &OpenOptions::writable()).unwrap();
        for i in 0..48u64 {
            let pattern: Vec<u8> = (0..20_000u64).map(|b| (b * 7 + i) as u8).collect();
            img.write_at(&pattern, i * 150_001 % (size - 20_000))
                .unwrap();
        }
        img.close().unwrap();
    }
    let plain = Image::open(&path, &OpenOptions::default()).unwrap();
    let ranges: Vec<(u64, usize)> = (0..40u64)
        .map(|i| match i % 4 {
            0 => ((i * 69_632) % size, 4096),
            1 => ((i * 131_072) % size, 65_536 + 4096),
            2 => ((i * 77_777) % size, 3001),
            _ => ((i * 12_288) % size, 8192),
        })
        .collect();
    for cache in [CacheMode::Buffered, CacheMode::Direct] {
        let img = Image::open(
            &path,
            &OpenOptions {
                cache,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let mut bufs: Vec<AlignedBuf> = ranges.iter().map(|&(_, n)| AlignedBuf::new(n)).collect();
        let mut past = vec![0u8; 4096];
        let mut reqs: Vec<ReadRequest<'_>> = bufs
            .iter_mut()
            .zip(&ranges)
            .map(|(b, &(at, _))| ReadRequest::new(b.bytes_mut(), at))
            .collect();
        reqs.insert(5, ReadRequest::new(&mut past, size - 2048));
        img.read_batch(&mut reqs);
        assert!(reqs[5].result.is_err(), "{cache:?}: a read past the end");
        reqs.remove(5);
        for (r, &(at, n)) in reqs.iter().zip(&ranges) {
            r.result.as_ref().unwrap();
            let mut want = vec![0u8; n];
            plain.read_at(&mut want, at).unwrap();
            assert!(
                r.buf[..] == want[..],
                "{cache:?}: batch read at {at:#x}+{n:#x}"
            );
        }
    }
}
