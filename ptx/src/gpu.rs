//! The device side of [`Block`]: one thread, registers for locals, `bar.sync` for barriers.
use crate::block::{Block, CpAsync, Dims, MmaIn, Op, Shared, Shfl, BFLY};
use crate::manifest::SmemKind;
use core::arch::asm;
use core::arch::nvptx;

// Static shared arrays. A kernel's shared size is that of the one array it references (ptxas
// reports it); see `manifest.rs` for which kernel uses which. `dinovmf_smem_dyn` is the
// dynamic shared memory, sized by the launch.
core::arch::global_asm!(
    ".shared .align 16 .b8 dinovmf_smem_small[1024];",
    ".shared .align 16 .b8 dinovmf_smem_gemm[8704];",
    ".shared .align 16 .b8 dinovmf_smem_tc[20480];",
    ".shared .align 16 .b8 dinovmf_smem_att[27648];",
    ".extern .shared .align 16 .b8 dinovmf_smem_dyn[];",
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
    #[inline(always)]
    fn ld_bits(&self, i: usize) -> u32 {
        // SAFETY: as `ld`.
        unsafe { *(self.0 as *const u32).add(i) }
    }
    #[inline(always)]
    fn st_bits(&self, i: usize, v: u32) {
        // SAFETY: as `ld`.
        unsafe { *(self.0 as *mut u32).add(i) = v }
    }
    #[inline(always)]
    fn cp_async<T: Copy>(&self, dst: usize, src: &[T], op: CpAsync) {
        let d = shared_addr(self.0.wrapping_add(dst) as u64);
        let s = src.as_ptr() as u64;
        // SAFETY: the destination lies in the kernel's shared array and the source in a
        // global buffer of at least `op.bytes()` bytes, both aligned (checked in the simulator).
        unsafe {
            match op {
                CpAsync::Ca4 => {
                    asm!("cvta.to.global.u64 {s}, {s};", "cp.async.ca.shared.global [{d}], [{s}], 4;",
                    d = in(reg64) d, s = inout(reg64) s => _, options(nostack))
                }
                CpAsync::Ca8 => {
                    asm!("cvta.to.global.u64 {s}, {s};", "cp.async.ca.shared.global [{d}], [{s}], 8;",
                    d = in(reg64) d, s = inout(reg64) s => _, options(nostack))
                }
                CpAsync::Ca16 => {
                    asm!("cvta.to.global.u64 {s}, {s};", "cp.async.ca.shared.global [{d}], [{s}], 16;",
                    d = in(reg64) d, s = inout(reg64) s => _, options(nostack))
                }
                CpAsync::Cg16 => {
                    asm!("cvta.to.global.u64 {s}, {s};", "cp.async.cg.shared.global [{d}], [{s}], 16;",
                    d = in(reg64) d, s = inout(reg64) s => _, options(nostack))
                }
            }
        }
    }
    #[inline(always)]
    fn cp_async_commit(&self) {
        // SAFETY: no operands.
        unsafe { asm!("cp.async.commit_group;", options(nostack)) }
    }
    #[inline(always)]
    fn cp_async_wait<const N: u32>(&self) {
        // SAFETY: no operands; orders this thread's earlier copies before its later accesses.
        unsafe { asm!("cp.async.wait_group {n};", n = const N, options(nostack)) }
    }
}

/// A generic address inside shared memory as a `.shared` window address.
#[inline(always)]
fn shared_addr(generic: u64) -> u64 {
    let s: u64;
    // SAFETY: a pure address conversion.
    unsafe {
        asm!("cvta.to.shared.u64 {s}, {g};", s = out(reg64) s, g = in(reg64) generic,
            options(pure, nomem, nostack));
    }
    s
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
                SmemKind::Tc => {
                    let p: u64;
                    asm!("cvta.shared.u64 {p}, dinovmf_smem_tc;", p = out(reg64) p,
                        options(pure, nomem, nostack));
                    p
                }
                SmemKind::Att => {
                    let p: u64;
                    asm!("cvta.shared.u64 {p}, dinovmf_smem_att;", p = out(reg64) p,
                        options(pure, nomem, nostack));
                    p
                }
                SmemKind::AttBwd => {
                    let p: u64;
                    asm!("cvta.shared.u64 {p}, dinovmf_smem_dyn;", p = out(reg64) p,
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
    #[inline(always)]
    fn shfl<L: Copy, V: Fn(&L) -> u32, A: Fn(u32, &L) -> u32, O: Fn(&mut L, u32)>(
        &mut self,
        l: &mut L,
        mode: Shfl,
        val: V,
        arg: A,
        out: O,
    ) {
        let (v, a) = (val(l), arg(self.tid, l));
        let r: u32;
        // SAFETY: warp-synchronous register exchange among all 32 lanes (whole warps, every
        // lane reaches it: the call is block-uniform).
        unsafe {
            match mode {
                Shfl::Idx => asm!("shfl.sync.idx.b32 {r}, {v}, {a}, 31, -1;", r = out(reg32) r,
                    v = in(reg32) v, a = in(reg32) a, options(nostack)),
                Shfl::Up => asm!("shfl.sync.up.b32 {r}, {v}, {a}, 0, -1;", r = out(reg32) r,
                    v = in(reg32) v, a = in(reg32) a, options(nostack)),
                Shfl::Down => asm!("shfl.sync.down.b32 {r}, {v}, {a}, 31, -1;", r = out(reg32) r,
                    v = in(reg32) v, a = in(reg32) a, options(nostack)),
                Shfl::Xor => asm!("shfl.sync.bfly.b32 {r}, {v}, {a}, 31, -1;", r = out(reg32) r,
                    v = in(reg32) v, a = in(reg32) a, options(nostack)),
            }
        }
        out(l, r);
    }
    #[inline(always)]
    fn mma_m16n8k16<L: Copy, FA: Fn(&L) -> [u32; 4], FB: Fn(&L) -> [u32; 2]>(
        &mut self,
        l: &mut L,
        ty: MmaIn,
        a: FA,
        b: FB,
        acc: impl Fn(&mut L) -> &mut [f32; 4],
    ) {
        let (a, b) = (a(l), b(l));
        let c = acc(l);
        // SAFETY: a warp-synchronous register operation (block-uniform call, whole warps).
        unsafe {
            match ty {
                MmaIn::Bf16 => asm!(
                    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{d0}, {d1}, {d2}, {d3}}}, {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, {{{d0}, {d1}, {d2}, {d3}}};",
                    d0 = inout(reg32) c[0], d1 = inout(reg32) c[1], d2 = inout(reg32) c[2], d3 = inout(reg32) c[3],
                    a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
                    b0 = in(reg32) b[0], b1 = in(reg32) b[1], options(pure, nomem, nostack)),
                MmaIn::F16 => asm!(
                    "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{{d0}, {d1}, {d2}, {d3}}}, {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, {{{d0}, {d1}, {d2}, {d3}}};",
                    d0 = inout(reg32) c[0], d1 = inout(reg32) c[1], d2 = inout(reg32) c[2], d3 = inout(reg32) c[3],
                    a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
                    b0 = in(reg32) b[0], b1 = in(reg32) b[1], options(pure, nomem, nostack)),
            }
        }
    }
    #[inline(always)]
    fn ldmatrix<L: Copy, const N: usize, A: Fn(u32, &L) -> usize>(
        &mut self,
        l: &mut L,
        trans: bool,
        row_addr: A,
        out: impl Fn(&mut L) -> &mut [u32; N],
    ) {
        let p = shared_addr(self.smem.0.wrapping_add(row_addr(self.tid, l)) as u64);
        let o = out(l);
        // SAFETY: every lane's row address lies in the kernel's shared array, 16-byte aligned
        // (checked in the simulator); warp-synchronous, block-uniform call.
        unsafe {
            match (N, trans) {
                (1, false) => asm!("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {{{r0}}}, [{p}];",
                    r0 = out(reg32) o[0], p = in(reg64) p, options(nostack)),
                (1, true) => {
                    asm!("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {{{r0}}}, [{p}];",
                    r0 = out(reg32) o[0], p = in(reg64) p, options(nostack))
                }
                (2, false) => {
                    asm!("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {{{r0}, {r1}}}, [{p}];",
                    r0 = out(reg32) o[0], r1 = out(reg32) o[1], p = in(reg64) p, options(nostack))
                }
                (2, true) => {
                    asm!("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {{{r0}, {r1}}}, [{p}];",
                    r0 = out(reg32) o[0], r1 = out(reg32) o[1], p = in(reg64) p, options(nostack))
                }
                (4, false) => {
                    asm!("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{r0}, {r1}, {r2}, {r3}}}, [{p}];",
                    r0 = out(reg32) o[0], r1 = out(reg32) o[1], r2 = out(reg32) o[2], r3 = out(reg32) o[3],
                    p = in(reg64) p, options(nostack))
                }
                _ => {
                    asm!("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{r0}, {r1}, {r2}, {r3}}}, [{p}];",
                    r0 = out(reg32) o[0], r1 = out(reg32) o[1], r2 = out(reg32) o[2], r3 = out(reg32) o[3],
                    p = in(reg64) p, options(nostack))
                }
            }
        }
    }
}

pub use crate::raw::{opt, opt_mut, sl, sl_mut, us};

/// Any panic (a failed bounds check) traps: the launch fails with an error the host sees.
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: `trap` aborts the kernel.
    unsafe { nvptx::trap() }
}
