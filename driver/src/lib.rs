//! qcow2-csi: the CSI plugin for qcow2 volumes. The CSI services ([`csi`]) keep volumes as
//! qcow2 layers in a state directory and attach them ([`attach`]) through the NBD export
//! ([`nbd`]) served from the engine; [`metrics`] counts what they do for Prometheus.

pub mod attach;
pub mod csi;
pub mod error;
pub mod metrics;
pub mod nbd;

pub use error::{Error, Result};
