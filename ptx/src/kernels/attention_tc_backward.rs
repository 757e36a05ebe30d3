//! Fused multi-head attention backward on tensor cores (flash-style), the partner of
//! [`attention_tc_forward`](super::attention_tc::attention_tc_forward): the scores are rebuilt
//! per 64 x 64 tile from `q`, `k` and the forward's row log-sum-exp `lse`, so the `T x T`
//! probabilities never reach global memory. Three kernels, none with atomics (every output
//! element is written by exactly one thread, so a run is deterministic):
//!
//! 1. [`attention_tc_delta`]: `delta[b, h, i] = Σ_c dout[i, c] out[i, c]` over the head's
//!    columns (`= Σ_j P_ij dP_ij`, the softmax backward's row term), f32, `dout` rounded to
//!    bf16 first as the tensor-core products see it.
//! 2. [`attention_tc_backward_kv`]: one block per 64 keys of one (image, head), each warp 16
//!    keys; it walks the query tiles and accumulates `dV = P^T dO` and `dK = scale dS^T Q` in
//!    registers, with `P^T = exp(scale K Q^T - lse)` and `dS^T = P^T ∘ (V dO^T - delta)`.
//! 3. [`attention_tc_backward_q`]: one block per 64 queries, each warp 16 queries; it walks
//!    the key tiles and accumulates `dQ = scale dS K` (the scores recomputed once more: the
//!    price of writing `dQ` without atomics).
//!
//! Layout as core's `attention_backward`: `qkv[B, T, 3 D]` (bf16 here), `dout[B, T, D]` f32,
//! `lse`, `delta` `[B, H, T]` f32, `dqkv[B, T, 3 D]` f32 (kernel 2 writes the `k` and `v`
//! columns, kernel 3 the `q` columns; together every element). Products on tensor cores
//! (`mma.sync` bf16, f32 accumulate); exponentials, softmax statistics and `dS` in f32;
//! `P`, `dS` and `dout` rounded to bf16 as operands. Head size a multiple of 16, at most 64.
//!
//! Shared memory ([`SMEM_ATT_BWD_WORDS`], 56.3 KB: above the 48 KB a launch gets without
//! `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`, so it is dynamic): the block's own
//! two tiles (loaded once) and two buffers of the two streamed tiles, the next one copied
//! (`cp.async`) while the current one is used.
use super::attention_tc::{pack_bf16, stage_rows, ATT_BLOCK, ATT_MAX_HD, ATT_TILE, RS, TILE_WORDS};
use super::for_each_elem;
use crate::block::{Block, MmaIn, Shared};
use crate::elem::Bf16;
use crate::math as m;

const NK: usize = ATT_MAX_HD / 16;
const ND: usize = ATT_MAX_HD / 8;
/// The block's own two tiles, then two buffers of each of the two streamed tiles, then (kernel
/// 2) two buffers of the query tile's `lse` and `delta`.
const OWN_A: usize = 0;
const OWN_B: usize = TILE_WORDS;
const STREAM_A: usize = 2 * TILE_WORDS;
const STREAM_B: usize = 4 * TILE_WORDS;
const LSE_OFF: usize = 6 * TILE_WORDS;
const DELTA_OFF: usize = 6 * TILE_WORDS + 2 * ATT_TILE;
/// Shared memory of both backward kernels, in 32-bit words.
pub const SMEM_ATT_BWD_WORDS: usize = 6 * TILE_WORDS + 4 * ATT_TILE;

/// `delta[b, h, i] = Σ_c bf16(dout[b, i, h hd + c]) out[b, i, h hd + c]`, one thread per
/// `(b, h, i)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_tc_delta<B: Block>(
    b: &mut B,
    delta: &mut [f32],
    out: &[f32],
    dout: &[f32],
    bsz: usize,
    t: usize,
    d: usize,
    heads: usize,
) {
    if heads == 0 || t == 0 {
        return;
    }
    let hd = d / heads;
    for_each_elem(b, bsz * heads * t, |i| {
        let (z, q) = (i / t, i % t);
        let (bi, h) = (z / heads, z % heads);
        let o = (bi * t + q) * d + h * hd;
        let mut acc = 0.0f32;
        for c in 0..hd {
            acc = m::fma(Bf16::from_f32(dout[o + c]).to_f32(), out[o + c], acc);
        }
        delta[i] = acc;
    });
}

/// Stages rows `t0 .. t0 + 64` (`< t`) of the head's columns `col ..` of the f32 `x` (row
/// stride `stride`, first row at `base`) as bf16 into shared words from `dst`, zero past `t`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn stage_rows_f32<S: Shared>(
    sm: &S,
    th: u32,
    x: &[f32],
    base: usize,
    stride: usize,
    col: usize,
    t0: usize,
    t: usize,
    hd: usize,
    dst: usize,
) {
    let cpr = hd / 8;
    let mut ch = th as usize;
    while ch < ATT_TILE * cpr {
        let (r, c) = (ch / cpr, (ch % cpr) * 8);
        let w = dst + r * RS + c / 2;
        let ok = t0 + r < t;
        let src = base + (t0 + r) * stride + col + c;
        for j in 0..4 {
            let h = |e: usize| {
                if ok {
                    Bf16::from_f32(x[src + e]).0 as u32
                } else {
                    0
                }
            };
            sm.st_bits(w + j, h(2 * j) | h(2 * j + 1) << 16);
        }
        ch += ATT_BLOCK as usize;
    }
}

/// Stages `x[off + t0 .. off + t0 + 64]` (zero past `t`) into words `dst ..`.
#[inline(always)]
fn stage_vec<S: Shared>(sm: &S, th: u32, x: &[f32], off: usize, t0: usize, t: usize, dst: usize) {
    let mut r = th as usize;
    while r < ATT_TILE {
        sm.st(dst + r, if t0 + r < t { x[off + t0 + r] } else { 0.0 });
        r += ATT_BLOCK as usize;
    }
}

/// What both kernels read, and where one (image, head) lies in it.
struct Src<'a> {
    qkv: &'a [Bf16],
    dout: &'a [f32],
    t: usize,
    d: usize,
    hd: usize,
    h: usize,
    /// First element of the image in `qkv` and in `dout`.
    base: usize,
    dbase: usize,
}

impl Src<'_> {
    /// The `which` (0 q, 1 k, 2 v) rows `t0 ..` of the head.
    #[inline(always)]
    fn stage_qkv<S: Shared>(&self, sm: &S, th: u32, which: usize, t0: usize, dst: usize) {
        let col = which * self.d + self.h * self.hd;
        stage_rows(
            sm,
            th,
            self.qkv,
            self.base,
            3 * self.d,
            col,
            t0,
            self.t,
            self.hd,
            dst,
        );
    }
    /// `dout` rows `t0 ..` of the head, as bf16.
    #[inline(always)]
    fn stage_dout<S: Shared>(&self, sm: &S, th: u32, t0: usize, dst: usize) {
        let col = self.h * self.hd;
        stage_rows_f32(
            sm, th, self.dout, self.dbase, self.d, col, t0, self.t, self.hd, dst,
        );
    }
}

/// Loads the A fragments (16 rows of the warp x 16 columns, per 16 columns of the head) of the
/// tile at word `off` into `frag(state)[kk]`.
#[inline(always)]
fn load_a_frags<B: Block>(
    b: &mut B,
    st: &mut B::Local<BwdState>,
    off: usize,
    nk: usize,
    frag: impl Fn(&mut BwdState) -> &mut [[u32; 4]; NK] + Copy,
) {
    for kk in 0..nk {
        b.ldmatrix(
            st,
            false,
            |th, _| {
                let (w, l) = (th as usize / 32, th as usize % 32);
                let (i, r) = (l / 8, l % 8);
                off + (w * 16 + r + 8 * (i % 2)) * RS + (kk * 16 + 8 * (i / 2)) / 2
            },
            move |s| &mut frag(s)[kk],
        );
    }
}

/// `acc[16 x 64] = A B^T` where `A` is the warp's 16 rows (`a(state, kk)`: the A fragment of
/// head columns `16 kk ..`) and `B` the 64-row tile at word `off` (rows as stored are the
/// "col" operand: no transpose).
#[inline(always)]
fn mma_rows_by_tile<B: Block>(
    b: &mut B,
    st: &mut B::Local<BwdState>,
    off: usize,
    nk: usize,
    a: impl Fn(&BwdState, usize) -> [u32; 4] + Copy,
    acc: impl Fn(&mut BwdState, usize) -> &mut [f32; 4] + Copy,
) {
    for kk in 0..nk {
        for p in 0..ATT_TILE / 16 {
            b.ldmatrix(
                st,
                false,
                |th, _| {
                    let l = th as usize % 32;
                    let (i, rr) = (l / 8, l % 8);
                    off + (p * 16 + rr + 8 * (i / 2)) * RS + (kk * 16 + 8 * (i % 2)) / 2
                },
                |s| &mut s.r,
            );
            for half in 0..2 {
                b.mma_m16n8k16(
                    st,
                    MmaIn::Bf16,
                    move |s| a(s, kk),
                    |s| [s.r[2 * half], s.r[2 * half + 1]],
                    move |s| acc(s, 2 * p + half),
                );
            }
        }
    }
}

/// `acc[16 x hd] += X T` where `X` is the state's `s` (16 x 64, f32 in the accumulator
/// layout), rounded to bf16 into A fragments, and `T` the 64-row tile at word `off` (its rows
/// are the reduction index: `ldmatrix.trans`).
#[inline(always)]
fn mma_scores_by_tile<B: Block>(
    b: &mut B,
    st: &mut B::Local<BwdState>,
    off: usize,
    nd: usize,
    acc: impl Fn(&mut BwdState, usize) -> &mut [f32; 4] + Copy,
) {
    for kk in 0..ATT_TILE / 16 {
        b.each(st, |_, s, _| {
            let (a, c) = (s.s[2 * kk], s.s[2 * kk + 1]);
            s.p = [
                pack_bf16(a[0], a[1]),
                pack_bf16(a[2], a[3]),
                pack_bf16(c[0], c[1]),
                pack_bf16(c[2], c[3]),
            ];
        });
        for p in 0..nd / 2 {
            b.ldmatrix(
                st,
                true,
                |th, _| {
                    let l = th as usize % 32;
                    let (i, rr) = (l / 8, l % 8);
                    off + (kk * 16 + rr + 8 * (i % 2)) * RS + (p * 16 + 8 * (i / 2)) / 2
                },
                |s| &mut s.r,
            );
            for half in 0..2 {
                b.mma_m16n8k16(
                    st,
                    MmaIn::Bf16,
                    |s| s.p,
                    |s| [s.r[2 * half], s.r[2 * half + 1]],
                    move |s| acc(s, 2 * p + half),
                );
            }
        }
    }
}

/// Per-thread state of both backward kernels.
#[derive(Clone, Copy)]
pub struct BwdState {
    /// The warp's own 16 rows as A fragments: `k` and `v` (kernel 2), `q` and `dout` (3).
    a: [[u32; 4]; NK],
    b: [[u32; 4]; NK],
    /// Scores -> probabilities -> dS of the 16 own rows x 64 streamed rows.
    s: [[f32; 4]; ATT_TILE / 8],
    dp: [[f32; 4]; ATT_TILE / 8],
    /// Gradient accumulators of the own rows, per 8 columns of the head.
    g0: [[f32; 4]; ND],
    g1: [[f32; 4]; ND],
    /// This lane's two rows' `lse` and `delta` (kernel 3).
    lse: [f32; 2],
    delta: [f32; 2],
    r: [u32; 4],
    p: [u32; 4],
}

const ZERO: BwdState = BwdState {
    a: [[0; 4]; NK],
    b: [[0; 4]; NK],
    s: [[0.0; 4]; ATT_TILE / 8],
    dp: [[0.0; 4]; ATT_TILE / 8],
    g0: [[0.0; 4]; ND],
    g1: [[0.0; 4]; ND],
    lse: [0.0; 2],
    delta: [0.0; 2],
    r: [0; 4],
    p: [0; 4],
};

/// The block's (image, head, first own row) and the shape checks; `None` leaves the outputs
/// untouched (the host refuses such shapes).
fn block_of<B: Block>(b: &B, bsz: usize, d: usize, heads: usize) -> Option<(usize, usize, usize)> {
    let dm = b.dims();
    if heads == 0 {
        return None;
    }
    let hd = d / heads;
    let (r0, z) = (dm.bid[0] as usize * ATT_TILE, dm.bid[1] as usize);
    let (bi, h) = (z / heads, z % heads);
    let ok = bi < bsz && hd != 0 && hd.is_multiple_of(16) && hd <= ATT_MAX_HD && hd * heads == d;
    ok.then_some((bi, h, r0))
}

/// Kernel 2: `dK`, `dV` of 64 keys of one (image, head). Grid `(ceil(T / 64), B H)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_tc_backward_kv<B: Block>(
    b: &mut B,
    dqkv: &mut [f32],
    qkv: &[Bf16],
    dout: &[f32],
    lse: &[f32],
    delta: &[f32],
    bsz: usize,
    t: usize,
    d: usize,
    heads: usize,
) {
    let Some((bi, h, k0)) = block_of(b, bsz, d, heads) else {
        return;
    };
    let hd = d / heads;
    let (nk, nd) = (hd / 16, hd / 8);
    let scale = 1.0 / m::sqrt(hd as f32);
    let src = Src {
        qkv,
        dout,
        t,
        d,
        hd,
        h,
        base: bi * t * 3 * d,
        dbase: bi * t * d,
    };
    let vec_off = (bi * heads + h) * t;
    let stage_queries = |sm: &B::Smem, th: u32, q0: usize, buf: usize| {
        src.stage_qkv(sm, th, 0, q0, STREAM_A + buf * TILE_WORDS);
        src.stage_dout(sm, th, q0, STREAM_B + buf * TILE_WORDS);
        stage_vec(sm, th, lse, vec_off, q0, t, LSE_OFF + buf * ATT_TILE);
        stage_vec(sm, th, delta, vec_off, q0, t, DELTA_OFF + buf * ATT_TILE);
    };
    let mut st = b.local(ZERO);
    b.each0(|th, sm| {
        src.stage_qkv(sm, th, 1, k0, OWN_A);
        src.stage_qkv(sm, th, 2, k0, OWN_B);
        stage_queries(sm, th, 0, 0);
        sm.cp_async_commit();
    });
    for (it, q0) in (0..t).step_by(ATT_TILE).enumerate() {
        let buf = it % 2;
        let next = q0 + ATT_TILE < t;
        b.each0(|th, sm| {
            if next {
                stage_queries(sm, th, q0 + ATT_TILE, 1 - buf);
                sm.cp_async_commit();
                sm.cp_async_wait::<1>();
            } else {
                sm.cp_async_wait::<0>();
            }
        });
        b.sync();
        if it == 0 {
            load_a_frags(b, &mut st, OWN_A, nk, |s| &mut s.a);
            load_a_frags(b, &mut st, OWN_B, nk, |s| &mut s.b);
        }
        let (qt, dot) = (STREAM_A + buf * TILE_WORDS, STREAM_B + buf * TILE_WORDS);
        let (lo, dlo) = (LSE_OFF + buf * ATT_TILE, DELTA_OFF + buf * ATT_TILE);
        // S^T = K Q^T (own keys x the tile's queries).
        b.each(&mut st, |_, s, _| s.s = [[0.0; 4]; ATT_TILE / 8]);
        mma_rows_by_tile(b, &mut st, qt, nk, |s, kk| s.a[kk], |s, n| &mut s.s[n]);
        // P^T = exp(scale S^T - lse[query]); zero outside the T x T block.
        b.each(&mut st, |th, s, sm| {
            let (w, lane) = ((th / 32) as usize, (th % 32) as usize);
            let (g, tig) = (lane / 4, lane % 4);
            for (nt, f) in s.s.iter_mut().enumerate() {
                for (e, v) in f.iter_mut().enumerate() {
                    let key = k0 + w * 16 + g + 8 * (e / 2);
                    let qc = nt * 8 + 2 * tig + (e & 1);
                    *v = if key < t && q0 + qc < t {
                        m::exp(*v * scale - sm.ld(lo + qc))
                    } else {
                        0.0
                    };
                }
            }
        });
        // dV += P^T dO.
        mma_scores_by_tile(b, &mut st, dot, nd, |s, n| &mut s.g1[n]);
        // dP^T = V dO^T.
        b.each(&mut st, |_, s, _| s.dp = [[0.0; 4]; ATT_TILE / 8]);
        mma_rows_by_tile(b, &mut st, dot, nk, |s, kk| s.b[kk], |s, n| &mut s.dp[n]);
        // dS^T = P^T (dP^T - delta[query]).
        b.each(&mut st, |th, s, sm| {
            let tig = (th % 4) as usize;
            for nt in 0..ATT_TILE / 8 {
                for e in 0..4 {
                    let qc = nt * 8 + 2 * tig + (e & 1);
                    s.s[nt][e] *= s.dp[nt][e] - sm.ld(dlo + qc);
                }
            }
        });
        // dK += dS^T Q (scaled at the end).
        mma_scores_by_tile(b, &mut st, qt, nd, |s, n| &mut s.g0[n]);
        b.sync();
    }
    b.each(&mut st, |th, s, _| {
        let (w, lane) = ((th / 32) as usize, (th % 32) as usize);
        let (g, tig) = (lane / 4, lane % 4);
        for i in 0..2 {
            let key = k0 + w * 16 + g + 8 * i;
            if key >= t {
                continue;
            }
            for nt in 0..nd {
                let o = src.base + key * 3 * d + d + h * hd + nt * 8 + 2 * tig;
                dqkv[o] = s.g0[nt][2 * i] * scale;
                dqkv[o + 1] = s.g0[nt][2 * i + 1] * scale;
                dqkv[o + d] = s.g1[nt][2 * i];
                dqkv[o + d + 1] = s.g1[nt][2 * i + 1];
            }
        }
    });
}

/// Kernel 3: `dQ` of 64 queries of one (image, head). Grid `(ceil(T / 64), B H)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_tc_backward_q<B: Block>(
    b: &mut B,
    dqkv: &mut [f32],
    qkv: &[Bf16],
    dout: &[f32],
    lse: &[f32],
    delta: &[f32],
    bsz: usize,
    t: usize,
    d: usize,
    heads: usize,
) {
    let Some((bi, h, q0)) = block_of(b, bsz, d, heads) else {
        return;
    };
    let hd = d / heads;
    let (nk, nd) = (hd / 16, hd / 8);
    let scale = 1.0 / m::sqrt(hd as f32);
    let src = Src {
        qkv,
        dout,
        t,
        d,
        hd,
        h,
        base: bi * t * 3 * d,
        dbase: bi * t * d,
    };
    let vec_off = (bi * heads + h) * t;
    let stage_keys = |sm: &B::Smem, th: u32, k0: usize, buf: usize| {
        src.stage_qkv(sm, th, 1, k0, STREAM_A + buf * TILE_WORDS);
        src.stage_qkv(sm, th, 2, k0, STREAM_B + buf * TILE_WORDS);
    };
    let mut st = b.local(ZERO);
    b.each(&mut st, |th, s, sm| {
        src.stage_qkv(sm, th, 0, q0, OWN_A);
        src.stage_dout(sm, th, q0, OWN_B);
        stage_keys(sm, th, 0, 0);
        sm.cp_async_commit();
        let (w, g) = ((th / 32) as usize, (th % 32 / 4) as usize);
        for i in 0..2 {
            let q = q0 + w * 16 + g + 8 * i;
            if q < t {
                s.lse[i] = lse[vec_off + q];
                s.delta[i] = delta[vec_off + q];
            }
        }
    });
    for (it, k0) in (0..t).step_by(ATT_TILE).enumerate() {
        let buf = it % 2;
        let next = k0 + ATT_TILE < t;
        b.each0(|th, sm| {
            if next {
                stage_keys(sm, th, k0 + ATT_TILE, 1 - buf);
                sm.cp_async_commit();
                sm.cp_async_wait::<1>();
            } else {
                sm.cp_async_wait::<0>();
            }
        });
        b.sync();
        if it == 0 {
            load_a_frags(b, &mut st, OWN_A, nk, |s| &mut s.a);
            load_a_frags(b, &mut st, OWN_B, nk, |s| &mut s.b);
        }
        let (kt, vt) = (STREAM_A + buf * TILE_WORDS, STREAM_B + buf * TILE_WORDS);
        // S = Q K^T.
        b.each(&mut st, |_, s, _| s.s = [[0.0; 4]; ATT_TILE / 8]);
        mma_rows_by_tile(b, &mut st, kt, nk, |s, kk| s.a[kk], |s, n| &mut s.s[n]);
        // dP = dO V^T.
        b.each(&mut st, |_, s, _| s.dp = [[0.0; 4]; ATT_TILE / 8]);
        mma_rows_by_tile(b, &mut st, vt, nk, |s, kk| s.b[kk], |s, n| &mut s.dp[n]);
        // dS = P (dP - delta[row]), P = exp(scale S - lse[row]); zero outside the block.
        b.each(&mut st, |th, s, _| {
            let (w, lane) = ((th / 32) as usize, (th % 32) as usize);
            let (g, tig) = (lane / 4, lane % 4);
            for nt in 0..ATT_TILE / 8 {
                for e in 0..4 {
                    let i = e / 2;
                    let q = q0 + w * 16 + g + 8 * i;
                    let key = k0 + nt * 8 + 2 * tig + (e & 1);
                    s.s[nt][e] = if q < t && key < t {
                        let p = m::exp(s.s[nt][e] * scale - s.lse[i]);
                        p * (s.dp[nt][e] - s.delta[i])
                    } else {
                        0.0
                    };
                }
            }
        });
        // dQ += dS K (scaled at the end).
        mma_scores_by_tile(b, &mut st, kt, nd, |s, n| &mut s.g0[n]);
        b.sync();
    }
    b.each(&mut st, |th, s, _| {
        let (w, lane) = ((th / 32) as usize, (th % 32) as usize);
        let (g, tig) = (lane / 4, lane % 4);
        for i in 0..2 {
            let q = q0 + w * 16 + g + 8 * i;
            if q >= t {
                continue;
            }
            for nt in 0..nd {
                let o = src.base + q * 3 * d + h * hd + nt * 8 + 2 * tig;
                dqkv[o] = s.g0[nt][2 * i] * scale;
                dqkv[o + 1] = s.g0[nt][2 * i + 1] * scale;
            }
        }
    });
}
