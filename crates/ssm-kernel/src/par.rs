//! Threading helpers.
//!
//! Kernels split work into independent tasks (a batch row and a block of channels or heads) and
//! run them on the current rayon pool, so the caller chooses the thread count with
//! `rayon::ThreadPool::install`. Tasks write disjoint parts of shared output buffers through
//! [`SharedMut`].

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
