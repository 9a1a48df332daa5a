//! Relay buffers recycled per thread.
//!
//! An idle client owns no buffer (that is what keeps an idle client near 1 KiB), so a client
//! in transaction mode gives its buffers back after every transaction and takes them again for
//! the next. Taking from and giving to a per-thread free list costs a few nanoseconds where
//! `malloc`/`free` of 8–32 KiB blocks cost far more and fragment the heap.

use std::cell::RefCell;

use bytes::BytesMut;

/// Capacity of a recycled buffer; larger ones (a client that sent or received big messages)
/// are freed instead of kept.
pub const SIZE: usize = 16 * 1024;
/// Most buffers kept per thread: enough for every client active at once on a busy thread.
const KEEP: usize = 256;

thread_local! {
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for at least `SIZE` bytes.
pub fn take() -> BytesMut {
    FREE.with(|free| free.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(SIZE))
}

/// Gives `buf` back for reuse (if it is empty and of the usual size) and leaves an empty,
/// unallocated buffer in its place.
#[inline]
pub fn give(buf: &mut BytesMut) {
    if buf.capacity() != 0 && buf.is_empty() {
        keep(buf);
    }
}

fn keep(buf: &mut BytesMut) {
    let mut buf = std::mem::take(buf);
    // An empty buffer whose start moved forward gets its whole allocation back here, without
    // allocating; one that is not of the usual size is freed.
    if !buf.try_reclaim(SIZE) || buf.capacity() != SIZE {
        return;
    }
    FREE.with(|free| {
        let mut free = free.borrow_mut();
        if free.len() < KEEP {
            free.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_comes_back_whole() {
        let mut b = take();
        b.extend_from_slice(&[1; 100]);
        let _ = b.split_to(100);
        give(&mut b);
        assert_eq!(b.capacity(), 0, "the giver keeps nothing");
        let again = take();
        assert!(again.is_empty());
        assert!(again.capacity() >= SIZE);
    }

    #[test]
    fn big_or_busy_buffers_are_not_kept() {
        let mut big = BytesMut::with_capacity(SIZE * 8);
        give(&mut big);
        let mut small = BytesMut::with_capacity(256);
        give(&mut small);
        assert_eq!(small.capacity(), 0, "freed, not kept");
        let mut busy = take();
        busy.extend_from_slice(b"x");
        give(&mut busy);
        assert_eq!(&busy[..], b"x", "a buffer with data stays with its owner");
    }
}
