//! Buffers that cross from the application into the driver without being copied.

/// Memory a read is written into: the application's buffer, borrowed for the life of the
/// command.
///
/// # Safety
///
/// `as_mut_ptr` must point to `len` writable bytes that stay valid, and that nothing else
/// reads or writes, for as long as the value lives; the value may be moved to and dropped
/// on another thread.
pub unsafe trait DestBuf: Send + 'static {
    /// The first byte.
    fn as_mut_ptr(&mut self) -> *mut u8;
    /// How many bytes.
    fn len(&self) -> usize;
    /// True for no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Memory a write is sent from, borrowed for the life of the command.
///
/// # Safety
///
/// `as_ptr` must point to `len` readable bytes that stay valid and unchanged for as long as
/// the value lives; the value may be moved to and dropped on another thread.
pub unsafe trait SourceBuf: Send + 'static {
    /// The first byte.
    fn as_ptr(&self) -> *const u8;
    /// How many bytes.
    fn len(&self) -> usize;
    /// True for no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

unsafe impl DestBuf for Vec<u8> {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        Vec::as_mut_ptr(self)
    }
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

unsafe impl SourceBuf for Vec<u8> {
    fn as_ptr(&self) -> *const u8 {
        Vec::as_ptr(self)
    }
    fn len(&self) -> usize {
        Vec::len(self)
    }
}
