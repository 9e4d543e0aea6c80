//! POSIX error numbers by name, as libnbd reports them through `nbd_get_errno`.

/// An errno value this library reports. The numbers are Linux's; the names are what
/// JavaScript sees as `NbdError.code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Errno {
    EPERM,
    ENOENT,
    EINTR,
    EIO,
    EBADF,
    EAGAIN,
    ENOMEM,
    EACCES,
    EFAULT,
    EBUSY,
    EEXIST,
    ENOTDIR,
    EINVAL,
    EMFILE,
    ENOSPC,
    EPIPE,
    ERANGE,
    ENAMETOOLONG,
    ENOSYS,
    EPROTO,
    EOVERFLOW,
    ENOTSOCK,
    EPROTONOSUPPORT,
    ENOTSUP,
    EADDRINUSE,
    EADDRNOTAVAIL,
    ENETUNREACH,
    ECONNABORTED,
    ECONNRESET,
    EISCONN,
    ENOTCONN,
    ESHUTDOWN,
    ETIMEDOUT,
    ECONNREFUSED,
    EHOSTUNREACH,
    ECANCELED,
    ENOEXEC,
    ENODEV,
    EAFNOSUPPORT,
    ESRCH,
}

use Errno::*;

const TABLE: &[(Errno, &str, i32)] = &[
    (EPERM, "EPERM", 1),
    (ENOENT, "ENOENT", 2),
    (EINTR, "EINTR", 4),
    (EIO, "EIO", 5),
    (EBADF, "EBADF", 9),
    (EAGAIN, "EAGAIN", 11),
    (ENOMEM, "ENOMEM", 12),
    (EACCES, "EACCES", 13),
    (EFAULT, "EFAULT", 14),
    (EBUSY, "EBUSY", 16),
    (EEXIST, "EEXIST", 17),
    (ENOTDIR, "ENOTDIR", 20),
    (EINVAL, "EINVAL", 22),
    (EMFILE, "EMFILE", 24),
    (ENOSPC, "ENOSPC", 28),
    (EPIPE, "EPIPE", 32),
    (ERANGE, "ERANGE", 34),
    (ENAMETOOLONG, "ENAMETOOLONG", 36),
    (ENOSYS, "ENOSYS", 38),
    (EPROTO, "EPROTO", 71),
    (EOVERFLOW, "EOVERFLOW", 75),
    (ENOTSOCK, "ENOTSOCK", 88),
    (EPROTONOSUPPORT, "EPROTONOSUPPORT", 93),
    (ENOTSUP, "ENOTSUP", 95),
    (EADDRINUSE, "EADDRINUSE", 98),
    (EADDRNOTAVAIL, "EADDRNOTAVAIL", 99),
    (ENETUNREACH, "ENETUNREACH", 101),
    (ECONNABORTED, "ECONNABORTED", 103),
    (ECONNRESET, "ECONNRESET", 104),
    (EISCONN, "EISCONN", 106),
    (ENOTCONN, "ENOTCONN", 107),
    (ESHUTDOWN, "ESHUTDOWN", 108),
    (ETIMEDOUT, "ETIMEDOUT", 110),
    (ECONNREFUSED, "ECONNREFUSED", 111),
    (EHOSTUNREACH, "EHOSTUNREACH", 113),
    (ECANCELED, "ECANCELED", 125),
    (ENOEXEC, "ENOEXEC", 8),
    (ENODEV, "ENODEV", 19),
    (EAFNOSUPPORT, "EAFNOSUPPORT", 97),
    (ESRCH, "ESRCH", 3),
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

    /// The positive POSIX number (Linux numbering).
    pub fn number(self) -> i32 {
        self.entry().2
    }

    /// The errno for an OS error number; numbers this library does not name become `EIO`.
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
