//! Kernel bodies, generic over [`Block`](crate::Block). Each `pub fn` here is one GPU kernel
//! (entry points in `manifest.rs`); dims are `usize`, slices are the kernel's buffers.
pub mod attention_tc;
pub mod attention_tc_backward;
pub mod elementwise;
pub mod gemm;
pub mod gemm_tc;
pub mod head;
pub mod ibot;
pub mod optim;
pub mod reduce;
pub mod rows;
pub mod sinkhorn;
pub mod tokens;

use crate::block::Block;

/// Threads per block of elementwise kernels (one element per thread, `ceil(n / 256)` blocks).
pub const EW_BLOCK: u32 = 256;
/// Threads per block of row kernels that give each row one warp (4 rows per block).
pub const ROW_BLOCK: u32 = 128;
/// Rows per block of [`ROW_BLOCK`] kernels.
pub const ROWS_PER_BLOCK: u32 = ROW_BLOCK / 32;
/// Threads per block of kernels that give a whole row (or a reduction chunk) one block.
pub const WIDE_BLOCK: u32 = 256;
/// f32 words of the small static shared array (block reductions).
pub const SMEM_SMALL_WORDS: usize = 256;
/// f32 words of the GEMM's static shared array.
pub const SMEM_GEMM_WORDS: usize = 2176;

/// Calls `f(i)` for the one element `i = blockIdx.x * blockDim.x + threadIdx.x` of this thread,
/// when `i < n`.
#[inline(always)]
pub fn for_each_elem<B: Block>(b: &mut B, n: usize, mut f: impl FnMut(usize)) {
    let base = b.dims().base_x();
    b.each0(|t, _| {
        let i = base + t as usize;
        if i < n {
            f(i)
        }
    });
}

/// `ceil(a / b)`.
#[inline(always)]
pub const fn div_ceil(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}
