//! A process-wide stop request (Ctrl-C). Long loops (training steps, search candidates) check
//! it at points where stopping leaves nothing half done, and return [`Error::Interrupted`].

use crate::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks every long loop to stop at its next safe point.
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// `Err(Interrupted)` once a stop was requested.
pub fn check() -> Result<()> {
    if requested() {
        return Err(Error::Interrupted);
    }
    Ok(())
}
