//! The AVX2+FMA kernel: register tiles of `R` weight rows × all `M` rows of `x`. Every function
//! is `#[inline(always)]` and runs only inside [`group_avx2`](super::group_avx2) on a CPU with
//! AVX2, FMA and F16C ([`Path::Simd`](super::Path) is chosen only there), which every `unsafe`
//! block here relies on besides its bounds.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Bf16Row, F16Row, F32Row, Q8_BLOCK, Q8Row, Row};

/// A [`Row`] that decodes eight weights into one vector.
pub(super) trait Load8: Row {
    /// Bytes of one stored weight (Q8: its `i8`, the scales apart).
    const BYTES: usize;

    /// Weights `i..i + 8`.
    ///
    /// # Safety
    /// `i + 8` must not exceed the row's length.
    unsafe fn load8(self, i: usize) -> __m256;

    /// Hints the CPU to fetch the cache line holding weight `i` of the row `ahead` rows
    /// further on (the rows of a matrix are contiguous; an address past the matrix is
    /// harmless, as a prefetch never faults).
    fn prefetch(self, i: usize, ahead: usize);

    /// [`Load8::prefetch`] for data besides the weights (Q8's scales), once per row.
    #[inline(always)]
    fn prefetch_extra(self, ahead: usize) {
        let _ = ahead;
    }

    /// [`tile`] for one row of `x` (a single sequence's decode step); Q8 overrides it.
    #[inline(always)]
    fn tile1<const R: usize>(x: &[f32], k: usize, rows: [Self; R], ahead: usize) -> [f32; R] {
        tile::<1, R, Self>(x, k, rows, ahead)[0]
    }
}

/// Hints the CPU to fetch the cache line of `p + off` elements into L1.
#[inline(always)]
fn prefetch_at<T>(p: *const T, off: usize) {
    // SAFETY: a prefetch never faults or changes memory; `wrapping_add` makes the address
    // without claiming it is in bounds.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off).cast()) }
}

impl Load8 for F32Row<'_> {
    const BYTES: usize = 4;

    #[inline(always)]
    unsafe fn load8(self, i: usize) -> __m256 {
        debug_assert!(i + 8 <= self.0.len());
        // SAFETY: in bounds (the caller's contract); AVX (module docs).
        unsafe { _mm256_loadu_ps(self.0.as_ptr().add(i)) }
    }

    #[inline(always)]
    fn prefetch(self, i: usize, ahead: usize) {
        prefetch_at(self.0.as_ptr(), ahead * self.0.len() + i);
    }
}

impl Load8 for Bf16Row<'_> {
    const BYTES: usize = 2;

    #[inline(always)]
    unsafe fn load8(self, i: usize) -> __m256 {
        debug_assert!(i + 8 <= self.0.len());
        // SAFETY: 16 bytes in bounds (the caller's contract); AVX2 (module docs).
        unsafe {
            let h = _mm_loadu_si128(self.0.as_ptr().add(i).cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }

    #[inline(always)]
    fn prefetch(self, i: usize, ahead: usize) {
        prefetch_at(self.0.as_ptr(), ahead * self.0.len() + i);
    }
}

impl Load8 for F16Row<'_> {
    const BYTES: usize = 2;

    #[inline(always)]
    unsafe fn load8(self, i: usize) -> __m256 {
        debug_assert!(i + 8 <= self.0.len());
        // SAFETY: 16 bytes in bounds (the caller's contract); F16C (module docs).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(self.0.as_ptr().add(i).cast())) }
    }

    #[inline(always)]
    fn prefetch(self, i: usize, ahead: usize) {
        prefetch_at(self.0.as_ptr(), ahead * self.0.len() + i);
    }
}

impl Load8 for Q8Row<'_> {
    const BYTES: usize = 1;

    #[inline(always)]
    unsafe fn load8(self, i: usize) -> __m256 {
        debug_assert!(i + 8 <= self.q.len());
        // Eight-aligned chunks never straddle a block.
        let s = self.s[i / Q8_BLOCK];
        // SAFETY: 8 bytes in bounds (the caller's contract); AVX2 (module docs).
        unsafe {
            let q = _mm_loadl_epi64(self.q.as_ptr().add(i).cast());
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_set1_ps(s))
        }
    }

    #[inline(always)]
    fn prefetch(self, i: usize, ahead: usize) {
        prefetch_at(self.q.as_ptr(), ahead * self.q.len() + i);
    }

    /// Sums `x·q` over each whole block and multiply-adds that sum by the block's scale
    /// (one multiply per block instead of one per eight weights: at one row of `x` the
    /// decode is most of the work); a partial last block is scaled per eight weights.
    #[inline(always)]
    fn tile1<const R: usize>(x: &[f32], k: usize, rows: [Self; R], ahead: usize) -> [f32; R] {
        assert!(x.len() >= k, "tile1: x holds fewer than {k} values");
        let kb = k - k % Q8_BLOCK;
        let k8 = k - k % 8;
        if ahead > 0 {
            rows.iter().for_each(|r| r.prefetch_extra(ahead));
        }
        // SAFETY: AVX2 and FMA (module docs); every row holds `k ≥ i + 8` weights and `x`
        // at least `k` values (asserted above).
        let acc = unsafe {
            let mut acc = [_mm256_setzero_ps(); R];
            let mut i = 0;
            while i < kb {
                if ahead > 0 && i % 64 == 0 {
                    rows.iter().for_each(|r| r.prefetch(i, ahead));
                }
                let mut blk = [_mm256_setzero_ps(); R];
                for c in (i..i + Q8_BLOCK).step_by(8) {
                    let xv = _mm256_loadu_ps(x.as_ptr().add(c));
                    for t in 0..R {
                        let q = _mm_loadl_epi64(rows[t].q.as_ptr().add(c).cast());
                        let w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                        blk[t] = _mm256_fmadd_ps(xv, w, blk[t]);
                    }
                }
                for t in 0..R {
                    acc[t] = _mm256_fmadd_ps(blk[t], _mm256_set1_ps(rows[t].s[i / Q8_BLOCK]), acc[t]);
                }
                i += Q8_BLOCK;
            }
            while i < k8 {
                let xv = _mm256_loadu_ps(x.as_ptr().add(i));
                for t in 0..R {
                    acc[t] = _mm256_fmadd_ps(xv, rows[t].load8(i), acc[t]);
                }
                i += 8;
            }
            acc
        };
        // Loops, not `std::array::from_fn`: its closure would be compiled for the baseline
        // unless inlined, and `hsum` needs this function's AVX.
        let mut out = [0.0f32; R];
        for t in 0..R {
            out[t] = hsum(acc[t]);
            for i in k8..k {
                out[t] += x[i] * rows[t].get(i);
            }
        }
        out
    }

    #[inline(always)]
    fn prefetch_extra(self, ahead: usize) {
        let nb = self.s.len();
        for b in (0..nb).step_by(16) {
            prefetch_at(self.s.as_ptr(), ahead * nb + b);
        }
        prefetch_at(self.s.as_ptr(), ahead * nb + nb - 1);
    }
}

/// The sum of the eight lanes.
#[inline(always)]
fn hsum(v: __m256) -> f32 {
    // SAFETY: AVX and SSE3 (module docs).
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

/// Tiles ahead that [`tile`] prefetches: one was measured best (two and four are no faster).
const PF_TILES: usize = 1;

/// `out[r][t] = ⟨x[r, :], rows[t]⟩` for `x` (M, k) and `R` rows of `k` weights: each chunk of
/// eight weights is decoded once and multiply-added into all `M` rows' accumulators.
///
/// Rows of a wide matrix cross a 4 KiB page every few rows, where hardware prefetchers stop,
/// and a decode step does too little work per byte to hide a miss: for every cache line of
/// its rows the tile reads, it prefetches the line at the same place `ahead` rows on (the
/// next tile's), spreading the prefetches evenly over the loop.
#[inline(always)]
fn tile<const M: usize, const R: usize, W: Load8>(
    x: &[f32],
    k: usize,
    rows: [W; R],
    ahead: usize,
) -> [[f32; R]; M] {
    assert!(x.len() >= M * k, "tile: x holds fewer than {M} rows of {k}");
    let k8 = k - k % 8;
    // Weights per 64-byte cache line of storage.
    let line = 64 / W::BYTES;
    let kl = k - k % line;
    if ahead > 0 {
        rows.iter().for_each(|r| r.prefetch_extra(ahead));
    }
    // SAFETY: AVX and FMA (module docs); every row holds `k ≥ i + 8` weights, and
    // `r·k + i + 8 ≤ M·k ≤ x.len()` (asserted above).
    let acc = unsafe {
        let mut acc = [[_mm256_setzero_ps(); R]; M];
        // A macro, not a closure: a closure LLVM does not inline is compiled for the baseline.
        macro_rules! step {
            ($i:expr) => {{
                let i = $i;
                let mut w = [_mm256_setzero_ps(); R];
                for t in 0..R {
                    w[t] = rows[t].load8(i);
                }
                for r in 0..M {
                    let xv = _mm256_loadu_ps(x.as_ptr().add(r * k + i));
                    for t in 0..R {
                        acc[r][t] = _mm256_fmadd_ps(xv, w[t], acc[r][t]);
                    }
                }
            }};
        }
        let mut i = 0;
        while i < kl {
            if ahead > 0 {
                rows.iter().for_each(|r| r.prefetch(i, ahead));
            }
            for ii in (i..i + line).step_by(8) {
                step!(ii);
            }
            i += line;
        }
        while i < k8 {
            step!(i);
            i += 8;
        }
        acc
    };
    let mut out = [[0.0f32; R]; M];
    for r in 0..M {
        for t in 0..R {
            out[r][t] = hsum(acc[r][t]);
            for i in k8..k {
                out[r][t] += x[r * k + i] * rows[t].get(i);
            }
        }
    }
    out
}

/// Outputs `js` for `M` rows of `x` (of a matrix of `n` rows of `k`), in tiles of `R`
/// outputs (then single ones). Tiles of several rows prefetch the next tile's rows while they
/// are in the matrix (past `js` too: a thread usually takes the next task's rows next); tiles
/// of one row ([`R1`]) read it as one sequential stream and leave the fetching to the hardware.
#[inline(always)]
fn tiles<const M: usize, const R: usize, W: Load8>(
    x: &[f32],
    (k, n): (usize, usize),
    js: Range<usize>,
    row: &impl Fn(usize) -> W,
    put: impl Fn(usize, usize, f32),
) {
    let mut j = js.start;
    while j + R <= js.end {
        let ahead = if R > 1 && j + (PF_TILES + 1) * R <= n { PF_TILES * R } else { 0 };
        let rows = std::array::from_fn(|t| row(j + t));
        let s =
            if M == 1 { [W::tile1::<R>(x, k, rows, ahead); M] } else { tile::<M, R, W>(x, k, rows, ahead) };
        for (r, sr) in s.iter().enumerate() {
            for (t, &v) in sr.iter().enumerate() {
                put(r, j + t, v);
            }
        }
        j += R;
    }
    for j in j..js.end {
        let s =
            if M == 1 { [W::tile1::<1>(x, k, [row(j)], 0); M] } else { tile::<M, 1, W>(x, k, [row(j)], 0) };
        for (r, sr) in s.iter().enumerate() {
            put(r, j, sr[0]);
        }
    }
}

/// Outputs `js` for `4 + M2` rows of `x`, in tiles of `R` outputs: each tile is computed for
/// the first four rows (which fetches its weights) and then for the other `M2` (from L1).
#[inline(always)]
fn tiles_split<const M2: usize, const R: usize, W: Load8>(
    x: &[f32],
    (k, n): (usize, usize),
    js: Range<usize>,
    row: &impl Fn(usize) -> W,
    put: impl Fn(usize, usize, f32),
) {
    let (xa, xb) = x.split_at(4 * k);
    let mut j = js.start;
    while j + R <= js.end {
        let ahead = if j + (PF_TILES + 1) * R <= n { PF_TILES * R } else { 0 };
        let rows: [W; R] = std::array::from_fn(|t| row(j + t));
        let sa = tile::<4, R, W>(xa, k, rows, ahead);
        let sb = tile::<M2, R, W>(xb, k, rows, 0);
        for t in 0..R {
            sa.iter().enumerate().for_each(|(r, sr)| put(r, j + t, sr[t]));
            sb.iter().enumerate().for_each(|(r, sr)| put(4 + r, j + t, sr[t]));
        }
        j += R;
    }
    for j in j..js.end {
        let sa = tile::<4, 1, W>(xa, k, [row(j)], 0);
        let sb = tile::<M2, 1, W>(xb, k, [row(j)], 0);
        sa.iter().enumerate().for_each(|(r, sr)| put(r, j, sr[0]));
        sb.iter().enumerate().for_each(|(r, sr)| put(4 + r, j, sr[0]));
    }
}

/// Weight rows per tile at one row of `x` (a single sequence's decode step): one. The
/// matrix's rows are then read in order, one sequential stream per thread, which the
/// hardware prefetchers follow at full speed without software prefetches. Tiles of four rows
/// with the next tile prefetched (what more rows of `x` use) reached only 60–70 % of it: on
/// 24 (3072, 768) matrices, 2 threads (`decode_timing`), f32 23.6 → 32.4 GB/s, f16 20.2 → 32.1,
/// q8 18.1 → 27.8 (and from 1 thread, q8 10.1 → 17.5 GB/s).
pub(super) const R1: usize = 1;

/// Outputs `js` for the `mg ≤ 8` rows of `x` (mg, k). One row of `x` takes tiles of [`R1`]
/// weight row; more rows keep `M·R` accumulators plus
/// `R` weight vectors within the 16 registers, with at least four independent sums. Six to
/// eight rows are split 4 + the rest ([`tiles_split`]): a tile over all eight rows has one
/// load of `x` per FMA, and the eight rows of `x` (24 KiB at k = 768) do not stay in L1 next
/// to the streamed weights; the split measured 10–30 % faster at m = 8 and slower at m = 5.
#[inline(always)]
pub(super) fn group<W: Load8>(
    x: &[f32],
    mg: usize,
    (k, n): (usize, usize),
    js: Range<usize>,
    row: &impl Fn(usize) -> W,
    put: impl Fn(usize, usize, f32),
) {
    match mg {
        1 => tiles::<1, R1, W>(x, (k, n), js, row, put),
        2 => tiles::<2, 4, W>(x, (k, n), js, row, put),
        3 => tiles::<3, 2, W>(x, (k, n), js, row, put),
        4 => tiles::<4, 2, W>(x, (k, n), js, row, put),
        5 => tiles::<5, 1, W>(x, (k, n), js, row, put),
        6 => tiles_split::<2, 2, W>(x, (k, n), js, row, put),
        7 => tiles_split::<3, 2, W>(x, (k, n), js, row, put),
        8 => tiles_split::<4, 2, W>(x, (k, n), js, row, put),
        _ => unreachable!("at most eight rows per group, got {mg}"),
    }
}
