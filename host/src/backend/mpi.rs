//! The [`Collective`] of ranks that are processes under `mpirun` (feature `mpi`): rsmpi over
//! the system's MPI library. No communication of our own: MPI moves the bytes, and the sums
//! over ranks are taken in rank order by [`ordered_sum_into`] so that they do not depend on
//! MPI's reduction algorithm (an `MPI_Allreduce` may add in any order).
//!
//! A sum is a reduce-scatter then an all-gather, as a ring all-reduce moves data: rank `r` owns
//! chunk `r` of the buffer, receives that chunk from every rank (`MPI_Alltoallv`), adds the
//! copies in rank order, and every rank then gathers all summed chunks (`MPI_Allgatherv`).
//! Each rank sends and receives `2 (N - 1) / N` of the buffer.
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use mpi::datatype::{Equivalence, Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::CommunicatorCollectives;
use mpi::Count;

use super::reduce::{ordered_sum_into, Collective};

/// The MPI environment of a process: initialised once, finalised when dropped (keep it alive
/// for as long as any [`MpiCollective`] is used).
pub struct MpiWorld {
    universe: Universe,
}

impl MpiWorld {
    /// Initialises MPI (the process must run under an MPI launcher or as an MPI singleton).
    pub fn init() -> Result<Self> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .context("MPI could not be initialised (or was initialised twice)")?;
        Ok(Self { universe })
    }

    pub fn rank(&self) -> usize {
        self.universe.world().rank() as usize
    }

    pub fn size(&self) -> usize {
        self.universe.world().size() as usize
    }

    /// A collective over all ranks of the world, on its own duplicate communicator (so that
    /// the backend's and the trainer's collectives never match each other's messages).
    pub fn collective(&self) -> MpiCollective {
        MpiCollective::new(self.universe.world().duplicate())
    }

    /// Ends every rank's process with `code` (an error on one rank would leave the others
    /// waiting in a collective).
    pub fn abort(&self, code: i32) -> ! {
        self.universe.world().abort(code)
    }
}

/// Counts and displacements of the `world` chunks of an `n`-element buffer.
fn chunks(n: usize, world: usize) -> Result<(Vec<Count>, Vec<Count>)> {
    ensure!(
        n <= Count::MAX as usize,
        "MPI collective over {n} values: more than MPI's count limit {}",
        Count::MAX
    );
    let start = |r: usize| (r * n / world) as Count;
    let counts = (0..world).map(|r| start(r + 1) - start(r)).collect();
    let displs = (0..world).map(start).collect();
    Ok((counts, displs))
}

/// Ranks that are MPI processes.
pub struct MpiCollective {
    comm: SimpleCommunicator,
    rank: usize,
    world: usize,
    /// Seconds spent in collectives and bytes this rank sent, since creation.
    pub seconds: f64,
    pub bytes_sent: u64,
}

// SAFETY: MPI is initialised with `Threading::Serialized` (calls from any thread, one at a
// time); a collective is owned by one backend or trainer and used by one thread at a time.
unsafe impl Send for MpiCollective {}

impl MpiCollective {
    fn new(comm: SimpleCommunicator) -> Self {
        let (rank, world) = (comm.rank() as usize, comm.size() as usize);
        Self {
            comm,
            rank,
            world,
            seconds: 0.0,
            bytes_sent: 0,
        }
    }

    fn ordered_sum<T: Equivalence + Copy + Default + std::ops::AddAssign>(
        &mut self,
        buf: &mut [T],
    ) -> Result<()> {
        let w = self.world;
        if w == 1 || buf.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        let (counts, displs) = chunks(buf.len(), w)?;
        let mine = counts[self.rank] as usize;
        // Chunk `rank` of every rank's buffer, rank after rank.
        let mut recv = vec![T::default(); w * mine];
        {
            let rc = vec![mine as Count; w];
            let rd: Vec<Count> = (0..w).map(|r| (r * mine) as Count).collect();
            let send = Partition::new(&buf[..], &counts[..], &displs[..]);
            let mut into = PartitionMut::new(&mut recv[..], rc, rd);
            self.comm.all_to_all_varcount_into(&send, &mut into);
        }
        let mut sum = vec![T::default(); mine];
        let parts: Vec<&[T]> = recv.chunks_exact(mine.max(1)).collect();
        if mine > 0 {
            ordered_sum_into(&mut sum, &parts);
        }
        let mut all = PartitionMut::new(buf, &counts[..], &displs[..]);
        self.comm.all_gather_varcount_into(&sum[..], &mut all);
        let size = std::mem::size_of::<T>() as u64;
        let n = counts.iter().map(|&c| c as u64).sum::<u64>();
        // Alltoallv: every chunk but our own; allgatherv: our chunk to every other rank.
        self.bytes_sent += size * (n - mine as u64) + size * mine as u64 * (w as u64 - 1);
        self.seconds += t.elapsed().as_secs_f64();
        Ok(())
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn sum_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        self.ordered_sum(buf)
    }
    fn sum_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        self.ordered_sum(buf)
    }
    fn all_gather_f32(&mut self, local: &[f32], all: &mut [f32]) -> Result<()> {
        ensure!(
            all.len() == self.world * local.len(),
            "all_gather: output holds {} values, expected {} x {}",
            all.len(),
            self.world,
            local.len()
        );
        let t = Instant::now();
        self.comm.all_gather_into(local, all);
        self.bytes_sent += 4 * (local.len() * (self.world - 1)) as u64;
        self.seconds += t.elapsed().as_secs_f64();
        Ok(())
    }
    fn traffic(&self) -> (u64, f64) {
        (self.bytes_sent, self.seconds)
    }
}
