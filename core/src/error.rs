//! The engine's error type: every failure names what went wrong and where.
use alloc::string::String;
use core::fmt;

/// An error from the engine. Messages name the file, field or tensor involved.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A config file is malformed or inconsistent. `file` is the path (or `<memory>`).
    Config { file: String, msg: String },
    /// A weight file or tensor is malformed, missing, of the wrong dtype or shape.
    Weights { tensor: String, msg: String },
    /// An input (token ids, shapes, options) is invalid.
    Input(String),
    /// An I/O error (missing file, unreadable directory).
    Io(String),
    /// A value that must be finite is NaN or infinite.
    NonFinite(String),
    /// The operation is not supported (e.g. a feature compiled out).
    Unsupported(String),
    /// A callback asked to stop (e.g. a load progress callback).
    Cancelled(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config { file, msg } => write!(f, "config error in {file}: {msg}"),
            Error::Weights { tensor, msg } => {
                write!(f, "weights error for tensor '{tensor}': {msg}")
            }
            Error::Input(m) => write!(f, "invalid input: {m}"),
            Error::Io(m) => write!(f, "I/O error: {m}"),
            Error::NonFinite(m) => write!(f, "non-finite value: {m}"),
            Error::Unsupported(m) => write!(f, "unsupported: {m}"),
            Error::Cancelled(m) => write!(f, "cancelled: {m}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

/// Result with the engine's [`Error`].
pub type Result<T> = core::result::Result<T, Error>;

/// Shorthand for an [`Error::Weights`].
pub(crate) fn werr(tensor: &str, msg: impl Into<String>) -> Error {
    Error::Weights { tensor: tensor.into(), msg: msg.into() }
}

/// Shorthand for an [`Error::Input`].
pub(crate) fn ierr(msg: impl Into<String>) -> Error {
    Error::Input(msg.into())
}
