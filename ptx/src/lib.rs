//! `dinovmf-ptx`: the GPU kernels of dinovmf, written once as plain Rust.
//!
//! Every kernel body is a generic function over a [`Block`]: one thread block seen as a sequence
//! of barrier-free phases ([`Block::each`]) separated by barriers ([`Block::sync`]). On
//! `nvptx64-nvidia-cuda` a phase runs once, for the calling thread, and a barrier is
//! `bar.sync 0` (`gpu.rs`, entry points in `manifest.rs`); on the host the simulator (`sim`) runs a
//! phase for every thread of the block in turn, honours barriers by construction and checks
//! shared-memory races and reads of unwritten shared memory. The same bodies therefore run in
//! the tests against `dinovmf-core`'s reference functions before any GPU is at hand.
//!
//! Wherever the per-element math is the same, bodies call `dinovmf-core` (AdamW, EMA, center
//! update, vMF branch terms, the `Real` functions); what core only has as whole-slice loops
//! (GELU, LayerNorm, ...) is restated per element here and checked against core.
#![no_std]
#![cfg_attr(
    target_arch = "nvptx64",
    feature(abi_ptx, stdarch_nvptx, asm_experimental_arch)
)]

#[cfg(not(target_arch = "nvptx64"))]
extern crate alloc;

pub mod block;
pub mod elem;
pub mod kernels;
pub mod manifest;
pub mod math;
pub mod raw;

#[cfg(target_arch = "nvptx64")]
mod gpu;
#[cfg(not(target_arch = "nvptx64"))]
pub mod sim;

pub use block::{Block, Dims, Op};
pub use elem::Elem;
