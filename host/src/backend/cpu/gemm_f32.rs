//! Our f32 GEMM driver around the `gemm-f32` crate's public microkernels (issue 16: a warm
//! training step allocates nothing).
//!
//! The `gemm` crate (0.19) allocates its packing buffers on every call and offers no entry
//! point that takes the caller's memory. This driver does the blocking, the packing, the
//! threading and the memory itself and calls the same microkernels (`gemm_f32::microkernel`:
//! AVX-512, AVX2 + FMA or scalar, picked by [`super::fastmath::simd_level`]), with the same
//! depth blocking (`kc`, from `gemm_common::cache::kernel_params`) and the same alpha/beta
//! handling. Each element of C is then the same chain of FMAs in the same order as in the crate,
//! so at the crate's own ISA the result is bit-identical to it on its blocked and horizontal
//! paths (the tests check this); the crate's special paths for `k <= 2` and matrix-vector
//! products round differently (our blocked path handles those too, within the tests' f64
//! bound).
//!
//! In the microkernels' terms (column-major, like the crate after it transposes a row-major
//! destination): `dst[m x n] = alpha dst + beta lhs[m x k] rhs[k x n]`; the kernel computes an
//! `MR x NR` tile from `lhs` packed in panels of `MR` rows (`k` steps of `MR` contiguous values)
//! and `rhs` either packed in panels of `NR` columns or read in place. Here `lhs` is packed
//! once per call (in phases of at most 1 MiB: runs of depth blocks, or groups of row panels),
//! in parallel when large, and shared by the tasks; the tasks split the columns of `dst` (for
//! the row-major products of the ViT: its rows, the tokens) and pack their own `rhs` panels,
//! once per depth block, on their stack. The packed `lhs` lives on the stack for small
//! single-threaded products (the attention's), in one process-wide buffer for multi-threaded
//! ones and in the calling thread's buffer otherwise, each allocated once at its full size and
//! reused, so a warm call allocates nothing (the parallel loops run on rayon's pool from inside
//! it). `lhs` is read in place, like the crate does, when its columns are contiguous and whole
//! registers tall.
//! Tasks never share an element of `dst` and each sums over `k` in a fixed order, so the bits
//! do not depend on the thread count.

use super::fastmath::SimdLevel;
#[cfg(target_arch = "x86_64")]
use gemm_common::microkernel::{HMicroKernelFn, MicroKernelFn};
#[cfg(target_arch = "x86_64")]
use std::cell::RefCell;

/// A product this size (`m n k`) or larger is split over rayon's threads (the `gemm` crate's
/// default threading threshold).
pub const PARALLEL_WORK: usize = 48 * 48 * 256;

/// A strided matrix: element `(i, j)` at `ptr + i rs + j cs` (in elements).
#[derive(Clone, Copy, Debug)]
pub struct Mat<P> {
    pub ptr: P,
    pub rs: usize,
    pub cs: usize,
}

/// `c = (accumulate ? c : 0) + scale a b`, `c` `m x n`, `a` `m x k`, `b` `k x n`, every operand
/// a strided view; with `accumulate = false` the old `c` is never read (NaN included). Split
/// over rayon's threads when `parallel` and the product is large. `level` picks the
/// microkernels (callers pass [`super::fastmath::simd_level`]; a level the CPU lacks must not be
/// passed).
///
/// # Safety
/// Every element the views reach must be in bounds of its allocation; `c` must not overlap `a`
/// or `b`, and its view must not map two `(i, j)` to one element.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    level: SimdLevel,
    m: usize,
    n: usize,
    k: usize,
    c: Mat<*mut f32>,
    accumulate: bool,
    a: Mat<*const f32>,
    b: Mat<*const f32>,
    scale: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *c.ptr.add(i * c.rs + j * c.cs) = 0.0;
                }
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // The microkernels store whole columns fastest: transpose the problem when the rows of
        // `c` are the contiguous direction, as the crate does (same test, same tie-break).
        let p = if c.cs < c.rs {
            Problem {
                m: n,
                n: m,
                k,
                dst: c.ptr,
                drs: c.cs,
                dcs: c.rs,
                lhs: b.ptr,
                lrs: b.cs,
                lcs: b.rs,
                rhs: a.ptr,
                rrs: a.cs,
                rcs: a.rs,
                accumulate,
                beta: scale,
            }
        } else {
            Problem {
                m,
                n,
                k,
                dst: c.ptr,
                drs: c.rs,
                dcs: c.cs,
                lhs: a.ptr,
                lrs: a.rs,
                lcs: a.cs,
                rhs: b.ptr,
                rrs: b.rs,
                rcs: b.cs,
                accumulate,
                beta: scale,
            }
        };
        let kern = Kernels::of(level);
        if kern.h_m > 0 && p.lcs == 1 && p.rrs == 1 && p.m * p.n <= 16 * 16 {
            horizontal(&kern, &p);
        } else {
            blocked(&kern, &p, parallel);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // No microkernels of ours here: the crate (which allocates) does the product.
        let _ = level;
        gemm_crate(m, n, k, c, accumulate, a, b, scale, parallel);
    }
}

/// [`gemm`] through the `gemm` crate itself, which allocates its packing buffers on every
/// call: the product on targets without our microkernels, and the reference the tests and
/// `benches/gemm.rs` compare our driver with (bit-identical at the crate's ISA, see the module
/// doc). Multi-threaded when `parallel` and the product is [`PARALLEL_WORK`] or larger.
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_crate(
    m: usize,
    n: usize,
    k: usize,
    c: Mat<*mut f32>,
    accumulate: bool,
    a: Mat<*const f32>,
    b: Mat<*const f32>,
    scale: f32,
    parallel: bool,
) {
    let par = if parallel && m * n * k >= PARALLEL_WORK {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        c.ptr,
        c.cs as isize,
        c.rs as isize,
        accumulate,
        a.ptr,
        a.cs as isize,
        a.rs as isize,
        b.ptr,
        b.cs as isize,
        b.rs as isize,
        1.0,
        scale,
        false,
        false,
        false,
        par,
    );
}

/// One ISA's microkernels, as the `gemm-f32` crate publishes them.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Kernels {
    /// f32 lanes of one register.
    lanes: usize,
    /// The tile: `mr` rows (a multiple of `lanes`) by `nr` columns.
    mr: usize,
    nr: usize,
    /// `ukr[(ceil(rows / lanes) - 1) nr + cols - 1]` computes a `rows x cols` tile.
    ukr: &'static [MicroKernelFn<f32>],
    /// The horizontal (dot-product) kernels for tiny products of row-major `lhs` and
    /// column-major `rhs`, up to `h_m x h_n` (none for scalar).
    h_m: usize,
    h_n: usize,
    hukr: &'static [HMicroKernelFn<f32>],
}

#[cfg(target_arch = "x86_64")]
mod tables {
    use gemm_common::microkernel::{HMicroKernelFn, MicroKernelFn};
    use gemm_f32::microkernel::{avx512f::f32 as v4, fma::f32 as v3, scalar::f32 as v1};
    pub static V1: [[MicroKernelFn<f32>; v1::NR]; v1::MR_DIV_N] = v1::UKR;
    pub static V3: [[MicroKernelFn<f32>; v3::NR]; v3::MR_DIV_N] = v3::UKR;
    pub static V4: [[MicroKernelFn<f32>; v4::NR]; v4::MR_DIV_N] = v4::UKR;
    pub static V3H: [[HMicroKernelFn<f32>; v3::H_N]; v3::H_M] = v3::H_UKR;
    pub static V4H: [[HMicroKernelFn<f32>; v4::H_N]; v4::H_M] = v4::H_UKR;
    pub const V1_SHAPE: (usize, usize) = (v1::MR_DIV_N, v1::NR);
    pub const V3_SHAPE: (usize, usize, usize, usize) = (v3::MR_DIV_N, v3::NR, v3::H_M, v3::H_N);
    pub const V4_SHAPE: (usize, usize, usize, usize) = (v4::MR_DIV_N, v4::NR, v4::H_M, v4::H_N);
}

#[cfg(target_arch = "x86_64")]
impl Kernels {
    fn of(level: SimdLevel) -> Self {
        use tables::*;
        match level {
            SimdLevel::Avx512 => Self {
                lanes: 16,
                mr: V4_SHAPE.0 * 16,
                nr: V4_SHAPE.1,
                ukr: V4.as_flattened(),
                h_m: V4_SHAPE.2,
                h_n: V4_SHAPE.3,
                hukr: V4H.as_flattened(),
            },
            SimdLevel::Avx2 => Self {
                lanes: 8,
                mr: V3_SHAPE.0 * 8,
                nr: V3_SHAPE.1,
                ukr: V3.as_flattened(),
                h_m: V3_SHAPE.2,
                h_n: V3_SHAPE.3,
                hukr: V3H.as_flattened(),
            },
            SimdLevel::Baseline => Self {
                lanes: 1,
                mr: V1_SHAPE.0,
                nr: V1_SHAPE.1,
                ukr: V1.as_flattened(),
                h_m: 0,
                h_n: 0,
                hukr: &[],
            },
        }
    }
}

/// A product in the microkernels' terms (see the module doc): `dst(i, j)` at
/// `dst + i drs + j dcs`, `lhs(i, p)` at `lhs + i lrs + p lcs`, `rhs(p, j)` at
/// `rhs + p rrs + j rcs`.
#[cfg(target_arch = "x86_64")]
struct Problem {
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    drs: usize,
    dcs: usize,
    lhs: *const f32,
    lrs: usize,
    lcs: usize,
    rhs: *const f32,
    rrs: usize,
    rcs: usize,
    accumulate: bool,
    beta: f32,
}
// SAFETY: the tasks that share a `Problem` read its operands and write disjoint parts of `dst`.
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for Problem {}

/// `alpha_status` of the microkernels: 0 writes `beta acc` (never reading `dst`), 1 writes
/// `dst + beta acc` (one FMA). The first depth block overwrites unless accumulating.
#[cfg(target_arch = "x86_64")]
fn alpha_status(p: &Problem, depth: usize) -> (f32, u8) {
    if depth == 0 && !p.accumulate {
        (0.0, 0)
    } else {
        (1.0, 1)
    }
}

/// Tiny products of row-major `lhs` and column-major `rhs` (`m n <= 256`): dot products in
/// depth blocks of 1024, through the crate's horizontal kernels, as the crate does.
#[cfg(target_arch = "x86_64")]
unsafe fn horizontal(kern: &Kernels, p: &Problem) {
    const KC: usize = 1024;
    let mut depth = 0;
    while depth < p.k {
        let kb = KC.min(p.k - depth);
        let (alpha, status) = alpha_status(p, depth);
        let mut col = 0;
        while col < p.n {
            let nb = kern.h_n.min(p.n - col);
            let mut row = 0;
            while row < p.m {
                let mb = kern.h_m.min(p.m - row);
                (kern.hukr[(mb - 1) * kern.h_n + nb - 1])(
                    kb,
                    p.dst.add(row * p.drs + col * p.dcs),
                    p.lhs.add(row * p.lrs + depth),
                    p.rhs.add(col * p.rcs + depth),
                    p.dcs as isize,
                    p.drs as isize,
                    p.lrs as isize,
                    p.rcs as isize,
                    alpha,
                    p.beta,
                    status,
                    false,
                    false,
                    false,
                );
                row += mb;
            }
            col += nb;
        }
        depth += kb;
    }
}

/// A pointer the parallel tasks share (each writes only what it owns).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Shared<T>(T);
// SAFETY: the tasks write disjoint elements through it and read what no task writes.
#[cfg(target_arch = "x86_64")]
unsafe impl<T> Send for Shared<T> {}
#[cfg(target_arch = "x86_64")]
unsafe impl<T> Sync for Shared<T> {}
#[cfg(target_arch = "x86_64")]
impl<T: Copy> Shared<T> {
    /// The pointer (a method, so that closures capture the whole `Shared`, not its field).
    fn get(&self) -> T {
        self.0
    }
}

/// Floats of packed `lhs` in the calling thread's buffer, allocated whole on the thread's first
/// large product (1 MiB): each phase of a product is sized to fit, so the buffer never grows
/// again.
#[cfg(target_arch = "x86_64")]
const LHS_CAP: usize = 1 << 18;
/// Floats of packed `lhs` that a single-threaded product keeps on the stack instead (64 KiB:
/// the attention's per-image products, called from inside a parallel loop on whichever thread,
/// never touch a thread-local buffer, so no thread first needs one in a warm step).
#[cfg(target_arch = "x86_64")]
const LHS_STACK: usize = 1 << 14;
/// A smaller stack buffer for the smallest products (fewer stack pages to probe per call).
#[cfg(target_arch = "x86_64")]
const LHS_STACK_SMALL: usize = 1 << 11;
/// Floats of packed `rhs` panels, on each task's stack (64 KiB; one depth block of `nc`
/// columns, the panel in use staying in L1 while the `lhs` block streams from L2).
#[cfg(target_arch = "x86_64")]
const RHS_STACK: usize = 1 << 14;

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The calling thread's packed `lhs` (one phase: some depth blocks of some row panels),
    /// shared with the tasks.
    static PACKED_LHS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `f` on `N` uninitialised floats on the stack (64-byte aligned). Not inlined, so that only
/// a call that takes this path has the array in its frame (and probes its stack pages).
#[cfg(target_arch = "x86_64")]
#[inline(never)]
fn with_stack<const N: usize, R>(f: impl FnOnce(*mut f32) -> R) -> R {
    #[repr(C, align(64))]
    struct Block<const N: usize>([std::mem::MaybeUninit<f32>; N]);
    let mut b = Block::<N>([std::mem::MaybeUninit::uninit(); N]);
    f(b.0.as_mut_ptr().cast())
}

/// The packed `lhs` of the multi-threaded products: one buffer for the process, not the
/// calling thread's, since which pool thread calls them can change from step to step (a step
/// called from outside the pool runs on any of its threads); they run one at a time in a step.
#[cfg(target_arch = "x86_64")]
static SHARED_LHS: std::sync::Mutex<Vec<f32>> = std::sync::Mutex::new(Vec::new());

/// The first `len` elements of `v`, 64-byte aligned, allocating once room for `cap` (or `len`
/// if larger).
#[cfg(target_arch = "x86_64")]
fn aligned(v: &mut Vec<f32>, len: usize, cap: usize) -> &mut [f32] {
    if v.len() < len + 16 {
        crate::backend::grown(v, len.max(cap) + 16);
    }
    let skip = v.as_ptr().align_offset(64).min(16);
    &mut v[skip..skip + len]
}

/// `f` on `len` floats of packed-`lhs` memory: [`SHARED_LHS`] for a multi-threaded product
/// (unless another holds it), else this thread's [`PACKED_LHS`]; allocated once with room for
/// [`LHS_CAP`] and kept. On a fresh buffer if both are in use (a rayon thread waiting inside
/// one product that picked up a task which starts another: not something the step does, but
/// safe).
#[cfg(target_arch = "x86_64")]
fn with_lhs_buffer<R>(par: bool, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    if par {
        if let Ok(mut v) = SHARED_LHS.try_lock() {
            return f(aligned(&mut v, len, LHS_CAP));
        }
    }
    PACKED_LHS.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => f(aligned(&mut s, len, LHS_CAP)),
        Err(_) => f(aligned(&mut Vec::new(), len, 0)),
    })
}

/// The blocked product (the module doc has the plan), in phases that each pack at most
/// [`LHS_CAP`] floats of `lhs`: a run of whole depth blocks of every row panel, or, when one
/// depth block of them is larger, groups of its row panels. The depth blocks still reach each
/// element of `dst` in order.
#[cfg(target_arch = "x86_64")]
unsafe fn blocked(kern: &Kernels, p: &Problem, parallel: bool) {
    let (mr, nr) = (kern.mr, kern.nr);
    // The crate's depth blocking, so that every element sums the same blocks.
    let kc = if p.m <= 64 && p.n <= 64 {
        p.k.min(512)
    } else {
        gemm_common::cache::kernel_params(p.m, p.n, p.k, mr, nr, 4).kc
    };
    let m_panels = p.m.div_ceil(mr);
    let n_panels = p.n.div_ceil(nr);
    let threads = rayon::current_num_threads();
    let par = parallel && threads > 1 && p.m * p.n * p.k >= PARALLEL_WORK;
    // `rhs` in place when it is contiguous down the depth or read by few row panels, as the
    // crate decides (the kernel broadcasts its elements one by one either way).
    // (And in place when one depth block of a panel would not fit the task's stack buffer.)
    let pack_rhs = if p.rrs == 1 {
        p.m > 128 * mr
    } else {
        p.m > 2 * mr
    } && nr * kc <= RHS_STACK;
    let l2 = gemm_common::cache::CACHE_INFO[1]
        .cache_bytes
        .max(256 * 1024);
    let geo = Geometry {
        mr,
        nr,
        kc,
        // A block of packed lhs (mc x kc) in half the L2, packed rhs (kc x nc) in RHS_STACK.
        mc_panels: (l2 / 2 / (mr * kc * 4)).max(1),
        nc_panels: (RHS_STACK / (nr * kc)).max(1),
        pack_rhs,
        // `lhs` in place when its columns are contiguous, whole registers tall and read by
        // few column panels, as the crate decides for one thread.
        lhs_in_place: p.lrs == 1 && p.m.is_multiple_of(kern.lanes) && p.n <= 8 * nr,
    };
    let tasks = if par { (2 * threads).min(n_panels) } else { 1 };
    let full = m_panels * mr;
    // (Then one phase, all of lhs, packed on the stack.)
    let on_stack = !par && full * p.k <= LHS_STACK;
    let mut d0 = 0;
    while d0 < p.k {
        let mut d1 = d0 + kc.min(p.k - d0);
        while d1 < p.k && full * (d1 + kc.min(p.k - d1) - d0) <= LHS_CAP {
            d1 += kc.min(p.k - d1);
        }
        let group = if full * (d1 - d0) <= LHS_CAP {
            m_panels
        } else {
            (LHS_CAP / (mr * (d1 - d0))).max(1)
        };
        let mut i0 = 0;
        while i0 < m_panels {
            let ph = Phase {
                depth: d0..d1,
                panels: i0..(i0 + group).min(m_panels),
            };
            let lhs_len = ph.panels.len() * mr * ph.depth.len();
            let phase = |packed: *mut f32| {
                if !geo.lhs_in_place {
                    // SAFETY: `packed` has room for `lhs_len`; the caller's bounds.
                    unsafe { pack_lhs_phase(kern, p, &geo, &ph, packed, lhs_len, par) };
                }
                let packed = Shared(packed as *const f32);
                let task = |t: usize| {
                    let cols = t * n_panels / tasks..(t + 1) * n_panels / tasks;
                    // SAFETY: the caller's bounds; `cols` are this task's alone.
                    if geo.pack_rhs {
                        with_stack::<RHS_STACK, _>(|rhs_buf| unsafe {
                            columns(kern, p, &geo, &ph, packed.get(), rhs_buf, cols)
                        })
                    } else {
                        unsafe {
                            columns(kern, p, &geo, &ph, packed.get(), std::ptr::null_mut(), cols)
                        }
                    }
                };
                if tasks > 1 {
                    use rayon::prelude::*;
                    (0..tasks).into_par_iter().for_each(task);
                } else {
                    task(0);
                }
            };
            if geo.lhs_in_place {
                phase(std::ptr::null_mut());
            } else if on_stack && lhs_len <= LHS_STACK_SMALL {
                with_stack::<LHS_STACK_SMALL, _>(phase);
            } else if on_stack {
                with_stack::<LHS_STACK, _>(phase);
            } else {
                with_lhs_buffer(par, lhs_len, |b| phase(b.as_mut_ptr()));
            }
            i0 += group;
        }
        d0 = d1;
    }
}

/// The blocking of one call.
#[cfg(target_arch = "x86_64")]
struct Geometry {
    mr: usize,
    nr: usize,
    kc: usize,
    mc_panels: usize,
    nc_panels: usize,
    pack_rhs: bool,
    lhs_in_place: bool,
}

/// One phase of [`blocked`]: the depth `depth` (whole blocks of `kc`, starting at a multiple of
/// it) of the row panels `panels`.
#[cfg(target_arch = "x86_64")]
struct Phase {
    depth: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
}

#[cfg(target_arch = "x86_64")]
impl Phase {
    /// Where the packed depth block starting at `d` begins, and where its panel `i` does
    /// after that: blocks one after the other, each the phase's panels of `kb` steps of `mr`.
    fn offset(&self, mr: usize, d: usize, kb: usize, i: usize) -> usize {
        self.panels.len() * mr * (d - self.depth.start) + (i - self.panels.start) * mr * kb
    }
}

/// Packs the phase's part of `lhs` into `packed` (layout: [`Phase::offset`]; zeros past `m`),
/// split over rayon when large.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_lhs_phase(
    kern: &Kernels,
    p: &Problem,
    geo: &Geometry,
    ph: &Phase,
    packed: *mut f32,
    len: usize,
    par: bool,
) {
    let np = ph.panels.len();
    let jobs = ph.depth.len().div_ceil(geo.kc) * np;
    let out = Shared(packed);
    let job = |j: usize| {
        let d = ph.depth.start + j / np * geo.kc;
        let i = ph.panels.start + j % np;
        let kb = geo.kc.min(p.k - d);
        let rows = geo.mr.min(p.m - i * geo.mr);
        // SAFETY: job `j` writes its own panel, inside `packed`.
        unsafe {
            let dst = out.get().add(ph.offset(geo.mr, d, kb, i));
            let src = p.lhs.add(i * geo.mr * p.lrs + d * p.lcs);
            pack_lhs_panel(kern, rows, kb, src, p.lrs, p.lcs, dst);
        }
    };
    if par && len >= 1 << 16 && jobs > 1 {
        use rayon::prelude::*;
        let chunk = jobs.div_ceil(2 * rayon::current_num_threads());
        (0..jobs.div_ceil(chunk)).into_par_iter().for_each(|c| {
            for j in c * chunk..((c + 1) * chunk).min(jobs) {
                job(j)
            }
        });
    } else {
        (0..jobs).for_each(job);
    }
}

/// One task: the column panels `cols` of `dst` for the phase's row panels, its depth blocks in
/// order.
#[cfg(target_arch = "x86_64")]
unsafe fn columns(
    kern: &Kernels,
    p: &Problem,
    geo: &Geometry,
    ph: &Phase,
    packed_lhs: *const f32,
    rhs_buf: *mut f32,
    cols: std::ops::Range<usize>,
) {
    let (mr, nr) = (geo.mr, geo.nr);
    let mut d = ph.depth.start;
    while d < ph.depth.end {
        let kb = geo.kc.min(p.k - d);
        let (alpha, status) = alpha_status(p, d);
        let mut jc = cols.start;
        while jc < cols.end {
            let jc_end = if geo.pack_rhs {
                (jc + geo.nc_panels).min(cols.end)
            } else {
                cols.end
            };
            if geo.pack_rhs {
                for jp in jc..jc_end {
                    let j0 = jp * nr;
                    pack_rhs_panel(
                        nr,
                        nr.min(p.n - j0),
                        kb,
                        p.rhs.add(d * p.rrs + j0 * p.rcs),
                        p.rrs,
                        p.rcs,
                        rhs_buf.add((jp - jc) * nr * kb),
                    );
                }
            }
            let mut ib = ph.panels.start;
            while ib < ph.panels.end {
                let ib_end = (ib + geo.mc_panels).min(ph.panels.end);
                for jp in jc..jc_end {
                    let j0 = jp * nr;
                    let cols_here = nr.min(p.n - j0);
                    let (rhs, rrs, rcs) = if geo.pack_rhs {
                        (rhs_buf.add((jp - jc) * nr * kb) as *const f32, nr, 1)
                    } else {
                        (p.rhs.add(d * p.rrs + j0 * p.rcs), p.rrs, p.rcs)
                    };
                    for ip in ib..ib_end {
                        let i0 = ip * mr;
                        let rows = mr.min(p.m - i0);
                        let (lhs, lcs) = if geo.lhs_in_place {
                            (p.lhs.add(i0 + d * p.lcs), p.lcs)
                        } else {
                            (packed_lhs.add(ph.offset(mr, d, kb, ip)), mr)
                        };
                        let f = kern.ukr[(rows.div_ceil(kern.lanes) - 1) * nr + cols_here - 1];
                        f(
                            rows,
                            cols_here,
                            kb,
                            p.dst.add(i0 * p.drs + j0 * p.dcs),
                            lhs,
                            rhs,
                            p.dcs as isize,
                            p.drs as isize,
                            lcs as isize,
                            rrs as isize,
                            rcs as isize,
                            alpha,
                            p.beta,
                            status,
                            false,
                            false,
                            false,
                            std::ptr::null(),
                        );
                    }
                }
                ib = ib_end;
            }
            jc = jc_end;
        }
        d += kb;
    }
}

/// One row panel of `lhs` (`rows <= mr` rows from `src`, `kb` steps) as `kb` runs of `mr`
/// values at `dst` (zeros past `rows`).
#[cfg(target_arch = "x86_64")]
unsafe fn pack_lhs_panel(
    kern: &Kernels,
    rows: usize,
    kb: usize,
    src: *const f32,
    rs: usize,
    cs: usize,
    dst: *mut f32,
) {
    match kern.mr {
        64 => pack_lhs_mr::<64>(rows, kb, src, rs, cs, dst),
        16 => pack_lhs_mr::<16>(rows, kb, src, rs, cs, dst),
        2 => pack_lhs_mr::<2>(rows, kb, src, rs, cs, dst),
        _ => unreachable!("gemm_f32: no microkernel with mr = {}", kern.mr),
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pack_lhs_mr<const MR: usize>(
    rows: usize,
    kb: usize,
    src: *const f32,
    rs: usize,
    cs: usize,
    dst: *mut f32,
) {
    if rows == MR && rs == 1 {
        // Each step's column is contiguous: one fixed-size copy per step.
        for q in 0..kb {
            std::ptr::copy_nonoverlapping(src.add(q * cs), dst.add(q * MR), MR);
        }
        return;
    }
    if rows == MR && cs == 1 && MR.is_multiple_of(8) && std::is_x86_feature_detected!("avx") {
        // Each row is contiguous along the depth: 8 x 8 transposes.
        let k8 = kb / 8 * 8;
        for q0 in (0..k8).step_by(8) {
            for r0 in (0..MR).step_by(8) {
                transpose8x8(src.add(r0 * rs + q0), rs, dst.add(q0 * MR + r0), MR);
            }
        }
        for q in k8..kb {
            for r in 0..MR {
                dst.add(q * MR + r).write(*src.add(r * rs + q));
            }
        }
        return;
    }
    for q in 0..kb {
        let d = dst.add(q * MR);
        for r in 0..rows {
            d.add(r).write(*src.add(r * rs + q * cs));
        }
        for r in rows..MR {
            d.add(r).write(0.0);
        }
    }
}

/// `dst[c][r] = src[r][c]` for an 8 x 8 block (row strides in elements).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose8x8(src: *const f32, srs: usize, dst: *mut f32, drs: usize) {
    use std::arch::x86_64::*;
    let r = |i: usize| _mm256_loadu_ps(src.add(i * srs));
    let (r0, r1, r2, r3, r4, r5, r6, r7) = (r(0), r(1), r(2), r(3), r(4), r(5), r(6), r(7));
    let t0 = _mm256_unpacklo_ps(r0, r1);
    let t1 = _mm256_unpackhi_ps(r0, r1);
    let t2 = _mm256_unpacklo_ps(r2, r3);
    let t3 = _mm256_unpackhi_ps(r2, r3);
    let t4 = _mm256_unpacklo_ps(r4, r5);
    let t5 = _mm256_unpackhi_ps(r4, r5);
    let t6 = _mm256_unpacklo_ps(r6, r7);
    let t7 = _mm256_unpackhi_ps(r6, r7);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    let w = |i: usize, v: __m256| _mm256_storeu_ps(dst.add(i * drs), v);
    w(0, _mm256_permute2f128_ps::<0x20>(u0, u4));
    w(1, _mm256_permute2f128_ps::<0x20>(u1, u5));
    w(2, _mm256_permute2f128_ps::<0x20>(u2, u6));
    w(3, _mm256_permute2f128_ps::<0x20>(u3, u7));
    w(4, _mm256_permute2f128_ps::<0x31>(u0, u4));
    w(5, _mm256_permute2f128_ps::<0x31>(u1, u5));
    w(6, _mm256_permute2f128_ps::<0x31>(u2, u6));
    w(7, _mm256_permute2f128_ps::<0x31>(u3, u7));
}

/// One column panel of `rhs` (`cols <= nr` columns from `src`, `kb` steps) as `kb` runs of
/// `nr` values (zeros past `cols`).
#[cfg(target_arch = "x86_64")]
unsafe fn pack_rhs_panel(
    nr: usize,
    cols: usize,
    kb: usize,
    src: *const f32,
    rs: usize,
    cs: usize,
    dst: *mut f32,
) {
    match nr {
        6 => pack_rhs_nr::<6>(cols, kb, src, rs, cs, dst),
        4 => pack_rhs_nr::<4>(cols, kb, src, rs, cs, dst),
        _ => unreachable!("gemm_f32: no microkernel with nr = {nr}"),
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pack_rhs_nr<const NR: usize>(
    cols: usize,
    kb: usize,
    src: *const f32,
    rs: usize,
    cs: usize,
    dst: *mut f32,
) {
    if cols == NR && cs == 1 {
        for q in 0..kb {
            std::ptr::copy_nonoverlapping(src.add(q * rs), dst.add(q * NR), NR);
        }
        return;
    }
    for q in 0..kb {
        for c in 0..NR {
            let x = if c < cols {
                *src.add(q * rs + c * cs)
            } else {
                0.0
            };
            dst.add(q * NR + c).write(x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::fastmath::detected_simd_level;
    use crate::backend::cpu::gemm::{matmul_gemm_crate, Op};

    /// Every level this CPU runs, lowest first.
    fn levels() -> Vec<SimdLevel> {
        let top = detected_simd_level();
        [SimdLevel::Baseline, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .filter(|&l| l <= top)
            .collect()
    }

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// A view and the buffer length it needs for a `rows x cols` matrix.
    #[derive(Clone, Copy, Debug)]
    struct V {
        off: usize,
        rs: usize,
        cs: usize,
    }
    impl V {
        fn len(self, rows: usize, cols: usize) -> usize {
            self.off + (rows.max(1) - 1) * self.rs + (cols.max(1) - 1) * self.cs + 1
        }
        fn at(self, i: usize, j: usize) -> usize {
            self.off + i * self.rs + j * self.cs
        }
        /// The view over `x` as the driver takes it.
        fn read(self, x: &[f32]) -> Mat<*const f32> {
            Mat {
                ptr: x[self.off..].as_ptr(),
                rs: self.rs,
                cs: self.cs,
            }
        }
        fn write(self, x: &mut [f32]) -> Mat<*mut f32> {
            Mat {
                ptr: x[self.off..].as_mut_ptr(),
                rs: self.rs,
                cs: self.cs,
            }
        }
        /// Row-major (`N`) or the transpose of a row-major buffer (`T`).
        fn op(op: Op, rows: usize, cols: usize) -> Self {
            match op {
                Op::N => V {
                    off: 0,
                    rs: cols,
                    cs: 1,
                },
                Op::T => V {
                    off: 0,
                    rs: 1,
                    cs: rows,
                },
            }
        }
    }

    struct Case {
        m: usize,
        n: usize,
        k: usize,
        va: V,
        vb: V,
        vc: V,
        scale: f32,
        accumulate: bool,
    }

    impl Case {
        /// Row-major buffers read as `op_a` / `op_b`, a row-major `c`, no scale.
        fn plain(m: usize, n: usize, k: usize, op_a: Op, op_b: Op, accumulate: bool) -> Self {
            Case {
                m,
                n,
                k,
                va: V::op(op_a, m, k),
                vb: V::op(op_b, k, n),
                vc: V::op(Op::N, m, n),
                scale: 1.0,
                accumulate,
            }
        }
    }

    /// Runs the case at `level` on fresh operands from `seed`; returns (c, f64 reference).
    fn run(level: SimdLevel, cs: &Case, seed: u64, parallel: bool) -> (Vec<f32>, Vec<f64>) {
        let mut r = rng(seed);
        let a: Vec<f32> = (0..cs.va.len(cs.m, cs.k)).map(|_| r()).collect();
        let b: Vec<f32> = (0..cs.vb.len(cs.k, cs.n)).map(|_| r()).collect();
        let mut c: Vec<f32> = (0..cs.vc.len(cs.m, cs.n))
            .map(|_| if cs.accumulate { r() } else { f32::NAN })
            .collect();
        let mut want = vec![0f64; c.len()];
        for i in 0..cs.m {
            for j in 0..cs.n {
                let s: f64 = (0..cs.k)
                    .map(|p| a[cs.va.at(i, p)] as f64 * b[cs.vb.at(p, j)] as f64)
                    .sum();
                let old = if cs.accumulate {
                    c[cs.vc.at(i, j)] as f64
                } else {
                    0.0
                };
                want[cs.vc.at(i, j)] = old + cs.scale as f64 * s;
            }
        }
        // SAFETY: the buffers were sized by `V::len` for these views.
        unsafe {
            gemm(
                level,
                cs.m,
                cs.n,
                cs.k,
                cs.vc.write(&mut c),
                cs.accumulate,
                cs.va.read(&a),
                cs.vb.read(&b),
                cs.scale,
                parallel,
            );
        }
        (c, want)
    }

    fn check(level: SimdLevel, cs: &Case, seed: u64) {
        let (c, want) = run(level, cs, seed, true);
        let tol = 4e-5 * (cs.k as f64).sqrt().max(1.0);
        for i in 0..cs.m {
            for j in 0..cs.n {
                let at = cs.vc.at(i, j);
                assert!(
                    (c[at] as f64 - want[at]).abs() <= tol,
                    "{level:?} {}x{}x{} {:?} {:?} {:?} acc {}: ({i}, {j}) {} vs {}",
                    cs.m,
                    cs.n,
                    cs.k,
                    cs.va,
                    cs.vb,
                    cs.vc,
                    cs.accumulate,
                    c[at],
                    want[at]
                );
            }
        }
    }

    /// Sizes around every tile edge of every level (MR 2, 16, 64; NR 4, 6), the crate's depth
    /// block (512 for small products, `kernel_params` beyond) and the horizontal kernels' limit.
    fn sizes() -> Vec<(usize, usize, usize)> {
        let mut v = vec![];
        for m in [1, 2, 3, 5, 7, 15, 16, 17, 33, 63, 64, 65] {
            for n in [1, 3, 4, 5, 6, 7, 13] {
                v.push((m, n, [1, 2, 3, 9, 31][(m + n) % 5]));
            }
        }
        v.extend([
            (16, 16, 40),
            (17, 32, 17),
            (30, 64, 20),
            (40, 128, 9),
            (17, 15, 40),
            (12, 6, 511),
            (20, 30, 512),
            (9, 9, 513),
            (40, 50, 1100),
            (130, 70, 1300),
            (97, 131, 64),
            (200, 13, 600),
        ]);
        v
    }

    #[test]
    fn matches_f64_reference_all_ops_every_level() {
        for level in levels() {
            for (s, &(m, n, k)) in sizes().iter().enumerate() {
                for op_a in [Op::N, Op::T] {
                    for op_b in [Op::N, Op::T] {
                        for accumulate in [false, true] {
                            let case = Case::plain(m, n, k, op_a, op_b, accumulate);
                            check(level, &case, s as u64);
                        }
                    }
                }
            }
        }
    }

    /// Several `nc` blocks of packed `rhs` (the driver's own blocking) and a large depth.
    #[test]
    fn matches_f64_reference_large_every_level() {
        for level in levels() {
            for (m, n, k, op_a, op_b) in [
                (700, 150, 600, Op::T, Op::N),
                (700, 150, 600, Op::T, Op::T),
                (300, 200, 96, Op::N, Op::T),
                (96, 300, 2176, Op::T, Op::N),
            ] {
                let case = Case::plain(m, n, k, op_a, op_b, false);
                check(level, &case, 7);
            }
        }
    }

    /// Strided views: padded rows, columns apart, `c` column-major (no transposition of the
    /// problem) and row-major, a scale, accumulate on and off.
    #[test]
    fn strided_views_match_f64_reference_every_level() {
        for level in levels() {
            for &(m, n, k) in &[
                (1, 1, 1),
                (17, 17, 32),
                (5, 70, 9),
                (70, 33, 600),
                (65, 9, 3),
            ] {
                let views = [
                    (
                        V {
                            off: 3,
                            rs: k + 5,
                            cs: 1,
                        },
                        V {
                            off: 1,
                            rs: 1,
                            cs: k + 2,
                        },
                        V {
                            off: 2,
                            rs: n + 3,
                            cs: 1,
                        },
                    ),
                    (
                        V {
                            off: 0,
                            rs: 2,
                            cs: 2 * m + 1,
                        },
                        V {
                            off: 4,
                            rs: 3 * n,
                            cs: 3,
                        },
                        V {
                            off: 1,
                            rs: 1,
                            cs: m + 4,
                        },
                    ),
                    (
                        V {
                            off: 0,
                            rs: 1,
                            cs: m,
                        },
                        V {
                            off: 0,
                            rs: n,
                            cs: 1,
                        },
                        V {
                            off: 5,
                            rs: 2 * n,
                            cs: 2,
                        },
                    ),
                ];
                for (va, vb, vc) in views {
                    for accumulate in [false, true] {
                        let case = Case {
                            m,
                            n,
                            k,
                            va,
                            vb,
                            vc,
                            scale: 0.125,
                            accumulate,
                        };
                        check(level, &case, (m * n + k) as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn thread_count_does_not_change_bits() {
        let pool = |t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        };
        for level in levels() {
            for (m, n, k, op_a, op_b) in [
                (700, 150, 600, Op::T, Op::N),
                (300, 200, 96, Op::N, Op::T),
                (96, 300, 2176, Op::T, Op::N),
                (2176, 96, 384, Op::N, Op::N),
            ] {
                let case = Case::plain(m, n, k, op_a, op_b, true);
                let one = pool(1).install(|| run(level, &case, 3, true).0);
                for t in [2, 3] {
                    let many = pool(t).install(|| run(level, &case, 3, true).0);
                    assert!(
                        one.iter()
                            .zip(&many)
                            .all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{level:?} {m}x{n}x{k}: {t} threads differ from 1"
                    );
                }
            }
        }
    }

    /// At the ISA the `gemm` crate picks on this CPU, its blocked and horizontal paths and ours
    /// give the same bits (its special paths for `k <= 2` and `m` or `n` = 1 are left out).
    #[test]
    fn bit_identical_to_the_gemm_crate_at_its_level() {
        let level = detected_simd_level();
        let mut shapes: Vec<_> = sizes()
            .into_iter()
            .filter(|&(m, n, k)| m > 1 && n > 1 && k > 2)
            .collect();
        shapes.extend([
            (2176, 288, 96),
            (2176, 96, 384),
            (384, 96, 2176),
            (394, 1152, 384),
            (700, 150, 600),
        ]);
        for &(m, n, k) in &shapes {
            for op_a in [Op::N, Op::T] {
                for op_b in [Op::N, Op::T] {
                    for accumulate in [false, true] {
                        let mut r = rng((m + 3 * n + 7 * k) as u64);
                        let a: Vec<f32> = (0..m * k).map(|_| r()).collect();
                        let b: Vec<f32> = (0..k * n).map(|_| r()).collect();
                        let c0: Vec<f32> = (0..m * n).map(|_| r()).collect();
                        let (mut ours, mut theirs) = (c0.clone(), c0);
                        // SAFETY: row-major buffers of the right sizes.
                        unsafe {
                            gemm(
                                level,
                                m,
                                n,
                                k,
                                V::op(Op::N, m, n).write(&mut ours),
                                accumulate,
                                V::op(op_a, m, k).read(&a),
                                V::op(op_b, k, n).read(&b),
                                1.0,
                                true,
                            );
                        }
                        matmul_gemm_crate(m, n, k, &a, op_a, &b, op_b, &mut theirs, accumulate);
                        let same = ours
                            .iter()
                            .zip(&theirs)
                            .filter(|(x, y)| x.to_bits() == y.to_bits())
                            .count();
                        assert_eq!(
                            same,
                            m * n,
                            "{level:?} {m}x{n}x{k} {op_a:?}{op_b:?} acc {accumulate}: {} of {} \
                             elements differ from the gemm crate",
                            m * n - same,
                            m * n
                        );
                    }
                }
            }
        }
    }

    /// The AVX-512 path cannot run on a CPU without AVX-512, but its blocking can be checked
    /// anywhere: every level's microkernel shape is one the packing handles, and the packing at
    /// every such `mr` / `nr` (plain code and AVX transposes, no AVX-512) matches a plain
    /// element-by-element copy, zero padding included (poisoned first).
    #[test]
    fn every_level_kernel_shape_is_packed_right() {
        for level in [SimdLevel::Baseline, SimdLevel::Avx2, SimdLevel::Avx512] {
            let kern = Kernels::of(level);
            assert!(
                [2, 16, 64].contains(&kern.mr) && [4, 6].contains(&kern.nr),
                "{level:?}: mr {} nr {} not handled by pack_lhs_panel / pack_rhs_panel",
                kern.mr,
                kern.nr
            );
            assert_eq!(
                kern.ukr.len(),
                (kern.mr / kern.lanes) * kern.nr,
                "{level:?}"
            );
            assert_eq!(kern.hukr.len(), kern.h_m * kern.h_n, "{level:?}");
            let mut r = rng(7 + kern.mr as u64);
            for (rows, kb) in [(kern.mr, 19), (kern.mr - 1, 8), (1, 5), (kern.mr, 16)] {
                for (rs, cs) in [(1usize, kern.mr + 3), (kb + 2, 1), (3, 3 * kern.mr + 1)] {
                    let src: Vec<f32> = (0..rows * rs + kb * cs + 1).map(|_| r()).collect();
                    let mut got = vec![f32::NAN; kern.mr * kb];
                    // SAFETY: `src` holds every (row, step) the strides reach; `got` is mr x kb.
                    unsafe {
                        pack_lhs_panel(&kern, rows, kb, src.as_ptr(), rs, cs, got.as_mut_ptr())
                    };
                    for q in 0..kb {
                        for i in 0..kern.mr {
                            let want = if i < rows { src[i * rs + q * cs] } else { 0.0 };
                            assert_eq!(got[q * kern.mr + i].to_bits(), want.to_bits());
                        }
                    }
                }
            }
            for (cols, kb) in [(kern.nr, 11), (kern.nr - 1, 4)] {
                for (rs, cs) in [(kern.nr + 2, 1), (1, kb + 1)] {
                    let src: Vec<f32> = (0..kb * rs + cols * cs + 1).map(|_| r()).collect();
                    let mut got = vec![f32::NAN; kern.nr * kb];
                    // SAFETY: as above, for a column panel.
                    unsafe {
                        pack_rhs_panel(kern.nr, cols, kb, src.as_ptr(), rs, cs, got.as_mut_ptr())
                    };
                    for q in 0..kb {
                        for j in 0..kern.nr {
                            let want = if j < cols { src[q * rs + j * cs] } else { 0.0 };
                            assert_eq!(got[q * kern.nr + j].to_bits(), want.to_bits());
                        }
                    }
                }
            }
        }
    }
}
