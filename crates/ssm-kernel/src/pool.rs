//! Buffers reused from one training step to the next, so a step neither zero-fills nor
//! page-faults its way through fresh memory for every activation and gradient.
//!
//! Kernels and ops take their temporaries here ([`take`] zeroed, [`take_for_overwrite`] when
//! every element will be written before it is read); `mamba-nn`'s tape gives all its values and
//! gradients back when it is dropped. One pool per thread; a buffer taken on one thread and given back
//! on another simply moves pools. Requests are served best-fit (the smallest pooled buffer that
//! is large enough, and not more than twice as large), so a step's many equal-sized tensors find
//! their buffers of the previous step.

use std::cell::RefCell;

/// At most this many buffers, and this many floats in all, are kept per thread.
const MAX_BUFFERS: usize = 512;
const MAX_FLOATS: usize = 1 << 28;

#[derive(Default)]
struct Free {
    bufs: Vec<Vec<f32>>,
    floats: usize,
}

thread_local! {
    static FREE: RefCell<Free> = RefCell::new(Free::default());
}

/// The smallest pooled buffer with room for `n` floats (and at most `2n + 1024`), removed.
fn pick(n: usize) -> Option<Vec<f32>> {
    FREE.with(|f| {
        let mut f = f.borrow_mut();
        let limit = n.saturating_mul(2).saturating_add(1024);
        // Among equal fits, the most recently given (likely still in cache).
        let (i, _) = f
            .bufs
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, v)| v.capacity() >= n && v.capacity() <= limit)
            .min_by_key(|(_, v)| v.capacity())?;
        let v = f.bufs.remove(i);
        f.floats -= v.capacity();
        Some(v)
    })
}

/// A zeroed buffer of `n` floats: a pooled one when one fits, else a new one.
pub fn take(n: usize) -> Vec<f32> {
    let mut v = pick(n).unwrap_or_default();
    v.clear();
    v.resize(n, 0.0);
    v
}

/// A buffer of `n` floats whose contents are unspecified (values left by an earlier use, or
/// zeros; NaN in test and debug builds): for outputs that are written in full before being
/// read.
pub fn take_for_overwrite(n: usize) -> Vec<f32> {
    let mut v = pick(n).unwrap_or_else(|| Vec::with_capacity(n));
    // Truncate, or extend within capacity writing zeros (written explicitly rather than
    // calloc'ed: see `tensor::zeros`).
    v.resize(n, 0.0);
    // Test and debug builds poison the buffer, so code that reads before it writes shows up as
    // NaNs in the tests rather than as silently stale values (`cargo test`'s default profile has
    // debug assertions on).
    if cfg!(any(test, debug_assertions)) {
        v.fill(f32::NAN);
    }
    v
}

/// Returns a buffer to this thread's pool (dropped instead when the pool is full).
pub fn give(v: Vec<f32>) {
    if v.capacity() == 0 {
        return;
    }
    FREE.with(|f| {
        let mut f = f.borrow_mut();
        if f.bufs.len() < MAX_BUFFERS && f.floats + v.capacity() <= MAX_FLOATS {
            f.floats += v.capacity();
            f.bufs.push(v);
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_given_buffer_is_reused_zeroed() {
        let mut v = super::take(100);
        v[3] = 7.0;
        let ptr = v.as_ptr();
        super::give(v);
        let w = super::take(60);
        assert_eq!(w.as_ptr(), ptr, "the pooled allocation is reused");
        assert_eq!(w.len(), 60);
        assert!(w.iter().all(|&x| x == 0.0), "a reused buffer comes back zeroed");
    }

    #[test]
    fn requests_are_served_best_fit() {
        let (big, small) = (vec![1.0f32; 10_000], vec![1.0f32; 3_000]);
        let (pb, ps) = (big.as_ptr(), small.as_ptr());
        super::give(big);
        super::give(small);
        let a = super::take_for_overwrite(2_500);
        assert_eq!(a.as_ptr(), ps, "the smallest buffer that fits");
        assert_eq!(a.len(), 2_500);
        let b = super::take_for_overwrite(100);
        assert_ne!(b.as_ptr(), pb, "not a buffer more than twice the request");
        let c = super::take_for_overwrite(9_000);
        assert_eq!(c.as_ptr(), pb);
    }
}
