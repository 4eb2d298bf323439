//! The CSI v1.12 wire types and gRPC services (Identity, Controller, Node), generated at build
//! time from `proto/csi.proto`.

/// Package `csi.v1`.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    missing_debug_implementations
)]
pub mod v1 {
    tonic::include_proto!("csi.v1");
}

/// `google.protobuf.Timestamp`, as the snapshot messages use it.
pub use prost_types::Timestamp;
