//! Buffering between the `nbd` crate and the socket.
//!
//! The `nbd` crate reads and writes every header field separately (a 28-byte request header is
//! five reads, a 16-byte reply three writes). Unbuffered, each of those is a system call; this
//! wrapper turns them into one read per arriving batch and one write per reply, which is what
//! makes the server fast enough for benchmarks and demos with many requests in flight.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::rc::Rc;

/// Capacity of each direction's buffer. Transfers at least this large bypass the buffer.
const CAPACITY: usize = 64 * 1024;

/// A read buffer and a write buffer around one connected stream.
pub(crate) struct BufferedStream<S> {
    inner: S,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    /// Set when the storage refused a write. The remainder of that write's payload has not been
    /// consumed, so whatever follows on the stream cannot be parsed as requests any more: every
    /// later read fails, which ends the `nbd` crate's transmission loop (after the error reply
    /// for the refused write has been flushed to the client).
    refused_write: Rc<Cell<bool>>,
}

impl<S: Read + Write> BufferedStream<S> {
    pub(crate) fn new(inner: S, refused_write: Rc<Cell<bool>>) -> Self {
        BufferedStream {
            inner,
            rbuf: vec![0; CAPACITY].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            wbuf: Vec::with_capacity(CAPACITY),
            refused_write,
        }
    }

    /// Sends whatever sits in the write buffer.
    fn send_buffered(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let result = self.inner.write_all(&self.wbuf);
        self.wbuf.clear();
        result
    }
}

impl<S: Read + Write> Read for BufferedStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.refused_write.get() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed after a refused write (its payload cannot be skipped)",
            ));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if self.rstart == self.rend {
            // About to wait for the client: anything it should see first must be on its way.
            self.send_buffered()?;
            if buf.len() >= self.rbuf.len() {
                return self.inner.read(buf);
            }
            let n = self.inner.read(&mut self.rbuf)?;
            self.rstart = 0;
            self.rend = n;
            if n == 0 {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.rend - self.rstart);
        buf[..n].copy_from_slice(&self.rbuf[self.rstart..self.rstart + n]);
        self.rstart += n;
        Ok(n)
    }
}

impl<S: Read + Write> Write for BufferedStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.wbuf.len() + buf.len() > CAPACITY {
            self.send_buffered()?;
        }
        if buf.len() >= CAPACITY {
            return self.inner.write(buf);
        }
        self.wbuf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffered()?;
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// An in-memory duplex: reads come from `input`, writes go to `output` (counted per call).
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
        write_calls: usize,
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_calls += 1;
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn duplex(input: Vec<u8>) -> BufferedStream<Duplex> {
        let d = Duplex {
            input: Cursor::new(input),
            output: Vec::new(),
            write_calls: 0,
        };
        BufferedStream::new(d, Rc::new(Cell::new(false)))
    }

    #[test]
    fn small_writes_are_coalesced_until_flush() {
        let mut s = duplex(Vec::new());
        for _ in 0..10 {
            s.write_all(b"abcd").unwrap();
        }
        assert_eq!(s.inner.write_calls, 0);
        s.flush().unwrap();
        assert_eq!(s.inner.write_calls, 1);
        assert_eq!(s.inner.output.len(), 40);
    }

    #[test]
    fn reading_flushes_pending_writes_first() {
        let mut s = duplex(b"xyz".to_vec());
        s.write_all(b"reply").unwrap();
        let mut b = [0; 2];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"xy");
        assert_eq!(s.inner.output, b"reply");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"z");
    }

    #[test]
    fn large_transfers_keep_order() {
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut s = duplex(big.clone());
        s.write_all(b"head").unwrap();
        s.write_all(&big).unwrap();
        s.flush().unwrap();
        let mut expect = b"head".to_vec();
        expect.extend_from_slice(&big);
        assert_eq!(s.inner.output, expect);
        let mut got = vec![0; 3];
        s.read_exact(&mut got).unwrap();
        let mut tail = Vec::new();
        s.read_to_end(&mut tail).unwrap();
        got.extend_from_slice(&tail);
        assert_eq!(got, big);
    }

    #[test]
    fn refused_write_stops_reading() {
        let mut s = duplex(b"more".to_vec());
        s.refused_write.set(true);
        let mut b = [0; 1];
        assert_eq!(
            s.read(&mut b).unwrap_err().kind(),
            io::ErrorKind::ConnectionAborted
        );
    }
}
