//! Ctrl-C during training: the first SIGINT sets a flag that the training loop reads
//! between steps (it then writes a checkpoint and returns); a second one kills the
//! process as usual.
//!
//! std has no signal API and we take no extra crate, so on Unix the handler is installed
//! through the C library's `signal(2)`, which std links anyway. The handler only stores
//! to an atomic and re-arms the default action, both async-signal-safe. Elsewhere
//! [`install`] does nothing and Ctrl-C stops the process (the last checkpoint stays).

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C was pressed since the handler was installed.
pub fn requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Asks a running training loop to checkpoint and stop (what Ctrl-C does).
pub fn request_stop() {
    STOP.store(true, Ordering::Relaxed);
}

/// Clears a pending request.
pub fn reset() {
    STOP.store(false, Ordering::Relaxed);
}

#[cfg(unix)]
mod unix {
    use super::STOP;
    use std::sync::atomic::Ordering;

    const SIGINT: i32 = 2;
    const SIG_DFL: usize = 0;
    const SIG_ERR: usize = usize::MAX;

    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }

    extern "C" fn on_sigint(_: i32) {
        STOP.store(true, Ordering::Relaxed);
        // SAFETY: signal(2) is async-signal-safe; the default action makes a second
        // Ctrl-C end the process.
        unsafe {
            signal(SIGINT, SIG_DFL);
        }
    }

    pub(super) fn install() -> bool {
        // SAFETY: installs a handler that only touches an atomic and calls signal(2).
        unsafe { signal(SIGINT, on_sigint as extern "C" fn(i32) as usize) != SIG_ERR }
    }
}

/// Installs the Ctrl-C handler; returns false where none can be installed.
pub fn install() -> bool {
    #[cfg(unix)]
    {
        unix::install()
    }
    #[cfg(not(unix))]
    {
        false
    }
}
