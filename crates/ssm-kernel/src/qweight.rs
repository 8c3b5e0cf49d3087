//! Weight matrices stored in reduced precision for inference, multiplied with f32 activations
//! and accumulated in f32: `out = x · Wᵀ (+ b)`.
//!
//! A decode step reads every weight once for a handful of multiply-adds, so it is bound by
//! memory bandwidth: halving the bytes of `W` nearly halves its time. [`QMatrix`] holds an
//! (n, k) matrix in one [`WeightFormat`]; [`qmatvec`] reads each weight row **once** for all
//! (up to [`QMATVEC_MAX_ROWS`]) rows of `x`, decodes it to f32 in registers and multiply-adds it
//! into register tiles of a few outputs × every row; [`qlinear`] adds the bias and, for
//! prefill-sized `m`, dequantizes blocks of weight rows into a reused f32 buffer for the GEMM.
//!
//! # Formats
//!
//! | format | stored per weight | bytes / weight | dequantized value |
//! |---|---|---|---|
//! | [`F32`](WeightFormat::F32) | `f32` | 4 | itself |
//! | [`Bf16`](WeightFormat::Bf16) | `u16`: the high half of an f32 | 2 | `f32::from_bits((b as u32) << 16)` |
//! | [`F16`](WeightFormat::F16) | `u16`: IEEE binary16 bits | 2 | the binary16 value (exact in f32) |
//! | [`Q8`](WeightFormat::Q8) | `i8` `q`, plus one f32 scale `s` per block of [`Q8_BLOCK`] inputs | 1.125 | `q as f32 * s` |
//!
//! Quantization rounds to nearest, ties to even, for bf16 and f16 (NaN stays NaN, ±inf stays
//! ±inf, values beyond the format's range become ±inf — 65504 is f16's largest). Q8 is
//! GGUF's Q8_0 with an f32 scale: each row is cut into blocks of 32 consecutive inputs (the
//! last block of a row is partial when `k` is not a multiple of 32, with its own scale), and
//! each block gets `s = max|w| / 127` and `q = round(w / s)` (half away from zero), so
//! `|w − q·s| ≤ s/2` up to the f32 rounding of `q·s`; an all-zero block has `s = 0`.
//!
//! # Numerics
//!
//! Every kernel computes, in f32, the dot products of `x` with the **dequantized** weights: the
//! result differs from `x · deq(W)ᵀ` only by f32 rounding in the order of summation, as
//! [`crate::matvec::matvec_rows`] differs from the exact product. (For Q8 at one row of `x`, the
//! SIMD kernel sums `x·q` over each block and multiplies that sum by the block's scale, where
//! the other paths multiply each weight by it: the same value up to that rounding.) Quantizing
//! `x` too and taking integer dot products, as llama.cpp does, was not done: with AVX2 and no
//! VNNI it saves little at `m = 8`, where the f32 path already shares each decoded weight
//! vector across eight FMAs, and it adds the error of an 8-bit `x`.
//!
//! **The one exception: bf16 weights on a CPU with AVX-512 BF16** (when
//! [`isa::bf16_dot`](crate::isa::bf16_dot) holds), for two to eight rows of `x` at a time. There
//! [`qmatvec`] multiplies with `vdpbf16ps`,
//! which takes both operands in bf16: `x` is rounded to bf16 (nearest, ties to even) and the
//! products of the bf16 pairs are summed in f32. Each product then moves by at most 2⁻⁹ of
//! itself, so `|out − x·deq(W)ᵀ| ≤ 2⁻⁹ · Σᵢ |xᵢ·wᵢ|` per output (the unit tests check that bound,
//! and that the result is the f32 product of the rounded `x`). That is the same size as the
//! rounding of the weights themselves, and what bf16 inference does elsewhere (PyTorch's bf16
//! matmuls, llama.cpp's BF16 type). It is 1.3× faster than widening the weights to f32 at
//! eight rows of `x`, where the product is bound by instructions rather than memory; at one row
//! it streams the weights slower than widening them, so one row (a single sequence's decode
//! step) keeps `x` in f32. The instruction treats subnormal inputs as zero.
//! `MAMBA_SIMD=avx2` keeps `x` in f32. [`qlinear`]'s GEMM path (more than
//! [`QLINEAR_MATVEC_MAX_ROWS`] rows) always multiplies in f32.
//!
//! # Layouts (row-major)
//!
//! | array | layout |
//! |---|---|
//! | `x` | (m, k) |
//! | `W` | (n, k) — PyTorch's `Linear.weight`: n outputs, k inputs |
//! | `b` | (n) |
//! | `out` | (m, n) |
//!
//! ```
//! use ssm_kernel::qweight::{QMatrix, WeightFormat, qmatvec};
//! let w = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0]; // (n, k) = (3, 2)
//! let q = QMatrix::quantize(&w, 3, 2, "bf16".parse::<WeightFormat>().unwrap());
//! assert_eq!(q.size_bytes(), 12);
//! let x = [1.0f32, 2.0]; // (m, k) = (1, 2)
//! let mut out = [0.0f32; 3];
//! qmatvec(&x, &q, 1, &mut out);
//! assert_eq!(out, [1.0, 2.0, 3.0]);
//! ```

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use rayon::prelude::*;

use crate::gemm::gemm;
use crate::matvec::{PAR_MIN_MACS, linear_rows};
use crate::par::SharedMut;
use crate::pool;
use crate::team;

/// Inputs per Q8 block: one f32 scale per 32 consecutive weights of a row.
pub const Q8_BLOCK: usize = 32;

/// Rows of `x` that [`qmatvec`] multiplies per pass over the weights; larger `m` takes
/// `m.div_ceil(8)` passes (each over a task's rows of `W` while they are in cache).
pub const QMATVEC_MAX_ROWS: usize = 8;

/// Rows of `x` up to which [`qlinear`] uses [`qmatvec`] for a quantized matrix; above it
/// dequantizes blocks of weight rows for the GEMM. (On (3072, 768) matrices and 2 threads the
/// two take equal time near m = 48; the GEMM path is 1.2× faster at 64.)
pub const QLINEAR_MATVEC_MAX_ROWS: usize = 32;

/// Outputs (weight rows) per parallel task of [`qmatvec`].
const OUTS_PER_TASK: usize = 64;

/// The storage format of a [`QMatrix`]; parses from and displays as `f32`, `bf16`, `f16`, `q8`
/// (parsing ignores case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// `f32`, as trained.
    F32,
    /// bfloat16: f32's exponent, 7 mantissa bits (relative rounding error ≤ 2⁻⁸).
    Bf16,
    /// IEEE binary16: 10 mantissa bits (relative rounding error ≤ 2⁻¹¹ in its normal range,
    /// 6.1e-5 ≤ |w| ≤ 65504).
    F16,
    /// 8-bit integers with one f32 scale per block of [`Q8_BLOCK`] inputs (GGUF Q8_0-like).
    Q8,
}

impl WeightFormat {
    /// Every format, in the order of the table in the module documentation.
    pub const ALL: [Self; 4] = [Self::F32, Self::Bf16, Self::F16, Self::Q8];

    /// The lowercase name `FromStr` accepts and `Display` prints.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::Q8 => "q8",
        }
    }

    /// Bytes of storage per weight, counting Q8's scales (4 bytes per 32 weights) for rows whose
    /// length is a multiple of 32: 4, 2, 2 and 1.125.
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            Self::F32 => 4.0,
            Self::Bf16 | Self::F16 => 2.0,
            Self::Q8 => 1.0 + 4.0 / Q8_BLOCK as f64,
        }
    }

    /// Bytes of storage of an (n, k) matrix in this format (Q8: `n·k` + 4 per block).
    pub fn size_bytes(self, n: usize, k: usize) -> usize {
        match self {
            Self::F32 => 4 * n * k,
            Self::Bf16 | Self::F16 => 2 * n * k,
            Self::Q8 => n * k + 4 * n * k.div_ceil(Q8_BLOCK),
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A string that names no [`WeightFormat`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseWeightFormatError(pub String);

impl fmt::Display for ParseWeightFormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown weight format {:?}: expected one of f32, bf16, f16, q8", self.0)
    }
}

impl std::error::Error for ParseWeightFormatError {}

impl FromStr for WeightFormat {
    type Err = ParseWeightFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseWeightFormatError(s.to_string()))
    }
}

/// `x` rounded to bfloat16 (nearest, ties to even), as bits. NaN stays NaN (quieted, sign and
/// top payload bits kept); values beyond bf16's range round to ±inf.
#[inline]
pub fn bf16_from_f32(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    // Add just under half an ulp of the result, plus one when the kept lowest bit is odd: a tie
    // then carries into that bit only when it makes it even. No overflow: the largest non-NaN
    // pattern is 0xFF80_0000 (−inf).
    let round = 0x7fff + ((b >> 16) & 1);
    ((b + round) >> 16) as u16
}

/// The f32 value of bfloat16 bits `b` (exact).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `x` rounded to IEEE binary16 (nearest, ties to even), as bits (the `half` crate's
/// conversion: F16C when the target has it).
#[inline]
pub fn f16_from_f32(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// The f32 value of binary16 bits `b` (exact).
#[inline(always)]
pub fn f16_to_f32(b: u16) -> f32 {
    f16::from_bits(b).to_f32()
}

/// The storage of an (n, k) [`QMatrix`], row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum QStorage {
    /// (n, k) values.
    F32(Vec<f32>),
    /// (n, k) bfloat16 bit patterns.
    Bf16(Vec<u16>),
    /// (n, k) IEEE binary16 bit patterns.
    F16(Vec<u16>),
    /// Q8 blocks: weight `(j, i)` is `q[j·k + i] as f32 * scales[j·nb + i / 32]`, where
    /// `nb = k.div_ceil(32)` blocks per row.
    Q8 {
        /// (n, k) quantized weights.
        q: Vec<i8>,
        /// (n, nb) block scales.
        scales: Vec<f32>,
    },
}

impl QStorage {
    /// The format of this storage.
    pub fn format(&self) -> WeightFormat {
        match self {
            Self::F32(_) => WeightFormat::F32,
            Self::Bf16(_) => WeightFormat::Bf16,
            Self::F16(_) => WeightFormat::F16,
            Self::Q8 { .. } => WeightFormat::Q8,
        }
    }
}

/// A row-major (n, k) weight matrix (n outputs, k inputs, like PyTorch's `Linear.weight`) in one
/// [`WeightFormat`].
#[derive(Clone, Debug, PartialEq)]
pub struct QMatrix {
    n: usize,
    k: usize,
    data: QStorage,
}

/// Quantizes one Q8 block into `q` and returns its scale.
#[track_caller]
fn q8_block(w: &[f32], q: &mut [i8], (j, b): (usize, usize)) -> f32 {
    let mut amax = 0.0f32;
    for &v in w {
        assert!(v.is_finite(), "QMatrix::quantize: Q8 needs finite weights; row {j}, block {b} holds {v}");
        amax = amax.max(v.abs());
    }
    let s = amax / 127.0;
    if s == 0.0 {
        q.fill(0);
        return 0.0;
    }
    for (q, &v) in q.iter_mut().zip(w) {
        // |v / s| ≤ 127·(1 + 2⁻²³), so the rounded value fits (and `as` would saturate anyway).
        *q = (v / s).round() as i8;
    }
    s
}

impl QMatrix {
    /// `w` (n, k) row-major f32 stored in `format` (see the module documentation for the
    /// rounding of each format). `F32` copies; [`QMatrix::from_f32`] takes ownership instead.
    ///
    /// # Panics
    /// If `w` is not (n, k), or `format` is Q8 and a weight is not finite.
    #[track_caller]
    pub fn quantize(w: &[f32], n: usize, k: usize, format: WeightFormat) -> Self {
        assert_eq!(
            w.len(),
            n * k,
            "QMatrix::quantize: w must be (n, k) = ({n}, {k}), got {} values",
            w.len()
        );
        let data = match format {
            WeightFormat::F32 => QStorage::F32(w.to_vec()),
            WeightFormat::Bf16 => QStorage::Bf16(w.iter().map(|&v| bf16_from_f32(v)).collect()),
            WeightFormat::F16 => {
                let mut h = vec![f16::ZERO; w.len()];
                h.convert_from_f32_slice(w);
                QStorage::F16(h.reinterpret_cast().to_vec())
            }
            WeightFormat::Q8 => {
                let nb = k.div_ceil(Q8_BLOCK);
                let mut q = vec![0i8; n * k];
                let mut scales = vec![0.0f32; n * nb];
                if k > 0 {
                    for (j, (wr, qr)) in w.chunks_exact(k).zip(q.chunks_exact_mut(k)).enumerate() {
                        let blocks = wr.chunks(Q8_BLOCK).zip(qr.chunks_mut(Q8_BLOCK));
                        for (b, (wb, qb)) in blocks.enumerate() {
                            scales[j * nb + b] = q8_block(wb, qb, (j, b));
                        }
                    }
                }
                QStorage::Q8 { q, scales }
            }
        };
        Self { n, k, data }
    }

    /// An F32 matrix that takes `w` (n, k) without copying.
    ///
    /// # Panics
    /// If `w` is not (n, k).
    #[track_caller]
    pub fn from_f32(w: Vec<f32>, n: usize, k: usize) -> Self {
        Self::from_storage(QStorage::F32(w), n, k)
    }

    /// A matrix over storage already in its format, such as bf16 or f16 bits read from a
    /// checkpoint.
    ///
    /// # Panics
    /// If the storage's lengths are not those of an (n, k) matrix (Q8: `q` (n, k) and `scales`
    /// (n, k.div_ceil(32))).
    #[track_caller]
    pub fn from_storage(data: QStorage, n: usize, k: usize) -> Self {
        let (len, what) = match &data {
            QStorage::F32(v) => (v.len(), "f32 values"),
            QStorage::Bf16(v) => (v.len(), "bf16 values"),
            QStorage::F16(v) => (v.len(), "f16 values"),
            QStorage::Q8 { q, scales } => {
                let nb = k.div_ceil(Q8_BLOCK);
                assert_eq!(
                    scales.len(),
                    n * nb,
                    "QMatrix::from_storage: Q8 scales must be (n, k/32 rounded up) = ({n}, {nb}), got {} values",
                    scales.len()
                );
                (q.len(), "q8 values")
            }
        };
        assert_eq!(len, n * k, "QMatrix::from_storage: must be (n, k) = ({n}, {k}), got {len} {what}");
        Self { n, k, data }
    }

    /// Outputs `n`.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Inputs `k`.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// The storage format.
    pub fn format(&self) -> WeightFormat {
        self.data.format()
    }

    /// Bytes of storage (what a pass over the matrix reads), for memory and bandwidth reports.
    pub fn size_bytes(&self) -> usize {
        self.format().size_bytes(self.n, self.k)
    }

    /// The raw storage.
    pub fn storage(&self) -> &QStorage {
        &self.data
    }

    /// The raw storage, by value.
    pub fn into_storage(self) -> QStorage {
        self.data
    }

    /// Writes the dequantized row `j` (k values) into `out`: an embedding lookup.
    ///
    /// # Panics
    /// If `j ≥ n` or `out` is not (k).
    #[track_caller]
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        assert!(j < self.n, "QMatrix::dequantize_row: row {j} of a matrix with {} rows", self.n);
        self.dequantize_rows(j..j + 1, out);
    }

    /// Writes the dequantized rows `rows` ((rows.len(), k) row-major) into `out`.
    ///
    /// # Panics
    /// If `rows` is not within `0..n` or `out` is not (rows.len(), k).
    #[track_caller]
    pub fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        assert!(
            rows.start <= rows.end && rows.end <= n,
            "QMatrix::dequantize_rows: rows {rows:?} outside a matrix with {n} rows"
        );
        let len = rows.len();
        assert_eq!(
            out.len(),
            len * k,
            "QMatrix::dequantize_rows: out must be (rows, k) = ({len}, {k}), got {} values",
            out.len()
        );
        let span = rows.start * k..rows.end * k;
        match &self.data {
            QStorage::F32(v) => out.copy_from_slice(&v[span]),
            QStorage::Bf16(v) => out.iter_mut().zip(&v[span]).for_each(|(o, &b)| *o = bf16_to_f32(b)),
            QStorage::F16(v) => v[span].reinterpret_cast::<f16>().convert_to_f32_slice(out),
            QStorage::Q8 { q, scales } => {
                let nb = k.div_ceil(Q8_BLOCK);
                for (jj, orow) in out.chunks_exact_mut(k.max(1)).enumerate().take(len) {
                    let j = rows.start + jj;
                    let qrow = &q[j * k..(j + 1) * k];
                    let blocks = orow.chunks_mut(Q8_BLOCK).zip(qrow.chunks(Q8_BLOCK));
                    for ((ob, qb), &s) in blocks.zip(&scales[j * nb..(j + 1) * nb]) {
                        ob.iter_mut().zip(qb).for_each(|(o, &q)| *o = q as f32 * s);
                    }
                }
            }
        }
    }

    /// The whole matrix dequantized to (n, k) f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.n * self.k];
        self.dequantize_rows(0..self.n, &mut out);
        out
    }
}

/// One weight row as the kernels read it: `k` weights, decoded to f32.
trait Row: Copy + Send + Sync {
    /// Weight `i`.
    fn get(self, i: usize) -> f32;

    /// Weights `i..i + 8`.
    #[inline(always)]
    fn get8(self, i: usize) -> [f32; 8] {
        std::array::from_fn(|l| self.get(i + l))
    }
}

#[derive(Clone, Copy)]
struct F32Row<'a>(&'a [f32]);

#[derive(Clone, Copy)]
struct Bf16Row<'a>(&'a [u16]);

#[derive(Clone, Copy)]
struct F16Row<'a>(&'a [u16]);

/// A Q8 row: its `k` quantized weights and its block scales.
#[derive(Clone, Copy)]
struct Q8Row<'a> {
    q: &'a [i8],
    s: &'a [f32],
}

impl Row for F32Row<'_> {
    #[inline(always)]
    fn get(self, i: usize) -> f32 {
        self.0[i]
    }
}

impl Row for Bf16Row<'_> {
    #[inline(always)]
    fn get(self, i: usize) -> f32 {
        bf16_to_f32(self.0[i])
    }
}

impl Row for F16Row<'_> {
    #[inline(always)]
    fn get(self, i: usize) -> f32 {
        f16_to_f32(self.0[i])
    }
}

impl Row for Q8Row<'_> {
    #[inline(always)]
    fn get(self, i: usize) -> f32 {
        self.q[i] as f32 * self.s[i / Q8_BLOCK]
    }

    #[inline(always)]
    fn get8(self, i: usize) -> [f32; 8] {
        // Eight-aligned chunks never straddle a block.
        let s = self.s[i / Q8_BLOCK];
        let q = &self.q[i..i + 8];
        std::array::from_fn(|l| q[l] as f32 * s)
    }
}

/// Which inner kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// bf16 weights only: the AVX-512 BF16 dot product (`qweight/bf16dot.rs`), which rounds `x`
    /// to bf16.
    Bf16Dot,
    /// The `std::arch` AVX2+FMA kernel (`qweight/simd.rs`), every format.
    Avx2,
    /// The portable kernel: what other targets and CPUs run, and what the tests compare with.
    Portable,
}

impl Path {
    /// The kernel the active level runs for weights in `format` and `m` rows of `x`. The BF16
    /// dot product only from two rows: at one row, widening the weights to f32 (the AVX2
    /// kernel) streams them faster — on 24 (3072, 768) matrices, 2 threads (`decode_timing`),
    /// 24–32 GB/s against 15–19 — and keeps `x` in f32.
    fn best(format: WeightFormat, m: usize) -> Path {
        if format == WeightFormat::Bf16 && m > 1 && crate::isa::bf16_dot() {
            Path::Bf16Dot
        } else if cfg!(target_arch = "x86_64") && crate::isa::active() >= crate::isa::Isa::Avx2 {
            Path::Avx2
        } else {
            Path::Portable
        }
    }

    /// Whether this CPU can run the kernel on weights in `format`.
    fn runs(self, format: WeightFormat) -> bool {
        match self {
            Path::Bf16Dot => format == WeightFormat::Bf16 && crate::isa::bf16_dot_supported(),
            Path::Avx2 => cfg!(target_arch = "x86_64") && crate::isa::Isa::Avx2.supported(),
            Path::Portable => true,
        }
    }
}

/// Sizes of one product: `x` (m, k), `W` (n, k), `out` (m, n).
#[derive(Clone, Copy)]
struct Dims {
    m: usize,
    k: usize,
    n: usize,
}

/// The row trait `run` needs: with the SIMD kernel, rows that load eight weights a vector.
#[cfg(target_arch = "x86_64")]
use simd::Load8 as KernelRow;

/// The row trait `run` needs: the portable kernel's.
#[cfg(not(target_arch = "x86_64"))]
use Row as KernelRow;

/// The outputs of one group of rows of `x`: row `g0 + r` of `out` (m, n).
#[derive(Clone, Copy)]
struct GroupOut {
    out: SharedMut<f32>,
    g0: usize,
    n: usize,
}

impl GroupOut {
    /// Stores output `j` of the group's row `r`.
    #[inline(always)]
    fn put(self, r: usize, j: usize, v: f32) {
        // SAFETY: the task holding this writes only its own outputs `j`, which no other task
        // writes (the contract of `for_groups`' caller).
        unsafe { self.out.write((self.g0 + r) * self.n + j, v) }
    }
}

/// Calls `kernel(xg, mg, go)` for each group of up to [`QMATVEC_MAX_ROWS`] rows of `x` (`xg`
/// (mg, k)); `go` stores into `out`, which the caller shares only with tasks writing other
/// outputs.
#[inline(always)]
fn for_groups(x: &[f32], d: Dims, out: SharedMut<f32>, mut kernel: impl FnMut(&[f32], usize, GroupOut)) {
    for g0 in (0..d.m).step_by(QMATVEC_MAX_ROWS) {
        let mg = (d.m - g0).min(QMATVEC_MAX_ROWS);
        kernel(&x[g0 * d.k..(g0 + mg) * d.k], mg, GroupOut { out, g0, n: d.n });
    }
}

/// Outputs `js` of every row of `out` (through `out`, which the caller shares only with tasks
/// writing other outputs) with the AVX2 or portable kernel: each weight row is decoded once per
/// group of up to eight rows of `x`.
fn run<W: KernelRow>(
    x: &[f32],
    d: Dims,
    js: Range<usize>,
    row: impl Fn(usize) -> W,
    out: SharedMut<f32>,
    path: Path,
) {
    for_groups(x, d, out, |xg, mg, go| match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Path::Avx2` runs only where the CPU has AVX2 (asserted by `qmatvec_path`).
        Path::Avx2 => unsafe { group_avx2(xg, mg, (d.k, d.n), js.clone(), &row, |r, j, v| go.put(r, j, v)) },
        _ => {
            for j in js.clone() {
                let sums = dot_rows_portable(xg, mg, d.k, row(j));
                for (r, &v) in sums[..mg].iter().enumerate() {
                    go.put(r, j, v);
                }
            }
        }
    });
}

/// [`run`] for bf16 weights `v` (n, k) with the AVX-512 BF16 kernel.
#[cfg(target_arch = "x86_64")]
fn run_bf16dot(x: &[f32], d: Dims, js: Range<usize>, v: &[u16], out: SharedMut<f32>) {
    let k = d.k;
    let row = |j: usize| &v[j * k..(j + 1) * k];
    // SAFETY: `Path::Bf16Dot` runs only where the CPU has AVX-512 BF16 (asserted by
    // `qmatvec_path`).
    for_groups(x, d, out, |xg, mg, go| unsafe {
        group_bf16dot(xg, mg, (k, d.n), js.clone(), &row, |r, j, v| go.put(r, j, v))
    });
}

/// The portable kernel: `⟨x[r, :], row⟩` for each of the `mg ≤ 8` rows of `x` (mg, k), the row
/// decoded eight weights at a time into eight-lane partial sums (which compilers vectorise).
fn dot_rows_portable<W: Row>(x: &[f32], mg: usize, k: usize, row: W) -> [f32; QMATVEC_MAX_ROWS] {
    let mut acc = [[0.0f32; 8]; QMATVEC_MAX_ROWS];
    let k8 = k - k % 8;
    for i in (0..k8).step_by(8) {
        let w = row.get8(i);
        for (r, a) in acc[..mg].iter_mut().enumerate() {
            let xr = &x[r * k + i..r * k + i + 8];
            for l in 0..8 {
                a[l] += xr[l] * w[l];
            }
        }
    }
    let mut sums = [0.0f32; QMATVEC_MAX_ROWS];
    for r in 0..mg {
        sums[r] = acc[r].iter().sum::<f32>();
        for i in k8..k {
            sums[r] += x[r * k + i] * row.get(i);
        }
    }
    sums
}

/// The AVX2+FMA kernel (`qweight/simd.rs`), run inside [`group_avx2`].
#[cfg(target_arch = "x86_64")]
mod simd;

/// The AVX-512 BF16 kernel (`qweight/bf16dot.rs`), run inside [`group_bf16dot`].
#[cfg(target_arch = "x86_64")]
mod bf16dot;

/// [`simd::group`] compiled for AVX2 + FMA + F16C: its `#[inline(always)]` body and the
/// intrinsics under it are compiled into this function.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt")]
fn group_avx2<W: simd::Load8>(
    x: &[f32],
    mg: usize,
    kn: (usize, usize),
    js: Range<usize>,
    row: &impl Fn(usize) -> W,
    put: impl Fn(usize, usize, f32),
) {
    simd::group(x, mg, kn, js, row, put)
}

/// [`bf16dot::group`] compiled for AVX-512 F/BW/DQ/VL and BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(
    enable = "avx,avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"
)]
fn group_bf16dot<'w>(
    x: &[f32],
    mg: usize,
    kn: (usize, usize),
    js: Range<usize>,
    row: &impl Fn(usize) -> &'w [u16],
    put: impl Fn(usize, usize, f32),
) {
    bf16dot::group(x, mg, kn, js, row, put)
}

#[track_caller]
fn check(kernel: &str, x: &[f32], w: &QMatrix, m: usize, out: &[f32]) {
    let (k, n) = (w.k, w.n);
    assert_eq!(x.len(), m * k, "{kernel}: x must be (m, k) = ({m}, {k}), got {} values", x.len());
    assert_eq!(out.len(), m * n, "{kernel}: out must be (m, n) = ({m}, {n}), got {} values", out.len());
}

/// `out[r, j] = ⟨x[r, :], deq(W)[j, :]⟩` for every row `r < m` and output `j < n`, accumulated
/// in f32. Each weight row is read once for every eight rows of `x` (decode runs `m` = 1–8
/// sequences), decoded in registers, and multiply-added into a tile of accumulators of a few
/// outputs × those rows, while the next tile's rows are prefetched (at one row of `x`, one
/// weight row at a time, read in order for the hardware prefetchers); the outputs are split over
/// the current rayon pool in tasks of 64 when `m · n · k ≥` [`PAR_MIN_MACS`], or over the
/// decode team when one is installed ([`crate::team`]). Allocates nothing.
/// `out` is overwritten.
///
/// # Panics
/// If `x` is not (m, k) or `out` is not (m, n) for `W` (n, k).
#[track_caller]
pub fn qmatvec(x: &[f32], w: &QMatrix, m: usize, out: &mut [f32]) {
    check("qmatvec", x, w, m, out);
    qmatvec_path(x, w, m, out, Path::best(w.format(), m));
}

/// [`qmatvec`] with a chosen inner kernel (the tests run both).
fn qmatvec_path(x: &[f32], w: &QMatrix, m: usize, out: &mut [f32], path: Path) {
    assert!(path.runs(w.format()), "qmatvec: this CPU cannot run {path:?} on {} weights", w.format());
    let d = Dims { m, k: w.k, n: w.n };
    if m == 0 || d.n == 0 {
        return;
    }
    if d.k == 0 {
        out.fill(0.0);
        return;
    }
    let out = SharedMut::new(out);
    let split = m * d.n * d.k >= PAR_MIN_MACS && rayon::current_num_threads() > 1;
    let go = |js: Range<usize>| {
        let k = d.k;
        match &w.data {
            QStorage::F32(v) => run(x, d, js, |j| F32Row(&v[j * k..(j + 1) * k]), out, path),
            #[cfg(target_arch = "x86_64")]
            QStorage::Bf16(v) if path == Path::Bf16Dot => run_bf16dot(x, d, js, v, out),
            QStorage::Bf16(v) => run(x, d, js, |j| Bf16Row(&v[j * k..(j + 1) * k]), out, path),
            QStorage::F16(v) => run(x, d, js, |j| F16Row(&v[j * k..(j + 1) * k]), out, path),
            QStorage::Q8 { q, scales } => {
                let nb = k.div_ceil(Q8_BLOCK);
                let row = |j: usize| Q8Row { q: &q[j * k..(j + 1) * k], s: &scales[j * nb..(j + 1) * nb] };
                run(x, d, js, row, out, path)
            }
        }
    };
    if team::try_run(m * d.n * d.k, &|part, parts| go(team::part_range(d.n, part, parts, 16))) {
        return;
    }
    if split {
        (0..d.n.div_ceil(OUTS_PER_TASK))
            .into_par_iter()
            .for_each(|t| go(t * OUTS_PER_TASK..((t + 1) * OUTS_PER_TASK).min(d.n)));
    } else {
        go(0..d.n);
    }
}

/// [`qmatvec`] for f32 weights held as a plain slice `w` (n, k) — a model's f32 parameter — so
/// decode reads each weight row once for all `m` rows of `x` without wrapping it in a
/// [`QMatrix`]. `out` (m, n) is overwritten.
///
/// # Panics
/// If a length disagrees with `(m, k, n)`.
#[track_caller]
pub fn qmatvec_f32(x: &[f32], w: &[f32], (m, k, n): (usize, usize, usize), out: &mut [f32]) {
    assert_eq!(x.len(), m * k, "qmatvec_f32: x must be (m, k) = ({m}, {k}), got {} values", x.len());
    assert_eq!(w.len(), n * k, "qmatvec_f32: w must be (n, k) = ({n}, {k}), got {} values", w.len());
    assert_eq!(out.len(), m * n, "qmatvec_f32: out must be (m, n) = ({m}, {n}), got {} values", out.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let d = Dims { m, k, n };
    let path = Path::best(WeightFormat::F32, m);
    let out = SharedMut::new(out);
    let go = |js: Range<usize>| run(x, d, js, |j| F32Row(&w[j * k..(j + 1) * k]), out, path);
    if team::try_run(m * n * k, &|part, parts| go(team::part_range(n, part, parts, 16))) {
        return;
    }
    if m * n * k >= PAR_MIN_MACS && rayon::current_num_threads() > 1 {
        (0..n.div_ceil(OUTS_PER_TASK))
            .into_par_iter()
            .for_each(|t| go(t * OUTS_PER_TASK..((t + 1) * OUTS_PER_TASK).min(n)));
    } else {
        go(0..n);
    }
}

/// Weight rows per block that [`qlinear`]'s GEMM path dequantizes at a time: about 512 KiB of
/// f32 (the block stays in L2 while the GEMM packs it), 32 to 256 rows, a multiple of 8.
fn gemm_block_rows(k: usize) -> usize {
    ((128 * 1024) / k.max(1)).clamp(32, 256) / 8 * 8
}

/// `out (m, n) = x (m, k) · deq(W)ᵀ (+ b)`, accumulated in f32; `out` is overwritten.
///
/// - F32: exactly [`crate::matvec::linear_rows`] on the stored weights (same results, bit for
///   bit).
/// - Other formats, `m ≤` [`QLINEAR_MATVEC_MAX_ROWS`]: [`qmatvec`].
/// - Other formats, larger `m` (prefill): blocks of 32–256 weight rows (about 512 KiB of f32)
///   are dequantized into reused f32 buffers ([`crate::pool`]) and multiplied with
///   [`crate::gemm::gemm`], one block per task on the current rayon pool.
///
/// Then the bias is added to every row.
///
/// # Panics
/// If `x` is not (m, k), `out` is not (m, n) or `b` is not (n), for `W` (n, k).
#[track_caller]
pub fn qlinear(x: &[f32], w: &QMatrix, b: Option<&[f32]>, m: usize, out: &mut [f32]) {
    check("qlinear", x, w, m, out);
    let (k, n) = (w.k, w.n);
    if let Some(b) = b {
        assert_eq!(b.len(), n, "qlinear: b must be (n) = ({n}), got {} values", b.len());
    }
    if m == 0 || n == 0 {
        return;
    }
    if let QStorage::F32(v) = &w.data {
        return linear_rows(x, v, b, (m, k, n), out);
    }
    if m <= QLINEAR_MATVEC_MAX_ROWS {
        qmatvec(x, w, m, out);
    } else {
        dequant_gemm(x, w, m, out);
    }
    if let Some(b) = b {
        for row in out.chunks_exact_mut(n) {
            row.iter_mut().zip(b).for_each(|(o, v)| *o += v);
        }
    }
}

/// `out = x · deq(W)ᵀ` for [`qlinear`]'s large `m`: one task per block of
/// [`gemm_block_rows`] weight rows, each dequantizing its block into a reused buffer of its
/// thread ([`crate::pool`]), multiplying it with a single-threaded [`gemm`] into a second one
/// (m, rows) and copying that into its columns of `out`. The tasks run on the current rayon
/// pool when the product is large (the copy costs `1/k` of the multiply-adds).
fn dequant_gemm(x: &[f32], w: &QMatrix, m: usize, out: &mut [f32]) {
    let (k, n) = (w.k, w.n);
    if k == 0 {
        out.fill(0.0);
        return;
    }
    if m == 0 || n == 0 {
        return;
    }
    let nb = gemm_block_rows(k).min(n);
    let out = SharedMut::new(out);
    let block = |b: usize| {
        let (j0, j1) = (b * nb, ((b + 1) * nb).min(n));
        let rows = j1 - j0;
        let mut wb = pool::take_for_overwrite(rows * k);
        let mut ob = pool::take_for_overwrite(m * rows);
        w.dequantize_rows(j0..j1, &mut wb);
        gemm((m, k, rows), 1.0, x, (k, 1), &wb, (1, k), 0.0, &mut ob, (rows, 1));
        for (r, o) in ob.chunks_exact(rows).enumerate() {
            // SAFETY: this task alone writes columns j0..j1 of `out`.
            unsafe { out.slice(r * n + j0, rows) }.copy_from_slice(o);
        }
        pool::give(ob);
        pool::give(wb);
    };
    let blocks = n.div_ceil(nb);
    if blocks > 1 && rayon::current_num_threads() > 1 && m * k * n >= 1 << 20 {
        (0..blocks).into_par_iter().for_each(block);
    } else {
        (0..blocks).for_each(block);
    }
}

#[cfg(test)]
mod tests;
