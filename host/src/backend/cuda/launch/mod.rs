//! Typed launchers: one function per kernel of `dinovmf.ptx`, named as the kernel and grouped
//! as `ptx/src/kernels/` is (`attention_tc.rs`, `head.rs`, `ibot.rs`, `optim.rs`, `reduce.rs`, `sinkhorn.rs`,
//! `tokens.rs`), taking typed device buffers and the sizes (a small struct where a kernel takes
//! many). The argument order is written here once; the production passes and the kernel table
//! (`verify.rs`) both call these, and every one goes through [`Gpu::launch`] and so through
//! `check_launch` (manifest types, buffer extents, grid limits).
//!
//! The GEMM, row, elementwise and reduction launchers that existed before live in `ops.rs` as
//! methods of [`Gpu`] with the same contract.
//!
//! [`Gpu`]: super::device::Gpu
//! [`Gpu::launch`]: super::device::Gpu::launch
pub mod attention_tc;
pub mod head;
pub mod ibot;
pub mod optim;
pub mod reduce;
pub mod sinkhorn;
pub mod tokens;
