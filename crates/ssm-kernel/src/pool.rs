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
use std::thread::LocalKey;

use crate::simd::x16;

/// At most this many buffers, and this many floats in all, are kept per thread and element type.
///
/// The float cap is 8 GB: a training step's activations must fit in it, or every step gives the
/// excess back to the allocator and page-faults it in again. With the earlier 1 GB cap a step of
/// 16,384 tokens on the S model (1.5 GB of activations) ran at 12.2 k tokens/s, now 17.6 k, and a
/// 65,536-token one at 7.7 k, now 18.3 k, at the same peak RSS (`cargo xtask bench long`). The
/// pool never holds more than was once live at the same time, unless the step's shapes change.
const MAX_BUFFERS: usize = 512;
const MAX_FLOATS: usize = 1 << 31;

/// One thread's free buffers of element type `T`.
struct Free<T> {
    bufs: Vec<Vec<T>>,
    /// Elements (of `T`) held.
    elems: usize,
}

impl<T> Free<T> {
    const fn new() -> Self {
        Self { bufs: Vec::new(), elems: 0 }
    }
}

thread_local! {
    static FREE: RefCell<Free<f32>> = const { RefCell::new(Free::new()) };
    static FREE_V16: RefCell<Free<x16::V>> = const { RefCell::new(Free::new()) };
}

/// The smallest pooled buffer with room for `n` elements (and at most `2n + 1024`), removed.
fn pick<T: 'static>(pool: &'static LocalKey<RefCell<Free<T>>>, n: usize) -> Option<Vec<T>> {
    pool.with(|f| {
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
        f.elems -= v.capacity();
        Some(v)
    })
}

/// Keeps `v` in this thread's `pool`, unless the pool is full (then it is dropped).
fn put<T: 'static>(pool: &'static LocalKey<RefCell<Free<T>>>, v: Vec<T>, max_elems: usize) {
    if v.capacity() == 0 {
        return;
    }
    pool.with(|f| {
        let mut f = f.borrow_mut();
        if f.bufs.len() < MAX_BUFFERS && f.elems + v.capacity() <= max_elems {
            f.elems += v.capacity();
            f.bufs.push(v);
        }
    });
}

/// A zeroed buffer of `n` floats: a pooled one when one fits, else a new one.
pub fn take(n: usize) -> Vec<f32> {
    let mut v = pick(&FREE, n).unwrap_or_default();
    v.clear();
    v.resize(n, 0.0);
    v
}

/// A buffer of `n` floats whose contents are unspecified (values left by an earlier use, or
/// zeros; NaN in test and debug builds): for outputs that are written in full before being
/// read.
pub fn take_for_overwrite(n: usize) -> Vec<f32> {
    let mut v = pick(&FREE, n).unwrap_or_else(|| Vec::with_capacity(n));
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
    put(&FREE, v, MAX_FLOATS);
}

/// `n` zero floats from [`take`], given back to the pool of the thread that drops them.
#[derive(Debug, Default)]
pub struct F32Buf(Vec<f32>);

impl F32Buf {
    /// `n` zeros.
    pub fn zeroed(n: usize) -> Self {
        Self(take(n))
    }
}

impl std::ops::Deref for F32Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl std::ops::DerefMut for F32Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a F32Buf {
    type Item = &'a f32;
    type IntoIter = std::slice::Iter<'a, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<'a> IntoIterator for &'a mut F32Buf {
    type Item = &'a mut f32;
    type IntoIter = std::slice::IterMut<'a, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter_mut()
    }
}

impl Drop for F32Buf {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.0));
    }
}

/// [`take`] for 16-lane vectors ([`x16::V`]): `n` zero vectors, from this thread's pool of them.
pub fn take_v16(n: usize) -> Vec<x16::V> {
    let mut v = pick(&FREE_V16, n).unwrap_or_default();
    v.clear();
    v.resize(n, x16::V::ZERO);
    v
}

/// [`give`] for 16-lane vectors.
pub fn give_v16(v: Vec<x16::V>) {
    put(&FREE_V16, v, MAX_FLOATS / x16::W);
}

/// `n` zero 16-lane vectors from [`take_v16`], given back to the pool of the thread that drops
/// them.
#[derive(Debug, Default)]
pub struct V16Buf(Vec<x16::V>);

impl V16Buf {
    /// `n` zero vectors.
    pub fn zeroed(n: usize) -> Self {
        Self(take_v16(n))
    }
}

impl std::ops::Deref for V16Buf {
    type Target = [x16::V];
    fn deref(&self) -> &[x16::V] {
        &self.0
    }
}

impl std::ops::DerefMut for V16Buf {
    fn deref_mut(&mut self) -> &mut [x16::V] {
        &mut self.0
    }
}

impl Drop for V16Buf {
    fn drop(&mut self) {
        give_v16(std::mem::take(&mut self.0));
    }
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

    #[test]
    fn vector_buffers_have_their_own_pool() {
        let mut v = super::take_v16(40);
        v[5] = crate::simd::x16::V::splat(2.0);
        let ptr = v.as_ptr();
        super::give_v16(v);
        let w = super::take_v16(33);
        assert_eq!(w.as_ptr(), ptr, "the pooled allocation is reused");
        assert_eq!(w.len(), 33);
        assert!(w.iter().all(|x| x.to_array() == [0.0; 16]), "and comes back zeroed");
    }
}
