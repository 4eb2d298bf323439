//! Arbitrary operation sequences on a fresh image: see `qcow2_csi_tests::fuzz::ops`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow2_csi_tests::fuzz::ops(data));
