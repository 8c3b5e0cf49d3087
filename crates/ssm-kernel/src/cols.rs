//! Column blocks of row-major matrices: views, and the copies between a block and a dense buffer.
//!
//! A fused projection such as Mamba-2's `in_proj` output (rows of `z | x | B | C | dt`) is read
//! and written one column block at a time. [`Cols`] and [`ColsMut`] name such a block without
//! copying it; [`gather`] copies one out into a dense buffer and [`scatter`] writes or adds a
//! dense buffer back.
//!
//! # Layout
//!
//! Row `r` of a block is `data[r·stride + offset ..][..width]`: rows `stride` values apart,
//! starting at column `offset`. A dense buffer of the block is (rows, width), row-major.
//!
//! ```
//! use ssm_kernel::cols::{Cols, ColsMut, gather, scatter};
//! let m = [0.0f32, 1.0, 2.0, 10.0, 11.0, 12.0]; // (2, 3)
//! let mid = gather(Cols { data: &m, stride: 3, offset: 1 }, 2, 2); // columns 1..3
//! assert_eq!(mid, [1.0, 2.0, 11.0, 12.0]);
//! let mut out = [0.0f32; 6];
//! scatter(ColsMut { data: &mut out, stride: 3, offset: 1 }, &mid, 2, true);
//! assert_eq!(out, [0.0, 1.0, 2.0, 0.0, 11.0, 12.0]);
//! # ssm_kernel::pool::give(mid);
//! ```

use rayon::prelude::*;

use crate::pool;

/// Rows per parallel task of [`gather`] and [`scatter`].
const ROWS_PER_TASK: usize = 64;

/// A column block of a row-major matrix: row `r` is `data[r·stride + offset..]` (its width is
/// given where it is used).
#[derive(Clone, Copy, Debug)]
pub struct Cols<'a> {
    /// The whole matrix, row-major.
    pub data: &'a [f32],
    /// Values between the starts of consecutive rows.
    pub stride: usize,
    /// The block's first column.
    pub offset: usize,
}

impl<'a> Cols<'a> {
    /// A dense (rows, `width`) matrix as a block: stride `width`, offset 0.
    pub fn dense(data: &'a [f32], width: usize) -> Self {
        Self { data, stride: width, offset: 0 }
    }

    /// Row `r` of the block, `width` values.
    #[inline]
    pub fn row(&self, r: usize, width: usize) -> &'a [f32] {
        &self.data[r * self.stride + self.offset..][..width]
    }
}

/// A mutable column block of a row-major matrix; see [`Cols`].
#[derive(Debug)]
pub struct ColsMut<'a> {
    /// The whole matrix, row-major.
    pub data: &'a mut [f32],
    /// Values between the starts of consecutive rows.
    pub stride: usize,
    /// The block's first column.
    pub offset: usize,
}

/// The first `rows` rows of the `width`-column block `src`, as a dense (rows, width) buffer from
/// this thread's [`pool`] (give it back with [`pool::give`]). Rows are copied in parallel tasks
/// of 64.
///
/// # Panics
/// If `src` has fewer than `rows` rows of that block.
#[track_caller]
pub fn gather(src: Cols, width: usize, rows: usize) -> Vec<f32> {
    let mut out = pool::take_for_overwrite(rows * width);
    if width > 0 {
        out.par_chunks_mut(width * ROWS_PER_TASK).enumerate().for_each(|(blk, o)| {
            for (i, row) in o.chunks_exact_mut(width).enumerate() {
                row.copy_from_slice(src.row(blk * ROWS_PER_TASK + i, width));
            }
        });
    }
    out
}

/// `dst[r, ..width] += src[r, ..]` for every row of the dense (rows, width) `src`, or `=` when
/// `overwrite`. Rows are written in parallel tasks of 64.
///
/// # Panics
/// If `dst` (from its offset) is narrower than `width` or has fewer rows than `src`.
#[track_caller]
pub fn scatter(dst: ColsMut, src: &[f32], width: usize, overwrite: bool) {
    if width == 0 {
        return;
    }
    let ColsMut { data, stride, offset } = dst;
    assert!(
        offset + width <= stride,
        "scatter: columns {offset}..{} exceed the row stride {stride}",
        offset + width
    );
    data.par_chunks_mut(stride * ROWS_PER_TASK).zip(src.par_chunks(width * ROWS_PER_TASK)).for_each(
        |(d, s)| {
            for (drow, srow) in d.chunks_exact_mut(stride).zip(s.chunks_exact(width)) {
                let drow = &mut drow[offset..offset + width];
                if overwrite {
                    drow.copy_from_slice(srow);
                } else {
                    for (o, v) in drow.iter_mut().zip(srow) {
                        *o += v;
                    }
                }
            }
        },
    );
}

/// Columns `start..start + len` of the rows (width `n`) of `src`, as a dense (rows, len) slice:
/// borrowed in place when `src` is a single row, else copied into `dst` (at least rows · len
/// long). For decode steps, whose one row per sequence is usually one row.
///
/// # Panics
/// If `src` is not whole rows of `n`, the columns overrun a row, or `dst` is too short.
#[track_caller]
pub fn row_cols<'a>(src: &'a [f32], n: usize, start: usize, len: usize, dst: &'a mut [f32]) -> &'a [f32] {
    assert!(
        n > 0 && src.len().is_multiple_of(n) && start + len <= n,
        "row_cols: columns {start}..{} of rows of {n} from {} values",
        start + len,
        src.len()
    );
    let rows = src.len() / n;
    if rows == 1 {
        return &src[start..start + len];
    }
    assert!(dst.len() >= rows * len, "row_cols: dst holds {} values, needs {}", dst.len(), rows * len);
    for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(len)) {
        d.copy_from_slice(&s[start..start + len]);
    }
    &dst[..rows * len]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_then_scatter_round_trips_on_many_rows() {
        let (rows, stride, offset, width) = (150, 11, 3, 5);
        let m: Vec<f32> = (0..rows * stride).map(|i| i as f32).collect();
        let g = gather(Cols { data: &m, stride, offset }, width, rows);
        for r in 0..rows {
            assert_eq!(&g[r * width..(r + 1) * width], &m[r * stride + offset..][..width]);
        }
        let mut out = vec![1.0f32; rows * stride];
        scatter(ColsMut { data: &mut out, stride, offset }, &g, width, false);
        for r in 0..rows {
            for j in 0..stride {
                let want = if (offset..offset + width).contains(&j) { 1.0 + m[r * stride + j] } else { 1.0 };
                assert_eq!(out[r * stride + j], want);
            }
        }
        scatter(ColsMut { data: &mut out, stride, offset }, &g, width, true);
        assert_eq!(out[stride + offset], m[stride + offset]);
        pool::give(g);
    }

    #[test]
    fn row_cols_borrows_one_row_and_copies_many() {
        let one = [0.0f32, 1.0, 2.0, 3.0];
        let mut dst = [9.0f32; 8];
        let got = row_cols(&one, 4, 1, 2, &mut dst);
        assert_eq!(got, &[1.0, 2.0]);
        assert_eq!(got.as_ptr(), one[1..].as_ptr(), "a single row is borrowed, not copied");
        let three: Vec<f32> = (0..15).map(|i| i as f32).collect(); // (3, 5)
        let mut dst = [0.0f32; 7];
        assert_eq!(row_cols(&three, 5, 3, 2, &mut dst), &[3.0, 4.0, 8.0, 9.0, 13.0, 14.0]);
    }
}
