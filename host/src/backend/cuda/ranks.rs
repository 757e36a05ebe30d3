//! The device side of the reduction seam: collectives over the ranks of a data-parallel run
//! that work on device buffers, ordered with the step's launches (NCCL, `nccl.rs`, feature
//! `nccl`). The host-side [`crate::backend::Collective`] stays the trainer's and the CPU
//! backend's; the CUDA backend's step reduces on the device through this one.
use anyhow::Result;

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
    /// `recv[r n .. (r + 1) n]` = rank `r`'s `send[..n]`, for every rank `r`.
    ///
    /// # Safety
    /// As [`DeviceCollective::sum_f32`], with `recv` holding `world_size() * n` f32.
    unsafe fn all_gather_f32(&mut self, send: u64, recv: u64, n: usize, stream: u64) -> Result<()>;
    /// Bytes this rank has sent (what a ring algorithm moves) and seconds spent in the calls so
    /// far (on a GPU the calls only enqueue: the transfer time shows in the next sync).
    fn traffic(&self) -> (u64, f64);
}
