//! The on-disk format: header and extensions, L1/L2 entries, refcount entries.
//!
//! Pure encoding and decoding with validation; no I/O happens here. Layouts follow
//! `docs/interop/qcow2.txt` in QEMU's tree.

pub mod entries;
pub mod header;
pub mod refcount;

pub use entries::{L1Entry, L2Entry, Mapping, SubclusterBitmap};
pub use header::{CompressionType, FeatureName, Header, HeaderExtension};
