//! The device side of [`Block`]: one thread, registers for locals, `bar.sync` for barriers.
use crate::block::{Block, Dims, Op, Shared, BFLY};
use crate::manifest::SmemKind;
use core::arch::asm;
use core::arch::nvptx;

// Static shared arrays. A kernel's shared size is that of the one array it references (ptxas
// reports it); see `manifest.rs` for which kernel uses which.
core::arch::global_asm!(
    ".shared .align 16 .b8 dinovmf_smem_small[1024];",
    ".shared .align 16 .b8 dinovmf_smem_gemm[8704];",
);

pub struct Smem(*mut f32);

impl Shared for Smem {
    #[inline(always)]
    fn ld(&self, i: usize) -> f32 {
        // SAFETY: indices are within the array the kernel declared (checked in the simulator).
        unsafe { *self.0.add(i) }
    }
    #[inline(always)]
    fn st(&self, i: usize, v: f32) {
        // SAFETY: as `ld`.
        unsafe { *self.0.add(i) = v }
    }
}

pub struct Gpu {
    dims: Dims,
    tid: u32,
    smem: Smem,
}

impl Gpu {
    #[inline(always)]
    pub fn new(kind: SmemKind) -> Gpu {
        // SAFETY: reading special registers; `cvta` of a declared shared symbol.
        unsafe {
            let p: u64 = match kind {
                SmemKind::None => 0,
                SmemKind::Small => {
                    let p: u64;
                    asm!("cvta.shared.u64 {p}, dinovmf_smem_small;", p = out(reg64) p,
                        options(pure, nomem, nostack));
                    p
                }
                SmemKind::Gemm => {
                    let p: u64;
                    asm!("cvta.shared.u64 {p}, dinovmf_smem_gemm;", p = out(reg64) p,
                        options(pure, nomem, nostack));
                    p
                }
            };
            Gpu {
                dims: Dims {
                    bid: [
                        nvptx::_block_idx_x() as u32,
                        nvptx::_block_idx_y() as u32,
                        nvptx::_block_idx_z() as u32,
                    ],
                    gdim: [
                        nvptx::_grid_dim_x() as u32,
                        nvptx::_grid_dim_y() as u32,
                        nvptx::_grid_dim_z() as u32,
                    ],
                    bdim: nvptx::_block_dim_x() as u32,
                },
                tid: nvptx::_thread_idx_x() as u32,
                smem: Smem(p as *mut f32),
            }
        }
    }
}

#[inline(always)]
fn shfl_bfly(v: f32, lane_mask: u32) -> f32 {
    let r: f32;
    // SAFETY: a warp-synchronous register exchange among all 32 lanes (every launch uses whole
    // warps and every lane reaches the reduction).
    unsafe {
        asm!("shfl.sync.bfly.b32 {r}, {v}, {m}, 31, -1;", r = out(reg32) r, v = in(reg32) v,
            m = in(reg32) lane_mask, options(nostack));
    }
    r
}

impl Block for Gpu {
    type Local<L: Copy> = L;
    type Smem = Smem;

    #[inline(always)]
    fn dims(&self) -> Dims {
        self.dims
    }
    #[inline(always)]
    fn local<L: Copy>(&mut self, init: L) -> L {
        init
    }
    #[inline(always)]
    fn each<L: Copy, F: FnMut(u32, &mut L, &Smem)>(&mut self, l: &mut L, mut f: F) {
        f(self.tid, l, &self.smem)
    }
    #[inline(always)]
    fn sync(&mut self) {
        // SAFETY: every thread of the block reaches each barrier (bodies keep control flow
        // outside `each` block-uniform).
        unsafe { nvptx::_syncthreads() }
    }
    #[inline(always)]
    fn warp_reduce<L: Copy, G: Fn(&mut L) -> &mut f32>(&mut self, l: &mut L, op: Op, field: G) {
        let mut v = *field(l);
        for m in BFLY {
            v = op.apply(v, shfl_bfly(v, m));
        }
        *field(l) = v;
    }
}

pub use crate::raw::{opt, opt_mut, sl, sl_mut, us};

/// Any panic (a failed bounds check) traps: the launch fails with an error the host sees.
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: `trap` aborts the kernel.
    unsafe { nvptx::trap() }
}
