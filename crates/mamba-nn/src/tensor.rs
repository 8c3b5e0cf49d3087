//! The tensor type: `ndarray::ArrayD<f32>`, always kept in standard (row-major, contiguous)
//! layout so kernels can take its data as a slice.

use ndarray::IxDyn;
use ssm_kernel::pool;

/// An n-dimensional `f32` array in row-major layout.
pub type Tensor = ndarray::ArrayD<f32>;

/// A zero tensor of `shape`.
///
/// The zeros are written explicitly rather than obtained from `calloc`: untouched `calloc` pages
/// are mapped to the shared zero page on first read, and the first write then takes a
/// copy-on-write fault with a TLB shootdown across threads — measured at ~9 % of a training step
/// before this change. Written pages are reused warm from step to step.
pub fn zeros(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let mut v = Vec::with_capacity(n);
    v.resize(n, 0.0f32);
    Tensor::from_shape_vec(IxDyn(shape), v).expect("length is the product of the shape")
}

/// A tensor of `shape` whose elements are unspecified (a recycled buffer's old values, or
/// zeros), for an op output that is written in full before anything reads it. Saves the
/// zero-fill of [`zeros`], a full pass over memory per activation.
pub fn for_overwrite(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    from_vec(shape, pool::take_for_overwrite(n))
}

/// A copy of `t` (same shape, row-major) in a pooled buffer.
pub fn pooled_copy(t: &Tensor) -> Tensor {
    from_vec(t.shape(), pooled_vec(data(t)))
}

/// A copy of `v` in a pooled buffer.
pub fn pooled_vec(v: &[f32]) -> Vec<f32> {
    let mut out = pool::take_for_overwrite(v.len());
    out.copy_from_slice(v);
    out
}

/// Gives `t`'s buffer back to this thread's pool for a later [`for_overwrite`] or pooled
/// temporary.
pub fn recycle(t: Tensor) {
    let (v, _) = t.into_raw_vec_and_offset();
    pool::give(v);
}

/// A tensor of `shape` holding `data` (row-major).
///
/// # Panics
/// If `data.len()` is not the product of `shape`.
#[track_caller]
pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Tensor {
    let n: usize = shape.iter().product();
    assert_eq!(data.len(), n, "from_vec: {} values do not fill shape {shape:?} ({n} elements)", data.len());
    Tensor::from_shape_vec(IxDyn(shape), data).expect("length checked above")
}

/// The elements of `t` in row-major order.
///
/// # Panics
/// If `t` is not in standard layout (every tensor this crate makes is).
#[track_caller]
pub fn data(t: &Tensor) -> &[f32] {
    t.as_slice().expect("tensor is not contiguous row-major")
}

/// The elements of `t` in row-major order, mutably.
///
/// # Panics
/// If `t` is not in standard layout.
#[track_caller]
pub fn data_mut(t: &mut Tensor) -> &mut [f32] {
    t.as_slice_mut().expect("tensor is not contiguous row-major")
}

/// Splits a shape `(…, last)` into (rows, last): the number of rows is the product of the leading
/// dimensions.
///
/// # Panics
/// If the shape is empty.
#[track_caller]
pub fn rows_cols(shape: &[usize]) -> (usize, usize) {
    let (&last, lead) = shape.split_last().expect("a tensor with at least one dimension");
    (lead.iter().product(), last)
}

/// Asks glibc's allocator to keep freed memory for reuse instead of returning it to the
/// operating system. A training step allocates and frees the same multi-megabyte activations
/// every step; by default glibc serves those with fresh `mmap`s and unmaps them on free, so each
/// step pays page faults, zeroing by the kernel and TLB shootdowns across threads (measured: ~16 %
/// of a Mamba-2 step). Raising the mmap and trim thresholds makes later steps reuse the heap.
///
/// A process-wide setting, so the library never makes it: a program calls this once at start
/// (the `mamba` binary and the benchmarks do). Idempotent; a no-op on other platforms.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator thresholds; both values are valid.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        });
    }
}
