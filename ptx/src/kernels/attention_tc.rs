//! Fused multi-head attention forward on tensor cores (flash-style): `out = softmax(q k^T /
//! sqrt(hd)) v` per (image, head) in one kernel, the `T x T` scores never leaving registers.
//! Layout as core's `attention_forward` (`qkv[B, T, 3 D]`, bf16 here; `out[B, T, D]` f32);
//! no key mask. Also writes `lse[B, H, T]`, each query row's `ln Σ_j exp(s_ij)` of the scaled
//! scores (what a backward needs to rebuild `P`).
//!
//! Grid `(ceil(T / 64), B H)`, [`ATT_BLOCK`] threads: each of the 4 warps owns 16 query rows.
//! The block stages its 64 query rows once, then for each tile of 64 keys stages K and V
//! (`cp.async` where a 16-byte chunk is in bounds and aligned, element-wise with zero padding
//! otherwise), computes `S = Q K^T` with `mma.sync` (f32), folds it into the running row max
//! `m`, sum `l` and output `O` (online softmax in f32; the 4 lanes that share a row agree
//! through `shfl.xor`), rounds `P = exp(S - m)` to bf16 straight from the accumulator
//! registers into A fragments (the m16n8 accumulator layout of two key tiles is the m16k16 A
//! layout) and adds `P V` on tensor cores. Head size: a multiple of 16, at most 64.
use crate::block::{Block, CpAsync, MmaIn, Shared, Shfl};
use crate::elem::Bf16;
use crate::math as m;

/// Threads per block (4 warps x 16 query rows).
pub const ATT_BLOCK: u32 = 128;
/// Query rows and keys per tile.
pub const ATT_TILE: usize = 64;
/// Largest head size.
pub const ATT_MAX_HD: usize = 64;
/// Words per staged row (64 + 8 bf16).
pub(crate) const RS: usize = (ATT_MAX_HD + 8) / 2;
pub(crate) const TILE_WORDS: usize = ATT_TILE * RS;
/// Shared memory: Q, K, V tiles.
pub const SMEM_ATT_WORDS: usize = 3 * TILE_WORDS;
const Q_OFF: usize = 0;
const K_OFF: usize = TILE_WORDS;
const V_OFF: usize = 2 * TILE_WORDS;

#[derive(Clone, Copy)]
pub struct AttState {
    /// Q fragments of the warp's 16 rows, per 16 columns of the head.
    q: [[u32; 4]; ATT_MAX_HD / 16],
    /// Scores of the 16 rows x 64 keys (8 n-tiles).
    s: [[f32; 4]; ATT_TILE / 8],
    /// Output accumulators, per 8 columns of the head.
    o: [[f32; 4]; ATT_MAX_HD / 8],
    /// Running max of rows `g` and `g + 8` (this lane's two rows), and this lane's share of
    /// their running sums.
    mx: [f32; 2],
    l: [f32; 2],
    /// Scratch: 4 ldmatrix registers, a bf16 P fragment, a shuffled value.
    r: [u32; 4],
    p: [u32; 4],
    x: f32,
}

/// Stages rows `t0 .. t0 + 64` (`< t`) of one `hd`-wide head block of `qkv` (column `col`)
/// into shared words from `dst`; this thread's chunks.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn stage_rows<S: Shared>(
    sm: &S,
    th: u32,
    qkv: &[Bf16],
    base: usize,
    row: usize,
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
        let src = base + (t0 + r) * row + col + c;
        if t0 + r < t && (qkv.as_ptr().wrapping_add(src) as usize).is_multiple_of(16) {
            sm.cp_async(w, &qkv[src..src + 8], CpAsync::Cg16);
        } else {
            let ok = t0 + r < t;
            for j in 0..4 {
                let h = |e: usize| if ok { qkv[src + e].0 as u32 } else { 0 };
                sm.st_bits(w + j, h(2 * j) | h(2 * j + 1) << 16);
            }
        }
        ch += ATT_BLOCK as usize;
    }
}

pub(crate) fn pack_bf16(lo: f32, hi: f32) -> u32 {
    Bf16::from_f32(lo).0 as u32 | (Bf16::from_f32(hi).0 as u32) << 16
}

/// Row max / sum over the 4 lanes that hold one row (lanes `4 g .. 4 g + 4`).
#[inline(always)]
fn quad_reduce<B: Block>(b: &mut B, st: &mut B::Local<AttState>, i: usize, max: bool) {
    for mask in [1u32, 2] {
        b.shfl(
            st,
            Shfl::Xor,
            |s| if max { s.mx[i] } else { s.l[i] }.to_bits(),
            |_, _| mask,
            |s, v| s.x = f32::from_bits(v),
        );
        b.each(st, |_, s, _| {
            if max {
                s.mx[i] = if s.x > s.mx[i] { s.x } else { s.mx[i] };
            } else {
                s.l[i] += s.x;
            }
        });
    }
}

/// One block: 64 query rows of one (image, head).
#[allow(clippy::too_many_arguments)]
pub fn attention_tc_forward<B: Block>(
    b: &mut B,
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[Bf16],
    bsz: usize,
    t: usize,
    d: usize,
    heads: usize,
) {
    let dm = b.dims();
    let hd = d / heads;
    let (q0, z) = (dm.bid[0] as usize * ATT_TILE, dm.bid[1] as usize);
    let (bi, h) = (z / heads, z % heads);
    // Head sizes the fragments do not cover leave `out` untouched (the host refuses them).
    if bi >= bsz || hd == 0 || !hd.is_multiple_of(16) || hd > ATT_MAX_HD || hd * heads != d {
        return;
    }
    let row = 3 * d;
    let base = bi * t * row;
    let scale = 1.0 / m::sqrt(hd as f32);
    let (nk, nd) = (hd / 16, hd / 8);
    let mut st = b.local(AttState {
        q: [[0; 4]; ATT_MAX_HD / 16],
        s: [[0.0; 4]; ATT_TILE / 8],
        o: [[0.0; 4]; ATT_MAX_HD / 8],
        mx: [f32::NEG_INFINITY; 2],
        l: [0.0; 2],
        r: [0; 4],
        p: [0; 4],
        x: 0.0,
    });
    b.each0(|th, sm| {
        stage_rows(sm, th, qkv, base, row, h * hd, q0, t, hd, Q_OFF);
        sm.cp_async_commit();
        sm.cp_async_wait::<0>();
    });
    b.sync();
    // Q fragments, once: lane 8 i + r addresses row r + 8 (i % 2), column 8 (i / 2).
    for kk in 0..nk {
        b.ldmatrix(
            &mut st,
            false,
            |th, _| {
                let (w, l) = (th as usize / 32, th as usize % 32);
                let (i, r) = (l / 8, l % 8);
                Q_OFF + (w * 16 + r + 8 * (i % 2)) * RS + (kk * 16 + 8 * (i / 2)) / 2
            },
            |s| &mut s.q[kk],
        );
    }
    for k0 in (0..t).step_by(ATT_TILE) {
        b.each0(|th, sm| {
            stage_rows(sm, th, qkv, base, row, d + h * hd, k0, t, hd, K_OFF);
            stage_rows(sm, th, qkv, base, row, 2 * d + h * hd, k0, t, hd, V_OFF);
            sm.cp_async_commit();
            sm.cp_async_wait::<0>();
        });
        b.sync();
        // S = Q K^T: K stored [key][dim] is B's "col" layout (no transpose).
        b.each(&mut st, |_, s, _| s.s = [[0.0; 4]; ATT_TILE / 8]);
        for kk in 0..nk {
            for p in 0..ATT_TILE / 16 {
                b.ldmatrix(
                    &mut st,
                    false,
                    |th, _| {
                        let l = th as usize % 32;
                        let (i, r) = (l / 8, l % 8);
                        K_OFF + (p * 16 + r + 8 * (i / 2)) * RS + (kk * 16 + 8 * (i % 2)) / 2
                    },
                    |s| &mut s.r,
                );
                for half in 0..2 {
                    b.mma_m16n8k16(
                        &mut st,
                        MmaIn::Bf16,
                        |s| s.q[kk],
                        |s| [s.r[2 * half], s.r[2 * half + 1]],
                        |s| &mut s.s[2 * p + half],
                    );
                }
            }
        }
        // Scale, hide keys past T, new row max.
        b.each(&mut st, |th, s, _| {
            let tig = (th % 4) as usize;
            for (nt, f) in s.s.iter_mut().enumerate() {
                for (e, v) in f.iter_mut().enumerate() {
                    let key = k0 + nt * 8 + 2 * tig + (e & 1);
                    *v = if key < t {
                        *v * scale
                    } else {
                        f32::NEG_INFINITY
                    };
                }
            }
            // The old max, for the rescale below (`r` is free until the next ldmatrix).
            s.r[0] = s.mx[0].to_bits();
            s.r[1] = s.mx[1].to_bits();
            for i in 0..2 {
                for f in &s.s {
                    for e in 0..2 {
                        let v = f[2 * i + e];
                        if v > s.mx[i] {
                            s.mx[i] = v;
                        }
                    }
                }
            }
        });
        quad_reduce(b, &mut st, 0, true);
        quad_reduce(b, &mut st, 1, true);
        // Rescale O and l by exp(m_old - m_new); P = exp(S - m_new).
        b.each(&mut st, |_, s, _| {
            for i in 0..2 {
                let old = f32::from_bits(s.r[i]);
                let corr = if old == f32::NEG_INFINITY {
                    0.0
                } else {
                    m::exp(old - s.mx[i])
                };
                s.l[i] *= corr;
                for f in s.o.iter_mut() {
                    f[2 * i] *= corr;
                    f[2 * i + 1] *= corr;
                }
                for f in s.s.iter_mut() {
                    for e in 0..2 {
                        let v = &mut f[2 * i + e];
                        *v = if *v == f32::NEG_INFINITY {
                            0.0
                        } else {
                            m::exp(*v - s.mx[i])
                        };
                    }
                }
            }
        });
        // O += P V, 16 keys at a time; l sums the bf16-rounded P actually multiplied.
        for kk in 0..ATT_TILE / 16 {
            b.each(&mut st, |_, s, _| {
                let (a, c) = (s.s[2 * kk], s.s[2 * kk + 1]);
                s.p = [
                    pack_bf16(a[0], a[1]),
                    pack_bf16(a[2], a[3]),
                    pack_bf16(c[0], c[1]),
                    pack_bf16(c[2], c[3]),
                ];
                for (j, &w) in s.p.iter().enumerate() {
                    let lo = Bf16(w as u16).to_f32();
                    let hi = Bf16((w >> 16) as u16).to_f32();
                    s.l[j % 2] += lo + hi;
                }
            });
            for p in 0..nd / 2 {
                // V stored [key][dim] is B transposed: ldmatrix.trans.
                b.ldmatrix(
                    &mut st,
                    true,
                    |th, _| {
                        let l = th as usize % 32;
                        let (i, r) = (l / 8, l % 8);
                        V_OFF + (kk * 16 + r + 8 * (i % 2)) * RS + (p * 16 + 8 * (i / 2)) / 2
                    },
                    |s| &mut s.r,
                );
                for half in 0..2 {
                    b.mma_m16n8k16(
                        &mut st,
                        MmaIn::Bf16,
                        |s| s.p,
                        |s| [s.r[2 * half], s.r[2 * half + 1]],
                        |s| &mut s.o[2 * p + half],
                    );
                }
            }
        }
        b.sync();
    }
    quad_reduce(b, &mut st, 0, false);
    quad_reduce(b, &mut st, 1, false);
    b.each(&mut st, |th, s, _| {
        let (w, lane) = ((th / 32) as usize, th % 32);
        let (g, tig) = ((lane / 4) as usize, (lane % 4) as usize);
        for i in 0..2 {
            let q = q0 + w * 16 + g + 8 * i;
            if q >= t {
                continue;
            }
            let inv = 1.0 / s.l[i];
            for (nt, f) in s.o.iter().enumerate().take(nd) {
                let col = h * hd + nt * 8 + 2 * tig;
                let o = (bi * t + q) * d + col;
                out[o] = f[2 * i] * inv;
                out[o + 1] = f[2 * i + 1] * inv;
            }
            if tig == 0 {
                lse[(bi * heads + h) * t + q] = s.mx[i] + m::ln(s.l[i]);
            }
        }
    });
}
