//! The NBD export: the wire format ([`proto`]), the device trait the server serves
//! ([`device`]), and the server ([`server`]). See `docs/nbd.md`.

pub mod device;
pub mod listen;
pub mod proto;
pub mod qos;
pub mod server;

pub use device::{BlockDevice, DeviceError, Extent};
pub use server::{Discard, Ended, Export, Limits, Server};
