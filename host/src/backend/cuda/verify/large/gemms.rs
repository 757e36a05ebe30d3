//! The GEMMs of the training step at production shapes, in the exact forms the step launches
//! them (`net.rs`, `step.rs`): a linear layer's input gradient (`dx = dy w`, "nn") and weight
//! gradient (`dw += dy^T x`, "tn" with beta 1), the head's backward GEMMs over K = 65536, and
//! the six batched, strided attention GEMMs (`Q K^T`, `P V`; `dO V^T`, `P^T dO`, `dS K`,
//! `dS^T Q`). Sampled entries: the first and last rows and columns of the first and the last
//! batch, which lie in the corner blocks of each grid.
use anyhow::Result;

use super::{ends, L};
use crate::backend::cuda::device::{Buf, Device};
use crate::backend::cuda::ops::Gemm;

/// One operand: the whole buffer (host copy) and where the GEMM's view of it starts.
struct Operand {
    data: Vec<f32>,
    offset: usize,
}

/// A random operand of `len` elements whose view starts at `offset`. For a batched GEMM
/// (`outer > 1`, the attention heads of `outer` images) only the first and the last outer
/// batch's `stride` elements are drawn, the rest stays zero: the sampled batches read nothing
/// else, and drawing ~60 M values per operand would dominate the simulator test.
fn operand<D: Device>(
    l: &mut L<'_, D>,
    len: usize,
    offset: usize,
    outer: usize,
    stride: usize,
) -> Result<(Operand, Buf<f32>)> {
    if outer <= 1 {
        let data = l.rv(len, -1.0, 1.0);
        let buf = l.up(&data)?;
        return Ok((Operand { data, offset }, buf));
    }
    let mut data = vec![0f32; len];
    let buf = l.gpu.alloc::<f32>(len)?;
    for zo in [0, outer - 1] {
        let s = offset + zo * stride;
        let e = (s + stride).min(len);
        let v = l.rv(e - s, -1.0, 1.0);
        data[s..e].copy_from_slice(&v);
        l.gpu.upload(buf.sub(s, e - s), &v)?;
    }
    Ok((Operand { data, offset }, buf))
}

/// `op(A)[z][i, t]` of batch `z` (`(z / inner, z % inner)`) as the kernel reads it.
fn a_at(g: &Gemm, a: &Operand, z: usize, i: usize, t: usize) -> f64 {
    let base = a.offset + (z / g.inner) * g.sa[0] + (z % g.inner) * g.sa[1];
    let ix = if g.ta { t * g.lda + i } else { i * g.lda + t };
    a.data[base + ix] as f64
}

/// `op(B)[z][t, j]`.
fn b_at(g: &Gemm, b: &Operand, z: usize, t: usize, j: usize) -> f64 {
    let base = b.offset + (z / g.inner) * g.sb[0] + (z % g.inner) * g.sb[1];
    let ix = if g.tb { j * g.ldb + t } else { t * g.ldb + j };
    b.data[base + ix] as f64
}

/// The element of C that `(z, i, j)` is.
fn c_index(g: &Gemm, c_offset: usize, z: usize, i: usize, j: usize) -> usize {
    c_offset + (z / g.inner) * g.sc[0] + (z % g.inner) * g.sc[1] + i * g.ldc + j
}

/// A GEMM `g` on random operands of the given total lengths (the views start at the given
/// offsets, as `qkv.from(d)` does), sampled entries of C against an f64 reference of
/// `alpha op(A) op(B) + beta C`. With `beta = 0` the sampled entries of C are poisoned (NaN);
/// with `beta = 1` they hold random values the result must add to.
#[allow(clippy::too_many_arguments)]
fn gemm_case<D: Device>(
    l: &mut L<'_, D>,
    what: &str,
    g: Gemm,
    (a_len, a_off): (usize, usize),
    (b_len, b_off): (usize, usize),
    (c_len, c_off): (usize, usize),
) -> Result<()> {
    let batches = g.outer * g.inner;
    let zs: Vec<usize> = ends(batches, 1);
    let (rows, cols) = (ends(g.m, 2), ends(g.n, 2));
    let (a, da) = operand(l, a_len, a_off, g.outer, g.sa[0])?;
    let (b, db) = operand(l, b_len, b_off, g.outer, g.sb[0])?;
    let mut at = Vec::new();
    for &z in &zs {
        for &i in &rows {
            for &j in &cols {
                at.push(c_index(&g, c_off, z, i, j));
            }
        }
    }
    let runs: Vec<(usize, usize)> = at.iter().map(|&e| (e, 1)).collect();
    let c0: Vec<f32> = if g.beta == 0.0 {
        Vec::new()
    } else {
        l.rv(at.len(), -1.0, 1.0)
    };
    let dc = if g.beta == 0.0 {
        l.out_at(c_len, &runs)?
    } else {
        let dc = l.gpu.alloc::<f32>(c_len)?;
        for (&e, &v) in at.iter().zip(&c0) {
            l.gpu.upload(dc.sub(e, 1), &[v])?;
        }
        dc
    };
    l.gpu
        .gemm(&g, dc.from(c_off), da.from(a_off), db.from(b_off), None)?;
    let got = l.get_at(dc, &runs)?;
    let mut want = Vec::with_capacity(got.len());
    for &z in &zs {
        for &i in &rows {
            for &j in &cols {
                let acc: f64 = (0..g.k)
                    .map(|t| a_at(&g, &a, z, i, t) * b_at(&g, &b, z, t, j))
                    .sum();
                let prev = c0.get(want.len()).map_or(0.0, |&v| v as f64);
                want.push(g.alpha as f64 * acc + g.beta as f64 * prev);
            }
        }
    }
    let kernel = match (g.ta, g.tb) {
        (false, false) => "gemm_nn_f32",
        (false, true) => "gemm_nt_f32",
        _ => "gemm_tn_f32",
    };
    let batch = if batches > 1 {
        format!(" x {batches} batches")
    } else {
        String::new()
    };
    // f32 sums of k products of values in (-1, 1): |err| ~ sqrt(k) eps.
    l.check(
        kernel,
        format!("{what} {}x{}x{}{batch}", g.m, g.n, g.k),
        &got,
        &want,
        (1e-5, 2e-5 * (g.k as f64).sqrt() / 8.0),
    );
    Ok(())
}

/// A linear layer `y[rows, d_out] = x[rows, d_in] w^T`: its input gradient `dx = dy w` ("nn").
pub(super) fn linear_dx<D: Device>(
    l: &mut L<'_, D>,
    what: &str,
    rows: usize,
    d_in: usize,
    d_out: usize,
) -> Result<()> {
    gemm_case(
        l,
        &format!("{what} dx"),
        Gemm::plain(false, false, rows, d_in, d_out),
        (rows * d_out, 0),
        (d_out * d_in, 0),
        (rows * d_in, 0),
    )
}

/// The weight gradient of the same layer, `dw += dy^T x` ("tn", beta 1): K is every token of
/// the batch (25,216), so each corner block walks all of them.
pub(super) fn linear_dw<D: Device>(
    l: &mut L<'_, D>,
    what: &str,
    rows: usize,
    d_in: usize,
    d_out: usize,
) -> Result<()> {
    gemm_case(
        l,
        &format!("{what} dw"),
        Gemm::plain(true, false, d_out, d_in, rows).beta(1.0),
        (rows * d_out, 0),
        (rows * d_in, 0),
        (d_out * d_in, 0),
    )
}

/// The head's backward GEMMs over the prototypes (`step.rs`): `dy[ns, p] = ddots[ns, K]
/// mu[K, p]` ("nn") and `dmu[K, p] = ddots^T y` ("tn").
pub(super) fn head_backward<D: Device>(
    l: &mut L<'_, D>,
    ns: usize,
    k: usize,
    p: usize,
) -> Result<()> {
    gemm_case(
        l,
        "head dy",
        Gemm::plain(false, false, ns, p, k),
        (ns * k, 0),
        (k * p, 0),
        (ns * p, 0),
    )?;
    gemm_case(
        l,
        "head dmu",
        Gemm::plain(true, false, k, p, ns),
        (ns * k, 0),
        (ns * p, 0),
        (k * p, 0),
    )
}

/// The six attention GEMMs of `net.rs` for `n` images of `t` tokens, width `d`, `h` heads:
/// operands are `qkv[n, t, 3d]` (Q, K, V at column offsets 0, d, 2d), `att[n, h, t, t]`,
/// `out[n, t, d]`, each (image, head) one batch.
pub(super) fn attention<D: Device>(
    l: &mut L<'_, D>,
    n: usize,
    t: usize,
    d: usize,
    h: usize,
) -> Result<()> {
    let hd = d / h;
    let scale = 1.0 / (hd as f32).sqrt();
    let (qkv_s, att_s, out_s) = ([t * 3 * d, hd], [h * t * t, t * t], [t * d, hd]);
    let (qkv, att, out) = (n * t * 3 * d, n * h * t * t, n * t * d);
    let head = |ta, tb, m, nn, k| Gemm {
        outer: n,
        inner: h,
        ..Gemm::plain(ta, tb, m, nn, k)
    };
    // S = scale Q K^T
    let g = Gemm {
        lda: 3 * d,
        ldb: 3 * d,
        ldc: t,
        sa: qkv_s,
        sb: qkv_s,
        sc: att_s,
        alpha: scale,
        ..head(false, true, t, t, hd)
    };
    gemm_case(l, "attn S=QK^T", g, (qkv, 0), (qkv, d), (att, 0))?;
    // O = P V
    let g = Gemm {
        lda: t,
        ldb: 3 * d,
        ldc: d,
        sa: att_s,
        sb: qkv_s,
        sc: out_s,
        ..head(false, false, t, hd, t)
    };
    gemm_case(l, "attn O=PV", g, (att, 0), (qkv, 2 * d), (out, 0))?;
    // dP = dO V^T
    let g = Gemm {
        lda: d,
        ldb: 3 * d,
        ldc: t,
        sa: out_s,
        sb: qkv_s,
        sc: att_s,
        ..head(false, true, t, t, hd)
    };
    gemm_case(l, "attn dP=dO V^T", g, (out, 0), (qkv, 2 * d), (att, 0))?;
    // dV = P^T dO
    let g = Gemm {
        lda: t,
        ldb: d,
        ldc: 3 * d,
        sa: att_s,
        sb: out_s,
        sc: qkv_s,
        ..head(true, false, t, hd, t)
    };
    gemm_case(l, "attn dV=P^T dO", g, (att, 0), (out, 0), (qkv, 2 * d))?;
    // dQ = scale dS K
    let g = Gemm {
        lda: t,
        ldb: 3 * d,
        ldc: 3 * d,
        sa: att_s,
        sb: qkv_s,
        sc: qkv_s,
        alpha: scale,
        ..head(false, false, t, hd, t)
    };
    gemm_case(l, "attn dQ=dS K", g, (att, 0), (qkv, d), (qkv, 0))?;
    // dK = scale dS^T Q
    let g = Gemm {
        lda: t,
        ldb: 3 * d,
        ldc: 3 * d,
        sa: att_s,
        sb: qkv_s,
        sc: qkv_s,
        alpha: scale,
        ..head(true, false, t, hd, t)
    };
    gemm_case(l, "attn dK=dS^T Q", g, (att, 0), (qkv, 0), (qkv, d))
}
