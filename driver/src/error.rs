//! The crate's one error type.

use std::io;

/// What can go wrong in the plugin.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// I/O on a connection or a file.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// An NBD peer broke the protocol (the connection is closed).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Attaching or detaching a block device failed at `step`.
    #[error("{step}: {detail}")]
    Attach {
        /// What was being done (a command, a wait).
        step: String,
        /// What went wrong.
        detail: String,
    },
}

impl Error {
    pub(crate) fn attach(step: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Attach {
            step: step.into(),
            detail: detail.into(),
        }
    }
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
