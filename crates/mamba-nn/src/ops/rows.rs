//! Row-block scheduling shared by the per-row fused ops (RMSNorm, cross-entropy): one level of
//! rayon parallelism over contiguous blocks of rows, used only when the work is large.

use std::ops::Range;

use rayon::prelude::*;

/// Below this many elements (rows · cols) a per-row op runs on the calling thread: spawning
/// tasks costs more than it saves.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 16;

/// Per-row output buffers of one block: for each of the `N` outputs, its rows of the block
/// (`cols` values per row), or `None` when that output is not wanted.
pub(crate) type Dsts<'a, const N: usize> = [Option<&'a mut [f32]>; N];

/// The rows per block [`for_row_blocks`] uses on the current pool (the last block may have
/// fewer): block `i` starts at row `i · block_rows`. All `rows` (at least 1) when it runs as one
/// block.
pub(crate) fn block_rows(rows: usize, cols: usize) -> usize {
    let nblocks = if rows * cols >= PAR_MIN_ELEMS { (rayon::current_num_threads() * 4).min(rows) } else { 1 };
    if nblocks <= 1 { rows.max(1) } else { rows.div_ceil(nblocks) }
}

/// Splits `rows` rows of `cols` values into contiguous blocks and calls `f(rows, parts)` for
/// each, where `parts[i]` is the block's part of `dsts[i]` (`cols` values per row; `None` when
/// `dsts[i]` is). Runs the blocks on the current rayon pool when `rows · cols ≥ PAR_MIN_ELEMS`,
/// else as one block on this thread. Returns the blocks' results in row order.
pub(crate) fn for_row_blocks<'a, R: Send, const N: usize>(
    rows: usize,
    cols: usize,
    dsts: Dsts<'a, N>,
    f: impl Fn(Range<usize>, Dsts<'_, N>) -> R + Sync,
) -> Vec<R> {
    for_row_blocks_strided(rows, cols, [cols; N], dsts, f)
}

/// [`for_row_blocks`] where `dsts[i]` has rows `strides[i]` values apart (a block's part of it
/// then starts at its first row and holds `strides[i]` values per row; the last block's part
/// ends where `dsts[i]` does). `cols` measures the work per row.
pub(crate) fn for_row_blocks_strided<'a, R: Send, const N: usize>(
    rows: usize,
    cols: usize,
    strides: [usize; N],
    dsts: Dsts<'a, N>,
    f: impl Fn(Range<usize>, Dsts<'_, N>) -> R + Sync,
) -> Vec<R> {
    let per = block_rows(rows, cols);
    if per >= rows {
        return vec![f(0..rows, dsts)];
    }
    // Carve every destination into disjoint per-block slices up front (one small Vec per call).
    let mut blocks: Vec<(Range<usize>, Dsts<'a, N>)> = Vec::with_capacity(rows.div_ceil(per));
    let mut rest = dsts;
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + per).min(rows);
        let parts: Dsts<'a, N> = std::array::from_fn(|i| {
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
