//! qcow2-engine: a qcow2 image engine, byte-compatible with QEMU in both directions.
//!
//! Layers (each a module with one job): [`storage`] (the only I/O seam), [`format`](mod@format) (on-disk
//! encoding and validation), [`cache`] (metadata slices under a byte budget), `alloc` (cluster
//! allocation with refcounts), [`image`] (the public handle) and [`ops`] (whole-image
//! operations). See `docs/engine.md` for the design and the durability contract.

pub mod cache;
pub mod crypto;
pub mod error;
pub mod format;
pub mod image;
pub mod ops;
pub mod storage;
pub mod types;

pub mod sync;

mod alloc;
mod barrier;
mod meta;

pub use error::{Error, Result};
pub use image::{Backing, BackingPolicy, Image, LayerStatus, OpenOptions, ZeroFlags};
pub use ops::create::{BackingFormat, CreateOptions, create, create_on};
pub use storage::CacheMode;
pub use types::{Geometry, GuestOffset, HostOffset};
