//! The crate's one error type, and its mapping to gRPC status codes (the one place where
//! that happens: [`From<Error> for tonic::Status`]).

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
    /// A request is malformed or asks for something unsupported.
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume (or other object) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken by an incompatible object.
    #[error("{0}")]
    AlreadyExists(String),
    /// Another operation on the same object is in progress: retry later.
    #[error("{0}")]
    Aborted(String),
    /// The object is not in a state that allows the operation (in use, say).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A size outside what can be provided.
    #[error("{0}")]
    OutOfRange(String),
    /// Out of space or another limit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Not ready yet (the state directory is loading).
    #[error("{0}")]
    Unavailable(String),
    /// Not offered by this plugin.
    #[error("{0}")]
    Unimplemented(String),
    /// Anything else: a bug or an environment failure, with what was being done.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn attach(step: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Attach {
            step: step.into(),
            detail: detail.into(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Aborted(_) => Code::Aborted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Io(io) if io.raw_os_error() == Some(libc::ENOSPC) => Code::ResourceExhausted,
            Error::Io(_) | Error::Protocol(_) | Error::Attach { .. } | Error::Internal(_) => {
                Code::Internal
            }
        };
        tonic::Status::new(code, e.to_string())
    }
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
