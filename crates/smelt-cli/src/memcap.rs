//! `--max-memory`: a cap on the heap smelt may hold.
//!
//! A hostile model can ask for tensors that pass every per-tensor limit and still add up to
//! more memory than the machine has; the kernel's OOM killer then ends smelt without a word.
//! The global allocator counts live bytes; an allocation that would cross the cap ends the
//! process at once with one `error:` line and exit code 1. Outputs are written to temporary
//! files and renamed, so no half-written model is left at the destination.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Capped;

static LIVE: AtomicUsize = AtomicUsize::new(0);
/// 0 = no cap.
static CAP: AtomicUsize = AtomicUsize::new(0);

pub fn set_cap(bytes: usize) {
    CAP.store(bytes, Ordering::Relaxed);
}

/// Formats into a fixed buffer: the allocator cannot allocate to report its own failure.
struct StackBuf {
    buf: [u8; 256],
    len: usize,
}

impl std::fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[cold]
fn over_cap(size: usize, live: usize, cap: usize) -> ! {
    use std::fmt::Write;
    // Only the first thread over the cap reports; the others wait for it to end the process.
    static REPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if REPORTING.swap(true, Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
    let mut b = StackBuf {
        buf: [0; 256],
        len: 0,
    };
    let _ = writeln!(
        b,
        "error: limit exceeded: allocating {size} bytes with {live} in use would pass --max-memory {cap}"
    );
    // SAFETY: writes an initialised buffer to stderr, then ends the process without unwinding
    // or running destructors (which could allocate).
    unsafe {
        libc::write(2, b.buf.as_ptr().cast(), b.len);
        libc::_exit(1)
    }
}

#[inline]
fn account(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    let cap = CAP.load(Ordering::Relaxed);
    if cap != 0 && live > cap {
        over_cap(size, live - size, cap);
    }
}

/// Gives back the count of an allocation that did not happen.
#[inline]
fn unaccount(size: usize) {
    LIVE.fetch_sub(size, Ordering::Relaxed);
}

// SAFETY: delegates every call to the system allocator; only counts sizes around it.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        account(layout.size());
        let p = System.alloc(layout);
        if p.is_null() {
            unaccount(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        account(layout.size());
        let p = System.alloc_zeroed(layout);
        if p.is_null() {
            unaccount(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unaccount(layout.size());
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old {
            account(new_size - old);
        }
        let p = System.realloc(ptr, layout, new_size);
        match (p.is_null(), new_size > old) {
            // Failed: the old block stays, so the growth never happened.
            (true, true) => unaccount(new_size - old),
            (false, false) => unaccount(old - new_size),
            _ => {}
        }
        p
    }
}
