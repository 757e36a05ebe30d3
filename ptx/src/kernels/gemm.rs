//! Tiled GEMM with shared memory: `C = alpha op(A) op(B) (+ bias) (+ beta C)`, f32 accumulate.
//!
//! One block of [`GEMM_BLOCK`] threads computes a `BM x BN` tile of C, stepping through K in
//! slices of `BK`: each slice of `op(A)` and `op(B)` is staged in shared memory (zero-padded at
//! the edges, so every M, N, K works), then each thread accumulates a 4 x 4 micro-tile whose
//! rows and columns are strided by 16 (conflict-free shared reads, coalesced stores).
//! Grid: `(ceil(N / 64), ceil(M / 64), batches)`.
//!
//! `op(A)` is `[M, K]`: `A[m, k] = a[m lda + k]`, or `a[k lda + m]` when `TA`; `op(B)` is
//! `[K, N]`: `B[k, n] = b[k ldb + n]`, or `b[n ldb + k]` when `TB`. A linear layer
//! `y = x w^T` is `TB` ("nt"), its input gradient `dx = dy w` is "nn", its weight gradient
//! `dw += dy^T x` is `TA` ("tn", with `beta = 1`). Batches (attention heads) index
//! `z = blockIdx.z` as `(z / inner, z % inner)` with an outer and an inner stride per operand.
use super::SMEM_GEMM_WORDS;
use crate::block::{Block, Lse, Shared};
use crate::elem::Elem;
use crate::math as m;

pub const BM: usize = 64;
pub const BN: usize = 64;
pub const BK: usize = 16;
/// Threads per GEMM block (16 x 16, each with a 4 x 4 micro-tile).
pub const GEMM_BLOCK: u32 = 256;
/// Row stride of a staged slice in shared memory (one word of padding against bank conflicts).
const LD_S: usize = BM + 1;
const B_OFF: usize = BK * LD_S;
const _: () = assert!(2 * BK * LD_S <= SMEM_GEMM_WORDS && BM * 32 <= SMEM_GEMM_WORDS);

/// Sizes, leading dimensions, batch strides and scalars of one GEMM launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    /// Batches per outer index (`H` for attention); 1 for a plain GEMM.
    pub inner: usize,
    /// `[outer, inner]` element strides of A, B, C between batches.
    pub sa: [usize; 2],
    pub sb: [usize; 2],
    pub sc: [usize; 2],
    pub alpha: f32,
    /// 0: C is overwritten (and never read); otherwise `C = ... + beta C`.
    pub beta: f32,
}

impl GemmShape {
    /// A single (unbatched) GEMM with packed leading dimensions for the given transposes.
    pub fn plain(m: usize, n: usize, k: usize, ta: bool, tb: bool) -> GemmShape {
        GemmShape {
            m,
            n,
            k,
            lda: if ta { m } else { k },
            ldb: if tb { k } else { n },
            ldc: n,
            inner: 1,
            sa: [0, 0],
            sb: [0, 0],
            sc: [0, 0],
            alpha: 1.0,
            beta: 0.0,
        }
    }
    /// The launch grid for `batches` batches.
    pub fn grid(&self, batches: usize) -> [u32; 3] {
        [
            self.n.div_ceil(BN) as u32,
            self.m.div_ceil(BM) as u32,
            batches as u32,
        ]
    }
}

type Acc = [[f32; 4]; 4];

/// Element offsets of this block's batch in A, B, C.
#[inline(always)]
fn batch_offsets(z: u32, s: &GemmShape) -> (usize, usize, usize) {
    let z = z as usize;
    let inner = s.inner.max(1);
    let (zo, zi) = (z / inner, z % inner);
    (
        zo * s.sa[0] + zi * s.sa[1],
        zo * s.sb[0] + zi * s.sb[1],
        zo * s.sc[0] + zi * s.sc[1],
    )
}

/// The K loop: returns each thread's 4 x 4 accumulators of the block's C tile.
#[inline(always)]
fn mainloop<B: Block, E: Elem, const TA: bool, const TB: bool>(
    b: &mut B,
    a: &[E],
    bm: &[E],
    s: &GemmShape,
) -> B::Local<Acc> {
    let dm = b.dims();
    let (n0, m0) = (dm.bid[0] as usize * BN, dm.bid[1] as usize * BM);
    let (aoff, boff, _) = batch_offsets(dm.bid[2], s);
    let mut acc = b.local([[0.0f32; 4]; 4]);
    let ktiles = s.k.div_ceil(BK);
    for kt in 0..ktiles {
        let k0 = kt * BK;
        b.each0(|t, sm| {
            for r in 0..(BM * BK / GEMM_BLOCK as usize) {
                let e = t as usize + GEMM_BLOCK as usize * r;
                // Consecutive threads read consecutive addresses of the stored layout.
                let (kk, mm) = if TA {
                    (e / BM, e % BM)
                } else {
                    (e % BK, e / BK)
                };
                let (gm, gk) = (m0 + mm, k0 + kk);
                let v = if gm < s.m && gk < s.k {
                    a[aoff + if TA { gk * s.lda + gm } else { gm * s.lda + gk }].ld()
                } else {
                    0.0
                };
                sm.st(kk * LD_S + mm, v);
                let (kk, nn) = if TB {
                    (e % BK, e / BK)
                } else {
                    (e / BN, e % BN)
                };
                let (gn, gk) = (n0 + nn, k0 + kk);
                let v = if gn < s.n && gk < s.k {
                    bm[boff + if TB { gn * s.ldb + gk } else { gk * s.ldb + gn }].ld()
                } else {
                    0.0
                };
                sm.st(B_OFF + kk * LD_S + nn, v);
            }
        });
        b.sync();
        b.each(&mut acc, |t, acc, sm| {
            let (ty, tx) = (t as usize / 16, t as usize % 16);
            for kk in 0..BK {
                let av: [f32; 4] = core::array::from_fn(|i| sm.ld(kk * LD_S + ty + 16 * i));
                let bv: [f32; 4] = core::array::from_fn(|j| sm.ld(B_OFF + kk * LD_S + tx + 16 * j));
                for i in 0..4 {
                    for j in 0..4 {
                        acc[i][j] = m::fma(av[i], bv[j], acc[i][j]);
                    }
                }
            }
        });
        b.sync();
    }
    acc
}

/// `C = alpha op(A) op(B) + bias[n] + beta C` for one tile (`bias` optional, `[N]`).
pub fn gemm<B: Block, E: Elem, EC: Elem, const TA: bool, const TB: bool>(
    b: &mut B,
    c: &mut [EC],
    a: &[E],
    bm: &[E],
    bias: Option<&[f32]>,
    s: &GemmShape,
) {
    let mut acc = mainloop::<B, E, TA, TB>(b, a, bm, s);
    let dm = b.dims();
    let (n0, m0) = (dm.bid[0] as usize * BN, dm.bid[1] as usize * BM);
    let (_, _, coff) = batch_offsets(dm.bid[2], s);
    b.each(&mut acc, |t, acc, _| {
        let (ty, tx) = (t as usize / 16, t as usize % 16);
        for (i, row) in acc.iter().enumerate() {
            let gm = m0 + ty + 16 * i;
            if gm >= s.m {
                continue;
            }
            for (j, &v) in row.iter().enumerate() {
                let gn = n0 + tx + 16 * j;
                if gn >= s.n {
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
    });
}

/// The student's logit GEMM with the loss's first pass fused into its epilogue:
/// `dots = Y M^T` (`[M, N]`, "nt", stored once) and, for every row and column tile, the online
/// log-sum-exp `(max, sum)` of the logits `scale[n] dots + bias[n]` over the tile's columns,
/// written to `lse_part[(row ntiles + tile) 2 + {0, 1}]` (`ntiles = ceil(N / 64)`). The loss
/// kernel then reads the logit matrix exactly once.
#[allow(clippy::too_many_arguments)]
pub fn gemm_logits<B: Block, E: Elem>(
    b: &mut B,
    dots: &mut [f32],
    lse_part: &mut [f32],
    y: &[E],
    mu: &[E],
    scale: &[f32],
    bias: &[f32],
    m: usize,
    n: usize,
    k: usize,
) {
    let s = GemmShape::plain(m, n, k, false, true);
    let mut acc = mainloop::<B, E, false, true>(b, y, mu, &s);
    let dm = b.dims();
    let (n0, m0) = (dm.bid[0] as usize * BN, dm.bid[1] as usize * BM);
    let ntiles = dm.gdim[0] as usize;
    // Each thread: store its dots, fold its 4 columns of each of its 4 rows into an LSE state,
    // park the states in shared memory ([row][tx] pairs).
    b.each(&mut acc, |t, acc, sm| {
        let (ty, tx) = (t as usize / 16, t as usize % 16);
        for (i, row) in acc.iter().enumerate() {
            let gm = m0 + ty + 16 * i;
            let mut st = Lse::EMPTY;
            for (j, &v) in row.iter().enumerate() {
                let gn = n0 + tx + 16 * j;
                if gm < m && gn < n {
                    dots[gm * n + gn] = v;
                    st.push(scale[gn] * v + bias[gn]);
                }
            }
            let rl = ty + 16 * i;
            sm.st((rl * 16 + tx) * 2, st.m);
            sm.st((rl * 16 + tx) * 2 + 1, st.s);
        }
    });
    b.sync();
    b.each0(|t, sm| {
        let rl = t as usize;
        if rl < BM && m0 + rl < m {
            let mut st = Lse::EMPTY;
            for tx in 0..16 {
                st.merge(Lse {
                    m: sm.ld((rl * 16 + tx) * 2),
                    s: sm.ld((rl * 16 + tx) * 2 + 1),
                });
            }
            let o = ((m0 + rl) * ntiles + dm.bid[0] as usize) * 2;
            lse_part[o] = st.m;
            lse_part[o + 1] = st.s;
        }
    });
}
