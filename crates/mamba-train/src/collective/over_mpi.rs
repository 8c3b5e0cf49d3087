//! [`Mpi`]: the ranks of a run started by `mpirun`, through the `mpi` crate (rsmpi).

use std::sync::Mutex;

use mpi::collective::SystemOperation;
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::Collective;

/// This process as one rank of `MPI_COMM_WORLD`. MPI is initialised with
/// `MPI_THREAD_SERIALIZED` (the trainer calls it from a worker thread of its pool, never from two
/// threads at once: every call takes the lock below) and finalised when this value is dropped.
pub struct Mpi {
    inner: Mutex<Inner>,
    rank: usize,
    size: usize,
}

/// The MPI handles and reused send buffers (no allocation per step), used under the lock only.
struct Inner {
    world: SimpleCommunicator,
    send: Vec<f32>,
    send64: Vec<f64>,
    /// Dropped last: finalises MPI.
    _universe: Universe,
}

// SAFETY: MPI runs at MPI_THREAD_SERIALIZED (checked in `Mpi::init`): any thread may call it as
// long as no two calls overlap, and every use of the handles goes through the mutex.
unsafe impl Send for Mpi {}
// SAFETY: as above; `&Mpi` gives access to the handles only through the mutex.
unsafe impl Sync for Mpi {}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi").field("rank", &self.rank).field("size", &self.size).finish()
    }
}

impl Mpi {
    /// Initialises MPI. A process started without `mpirun` is a world of one rank.
    ///
    /// # Errors
    /// When MPI was already initialised in this process, or the library cannot call MPI from
    /// the trainer's thread (it offers less than `MPI_THREAD_SERIALIZED`).
    pub fn init() -> Result<Mpi, String> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or("MPI is already initialised in this process")?;
        if level < Threading::Serialized {
            return Err(format!(
                "the MPI library offers thread level {level:?}; training needs Serialized (calls from \
                 the trainer's worker thread)"
            ));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let inner = Inner { world, send: Vec::new(), send64: Vec::new(), _universe: universe };
        Ok(Mpi { inner: Mutex::new(inner), rank, size })
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let mut g = self.inner.lock().expect("an MPI call panicked");
        let Inner { world, send, .. } = &mut *g;
        send.clear();
        send.extend_from_slice(buf);
        world.all_reduce_into(&send[..], buf, SystemOperation::sum());
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
        let mut g = self.inner.lock().expect("an MPI call panicked");
        let Inner { world, send64, .. } = &mut *g;
        send64.clear();
        send64.extend_from_slice(buf);
        world.all_reduce_into(&send64[..], buf, SystemOperation::sum());
    }
}
