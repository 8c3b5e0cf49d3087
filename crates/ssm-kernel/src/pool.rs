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

use std::marker::PhantomData;

use crate::simd::V16;

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
    static FREE_V16: RefCell<Free<Block16>> = const { RefCell::new(Free::new()) };
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

/// Storage for one 16-lane vector of any level: 16 f32 values, aligned for the widest register.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
pub struct Block16([f32; 16]);

/// [`take`] for 16-lane vectors: `n` zero blocks, from this thread's pool of them.
fn take_v16(n: usize) -> Vec<Block16> {
    if n == 0 {
        return Vec::new();
    }
    let mut v = pick(&FREE_V16, n).unwrap_or_default();
    v.clear();
    v.resize(n, Block16::default());
    v
}

/// `n` zero 16-lane vectors of type `V` (any level's), from this thread's pool, given back to
/// the pool of the thread that drops them.
#[derive(Debug, Default)]
pub struct V16Buf<V> {
    blocks: Vec<Block16>,
    _v: PhantomData<V>,
}

impl<V: V16> V16Buf<V> {
    /// `n` zero vectors.
    pub fn zeroed(n: usize) -> Self {
        const {
            assert!(std::mem::size_of::<V>() == std::mem::size_of::<Block16>());
            assert!(std::mem::align_of::<V>() <= std::mem::align_of::<Block16>());
        }
        Self { blocks: take_v16(n), _v: PhantomData }
    }
}

impl<V: V16> std::ops::Deref for V16Buf<V> {
    type Target = [V];
    fn deref(&self) -> &[V] {
        // SAFETY: `V` has `Block16`'s size and at most its alignment (checked in `zeroed`, the
        // only constructor of a non-empty buffer), and is plain f32 lanes like it.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast(), self.blocks.len()) }
    }
}

impl<V: V16> std::ops::DerefMut for V16Buf<V> {
    fn deref_mut(&mut self) -> &mut [V] {
        // SAFETY: as in `deref`.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast(), self.blocks.len()) }
    }
}

impl<V> Drop for V16Buf<V> {
    fn drop(&mut self) {
        put(&FREE_V16, std::mem::take(&mut self.blocks), MAX_FLOATS / 16);
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
        let mut v = super::V16Buf::<wide::f32x16>::zeroed(40);
        v[5] = wide::f32x16::splat(2.0);
        let ptr = v.as_ptr() as usize;
        drop(v);
        let w = super::V16Buf::<wide::f32x16>::zeroed(33);
        assert_eq!(w.as_ptr() as usize, ptr, "the pooled allocation is reused");
        assert_eq!(w.len(), 33);
        assert!(w.iter().all(|x| x.to_array() == [0.0; 16]), "and comes back zeroed");
    }
}
