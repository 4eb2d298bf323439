//! The engine's one error type.
//!
//! Callers (the CLI, later the NBD server and the CSI services) match on the variant to decide
//! what to tell their user; the message is meant to be shown as is, on one line.

use std::io;
use std::path::PathBuf;

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error from the storage below, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        /// What the engine was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The image is not a valid qcow2 image (bad header, out-of-range table, ...).
    #[error("invalid image: {0}")]
    InvalidImage(String),
    /// The image uses a feature this engine does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The request itself is wrong (out of range, bad size, bad option).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The image is opened read-only (or can only be opened read-only).
    #[error("image is read-only: {0}")]
    ReadOnly(String),
    /// Metadata inside the image is inconsistent; the operation was refused to avoid damage.
    #[error("image is corrupt: {0}")]
    Corrupt(String),
    /// A backing file was refused by the backing policy, or the chain is malformed.
    #[error("backing file {path:?}: {reason}")]
    Backing {
        /// The backing path as named by the image (resolved where possible).
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
}

impl Error {
    /// Wraps an I/O error with a description of the operation.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidImage(msg.into())
    }

    pub(crate) fn unsupported(msg: impl Into<String>) -> Self {
        Error::Unsupported(msg.into())
    }

    pub(crate) fn arg(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    pub(crate) fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(msg.into())
    }
}

/// Adds context to `io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}
