//! The f32 GEMMs (`gemm_{nn,nt,tn}_f32`, plain and batched with strided views) against an f64
//! product. Small: below, at and above the 64 x 64 x 16 tile and ragged, every layout, beta 0
//! with a bias into a poisoned C and beta 1 accumulating, and attention-shaped batches. At the
//! production shapes: the exact GEMMs the training step launches (`vit.rs`, `attention.rs`,
//! `head.rs`): a linear layer's forward (`y = x w^T + b`, "nt"), input gradient (`dx = dy w`,
//! "nn") and weight gradient (`dw += dy^T x`, "tn" with beta 1), the six batched attention
//! GEMMs (`Q K^T`, `P V`; `dO V^T`, `P^T dO`, `dS K`, `dS^T Q`) and the head's backward GEMMs
//! over K = 65536, on sampled entries: the first and last rows and columns of the first and the
//! last batch, which lie in the corner blocks of each grid.
use anyhow::Result;

use super::sample::{ends, f64s, first_last};
use super::shapes::LargeShape;
use super::tolerance;
use super::V;
use crate::backend::cuda::attention::AttentionGemms;
use crate::backend::cuda::device::{Buf, Device};
use crate::backend::cuda::ops::Gemm;

pub(super) fn small<D: Device>(v: &mut V<'_, D>) {
    v.case("gemm f32", gemm_f32);
    v.case("gemm batched", gemm_batched);
}

pub(super) fn large<D: Device>(v: &mut V<'_, D>, s: &LargeShape) {
    let (d, tokens) = (s.dim, s.tokens());
    v.case("qkv", |v| linear(v, "qkv", tokens, 3 * d, d));
    v.case("mlp fc1", |v| linear(v, "fc1", tokens, 4 * d, d));
    v.case("mlp fc1 local", |v| {
        linear(v, "fc1 local", s.local_tokens(), 4 * d, d)
    });
    v.case("qkv dx", |v| linear_dx(v, "qkv", tokens, d, 3 * d));
    v.case("qkv dw", |v| linear_dw(v, "qkv", tokens, d, 3 * d));
    v.case("mlp fc1 dx", |v| linear_dx(v, "fc1", tokens, d, 4 * d));
    v.case("mlp fc2 dx", |v| linear_dx(v, "fc2", tokens, 4 * d, d));
    v.case("attention global", |v| {
        attention(v, s.batch * 2, s.global_tokens, d, s.heads)
    });
    v.case("attention local", |v| {
        attention(v, s.batch * s.n_local, s.local_tokens, d, s.heads)
    });
    if s.head {
        v.case("head backward", |v| {
            head_backward(v, s.students(), s.k, s.bottleneck)
        });
    }
}

/// `C = alpha op(A) op(B)` of batch `z`, in f64.
pub(super) fn ref_gemm(a: &[f64], b: &[f64], g: &Gemm, z: (usize, usize)) -> Vec<f64> {
    let (ao, bo) = (z.0 * g.sa[0] + z.1 * g.sa[1], z.0 * g.sb[0] + z.1 * g.sb[1]);
    let mut c = vec![0f64; g.m * g.n];
    for i in 0..g.m {
        for j in 0..g.n {
            let mut acc = 0.0;
            for kk in 0..g.k {
                let av = a[ao + if g.ta { kk * g.lda + i } else { i * g.lda + kk }];
                let bv = b[bo + if g.tb { j * g.ldb + kk } else { kk * g.ldb + j }];
                acc += av * bv;
            }
            c[i * g.n + j] = acc * g.alpha as f64;
        }
    }
    c
}

/// (m, n, k): below, at and above the 64 x 64 x 16 tile, and ragged.
pub(super) const SHAPES: [(usize, usize, usize); 6] = [
    (1, 1, 1),
    (17, 33, 5),
    (64, 64, 16),
    (65, 130, 47),
    (3, 200, 70),
    (100, 7, 129),
];

pub(super) fn layouts() -> [(bool, bool, &'static str); 3] {
    [
        (false, false, "nn"),
        (false, true, "nt"),
        (true, false, "tn"),
    ]
}

fn gemm_f32<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for (ta, tb, tag) in layouts() {
        let name = format!("gemm_{tag}_f32");
        for (m, n, k) in SHAPES {
            let g = Gemm::plain(ta, tb, m, n, k).alpha(0.75);
            let a = v.rv(m * k, -1.0, 1.0);
            let b = v.rv(k * n, -1.0, 1.0);
            let bias = v.rv(n, -1.0, 1.0);
            let want = ref_gemm(&f64s(&a), &f64s(&b), &g, (0, 0));
            let (da, db, dbias) = (v.up(&a)?, v.up(&b)?, v.up(&bias)?);
            // beta 0 with bias into a poisoned C.
            let c = v.out(m * n)?;
            v.gpu.gemm(&g, c, da, db, Some(dbias))?;
            let got = v.get(c)?;
            let w: Vec<f64> = (0..m * n).map(|i| want[i] + bias[i % n] as f64).collect();
            v.check(
                &name,
                format!("{m}x{n}x{k} beta 0 +bias"),
                &got,
                &w,
                tolerance::dot(k),
            );
            // beta 1 accumulates.
            let c0 = v.rv(m * n, -1.0, 1.0);
            let c = v.up(&c0)?;
            v.gpu.gemm(&g.beta(1.0), c, da, db, None)?;
            let got = v.get(c)?;
            let w: Vec<f64> = (0..m * n).map(|i| want[i] + c0[i] as f64).collect();
            v.check(
                &name,
                format!("{m}x{n}x{k} beta 1"),
                &got,
                &w,
                tolerance::dot(k),
            );
        }
    }
    Ok(())
}

/// Attention-shaped batched GEMMs (outer = images, inner = heads) with strided views.
fn gemm_batched<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for (imgs, t, d, heads) in [(2, 5, 12, 3), (2, 17, 32, 2), (1, 70, 24, 4)] {
        let hd = d / heads;
        let qkv = v.rv(imgs * t * 3 * d, -1.0, 1.0);
        let dq = v.up(&qkv)?;
        // S = scale Q K^T per (image, head), the view the attention forward launches (with
        // another scale).
        let g = Gemm {
            alpha: 0.5,
            ..AttentionGemms::new(imgs, t, d, heads).scores
        };
        let s = v.out(imgs * heads * t * t)?;
        v.gpu.gemm(&g, s, dq, dq.from(d), None)?;
        let got = v.get(s)?;
        let q64 = f64s(&qkv);
        let mut want = Vec::new();
        for z0 in 0..imgs {
            for z1 in 0..heads {
                // B (keys) starts d columns into each token row.
                let gb = Gemm {
                    sb: [t * 3 * d, hd],
                    ..g
                };
                let b: Vec<f64> = q64[d..].to_vec();
                let c = ref_gemm(&q64, &b, &gb, (z0, z1));
                want.extend(c);
            }
        }
        v.check(
            "gemm_nt_f32",
            format!("batched {imgs}x{heads} t{t} hd{hd}"),
            &got,
            &want,
            tolerance::dot(hd),
        );
    }
    Ok(())
}

/// `C = A B^T` (a linear layer's forward, `gemm_nt_f32`) at `m x n x k`, sampled rows, all
/// columns of them (the first and last column tiles included).
fn linear<D: Device>(l: &mut V<'_, D>, what: &str, m: usize, n: usize, k: usize) -> Result<()> {
    let a = l.rv(m * k, -1.0, 1.0);
    let w = l.rv(n * k, -1.0, 1.0);
    let bias = l.rv(n, -1.0, 1.0);
    let (rows, cols) = (ends(m, 3), first_last(n, 64));
    let at = V::<D>::cells(&rows, &cols, n);
    let (da, dw, db) = (l.up(&a)?, l.up(&w)?, l.up(&bias)?);
    let c = l.out_at(m * n, &at)?;
    l.gpu
        .gemm(&Gemm::plain(false, true, m, n, k), c, da, dw, Some(db))?;
    let got = l.get_at(c, &at)?;
    let mut want = Vec::with_capacity(got.len());
    for &r in &rows {
        for &j in &cols {
            let acc: f64 = (0..k)
                .map(|t| a[r * k + t] as f64 * w[j * k + t] as f64)
                .sum();
            want.push(acc + bias[j] as f64);
        }
    }
    l.check(
        "gemm_nt_f32",
        format!("{what} {m}x{n}x{k}"),
        &got,
        &want,
        tolerance::dot(k),
    );
    Ok(())
}

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
    l: &mut V<'_, D>,
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
    l: &mut V<'_, D>,
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
    l.check(
        kernel,
        format!("{what} {}x{}x{}{batch}", g.m, g.n, g.k),
        &got,
        &want,
        tolerance::dot(g.k),
    );
    Ok(())
}

/// A linear layer `y[rows, d_out] = x[rows, d_in] w^T`: its input gradient `dx = dy w` ("nn").
fn linear_dx<D: Device>(
    l: &mut V<'_, D>,
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
fn linear_dw<D: Device>(
    l: &mut V<'_, D>,
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
fn head_backward<D: Device>(l: &mut V<'_, D>, ns: usize, k: usize, p: usize) -> Result<()> {
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

/// The six attention GEMMs of the step (`cuda/attention.rs`'s [`AttentionGemms`], the views it
/// launches) for `n` images of `t` tokens, width `d`, `h` heads, on operands of the sizes of
/// `qkv[n, t, 3d]`, `att[n, h, t, t]` and `out[n, t, d]` at the column offsets the step uses.
fn attention<D: Device>(l: &mut V<'_, D>, n: usize, t: usize, d: usize, h: usize) -> Result<()> {
    let g = AttentionGemms::new(n, t, d, h);
    let (qkv, att, out) = (n * t * 3 * d, n * h * t * t, n * t * d);
    gemm_case(l, "attn S=QK^T", g.scores, (qkv, 0), (qkv, d), (att, 0))?;
    gemm_case(l, "attn O=PV", g.out, (att, 0), (qkv, 2 * d), (out, 0))?;
    gemm_case(
        l,
        "attn dP=dO V^T",
        g.d_probs,
        (out, 0),
        (qkv, 2 * d),
        (att, 0),
    )?;
    gemm_case(l, "attn dV=P^T dO", g.d_v, (att, 0), (out, 0), (qkv, 2 * d))?;
    gemm_case(l, "attn dQ=dS K", g.d_q, (att, 0), (qkv, d), (qkv, 0))?;
    gemm_case(l, "attn dK=dS^T Q", g.d_k, (att, 0), (qkv, 0), (qkv, d))
}
