//! Cancellation of commands, with the guarantee that a cancelled read no longer writes to
//! its destination.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// Cancels the commands it is passed to. Clones share one state; cancelling is final.
///
/// The reader writes into a command's destination only while holding this token's lock
/// and after checking it is not cancelled, so once [`CancelToken::cancel`] returns, no
/// byte lands in the destination any more.
#[derive(Debug, Clone)]
pub struct CancelToken {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cancelled: Mutex<bool>,
    signal: watch::Sender<bool>,
}

impl Default for CancelToken {
    fn default() -> Self {
        CancelToken::new()
    }
}

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> CancelToken {
        CancelToken {
            inner: Arc::new(Inner {
                cancelled: Mutex::new(false),
                signal: watch::channel(false).0,
            }),
        }
    }

    /// Cancels; from the moment this returns no destination buffer is written.
    pub fn cancel(&self) {
        *self.lock() = true;
        self.inner.signal.send_replace(true);
    }

    /// True once cancelled.
    pub fn is_cancelled(&self) -> bool {
        *self.lock()
    }

    /// Resolves when the token is cancelled.
    pub async fn cancelled(&self) {
        let mut rx = self.inner.signal.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|cancelled| *cancelled).await;
    }

    /// Holds off cancellation while the guard lives; the guard says whether it already
    /// happened.
    pub(crate) fn lock(&self) -> MutexGuard<'_, bool> {
        self.inner
            .cancelled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
