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
    /// I/O on the host (a file, a directory, a device), with what was being done.
    #[error("{context}: {source}")]
    HostIo {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The engine refused or failed an operation on an image, with what was being done.
    #[error("{context}: {source}")]
    Engine {
        context: String,
        #[source]
        source: qcow2_engine::Error,
    },
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
    /// Host I/O that failed while doing `context`; the error keeps its source.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::HostIo {
            context: context.into(),
            source,
        }
    }

    /// An engine operation that failed while doing `context`; the error keeps its source.
    pub fn engine(context: impl Into<String>, source: qcow2_engine::Error) -> Self {
        Error::Engine {
            context: context.into(),
            source,
        }
    }

    /// The same error, its message led by `what` (which volume, say): the gRPC code it
    /// maps to is kept.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        let lead = |s: String| format!("{what}: {s}");
        match self {
            Error::Io(source) => Error::HostIo {
                context: what.to_string(),
                source,
            },
            Error::HostIo { context, source } => Error::HostIo {
                context: lead(context),
                source,
            },
            Error::Engine { context, source } => Error::Engine {
                context: lead(context),
                source,
            },
            Error::Protocol(s) => Error::Protocol(lead(s)),
            Error::Attach { step, detail } => Error::Attach {
                step: lead(step),
                detail,
            },
            Error::InvalidArgument(s) => Error::InvalidArgument(lead(s)),
            Error::NotFound(s) => Error::NotFound(lead(s)),
            Error::AlreadyExists(s) => Error::AlreadyExists(lead(s)),
            Error::Aborted(s) => Error::Aborted(lead(s)),
            Error::FailedPrecondition(s) => Error::FailedPrecondition(lead(s)),
            Error::OutOfRange(s) => Error::OutOfRange(lead(s)),
            Error::ResourceExhausted(s) => Error::ResourceExhausted(lead(s)),
            Error::Unavailable(s) => Error::Unavailable(lead(s)),
            Error::Unimplemented(s) => Error::Unimplemented(lead(s)),
            Error::Internal(s) => Error::Internal(lead(s)),
        }
    }

    pub(crate) fn attach(step: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Attach {
            step: step.into(),
            detail: detail.into(),
        }
    }
}

/// Out of space on the host: a full filesystem, a quota, a file at its size limit.
fn out_of_space(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
    )
}

impl Error {
    /// The gRPC code a CO sees for this error: the one place where errors become codes.
    pub fn code(&self) -> tonic::Code {
        use qcow2_engine::Error as E;
        use tonic::Code;
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Aborted(_) => Code::Aborted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Io(io) | Error::HostIo { source: io, .. } if out_of_space(io) => {
                Code::ResourceExhausted
            }
            Error::Engine { source, .. } => match source {
                E::Io { source, .. } if out_of_space(source) => Code::ResourceExhausted,
                // The image or its chain is damaged or beyond this engine: retrying cannot
                // help until someone repairs it.
                E::InvalidImage(_) | E::Corrupt(_) | E::Backing { .. } | E::Unsupported(_) => {
                    Code::FailedPrecondition
                }
                E::ReadOnly(_) => Code::FailedPrecondition,
                E::InvalidArgument(_) => Code::InvalidArgument,
                _ => Code::Internal,
            },
            Error::Io(_)
            | Error::HostIo { .. }
            | Error::Protocol(_)
            | Error::Attach { .. }
            | Error::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn errors_keep_their_source_and_map_to_the_codes_a_co_can_act_on() {
        let full = || io::Error::from_raw_os_error(libc::ENOSPC);
        for e in [
            Error::io("creating x", full()),
            Error::io("creating x", io::Error::from_raw_os_error(libc::EDQUOT)),
            Error::Io(full()),
            Error::engine("growing", qcow2_engine::Error::io("writing", full())),
        ] {
            assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        }
        let corrupt = Error::engine("opening a", qcow2_engine::Error::Corrupt("bad L2".into()));
        assert_eq!(corrupt.code(), Code::FailedPrecondition);
        assert_eq!(corrupt.to_string(), "opening a: image is corrupt: bad L2");
        let eio = Error::io("reading y", io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(eio.code(), Code::Internal);
        assert!(
            std::error::Error::source(&eio).is_some(),
            "the source is kept"
        );
        let status = tonic::Status::from(Error::io("creating /s", full()));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status.message().starts_with("creating /s: No space left"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn context_leads_the_message_and_keeps_the_code() {
        let full = || io::Error::from_raw_os_error(libc::ENOSPC);
        for e in [
            Error::Io(full()),
            Error::io("flushing", full()),
            Error::engine("flushing", qcow2_engine::Error::io("writing", full())),
            Error::InvalidArgument("bad".into()),
            Error::Internal("broken".into()),
            Error::attach("connecting", "refused"),
        ] {
            let (code, message) = (e.code(), e.to_string());
            let led = e.context("volume v1");
            assert_eq!(led.code(), code, "{led}");
            assert!(led.to_string().starts_with("volume v1"), "{led}");
            assert!(
                led.to_string().ends_with(&message) || matches!(led, Error::HostIo { .. }),
                "{led} lost {message}"
            );
        }
    }
}
