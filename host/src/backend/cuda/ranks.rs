//! The device side of the reduction seam: collectives over the ranks of a data-parallel run
//! that work on device buffers, ordered with the step's launches (NCCL, `nccl.rs`, feature
//! `nccl`). The host-side [`crate::backend::Collective`] stays the trainer's and the CPU
//! backend's; the CUDA backend's step reduces on the device through this one.
use anyhow::Result;

use super::device::Buf;

/// Collectives on device memory over the ranks of one run. Every rank must make the same calls
/// in the same order with the same lengths. Addresses are device addresses of the device the
/// collective was created for, `stream` that device's stream (0: the legacy default stream).
pub trait DeviceCollective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// `recv[..n] = sum over ranks of send[..n]` (`send == recv` is allowed).
    ///
    /// # Safety
    /// `send` and `recv` must each hold `n` f32 of device memory that stays allocated until the
    /// stream has run the operation.
    unsafe fn sum_f32(&mut self, send: u64, recv: u64, n: usize, stream: u64) -> Result<()>;
    /// `recv[..n] = element-wise maximum over ranks of send[..n]` (`send == recv` is allowed;
    /// exact, so every rank gets the same bits whatever the order).
    ///
    /// # Safety
    /// As [`DeviceCollective::sum_f32`].
    unsafe fn max_f32(&mut self, send: u64, recv: u64, n: usize, stream: u64) -> Result<()>;
    /// `recv[r n .. (r + 1) n]` = rank `r`'s `send[..n]`, for every rank `r`.
    ///
    /// # Safety
    /// As [`DeviceCollective::sum_f32`], with `recv` holding `world_size() * n` f32.
    unsafe fn all_gather_f32(&mut self, send: u64, recv: u64, n: usize, stream: u64) -> Result<()>;
    /// Bytes this rank has sent (what a ring algorithm moves) and seconds spent in the calls so
    /// far (on a GPU the calls only enqueue: the transfer time shows in the next sync).
    fn traffic(&self) -> (u64, f64);
}

/// Where the rest of a step's batch is, for the statistics over it: Sinkhorn-Knopp's column
/// maxima and sums each round, and whether a center may move as soon as its statistic is known.
pub enum BatchScope<'a> {
    /// The rows here are the whole batch: statistics are complete where they are computed.
    Whole,
    /// The rows here are this rank's equal share of a batch split over ranks.
    Shard(RankShard<'a>),
}

/// A rank's collective and `[k]` device scratch for Sinkhorn's column statistics over ranks.
pub struct RankShard<'a> {
    pub coll: &'a mut dyn DeviceCollective,
    /// Column maxima, then sums, each at least `k` long.
    pub col_max: Buf<f32>,
    pub col_sum: Buf<f32>,
}

impl BatchScope<'_> {
    /// The whole batch's row count, given the `local` rows here (equal shards).
    pub fn batch_rows(&self, local: usize) -> usize {
        match self {
            BatchScope::Whole => local,
            BatchScope::Shard(s) => local * s.coll.world_size(),
        }
    }

    /// Whether a center moves where its statistic is computed (`Whole`), or only after the
    /// statistic has been reduced over ranks (`Shard`: the reduce phase moves it).
    pub fn center_moves_in_place(&self) -> bool {
        matches!(self, BatchScope::Whole)
    }
}
