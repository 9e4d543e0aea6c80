//! The export as the `nbd` crate sees it: `Read + Write + Seek` over the shared memory, with a
//! cursor of its own per connection.

use std::cell::Cell;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::rc::Rc;

use crate::Shared;

/// One connection's view of the export.
///
/// The `nbd` crate seeks before every read and write, then reads or writes in chunks of at most
/// 64 KiB; errors returned here become NBD error replies through their raw OS error number.
pub(crate) struct Storage<'a> {
    shared: &'a Shared,
    pos: u64,
    /// Raised when a write is refused; see `BufferedStream`.
    refused_write: Rc<Cell<bool>>,
}

impl<'a> Storage<'a> {
    pub(crate) fn new(shared: &'a Shared, refused_write: Rc<Cell<bool>>) -> Self {
        Storage {
            shared,
            pos: 0,
            refused_write,
        }
    }

    fn refuse_write(&self, errno: i32) -> io::Error {
        self.refused_write.set(true);
        io::Error::from_raw_os_error(errno)
    }
}

impl Read for Storage<'_> {
    /// Copies from the export at the cursor.
    ///
    /// An empty `buf` is an error here, unlike `std`'s convention: the `nbd` crate asks for zero
    /// bytes only for a zero-length `NBD_CMD_READ`, and answering `Ok(0)` would make it send no
    /// reply at all, leaving the client waiting forever. `EINVAL` gives the client an answer.
    /// Reading at or past the end is `EINVAL` too: as the first chunk of a request it becomes a
    /// clean error reply; later in a request the `nbd` crate ends the connection.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let data = self.shared.data();
        let size = data.len() as u64;
        if buf.is_empty() || self.pos >= size {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let start = self.pos as usize;
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Storage<'_> {
    /// Copies into the export at the cursor: `EPERM` on a read-only export, `ENOSPC` for a chunk
    /// that does not fit entirely before the end (nothing of that chunk is written).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.shared.options.read_only {
            return Err(self.refuse_write(libc::EPERM));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let mut data = self.shared.data_mut();
        let fits = self
            .pos
            .checked_add(buf.len() as u64)
            .is_some_and(|end| end <= data.len() as u64);
        if !fits {
            return Err(self.refuse_write(libc::ENOSPC));
        }
        let start = self.pos as usize;
        data[start..start + buf.len()].copy_from_slice(buf);
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    /// Memory needs no flushing: every write is visible to all connections at once.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Storage<'_> {
    /// Moves the cursor; positions past the end are allowed (reads and writes there fail).
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let size = self.shared.options.size;
        let target = match to {
            SeekFrom::Start(offset) => Some(offset),
            SeekFrom::Current(delta) => self.pos.checked_add_signed(delta),
            SeekFrom::End(delta) => size.checked_add_signed(delta),
        };
        match target {
            Some(pos) => {
                self.pos = pos;
                Ok(pos)
            }
            None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}
