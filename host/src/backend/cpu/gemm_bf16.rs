//! bf16 matrix products with f32 accumulation, the CPU backend's `--precision bf16` path: the
//! operands are rounded to bf16 (round to nearest even, the format's 8-bit significand), every
//! product of two bf16 values is exact in f32, and the sums are f32. The model's master
//! weights, the optimiser, the logits against the prototypes, log C_p, the softmax and the
//! loss stay f32; only the forward and input-gradient products of the backbone's and the head
//! MLP's linear layers come here (`gemm::linear_matmul`).
//!
//! Three kernels, chosen once per process like the row kernels (`fastmath::simd_level`):
//! - AMX (`tdpbf16ps` on 16 x 16 f32 tiles) and AVX512-BF16 (`vdpbf16ps`: 16 lanes, each adding
//!   two bf16 products into an f32 lane; a 12 x 32 register tile) share one frame
//!   ([`packed_matmul`]): A packed as bf16 rows, B as bf16 pairs along k in 16-column panels,
//!   each element of C summed over k in a fixed order by one row block; rayon splits the row
//!   blocks only, so the bits do not depend on the thread count.
//! - Elsewhere: the operands rounded to bf16 (kept as f32) through the f32 GEMM, the same
//!   products with the f32 GEMM's summation order.
//!
//! All are checked against f64 sums of the same bf16 products (`tests` below); they differ
//! from each other in the order of the f32 sums only.
use std::cell::RefCell;
use std::thread::LocalKey;

use rayon::prelude::*;

use super::fastmath::{detected_simd_level, simd_level, SimdLevel};
use super::gemm::{matmul, Op};
use crate::backend::grown;

/// bf16 bits of `x`, rounded to nearest even (NaN stays NaN, quiet).
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    ((b + round) >> 16) as u16
}

/// The f32 value of bf16 bits.
#[inline]
pub fn bf16_value(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to bf16, as f32.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    bf16_value(bf16_bits(x))
}

/// Which kernel [`matmul_bf16`] runs on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tiles (`tdpbf16ps`: a 16 x 16 f32 tile += 16 x 32 bf16 times 32 x 16 bf16).
    Amx,
    /// `vdpbf16ps` (AVX512-BF16).
    Avx512Bf16,
    /// bf16-rounded operands through the f32 GEMM.
    Emulated,
}

/// The kernel for this process: AMX where the CPU has AMX-BF16 and Linux grants the tile
/// state, else AVX512-BF16, else the emulation; `DINOVMF_SIMD` below `avx512` means the
/// emulation.
pub fn bf16_kernel() -> Bf16Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if simd_level() == SimdLevel::Avx512 && detected_simd_level() == SimdLevel::Avx512 {
            if amx::available() {
                return Bf16Kernel::Amx;
            }
            if std::arch::is_x86_feature_detected!("avx512bf16") {
                return Bf16Kernel::Avx512Bf16;
            }
        }
    }
    Bf16Kernel::Emulated
}

/// `c[m x n] = (accumulate ? c : 0) + bf16(a) bf16(b)`, the operands as [`matmul`] takes them.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    op_a: Op,
    b: &[f32],
    op_b: Op,
    c: &mut [f32],
    accumulate: bool,
) {
    matmul_bf16_with(bf16_kernel(), m, n, k, a, op_a, b, op_b, c, accumulate)
}

/// [`matmul_bf16`] on a given kernel (the tests run both; a kernel the CPU lacks falls back
/// to the emulation).
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16_with(
    kernel: Bf16Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    op_a: Op,
    b: &[f32],
    op_b: Op,
    c: &mut [f32],
    accumulate: bool,
) {
    assert!(a.len() >= m * k, "matmul_bf16: a has {} < {m}x{k}", a.len());
    assert!(b.len() >= k * n, "matmul_bf16: b has {} < {k}x{n}", b.len());
    assert!(c.len() >= m * n, "matmul_bf16: c has {} < {m}x{n}", c.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if kernel == Bf16Kernel::Amx && amx::available() {
            amx::matmul(m, n, k, a, op_a, b, op_b, c, accumulate);
            return;
        }
        if kernel == Bf16Kernel::Avx512Bf16 && std::arch::is_x86_feature_detected!("avx512bf16") {
            avx512::matmul(m, n, k, a, op_a, b, op_b, c, accumulate);
            return;
        }
    }
    let _ = kernel;
    with_local(&SCRATCH, |s| {
        let ra = grown(&mut s.rounded_a, m * k);
        let rb = grown(&mut s.rounded_b, k * n);
        for (r, &x) in ra.iter_mut().zip(&a[..m * k]) {
            *r = round_bf16(x);
        }
        for (r, &x) in rb.iter_mut().zip(&b[..k * n]) {
            *r = round_bf16(x);
        }
        matmul(m, n, k, ra, op_a, rb, op_b, c, accumulate);
    });
}

/// The packing memory of the bf16 products on one thread: grown to the largest product the
/// thread has run, then kept, so that a warm training step allocates nothing here.
#[derive(Default)]
struct Scratch {
    /// A as bf16 rows ([`pack_rows_bf16`]), B as pair panels ([`pack_panels`]).
    a: Vec<u16>,
    b: Vec<u32>,
    /// A transposed operand converted to bf16 before it is rearranged.
    t: Vec<u16>,
    /// The emulation's operands rounded to bf16 (kept as f32).
    rounded_a: Vec<f32>,
    rounded_b: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
    /// One column of B in bf16, per rayon thread ([`pack_panels`]).
    static COLUMN: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// `f` on this thread's buffer `key`; on a fresh one if it is in use (a rayon thread waiting
/// inside one product that picked up another's task: not something the step does, but safe).
fn with_local<T: Default + 'static, R>(
    key: &'static LocalKey<RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut T::default()),
    })
}

/// `dst[i] = bf16(src[i])` (AVX512-BF16's `vcvtne2ps2bf16` where the CPU has it: round to
/// nearest even like [`bf16_bits`], denormals flushed to zero).
pub fn to_bf16_row(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bf16") {
        // SAFETY: the feature was just detected; the loop reads and writes inside `n`.
        done = unsafe { to_bf16_avx512(&src[..n], &mut dst[..n]) };
    }
    for i in done..n {
        dst[i] = bf16_bits(src[i]);
    }
}

/// The vector part of [`to_bf16_row`]; returns how many it converted (a multiple of 32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn to_bf16_avx512(src: &[f32], dst: &mut [u16]) -> usize {
    use std::arch::x86_64::*;
    let n = src.len() / 32 * 32;
    for i in (0..n).step_by(32) {
        let lo = _mm512_loadu_ps(src.as_ptr().add(i));
        let hi = _mm512_loadu_ps(src.as_ptr().add(i + 16));
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.as_mut_ptr().add(i) as *mut _, v);
    }
    n
}

/// The logical `m x k` matrix as bf16 rows of `kpad` (zero past k), rows padded with zeros to
/// a multiple of `row_multiple` (the kernel's row block), into `out` (grown if short; `t` is
/// scratch). Row `i`'s bf16 values, read as 32-bit words, are its `(A[i, 2p], A[i, 2p + 1])`
/// pairs.
#[allow(clippy::too_many_arguments)]
fn pack_rows_bf16<'o>(
    m: usize,
    k: usize,
    a: &[f32],
    op: Op,
    kpad: usize,
    row_multiple: usize,
    out: &'o mut Vec<u16>,
    t: &mut Vec<u16>,
) -> &'o [u16] {
    let mpad = m.div_ceil(row_multiple) * row_multiple;
    let out = grown(out, mpad * kpad);
    match op {
        Op::N => {
            out[..m * kpad]
                .par_chunks_mut(kpad)
                .zip(a[..m * k].par_chunks(k))
                .for_each(|(row, src)| {
                    to_bf16_row(src, &mut row[..k]);
                    row[k..].fill(0);
                });
            out[m * kpad..].fill(0);
        }
        Op::T => {
            // Stored k x m: convert the stored rows, then transpose in 32 x 32 blocks.
            let t = grown(t, k * m);
            t.par_chunks_mut(m)
                .zip(a[..k * m].par_chunks(m))
                .for_each(|(d, s)| to_bf16_row(s, d));
            let t = &*t;
            out.par_chunks_mut(32 * kpad)
                .enumerate()
                .for_each(|(ib, blk)| {
                    blk.fill(0);
                    for t0 in (0..k).step_by(32) {
                        for i in ib * 32..(ib * 32 + 32).min(m) {
                            let row = &mut blk[(i - ib * 32) * kpad..];
                            for tt in t0..(t0 + 32).min(k) {
                                row[tt] = t[tt * m + i];
                            }
                        }
                    }
                });
        }
    }
    out
}

/// The logical `k x n` matrix as panels of 16 columns, each `kp` rows of 16 bf16 pairs
/// (`(B[2p, j], B[2p + 1, j])`, zero past k and n); `ceil(n / 32) * 2` panels, into `out`
/// (grown if short; `t` is scratch).
fn pack_panels<'o>(
    k: usize,
    n: usize,
    b: &[f32],
    op: Op,
    kp: usize,
    out: &'o mut Vec<u32>,
    t: &mut Vec<u16>,
) -> &'o [u32] {
    let panels = n.div_ceil(32) * 2;
    let out = grown(out, panels * kp * 16);
    match op {
        Op::T => {
            // Stored n x k: row j of the storage is column j, its pairs consecutive.
            out.par_chunks_mut(kp * 16)
                .enumerate()
                .for_each(|(q, panel)| {
                    panel.fill(0);
                    with_local(&COLUMN, |col| {
                        let row = grown(col, 2 * kp);
                        row[k..].fill(0);
                        for jj in 0..16 {
                            let j = q * 16 + jj;
                            if j >= n {
                                break;
                            }
                            to_bf16_row(&b[j * k..(j + 1) * k], &mut row[..k]);
                            for p in 0..kp {
                                panel[p * 16 + jj] =
                                    row[2 * p] as u32 | (row[2 * p + 1] as u32) << 16;
                            }
                        }
                    });
                });
        }
        Op::N => {
            // Stored k x n: rows 2p and 2p + 1 interleave into pair row p.
            let t = grown(t, 2 * kp * n);
            t.par_chunks_mut(n)
                .zip(b[..k * n].par_chunks(n))
                .for_each(|(d, s)| to_bf16_row(s, d));
            t[k * n..].fill(0);
            let t = &*t;
            out.par_chunks_mut(kp * 16)
                .enumerate()
                .for_each(|(q, panel)| {
                    panel.fill(0);
                    for p in 0..kp {
                        let (lo, hi) = (&t[2 * p * n..], &t[(2 * p + 1) * n..]);
                        for jj in 0..16 {
                            let j = q * 16 + jj;
                            if j >= n {
                                break;
                            }
                            panel[p * 16 + jj] = lo[j] as u32 | (hi[j] as u32) << 16;
                        }
                    }
                });
        }
    }
    out
}

/// The operands of one product, as [`matmul`] takes them.
#[derive(Clone, Copy)]
struct Operands<'a> {
    a: &'a [f32],
    op_a: Op,
    b: &'a [f32],
    op_b: Op,
}

/// A and B packed for the bf16 kernels: A by [`pack_rows_bf16`] (rows of `kpad`), B by
/// [`pack_panels`] (16-column panels of `kp = kpad / 2` pair rows).
struct Packed<'s> {
    a: &'s [u16],
    b: &'s [u32],
    kpad: usize,
    kp: usize,
}

/// The frame both bf16 kernels share: `k = 0`, the packing (k padded to a multiple of
/// `k_multiple`, A's rows to a multiple of `rows`), and `block(blk, c_rows, packed)` over the
/// row blocks of `rows` rows of C, split over rayon when the product is large. Each element of
/// C is written by one block with its k-sum in a fixed order, so the bits do not depend on the
/// thread count. The packing memory is this thread's [`Scratch`].
fn packed_matmul(
    m: usize,
    n: usize,
    k: usize,
    x: Operands<'_>,
    c: &mut [f32],
    (k_multiple, rows): (usize, usize),
    block: impl Fn(usize, &mut [f32], &Packed<'_>) + Sync,
) {
    debug_assert!(k > 0, "matmul_bf16_with handles k = 0");
    let c = &mut c[..m * n];
    let kpad = k.div_ceil(k_multiple) * k_multiple;
    let kp = kpad / 2;
    with_local(&SCRATCH, |s| {
        let p = Packed {
            a: pack_rows_bf16(m, k, x.a, x.op_a, kpad, rows, &mut s.a, &mut s.t),
            b: pack_panels(k, n, x.b, x.op_b, kp, &mut s.b, &mut s.t),
            kpad,
            kp,
        };
        if m * n * k >= 1 << 16 {
            c.par_chunks_mut(rows * n)
                .enumerate()
                .for_each(|(blk, cr)| block(blk, cr, &p));
        } else {
            c.chunks_mut(rows * n)
                .enumerate()
                .for_each(|(blk, cr)| block(blk, cr, &p));
        }
    })
}

/// AMX: A packed as bf16 rows padded to 32 rows and to `kpad` (a multiple of 32) columns, B
/// as pairs in panels of 16 columns (`kpad / 2` rows of 16 pairs, 64 bytes each); each 32 x 32
/// block of C is four 16 x 16 f32 tiles (tmm0-3) summing over k in chunks of 32 (A tiles tmm4,
/// tmm5; B tiles tmm6, tmm7), in a fixed order.
#[cfg(target_arch = "x86_64")]
mod amx {
    use super::*;
    use std::arch::asm;
    use std::sync::OnceLock;

    /// CPUID says AMX-TILE and AMX-BF16, and Linux granted this process the tile data state
    /// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, once per process).
    pub fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            // SAFETY: CPUID leaf 7 exists on every x86-64 CPU that has AVX-512 (checked by
            // the caller's level); arch_prctl only changes this process's permissions.
            unsafe {
                let leaf = std::arch::x86_64::__cpuid_count(7, 0);
                let (tile, bf16) = (leaf.edx >> 24 & 1 == 1, leaf.edx >> 22 & 1 == 1);
                if !(tile && bf16 && cfg!(target_os = "linux")) {
                    return false;
                }
                let ret: i64;
                // arch_prctl(0x1023 = ARCH_REQ_XCOMP_PERM, 18 = XFEATURE_XTILEDATA)
                asm!(
                    "syscall",
                    inlateout("rax") 158i64 => ret,
                    in("rdi") 0x1023i64,
                    in("rsi") 18i64,
                    lateout("rcx") _,
                    lateout("r11") _,
                    options(nostack)
                );
                ret == 0
            }
        })
    }

    /// The tile configuration: palette 1, every tile 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    fn config() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        TileConfig(c)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        op_a: Op,
        b: &[f32],
        op_b: Op,
        c: &mut [f32],
        accumulate: bool,
    ) {
        let cfg = config();
        let operands = Operands { a, op_a, b, op_b };
        packed_matmul(m, n, k, operands, c, (32, 32), |blk, c_rows, p| {
            let rows = (m - blk * 32).min(32);
            let mut out = [0f32; 32 * 32];
            // SAFETY: `available()` held; the tile loads read 16 rows of 64 bytes inside `p.a`
            // (rows blk*32 .. +32 of kpad bf16) and `p.b` (panels 2q, 2q+1, rows of the chunk).
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack));
            }
            for q in 0..n.div_ceil(32) {
                let cols = (n - q * 32).min(32);
                unsafe {
                    block(
                        &p.a[blk * 32 * p.kpad..],
                        p.kpad,
                        &p.b[2 * q * p.kp * 16..],
                        p.kp,
                        &mut out,
                    );
                }
                for r in 0..rows {
                    let dst = &mut c_rows[r * n + q * 32..r * n + q * 32 + cols];
                    let src = &out[r * 32..r * 32 + cols];
                    if accumulate {
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
            }
            unsafe { asm!("tilerelease", options(nostack)) };
        });
    }

    /// `out[32 x 32] = A[32 x kpad] B[kpad x 32]` for the A rows at `a` (row stride kpad) and
    /// the two B panels at `b` (each `kp` rows of 64 bytes).
    ///
    /// # Safety
    /// The tile configuration is loaded; `a` holds 32 rows of `kpad`, `b` two panels.
    unsafe fn block(a: &[u16], kpad: usize, b: &[u32], kp: usize, out: &mut [f32; 1024]) {
        debug_assert!(a.len() >= 32 * kpad && b.len() >= 2 * kp * 16);
        let a_stride = kpad * 2;
        let (a0, a1) = (a.as_ptr(), a.as_ptr().add(16 * kpad));
        let (b0, b1) = (b.as_ptr(), b.as_ptr().add(kp * 16));
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack)
        );
        for ch in 0..kpad / 32 {
            asm!(
                "tileloadd tmm4, [{a0} + {sa}]",
                "tileloadd tmm5, [{a1} + {sa}]",
                "tileloadd tmm6, [{b0} + {sb}]",
                "tileloadd tmm7, [{b1} + {sb}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.add(ch * 32),
                a1 = in(reg) a1.add(ch * 32),
                b0 = in(reg) b0.add(ch * 16 * 16),
                b1 = in(reg) b1.add(ch * 16 * 16),
                sa = in(reg) a_stride,
                sb = in(reg) 64usize,
                options(nostack)
            );
        }
        let o = out.as_mut_ptr();
        asm!(
            "tilestored [{c0} + {s}], tmm0",
            "tilestored [{c1} + {s}], tmm1",
            "tilestored [{c2} + {s}], tmm2",
            "tilestored [{c3} + {s}], tmm3",
            c0 = in(reg) o,
            c1 = in(reg) o.add(16),
            c2 = in(reg) o.add(16 * 32),
            c3 = in(reg) o.add(16 * 32 + 16),
            s = in(reg) 128usize,
            options(nostack)
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// Rows of the register tile (a tile is 12 rows x 32 columns of C).
    const MR: usize = 12;

    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        op_a: Op,
        b: &[f32],
        op_b: Op,
        c: &mut [f32],
        accumulate: bool,
    ) {
        let operands = Operands { a, op_a, b, op_b };
        packed_matmul(m, n, k, operands, c, (2, MR), |blk, c_rows, p| {
            let rows = (m - blk * MR).min(MR);
            let a_blk = &p.a[blk * MR * p.kpad..(blk + 1) * MR * p.kpad];
            for q in 0..n.div_ceil(32) {
                let cols = (n - q * 32).min(32);
                let panels = &p.b[2 * q * p.kp * 16..(2 * q + 2) * p.kp * 16];
                // SAFETY: the caller checked avx512bf16 (and with it avx512f); `a_blk` holds MR
                // rows of kpad bf16, `panels` two panels of kp x 16 pairs, `c_rows` holds `rows`
                // rows of n.
                unsafe {
                    tile(
                        a_blk,
                        p.kpad,
                        panels,
                        p.kp,
                        c_rows,
                        n,
                        q * 32,
                        rows,
                        cols,
                        accumulate,
                    )
                };
            }
        });
    }

    /// One MR x 32 tile of C from MR rows of A (`kpad` bf16 each) and two 16-column panels of
    /// B: `rows` x `cols` of it are stored at column `col0` of `c`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        a: &[u16],
        kpad: usize,
        panels: &[u32],
        kp: usize,
        c: &mut [f32],
        n: usize,
        col0: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (bp0, bp1) = (panels.as_ptr(), panels.as_ptr().add(kp * 16));
        let ap = a.as_ptr();
        for p in 0..kp {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp0.add(p * 16) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp1.add(p * 16) as *const _));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                // The pair (A[r, 2p], A[r, 2p + 1]) as one 32-bit word.
                let pair = (ap.add(r * kpad + 2 * p) as *const u32).read_unaligned();
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
                acc_r[0] = _mm512_dpbf16_ps(acc_r[0], av, b0);
                acc_r[1] = _mm512_dpbf16_ps(acc_r[1], av, b1);
            }
        }
        let masks: [__mmask16; 2] = [
            if cols >= 16 {
                0xffff
            } else {
                (1u32 << cols) as u16 - 1
            },
            if cols <= 16 {
                0
            } else if cols >= 32 {
                0xffff
            } else {
                ((1u32 << (cols - 16)) - 1) as u16
            },
        ];
        for (r, acc_r) in acc.iter().enumerate().take(rows) {
            let row = c.as_mut_ptr().add(r * n + col0);
            for h in 0..2 {
                if masks[h] == 0 {
                    continue;
                }
                let dst = row.add(16 * h);
                let v = if accumulate {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(masks[h], dst), acc_r[h])
                } else {
                    acc_r[h]
                };
                _mm512_mask_storeu_ps(dst, masks[h], v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Element `(i, t)` of the logical `rows x cols` matrix stored row-major (`Op::N`) or as the
    /// transpose of a row-major `cols x rows` buffer (`Op::T`).
    #[inline]
    fn at(x: &[f32], op: Op, rows: usize, cols: usize, i: usize, t: usize) -> f32 {
        match op {
            Op::N => x[i * cols + t],
            Op::T => x[t * rows + i],
        }
    }
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn bf16_rounding_is_round_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0); // halfway: to even
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0); // halfway: to even
        assert_eq!(round_bf16(1.0 + 1.5 / 256.0), 1.0 + 2.0 / 256.0);
        assert_eq!(round_bf16(-2.5), -2.5);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        // Relative error at most 2^-8 (half the spacing of an 8-bit significand).
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..10_000 {
            let x: f32 = rng.gen_range(-1e3..1e3);
            assert!(((round_bf16(x) - x) / x).abs() <= 1.0 / 256.0, "{x}");
        }
    }

    /// f64 sum of the bf16-rounded products.
    fn reference(m: usize, n: usize, k: usize, a: &[f32], oa: Op, b: &[f32], ob: Op) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|t| {
                        round_bf16(at(a, oa, m, k, i, t)) as f64
                            * round_bf16(at(b, ob, k, n, t, j)) as f64
                    })
                    .sum();
            }
        }
        c
    }

    /// The per-thread packing memory is reused from product to product: a product after a
    /// larger one (whose values are still in that memory, past where the smaller one writes)
    /// gives the bits it gives on threads that never ran one, for every kernel and layout.
    #[test]
    fn bf16_gemm_bits_do_not_depend_on_the_product_before() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut rnd =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let (big, small) = ((45, 70, 97), (13, 33, 5));
        let (ab, bb) = (rnd(big.0 * big.2), rnd(big.2 * big.1));
        let (a, b) = (rnd(small.0 * small.2), rnd(small.2 * small.1));
        let (m, n, k) = small;
        for kernel in [
            Bf16Kernel::Amx,
            Bf16Kernel::Avx512Bf16,
            Bf16Kernel::Emulated,
        ] {
            for (oa, ob) in [(Op::N, Op::T), (Op::N, Op::N), (Op::T, Op::N)] {
                // A fresh two-thread pool each time: its threads' packing memory is new.
                let run = |after_big: bool| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(2)
                        .build()
                        .unwrap();
                    pool.install(|| {
                        if after_big {
                            let (bm, bn, bk) = big;
                            let mut c = vec![0.0; bm * bn];
                            matmul_bf16_with(kernel, bm, bn, bk, &ab, oa, &bb, ob, &mut c, false);
                        }
                        let mut c = vec![f32::NAN; m * n];
                        matmul_bf16_with(kernel, m, n, k, &a, oa, &b, ob, &mut c, false);
                        c.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                    })
                };
                let fresh = run(false);
                assert!(fresh.iter().all(|&x| f32::from_bits(x).is_finite()));
                assert!(fresh == run(true), "{kernel:?} {oa:?} {ob:?}");
            }
        }
    }

    /// Both kernels, every layout, ragged sizes around the 12 x 32 tile and odd k, beta 0 into
    /// a NaN-poisoned C and accumulating: within `1e-5 + 2.5e-6 sqrt(k)` absolute (f32 sums of
    /// exact products of values in (-1, 1)) of f64.
    #[test]
    fn bf16_gemm_matches_f64_of_the_rounded_operands() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for kernel in [
            Bf16Kernel::Amx,
            Bf16Kernel::Avx512Bf16,
            Bf16Kernel::Emulated,
        ] {
            for (m, n, k) in [
                (1, 1, 1),
                (13, 33, 5),
                (12, 32, 16),
                (32, 32, 32),
                (25, 70, 97),
                (40, 3, 300),
                (70, 45, 64),
            ] {
                for (oa, ob) in [(Op::N, Op::T), (Op::N, Op::N), (Op::T, Op::N)] {
                    let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
                    let b: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
                    let want = reference(m, n, k, &a, oa, &b, ob);
                    let tol = 1e-5 + 2.5e-6 * (k as f64).sqrt();
                    let mut c = vec![f32::NAN; m * n];
                    matmul_bf16_with(kernel, m, n, k, &a, oa, &b, ob, &mut c, false);
                    for (e, (&g, &w)) in c.iter().zip(&want).enumerate() {
                        assert!((g as f64 - w).abs() <= tol, "{kernel:?} {m}x{n}x{k} [{e}]");
                    }
                    let c0: Vec<f32> = (0..m * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
                    let mut c = c0.clone();
                    matmul_bf16_with(kernel, m, n, k, &a, oa, &b, ob, &mut c, true);
                    for e in 0..m * n {
                        let w = want[e] + c0[e] as f64;
                        assert!((c[e] as f64 - w).abs() <= tol, "{kernel:?} acc [{e}]");
                    }
                }
            }
        }
    }

    /// Against the f32 GEMM on the unrounded operands: each operand's rounding is at most
    /// 2^-8 relative, so a product is off by at most ~2^-7 of |a||b|, and a sum of k of them
    /// by 2^-7 sum |a_t b_t|.
    #[test]
    fn bf16_gemm_is_within_the_rounding_bound_of_f32() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (m, n, k) = (37, 45, 130);
        let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-2.0..2.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-2.0..2.0)).collect();
        let mut c32 = vec![0f32; m * n];
        matmul(m, n, k, &a, Op::N, &b, Op::N, &mut c32, false);
        let mut c16 = vec![0f32; m * n];
        matmul_bf16(m, n, k, &a, Op::N, &b, Op::N, &mut c16, false);
        let mut worst = 0f64;
        for i in 0..m {
            for j in 0..n {
                let abs: f64 = (0..k)
                    .map(|t| (a[i * k + t] * b[t * n + j]).abs() as f64)
                    .sum();
                let err = (c16[i * n + j] - c32[i * n + j]).abs() as f64;
                assert!(
                    err <= abs / 128.0 + 1e-5,
                    "({i}, {j}): {err} > {}",
                    abs / 128.0
                );
                worst = worst.max(err / abs);
            }
        }
        // And not the f32 result: the operands were rounded.
        assert!(
            worst > 1e-6,
            "bf16 path gave f32 results (worst rel {worst})"
        );
    }

    /// No kernel's bits depend on the rayon thread count.
    #[test]
    fn bf16_gemm_bits_do_not_depend_on_threads() {
        for kernel in [
            Bf16Kernel::Amx,
            Bf16Kernel::Avx512Bf16,
            Bf16Kernel::Emulated,
        ] {
            threads_case(kernel);
        }
    }

    fn threads_case(kernel: Bf16Kernel) {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (m, n, k) = (200, 96, 96);
        let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut c = vec![0f32; m * n];
            pool.install(|| matmul_bf16_with(kernel, m, n, k, &a, Op::N, &b, Op::T, &mut c, false));
            c
        };
        let one = run(1);
        assert!(one
            .iter()
            .zip(run(3))
            .all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
