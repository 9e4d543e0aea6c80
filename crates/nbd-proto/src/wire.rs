//! Big-endian field readers and writers shared by the handshake and transmission codecs.
//!
//! Encoders append to the caller's `Vec<u8>`; readers take from a slice and never panic:
//! a short slice is reported as `None` so a decoder can ask for more bytes.

/// Appends a `u16` in network byte order.
pub fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Appends a `u32` in network byte order.
pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Appends a `u64` in network byte order.
pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// A forward-only reader of big-endian fields over a byte slice (not an IO reader: a
/// decoder's view of bytes already read).
#[derive(Debug, Clone, Copy)]
pub struct FieldReader<'a> {
    bytes: &'a [u8],
}

impl<'a> FieldReader<'a> {
    /// Reads from the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> FieldReader<'a> {
        FieldReader { bytes }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    /// The next `n` bytes, or `None` if fewer are left.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Some(head)
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    /// The next big-endian `u16`, or `None` if fewer than 2 bytes are left.
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// The next big-endian `u32`, or `None` if fewer than 4 bytes are left.
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    }

    /// The next big-endian `u64`, or `None` if fewer than 8 bytes are left.
    pub fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_be_bytes(b.try_into().unwrap()))
    }
}

/// Text sent by a server (names, descriptions, error messages), made printable:
/// invalid UTF-8 is replaced, never refused.
pub fn server_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The server's own words for one of our error messages: at most [`MAX_STRING`] bytes of
/// them (the protocol's limit for a string; what is cut is counted), with control characters
/// escaped (`\u{1b}`), so that a hostile server cannot fill a log line with megabytes or
/// drive the terminal an error is printed on.
///
/// [`MAX_STRING`]: crate::consts::MAX_STRING
pub fn server_message(bytes: &[u8]) -> String {
    let limit = crate::consts::MAX_STRING;
    let shown = &bytes[..bytes.len().min(limit)];
    let mut out = String::with_capacity(shown.len());
    for c in String::from_utf8_lossy(shown).chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if bytes.len() > limit {
        out.push_str(&format!("… ({} more bytes)", bytes.len() - limit));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_messages_are_bounded_and_escaped() {
        assert_eq!(server_message(b"disk on fire"), "disk on fire");
        assert_eq!(server_message(b"a\x1b[2Jb\0c\td\x7f"), "a\\u{1b}[2Jb\\u{0}c\td\\u{7f}");
        assert_eq!(server_message(&[0xff, b'x']), "\u{fffd}x");
        let long = vec![b'a'; 5000];
        let m = server_message(&long);
        assert!(m.starts_with(&"a".repeat(4096)));
        assert!(m.ends_with("… (904 more bytes)"), "{m}");
    }

    #[test]
    fn reader_reports_short_input() {
        let mut r = FieldReader::new(&[0, 1, 2]);
        assert_eq!(r.u16(), Some(1));
        assert_eq!(r.u16(), None);
        assert_eq!(r.remaining(), 1);
    }

    #[test]
    fn writers_are_big_endian() {
        let mut v = Vec::new();
        put_u16(&mut v, 0x0102);
        put_u32(&mut v, 0x03040506);
        put_u64(&mut v, 0x0708090a0b0c0d0e);
        assert_eq!(v, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
    }
}
