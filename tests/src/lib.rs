//! Shared helpers for the workspace tests: qemu-img/qemu-io as the oracle.

pub mod oplog;
pub mod qemu;
