//! POSIX error numbers by name, as libnbd reports them through `nbd_get_errno`.

/// An errno value this library reports. The names are what JavaScript sees as
/// `NbdError.code`; the numbers are this platform's (the comments give Linux's, which the
/// NBD protocol also uses on the wire: see [`Errno::from_nbd_error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Errno {
    /// Operation not permitted (1 on Linux).
    EPERM,
    /// No such file or directory (2 on Linux).
    ENOENT,
    /// Interrupted system call (4 on Linux).
    EINTR,
    /// Input/output error (5 on Linux).
    EIO,
    /// Bad file descriptor (9 on Linux).
    EBADF,
    /// Resource temporarily unavailable (11 on Linux).
    EAGAIN,
    /// Cannot allocate memory (12 on Linux).
    ENOMEM,
    /// Permission denied (13 on Linux).
    EACCES,
    /// Bad address (14 on Linux).
    EFAULT,
    /// Device or resource busy (16 on Linux).
    EBUSY,
    /// File exists (17 on Linux).
    EEXIST,
    /// Not a directory (20 on Linux).
    ENOTDIR,
    /// Invalid argument (22 on Linux).
    EINVAL,
    /// Too many open files (24 on Linux).
    EMFILE,
    /// No space left on device (28 on Linux).
    ENOSPC,
    /// Broken pipe (32 on Linux).
    EPIPE,
    /// Numerical result out of range (34 on Linux).
    ERANGE,
    /// File name too long (36 on Linux).
    ENAMETOOLONG,
    /// Function not implemented (38 on Linux).
    ENOSYS,
    /// Protocol error (71 on Linux).
    EPROTO,
    /// Value too large for defined data type (75 on Linux).
    EOVERFLOW,
    /// Socket operation on non-socket (88 on Linux).
    ENOTSOCK,
    /// Protocol not supported (93 on Linux).
    EPROTONOSUPPORT,
    /// Operation not supported (95 on Linux).
    ENOTSUP,
    /// Address already in use (98 on Linux).
    EADDRINUSE,
    /// Cannot assign requested address (99 on Linux).
    EADDRNOTAVAIL,
    /// Network is unreachable (101 on Linux).
    ENETUNREACH,
    /// Software caused connection abort (103 on Linux).
    ECONNABORTED,
    /// Connection reset by peer (104 on Linux).
    ECONNRESET,
    /// Transport endpoint is already connected (106 on Linux).
    EISCONN,
    /// Transport endpoint is not connected (107 on Linux).
    ENOTCONN,
    /// Cannot send after transport endpoint shutdown (108 on Linux).
    ESHUTDOWN,
    /// Connection timed out (110 on Linux).
    ETIMEDOUT,
    /// Connection refused (111 on Linux).
    ECONNREFUSED,
    /// No route to host (113 on Linux).
    EHOSTUNREACH,
    /// Operation canceled (125 on Linux).
    ECANCELED,
    /// Exec format error (8 on Linux).
    ENOEXEC,
    /// No such device (19 on Linux).
    ENODEV,
    /// Address family not supported by protocol (97 on Linux).
    EAFNOSUPPORT,
    /// No such process (3 on Linux).
    ESRCH,
}

use Errno::*;

const TABLE: &[(Errno, &str, i32)] = &[
    (EPERM, "EPERM", libc::EPERM),
    (ENOENT, "ENOENT", libc::ENOENT),
    (EINTR, "EINTR", libc::EINTR),
    (EIO, "EIO", libc::EIO),
    (EBADF, "EBADF", libc::EBADF),
    (EAGAIN, "EAGAIN", libc::EAGAIN),
    (ENOMEM, "ENOMEM", libc::ENOMEM),
    (EACCES, "EACCES", libc::EACCES),
    (EFAULT, "EFAULT", libc::EFAULT),
    (EBUSY, "EBUSY", libc::EBUSY),
    (EEXIST, "EEXIST", libc::EEXIST),
    (ENOTDIR, "ENOTDIR", libc::ENOTDIR),
    (EINVAL, "EINVAL", libc::EINVAL),
    (EMFILE, "EMFILE", libc::EMFILE),
    (ENOSPC, "ENOSPC", libc::ENOSPC),
    (EPIPE, "EPIPE", libc::EPIPE),
    (ERANGE, "ERANGE", libc::ERANGE),
    (ENAMETOOLONG, "ENAMETOOLONG", libc::ENAMETOOLONG),
    (ENOSYS, "ENOSYS", libc::ENOSYS),
    (EPROTO, "EPROTO", libc::EPROTO),
    (EOVERFLOW, "EOVERFLOW", libc::EOVERFLOW),
    (ENOTSOCK, "ENOTSOCK", libc::ENOTSOCK),
    (EPROTONOSUPPORT, "EPROTONOSUPPORT", libc::EPROTONOSUPPORT),
    (ENOTSUP, "ENOTSUP", libc::ENOTSUP),
    (EADDRINUSE, "EADDRINUSE", libc::EADDRINUSE),
    (EADDRNOTAVAIL, "EADDRNOTAVAIL", libc::EADDRNOTAVAIL),
    (ENETUNREACH, "ENETUNREACH", libc::ENETUNREACH),
    (ECONNABORTED, "ECONNABORTED", libc::ECONNABORTED),
    (ECONNRESET, "ECONNRESET", libc::ECONNRESET),
    (EISCONN, "EISCONN", libc::EISCONN),
    (ENOTCONN, "ENOTCONN", libc::ENOTCONN),
    (ESHUTDOWN, "ESHUTDOWN", libc::ESHUTDOWN),
    (ETIMEDOUT, "ETIMEDOUT", libc::ETIMEDOUT),
    (ECONNREFUSED, "ECONNREFUSED", libc::ECONNREFUSED),
    (EHOSTUNREACH, "EHOSTUNREACH", libc::EHOSTUNREACH),
    (ECANCELED, "ECANCELED", libc::ECANCELED),
    (ENOEXEC, "ENOEXEC", libc::ENOEXEC),
    (ENODEV, "ENODEV", libc::ENODEV),
    (EAFNOSUPPORT, "EAFNOSUPPORT", libc::EAFNOSUPPORT),
    (ESRCH, "ESRCH", libc::ESRCH),
];

impl Errno {
    fn entry(self) -> &'static (Errno, &'static str, i32) {
        TABLE
            .iter()
            .find(|(e, _, _)| *e == self)
            .expect("every Errno has a table row")
    }

    /// The symbolic name, e.g. `"EINVAL"`.
    pub fn name(self) -> &'static str {
        self.entry().1
    }

    /// The positive POSIX number on this platform (as libnbd's `nbd_get_errno`).
    pub fn number(self) -> i32 {
        self.entry().2
    }

    /// The errno for an OS error number of this platform; numbers this library does not
    /// name become `EIO`.
    pub fn from_raw_os_error(n: i32) -> Errno {
        TABLE
            .iter()
            .find(|(_, _, num)| *num == n)
            .map(|(e, _, _)| *e)
            .unwrap_or(EIO)
    }

    /// The errno for an error number carried in an NBD reply, mapped as libnbd does:
    /// the protocol's own values pass through, anything else becomes `EINVAL`.
    pub fn from_nbd_error(n: u32) -> Errno {
        match n {
            1 => EPERM,
            5 => EIO,
            12 => ENOMEM,
            22 => EINVAL,
            28 => ENOSPC,
            75 => EOVERFLOW,
            95 => ENOTSUP,
            108 => ESHUTDOWN,
            _ => EINVAL,
        }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_round_trip() {
        for (e, name, n) in TABLE {
            assert_eq!(e.name(), *name);
            assert_eq!(Errno::from_raw_os_error(*n), *e);
        }
        assert_eq!(Errno::from_raw_os_error(9999), EIO);
    }

    #[test]
    fn server_errors_map_like_libnbd() {
        assert_eq!(Errno::from_nbd_error(5), EIO);
        assert_eq!(Errno::from_nbd_error(108), ESHUTDOWN);
        assert_eq!(Errno::from_nbd_error(2), EINVAL);
        assert_eq!(Errno::from_nbd_error(u32::MAX), EINVAL);
    }
}
