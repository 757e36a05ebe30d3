//! Tensor-core GEMM: `C = alpha op(A) op(B) (+ bias) (+ beta C)` with bf16 `A`, `B` and f32
//! accumulate (`mma.sync.m16n8k16`), f32 `C`. The same shapes, transposes and batches as the
//! scalar [`gemm`](super::gemm) (its [`GemmShape`], grid `(ceil(N / 64), ceil(M / 64),
//! batches)`), so either can serve a call.
//!
//! One block of [`TC_BLOCK`] threads (4 warps, 2 x 2, each owning a 32 x 32 piece) computes a
//! 64 x 64 tile of C, stepping through K in slices of [`TC_BK`]. Each slice of `op(A)` and
//! `op(B)` is staged in shared memory in its global orientation (rows along the contiguous
//! dimension, padded by 16 bytes against bank conflicts), in two buffers: while the warps
//! multiply slice `kt`, `cp.async` brings slice `kt + 1` (double buffering). A 16-byte chunk
//! goes through `cp.async` when it lies wholly inside the matrix and is 16-byte aligned;
//! otherwise (edges, odd leading dimensions) its elements are loaded one by one, zero-padded.
//! Fragments come out of shared memory with `ldmatrix` (`.trans` where the stored orientation
//! is the transpose of the fragment's: `A` stored `[k][m]` for "tn", `B` stored `[k][n]` for
//! "nn").
use super::gemm::GemmShape;
use crate::block::{mma_c_index, Block, CpAsync, MmaIn, Shared};
use crate::elem::{Bf16, Elem};

pub const TC_BM: usize = 64;
pub const TC_BN: usize = 64;
pub const TC_BK: usize = 32;
/// Threads per block: 4 warps.
pub const TC_BLOCK: u32 = 128;
/// 32-bit words (two bf16 each) of one staged row along K (`[m][k]`, `[n][k]`): 32 + 8 halves.
const RS_K: usize = (TC_BK + 8) / 2;
/// Words of one staged row along M or N (`[k][m]`, `[k][n]`): 64 + 8 halves.
const RS_MN: usize = (TC_BM + 8) / 2;
/// Words of one staged operand slice (the larger orientation).
const REGION: usize = if TC_BM * RS_K > TC_BK * RS_MN {
    TC_BM * RS_K
} else {
    TC_BK * RS_MN
};
/// Shared memory of the kernel in 32-bit words: 2 buffers x (A, B).
pub const SMEM_TC_WORDS: usize = 4 * REGION;
const _: () = assert!(
    TC_BM == TC_BN && RS_K.is_multiple_of(4) && RS_MN.is_multiple_of(4) && REGION.is_multiple_of(4)
);

/// Per thread: the accumulators of its warp's 2 x 4 mma tiles and the fragments of one k step.
#[derive(Clone, Copy)]
pub struct TcState {
    acc: [[[f32; 4]; 4]; 2],
    a: [[u32; 4]; 2],
    /// `b[p]`: the B fragments of n-tiles `2p` (registers 0, 1) and `2p + 1` (2, 3).
    b: [[u32; 4]; 2],
}

/// One operand slice to stage: `rows x cols` elements of a row-major matrix (`ld`, offset
/// `off`) from `(r0, c0)`, `rmax x cmax` in bounds, into shared words from `dst` with row
/// stride `rs` words.
#[derive(Clone, Copy)]
struct Slice {
    rows: usize,
    cols: usize,
    r0: usize,
    c0: usize,
    rmax: usize,
    cmax: usize,
    ld: usize,
    off: usize,
    rs: usize,
}

/// This thread's share (chunks `t`, `t + 128`, ...) of staging `sl` from `src`.
#[inline(always)]
fn stage<S: Shared>(sm: &S, t: u32, src: &[Bf16], sl: &Slice, dst: usize) {
    let cpr = sl.cols / 8;
    let mut ch = t as usize;
    while ch < sl.rows * cpr {
        let (r, c) = (ch / cpr, (ch % cpr) * 8);
        let (gr, gc) = (sl.r0 + r, sl.c0 + c);
        let valid = if gr < sl.rmax && gc < sl.cmax {
            (sl.cmax - gc).min(8)
        } else {
            0
        };
        let w = dst + r * sl.rs + c / 2;
        let base = sl.off + gr * sl.ld + gc;
        if valid == 8 && (src.as_ptr().wrapping_add(base) as usize).is_multiple_of(16) {
            sm.cp_async(w, &src[base..base + 8], CpAsync::Cg16);
        } else {
            for j in 0..4 {
                let h = |e: usize| if e < valid { src[base + e].0 as u32 } else { 0 };
                sm.st_bits(w + j, h(2 * j) | h(2 * j + 1) << 16);
            }
        }
        ch += TC_BLOCK as usize;
    }
}

/// `C = alpha op(A) op(B) + bias[n] + beta C` for one 64 x 64 tile (`bias` optional, `[N]`).
pub fn gemm_tc<B: Block, EC: Elem, const TA: bool, const TB: bool>(
    b: &mut B,
    c: &mut [EC],
    a: &[Bf16],
    bm: &[Bf16],
    bias: Option<&[f32]>,
    s: &GemmShape,
) {
    let dm = b.dims();
    let (n0, m0) = (dm.bid[0] as usize * TC_BN, dm.bid[1] as usize * TC_BM);
    let (aoff, boff, coff) = {
        let z = dm.bid[2] as usize;
        let inner = s.inner.max(1);
        let (zo, zi) = (z / inner, z % inner);
        (
            zo * s.sa[0] + zi * s.sa[1],
            zo * s.sb[0] + zi * s.sb[1],
            zo * s.sc[0] + zi * s.sc[1],
        )
    };
    // op(A) [M, K]: stored [m][k] (rows along K), or [k][m] when TA.
    let a_slice = |k0: usize| {
        if TA {
            Slice {
                rows: TC_BK,
                cols: TC_BM,
                r0: k0,
                c0: m0,
                rmax: s.k,
                cmax: s.m,
                ld: s.lda,
                off: aoff,
                rs: RS_MN,
            }
        } else {
            Slice {
                rows: TC_BM,
                cols: TC_BK,
                r0: m0,
                c0: k0,
                rmax: s.m,
                cmax: s.k,
                ld: s.lda,
                off: aoff,
                rs: RS_K,
            }
        }
    };
    // op(B) [K, N]: stored [n][k] when TB, else [k][n].
    let b_slice = |k0: usize| {
        if TB {
            Slice {
                rows: TC_BN,
                cols: TC_BK,
                r0: n0,
                c0: k0,
                rmax: s.n,
                cmax: s.k,
                ld: s.ldb,
                off: boff,
                rs: RS_K,
            }
        } else {
            Slice {
                rows: TC_BK,
                cols: TC_BN,
                r0: k0,
                c0: n0,
                rmax: s.k,
                cmax: s.n,
                ld: s.ldb,
                off: boff,
                rs: RS_MN,
            }
        }
    };
    let buf_a = |stage: usize| stage * 2 * REGION;
    let buf_b = |stage: usize| stage * 2 * REGION + REGION;

    let mut st = b.local(TcState {
        acc: [[[0.0; 4]; 4]; 2],
        a: [[0; 4]; 2],
        b: [[0; 4]; 2],
    });
    let ktiles = s.k.div_ceil(TC_BK);
    b.each0(|t, sm| {
        stage(sm, t, a, &a_slice(0), buf_a(0));
        stage(sm, t, bm, &b_slice(0), buf_b(0));
        sm.cp_async_commit();
    });
    for kt in 0..ktiles {
        let cur = kt % 2;
        b.each0(|t, sm| {
            if kt + 1 < ktiles {
                let k1 = (kt + 1) * TC_BK;
                stage(sm, t, a, &a_slice(k1), buf_a(1 - cur));
                stage(sm, t, bm, &b_slice(k1), buf_b(1 - cur));
            }
            sm.cp_async_commit();
            sm.cp_async_wait::<1>();
        });
        b.sync();
        for kk in 0..TC_BK / 16 {
            for mt in 0..2 {
                b.ldmatrix(
                    &mut st,
                    TA,
                    |t, _| {
                        let (wm, l) = ((t as usize % 128) / 64, t as usize % 32);
                        let (i, r) = (l / 8, l % 8);
                        let mrow = wm * 32 + mt * 16;
                        if TA {
                            let (k, m) = (kk * 16 + r + 8 * (i / 2), mrow + 8 * (i % 2));
                            buf_a(cur) + k * RS_MN + m / 2
                        } else {
                            let (m, k) = (mrow + r + 8 * (i % 2), kk * 16 + 8 * (i / 2));
                            buf_a(cur) + m * RS_K + k / 2
                        }
                    },
                    |s| &mut s.a[mt],
                );
            }
            for p in 0..2 {
                b.ldmatrix(
                    &mut st,
                    !TB,
                    |t, _| {
                        let (wn, l) = ((t as usize / 32) % 2, t as usize % 32);
                        let (i, r) = (l / 8, l % 8);
                        let ncol = wn * 32 + p * 16;
                        if TB {
                            let (n, k) = (ncol + r + 8 * (i / 2), kk * 16 + 8 * (i % 2));
                            buf_b(cur) + n * RS_K + k / 2
                        } else {
                            let (k, n) = (kk * 16 + r + 8 * (i % 2), ncol + 8 * (i / 2));
                            buf_b(cur) + k * RS_MN + n / 2
                        }
                    },
                    |s| &mut s.b[p],
                );
            }
            for mt in 0..2 {
                for nt in 0..4 {
                    let (p, h) = (nt / 2, 2 * (nt % 2));
                    b.mma_m16n8k16(
                        &mut st,
                        MmaIn::Bf16,
                        |s| s.a[mt],
                        |s| [s.b[p][h], s.b[p][h + 1]],
                        |s| &mut s.acc[mt][nt],
                    );
                }
            }
        }
        b.sync();
    }
    b.each(&mut st, |t, st, _| {
        let (w, lane) = (t as usize / 32, t % 32);
        let (wm, wn) = (w / 2, w % 2);
        for (mt, row) in st.acc.iter().enumerate() {
            for (nt, frag) in row.iter().enumerate() {
                for (e, &v) in frag.iter().enumerate() {
                    let (r, col) = mma_c_index(lane, e);
                    let (gm, gn) = (m0 + wm * 32 + mt * 16 + r, n0 + wn * 32 + nt * 8 + col);
                    if gm >= s.m || gn >= s.n {
                        continue;
                    }
                    let idx = coff + gm * s.ldc + gn;
                    let mut v = s.alpha * v;
                    if let Some(bias) = bias {
                        v += bias[gn];
                    }
                    if s.beta != 0.0 {
                        v += s.beta * c[idx].ld();
                    }
                    c[idx] = EC::st(v);
                }
            }
        }
    });
}
