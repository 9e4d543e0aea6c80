//! The one error type of the protocol engine, saying who was at fault.

use crate::errno::Errno;
use std::fmt;

/// Who caused a failure. Drivers use it to decide whether the connection survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The application asked for something invalid (wrong state, bad argument, strict check).
    /// Nothing was sent; the handle is unchanged.
    Usage,
    /// The server answered a command with an error. The connection stays usable.
    Server,
    /// The server lacks a feature the application required.
    Unsupported,
    /// The server broke the protocol. The connection cannot continue.
    Protocol,
    /// The transport failed or closed. The connection cannot continue.
    Io,
    /// The application cancelled the call.
    Cancelled,
}

/// An NBD failure: an errno for programs, a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    errno: Errno,
    fault: Fault,
    message: String,
}

impl Error {
    /// A new error.
    pub fn new(fault: Fault, errno: Errno, message: impl Into<String>) -> Error {
        Error {
            errno,
            fault,
            message: message.into(),
        }
    }

    /// The application misused the API (libnbd's client-side refusals).
    pub fn usage(errno: Errno, message: impl Into<String>) -> Error {
        Error::new(Fault::Usage, errno, message)
    }

    /// The server broke the protocol (`EPROTO`).
    pub fn protocol(message: impl Into<String>) -> Error {
        Error::new(Fault::Protocol, Errno::EPROTO, message)
    }

    /// The server returned an error for one command or option.
    pub fn server(errno: Errno, message: impl Into<String>) -> Error {
        Error::new(Fault::Server, errno, message)
    }

    /// The transport failed.
    pub fn io(errno: Errno, message: impl Into<String>) -> Error {
        Error::new(Fault::Io, errno, message)
    }

    /// The errno.
    pub fn errno(&self) -> Errno {
        self.errno
    }

    /// Who was at fault.
    pub fn fault(&self) -> Fault {
        self.fault
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// True when the connection cannot be used after this error.
    pub fn is_fatal(&self) -> bool {
        matches!(self.fault, Fault::Protocol | Fault::Io)
    }

    /// The same error with `context: ` put before the message.
    pub fn context(mut self, context: &str) -> Error {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.errno)
    }
}

impl std::error::Error for Error {}

/// Results of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;
