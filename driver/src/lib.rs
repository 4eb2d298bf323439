//! qcow2-csi: the CSI plugin for qcow2 volumes. Today it holds the NBD export ([`nbd`]) and
//! the `qcow2-csi nbd` command that serves an image on a socket; the CSI services follow.

pub mod attach;
pub mod csi;
pub mod error;
pub mod nbd;

pub use error::{Error, Result};
