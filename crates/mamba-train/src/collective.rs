//! Collectives for data-parallel training: the sums a group of ranks exchanges each step.
//!
//! A data-parallel run has `size` ranks, each holding the whole model. Every rank draws the same
//! global batch (the same seeded sampler), trains on its share of the rows, and the ranks sum
//! their scaled gradients with [`Collective::all_reduce_sum`], so that every rank applies the same
//! optimizer step and the parameters stay identical. [`Solo`] is the one-rank group every
//! [`Trainer`](crate::trainer::Trainer) has by default; [`InProcess`] runs a group as threads of
//! one process (how the trainer's data-parallel logic is tested without MPI); `Mpi` (cargo
//! feature `mpi`) is one process of a run started with `mpirun`.
//!
//! ```
//! use mamba_train::collective::{Collective, InProcess};
//!
//! let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
//!     let ranks = InProcess::group(3);
//!     let handles: Vec<_> = ranks
//!         .into_iter()
//!         .map(|c| s.spawn(move || {
//!             let mut buf = vec![c.rank() as f32, 1.0];
//!             c.all_reduce_sum(&mut buf);
//!             buf
//!         }))
//!         .collect();
//!     handles.into_iter().map(|h| h.join().unwrap()).collect()
//! });
//! assert!(sums.iter().all(|b| b == &[3.0, 3.0]));
//! ```

use std::sync::{Arc, Barrier, Mutex};

#[cfg(feature = "mpi")]
mod over_mpi;
#[cfg(feature = "mpi")]
pub use over_mpi::Mpi;

/// A group of ranks that sum buffers together.
pub trait Collective: Send + Sync {
    /// This rank's index, `0..size()`; rank 0 writes the run's files.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn size(&self) -> usize;

    /// Replaces `buf` with its elementwise sum over all ranks. Every rank must call it with a
    /// buffer of the same length, in the same order of calls; every rank gets the bitwise same
    /// result (the sum is taken in rank order).
    fn all_reduce_sum(&self, buf: &mut [f32]);

    /// [`Collective::all_reduce_sum`] for f64 values (losses, checksums).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]);
}

/// The group of one rank: every collective is a no-op.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _buf: &mut [f32]) {}

    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) {}
}

/// What the ranks of an [`InProcess`] group share: one deposit slot per rank, and a barrier.
#[derive(Debug)]
struct Shared {
    slots: Mutex<Vec<Vec<f64>>>,
    barrier: Barrier,
}

/// One rank of a group of threads in this process ([`InProcess::group`]). Each collective
/// deposits the rank's buffer, waits for every rank, sums the deposits in rank order, and waits
/// again before the slots are reused; so every rank of the group must make the same calls.
#[derive(Clone, Debug)]
pub struct InProcess {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl InProcess {
    /// The `size` ranks of a new group, rank `i` at index `i`; hand one to each thread.
    ///
    /// # Panics
    /// If `size` is 0.
    #[track_caller]
    pub fn group(size: usize) -> Vec<InProcess> {
        assert!(size > 0, "InProcess::group: a group needs at least one rank");
        let shared =
            Arc::new(Shared { slots: Mutex::new(vec![Vec::new(); size]), barrier: Barrier::new(size) });
        (0..size).map(|rank| InProcess { rank, size, shared: Arc::clone(&shared) }).collect()
    }

    /// Sums `len` values over the ranks: `get(i)` is this rank's value `i`, `set(i, v)` stores the
    /// sum. Values travel as f64 (exact for f32), and are summed in rank order in f64 then
    /// rounded once, the same on every rank.
    fn sum(&self, len: usize, get: impl Fn(usize) -> f64, mut set: impl FnMut(usize, f64)) {
        {
            let mut slots = self.shared.slots.lock().expect("a rank panicked inside a collective");
            slots[self.rank].clear();
            slots[self.rank].extend((0..len).map(get));
        }
        self.shared.barrier.wait();
        {
            let slots = self.shared.slots.lock().expect("a rank panicked inside a collective");
            for (r, s) in slots.iter().enumerate() {
                assert_eq!(
                    s.len(),
                    len,
                    "all_reduce_sum: rank {r} gave {} values, rank {} gave {len}",
                    s.len(),
                    self.rank
                );
            }
            for i in 0..len {
                set(i, slots.iter().map(|s| s[i]).sum());
            }
        }
        // Nobody deposits the next call's values before every rank has read this one's.
        self.shared.barrier.wait();
    }
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let src = buf.to_vec();
        self.sum(buf.len(), |i| src[i] as f64, |i, v| buf[i] = v as f32);
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
        let src = buf.to_vec();
        self.sum(buf.len(), |i| src[i], |i, v| buf[i] = v);
    }
}

/// One f64 per rank, gathered onto every rank: `value` lands at index `rank` of the result
/// (a sum of one non-zero term per index is exact).
pub fn gather_f64(c: &dyn Collective, value: f64) -> Vec<f64> {
    let mut v = vec![0.0f64; c.size()];
    v[c.rank()] = value;
    c.all_reduce_sum_f64(&mut v);
    v
}

/// The rows `rank` trains on out of `batch` rows split over `size` ranks: contiguous, sizes
/// differing by at most one (the first `batch % size` ranks take one more).
pub fn share(batch: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let (q, r) = (batch / size, batch % size);
    let start = rank * q + rank.min(r);
    start..start + q + usize::from(rank < r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_group<T: Send>(n: usize, f: impl Fn(InProcess) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let hs: Vec<_> = InProcess::group(n).into_iter().map(|c| s.spawn(|| f(c))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn sums_are_equal_on_every_rank_and_in_rank_order() {
        // Values whose f32 sum depends on the order: summed in f64 and rounded once.
        let out = on_group(3, |c| {
            let mut buf = vec![[1e8f32, 1.0, -1e8][c.rank()], c.rank() as f32 * 0.5];
            c.all_reduce_sum(&mut buf);
            // Several calls in a row reuse the slots.
            let mut again = vec![1.0f64; 4];
            c.all_reduce_sum_f64(&mut again);
            (buf, again, gather_f64(&c, c.rank() as f64 + 0.25))
        });
        for (buf, again, g) in &out {
            assert_eq!(buf, &vec![1.0, 1.5]);
            assert_eq!(again, &vec![3.0; 4]);
            assert_eq!(g, &vec![0.25, 1.25, 2.25]);
        }
    }

    #[test]
    fn shares_cover_the_batch_once() {
        for (batch, size) in [(8, 2), (8, 3), (5, 5), (3, 4), (1, 1)] {
            let rows: Vec<usize> = (0..size).flat_map(|r| share(batch, r, size)).collect();
            assert_eq!(rows, (0..batch).collect::<Vec<_>>(), "batch {batch} over {size}");
            let lens: Vec<usize> = (0..size).map(|r| share(batch, r, size).len()).collect();
            assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn solo_changes_nothing() {
        let mut b = vec![1.5f32, -2.0];
        Solo.all_reduce_sum(&mut b);
        assert_eq!((b, Solo.rank(), Solo.size()), (vec![1.5, -2.0], 0, 1));
        assert_eq!(gather_f64(&Solo, 7.0), vec![7.0]);
    }
}
