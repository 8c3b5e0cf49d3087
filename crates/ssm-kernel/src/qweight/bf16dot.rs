//! The AVX-512 BF16 kernel for bf16 weights. One `vdpbf16ps` multiplies 32 pairs of bf16 values
//! and adds each lane's two products into one of 16 f32 accumulators: it takes a whole 64-byte
//! cache line of weights as stored, where the AVX2 kernel widens every eight weights to f32
//! first (two instructions) before its multiply-add. The activations are rounded to bf16
//! (nearest, ties to even: `vcvtne2ps2bf16`) 32 at a time inside each tile, so nothing is
//! allocated and `x` stays f32 for the caller.
//!
//! Every function is `#[inline(always)]` and runs only inside
//! [`group_bf16dot`](super::group_bf16dot) on a CPU with AVX-512 F/BW/VL and BF16
//! ([`Path::Bf16Dot`](super::Path) is chosen only there), which every `unsafe` block here relies
//! on besides its bounds.

use std::arch::x86_64::*;
use std::ops::Range;

/// Values per `vdpbf16ps`: 32 bf16 = one 64-byte cache line of weights.
const STEP: usize = 32;

/// Tiles ahead whose rows a tile prefetches (as the AVX2 kernel).
const PF_TILES: usize = 1;

/// `x[0..len]` (`len ≤ 32`) rounded to bf16 in the order the weights are stored, zeros past
/// `len` (whose products then add nothing).
///
/// # Safety
/// `x..x + len` must be readable.
#[inline(always)]
unsafe fn x_bf16(x: *const f32, len: usize) -> __m512bh {
    // SAFETY: the masked loads touch only the `len` values the caller vouches for; AVX-512 F
    // and BF16 (module docs). `wrapping_add` makes the upper half's address without claiming
    // it is in bounds when its mask is empty.
    unsafe {
        if len >= STEP {
            _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x.add(16)), _mm512_loadu_ps(x))
        } else {
            let lo = _mm512_maskz_loadu_ps(mask16(len), x);
            let hi = _mm512_maskz_loadu_ps(mask16(len.saturating_sub(16)), x.wrapping_add(16));
            _mm512_cvtne2ps_pbh(hi, lo)
        }
    }
}

/// The mask of the first `min(n, 16)` lanes.
#[inline(always)]
fn mask16(n: usize) -> __mmask16 {
    if n >= 16 { !0 } else { ((1u32 << n) - 1) as __mmask16 }
}

/// 32 stored weights from `w`, zeros past `len` (`len ≤ 32`).
///
/// # Safety
/// `w..w + min(len, 32)` must be readable.
#[inline(always)]
unsafe fn w_bf16(w: *const u16, len: usize) -> __m512bh {
    // SAFETY: as `x_bf16`; AVX-512 BW for the 16-bit masked load. A bf16 vector is 32 u16 bit
    // patterns, so the integer register is reinterpreted as it stands.
    unsafe {
        let v = if len >= STEP {
            _mm512_loadu_epi16(w.cast())
        } else {
            _mm512_maskz_loadu_epi16((1u32 << len) - 1, w.cast())
        };
        std::mem::transmute::<__m512i, __m512bh>(v)
    }
}

/// `out[r][t] = ⟨bf16(x[r, :]), rows[t]⟩` for `x` (M, k) and `R` rows of `k` bf16 weights,
/// prefetching the cache line `ahead` rows on for every line read.
#[inline(always)]
fn tile<const M: usize, const R: usize>(
    x: &[f32],
    k: usize,
    rows: [&[u16]; R],
    ahead: usize,
) -> [[f32; R]; M] {
    assert!(x.len() >= M * k, "bf16dot tile: x holds fewer than {M} rows of {k}");
    for r in &rows {
        assert!(r.len() >= k, "bf16dot tile: a weight row holds fewer than {k} values");
    }
    let k32 = k - k % STEP;
    // SAFETY: AVX-512 F/BW and BF16 (module docs); every load reads at most `k − i` values from
    // offset `i` of a row or of a row of `x`, in bounds by the asserts above. A prefetch never
    // faults (`wrapping_add` forms its address).
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); R]; M];
        let zero: __m512bh = std::mem::transmute(_mm512_setzero_si512());
        let mut i = 0;
        while i < k {
            let len = if i < k32 { STEP } else { k - i };
            if ahead > 0 {
                for row in &rows {
                    _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().wrapping_add(ahead * k + i).cast());
                }
            }
            let mut w = [zero; R];
            for t in 0..R {
                w[t] = w_bf16(rows[t].as_ptr().add(i), len);
            }
            for r in 0..M {
                let xv = x_bf16(x.as_ptr().add(r * k + i), len);
                for t in 0..R {
                    acc[r][t] = _mm512_dpbf16_ps(acc[r][t], xv, w[t]);
                }
            }
            i += STEP;
        }
        let mut out = [[0.0f32; R]; M];
        for r in 0..M {
            for t in 0..R {
                out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
            }
        }
        out
    }
}

/// Outputs `js` for the `M` rows of `x`, in tiles of `R` outputs (then single ones). A tile of
/// several weight rows prefetches the next tile's rows while they are in the matrix of `n`
/// rows; a tile of one reads its row as one stream (as the AVX2 kernel's `tiles`).
#[inline(always)]
fn tiles<'w, const M: usize, const R: usize>(
    x: &[f32],
    (k, n): (usize, usize),
    js: Range<usize>,
    row: &impl Fn(usize) -> &'w [u16],
    put: impl Fn(usize, usize, f32),
) {
    let mut j = js.start;
    while j + R <= js.end {
        let ahead = if R > 1 && j + (PF_TILES + 1) * R <= n { PF_TILES * R } else { 0 };
        let mut rows = [&[][..]; R];
        for (t, r) in rows.iter_mut().enumerate() {
            *r = row(j + t);
        }
        let s = tile::<M, R>(x, k, rows, ahead);
        for (r, sr) in s.iter().enumerate() {
            for (t, &v) in sr.iter().enumerate() {
                put(r, j + t, v);
            }
        }
        j += R;
    }
    for j in j..js.end {
        let s = tile::<M, 1>(x, k, [row(j)], 0);
        for (r, sr) in s.iter().enumerate() {
            put(r, j, sr[0]);
        }
    }
}

/// Outputs `js` for the `mg ≤ 8` rows of `x` (mg, k). One row of `x` takes tiles of one
/// weight row ([`R1`](super::simd::R1), read as one stream); more take tiles of `mg` rows ×
/// `R` outputs, whose `mg·R` accumulators, `mg` converted rows of `x` and `R` weight vectors
/// fit in the 32 registers.
#[inline(always)]
pub(super) fn group<'w>(
    x: &[f32],
    mg: usize,
    (k, n): (usize, usize),
    js: Range<usize>,
    row: &impl Fn(usize) -> &'w [u16],
    put: impl Fn(usize, usize, f32),
) {
    match mg {
        1 => tiles::<1, { super::simd::R1 }>(x, (k, n), js, row, put),
        2 => tiles::<2, 4>(x, (k, n), js, row, put),
        3 => tiles::<3, 4>(x, (k, n), js, row, put),
        4 => tiles::<4, 4>(x, (k, n), js, row, put),
        5 => tiles::<5, 2>(x, (k, n), js, row, put),
        6 => tiles::<6, 2>(x, (k, n), js, row, put),
        7 => tiles::<7, 2>(x, (k, n), js, row, put),
        8 => tiles::<8, 2>(x, (k, n), js, row, put),
        _ => unreachable!("at most eight rows per group, got {mg}"),
    }
}
