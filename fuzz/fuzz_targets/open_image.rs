//! Arbitrary bytes as a qcow2 image: see `qcow2_csi_tests::fuzz::open_image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow2_csi_tests::fuzz::open_image(data));
