//! Threading helpers.
//!
//! Kernels split work into independent tasks (a batch row and a block of channels or heads) and
//! run them on the current rayon pool, so the caller chooses the thread count with
//! `rayon::ThreadPool::install`. Tasks write disjoint parts of shared output buffers through
//! [`SharedMut`].
//!
//! Per-row fused kernels (RMSNorm, cross-entropy) schedule their rows with [`for_row_blocks`]:
//! one level of rayon parallelism over contiguous blocks of rows, used only when the work is
//! large (at least [`PAR_MIN_ELEMS`] elements).

use std::ops::Range;

use rayon::prelude::*;

/// A raw view of a mutable slice that several tasks write **disjoint** elements of.
///
/// Soundness rests on the caller: no two tasks may touch the same element, and the slice must
/// outlive every task (which holds, because rayon's scoped iterators join before returning).
#[derive(Clone, Copy)]
pub struct SharedMut<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: tasks only write disjoint elements (see the type's documentation).
unsafe impl<T: Send> Send for SharedMut<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Wraps `s`; the borrow must outlive every use of the returned view.
    pub fn new(s: &mut [T]) -> Self {
        Self { ptr: s.as_mut_ptr(), len: s.len() }
    }

    /// The sub-slice `[start, start + len)`.
    ///
    /// # Safety
    /// No other live reference (from any task) may overlap that range.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len, "SharedMut::slice out of bounds");
        // SAFETY: in bounds (checked); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }

    /// Hints the CPU to fetch the cache line of element `i` (see [`crate::simd::prefetch`]).
    #[inline(always)]
    pub fn prefetch(&self, i: usize) {
        if i < self.len {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `i` is in bounds, and a prefetch never faults or changes memory.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                    self.ptr.add(i).cast(),
                );
            }
        }
    }

    /// Writes element `i`.
    ///
    /// # Safety
    /// No other task may access element `i` concurrently.
    #[inline(always)]
    pub unsafe fn write(&self, i: usize, v: T) {
        assert!(i < self.len, "SharedMut::write out of bounds");
        // SAFETY: in bounds (checked); exclusivity is the caller's contract.
        unsafe { *self.ptr.add(i) = v }
    }

    /// Adds `v` to element `i`.
    ///
    /// # Safety
    /// No other task may access element `i` concurrently.
    #[inline(always)]
    pub unsafe fn add(&self, i: usize, v: T)
    where
        T: std::ops::AddAssign,
    {
        assert!(i < self.len, "SharedMut::add out of bounds");
        // SAFETY: in bounds (checked); exclusivity is the caller's contract.
        unsafe { *self.ptr.add(i) += v }
    }
}

/// Below this many elements (rows · cols) a per-row kernel runs on the calling thread: spawning
/// tasks costs more than it saves.
pub const PAR_MIN_ELEMS: usize = 1 << 16;

/// Per-row output buffers of one block: for each of the `N` outputs, its rows of the block, or
/// `None` when that output is not wanted.
pub type RowDsts<'a, const N: usize> = [Option<&'a mut [f32]>; N];

/// The rows per block [`for_row_blocks`] uses on the current pool (the last block may have
/// fewer): block `i` starts at row `i · block_rows`. All `rows` (at least 1) when it runs as one
/// block: `4 × threads` blocks when `rows · cols ≥ PAR_MIN_ELEMS`, else one.
pub fn block_rows(rows: usize, cols: usize) -> usize {
    let nblocks = if rows * cols >= PAR_MIN_ELEMS { (rayon::current_num_threads() * 4).min(rows) } else { 1 };
    if nblocks <= 1 { rows.max(1) } else { rows.div_ceil(nblocks) }
}

/// Splits `rows` rows of `cols` values into contiguous blocks of [`block_rows`] rows and calls
/// `f(rows, parts)` for each, where `parts[i]` is the block's part of `dsts[i]` (`cols` values
/// per row; `None` when `dsts[i]` is). Runs the blocks on the current rayon pool when
/// `rows · cols ≥ PAR_MIN_ELEMS`, else as one block on this thread. Returns the blocks' results
/// in row order.
pub fn for_row_blocks<'a, R: Send, const N: usize>(
    rows: usize,
    cols: usize,
    dsts: RowDsts<'a, N>,
    f: impl Fn(Range<usize>, RowDsts<'_, N>) -> R + Sync,
) -> Vec<R> {
    for_row_blocks_strided(rows, cols, [cols; N], dsts, f)
}

/// [`for_row_blocks`] where `dsts[i]` has rows `strides[i]` values apart (a block's part of it
/// then starts at its first row and holds `strides[i]` values per row; the last block's part
/// ends where `dsts[i]` does). `cols` measures the work per row.
pub fn for_row_blocks_strided<'a, R: Send, const N: usize>(
    rows: usize,
    cols: usize,
    strides: [usize; N],
    dsts: RowDsts<'a, N>,
    f: impl Fn(Range<usize>, RowDsts<'_, N>) -> R + Sync,
) -> Vec<R> {
    let per = block_rows(rows, cols);
    if per >= rows {
        return vec![f(0..rows, dsts)];
    }
    // Carve every destination into disjoint per-block slices up front (one small Vec per call).
    let mut blocks: Vec<(Range<usize>, RowDsts<'a, N>)> = Vec::with_capacity(rows.div_ceil(per));
    let mut rest = dsts;
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + per).min(rows);
        let parts: RowDsts<'a, N> = std::array::from_fn(|i| {
            rest[i].take().map(|s| {
                let at = ((r1 - r0) * strides[i]).min(s.len());
                let (head, tail) = s.split_at_mut(at);
                rest[i] = Some(tail);
                head
            })
        });
        blocks.push((r0..r1, parts));
        r0 = r1;
    }
    blocks.into_par_iter().map(|(range, parts)| f(range, parts)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row is visited once, in order, with its own part of a strided destination.
    #[test]
    fn row_blocks_cover_every_row_once() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (rows, cols) in [(1usize, 3usize), (7, 5), (300, 256), (1000, 70)] {
            let stride = cols + 2;
            let mut dst = vec![0.0f32; rows * stride];
            let ranges = pool.install(|| {
                for_row_blocks_strided(rows, cols, [stride], [Some(&mut dst[..])], |range, [part]| {
                    let part = part.expect("wanted");
                    for (i, r) in range.clone().enumerate() {
                        part[i * stride + 1] += r as f32 + 1.0;
                    }
                    range
                })
            });
            let flat: Vec<usize> = ranges.into_iter().flatten().collect();
            assert_eq!(flat, (0..rows).collect::<Vec<_>>());
            for r in 0..rows {
                assert_eq!(dst[r * stride + 1], r as f32 + 1.0, "row {r} of {rows}");
            }
        }
    }
}
