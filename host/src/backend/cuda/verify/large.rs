//! Kernels at production shapes (ViT-S/16 and ViT-B/16, batch 64, 2 global 224-pixel crops and
//! 8 local 96-pixel ones, K = 65536 prototypes; DINO's backbone and head, iBOT's masked-row
//! gather and patch loss), checked on sampled entries: the first and last
//! rows and columns, which lie in the first and the last (partial) blocks and tiles of each grid.
//!
//! On a GPU (`dinovmf verify-kernels --large`) every block runs and only the samples are read
//! back; on the simulator with [`SimOptions::corners`](dinovmf_ptx::sim::SimOptions) only the
//! corner blocks run, which is exactly where the samples are, so `cargo test` covers these
//! shapes in seconds. Inputs are random (never zero); every sampled output range is poisoned
//! (NaN) before its launch, so an entry nothing wrote fails.
use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use dinovmf_core::ops;

use super::{compare, Row};

mod elementwise;
mod gemms;
mod head;
mod rows;
use crate::backend::cuda::device::{Buf, Device, Gpu};
use crate::backend::cuda::launch::head::{gemm_logits_f32, LogitTerms};
use crate::backend::cuda::launch::ibot::{gather_rows, xent_masked, XentMasked};
use crate::backend::cuda::ops::Gemm;

/// One production model and batch.
#[derive(Clone, Copy, Debug)]
pub struct LargeShape {
    pub name: &'static str,
    /// Embedding width and heads.
    pub dim: usize,
    pub heads: usize,
    pub batch: usize,
    /// Tokens of a global crop (`(224/16)^2 + 1`) and a local one (`(96/16)^2 + 1`).
    pub global_tokens: usize,
    pub local_tokens: usize,
    pub n_local: usize,
    /// Prototypes and the head's bottleneck width.
    pub k: usize,
    pub bottleneck: usize,
    /// Masked patch rows of the iBOT student (about 30 % of the global crops' patches).
    pub masked_rows: usize,
    /// Whether the head's loss kernels and backward GEMMs run at this shape: they depend only
    /// on the batch, the crops, K and the bottleneck, which ViT-B/16 shares with ViT-S/16.
    pub head: bool,
}

pub const VIT_S16: LargeShape = LargeShape {
    name: "ViT-S/16",
    dim: 384,
    heads: 6,
    batch: 64,
    global_tokens: 197,
    local_tokens: 37,
    n_local: 8,
    k: 65536,
    bottleneck: 256,
    masked_rows: 7526,
    head: true,
};

pub const VIT_B16: LargeShape = LargeShape {
    name: "ViT-B/16",
    dim: 768,
    heads: 12,
    head: false,
    ..VIT_S16
};

/// Rows (or columns) sampled from `0..n`: the first and the last few.
fn ends(n: usize, each: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..each.min(n)).collect();
    v.extend((n.saturating_sub(each)..n).filter(|i| *i >= each.min(n)));
    v
}

/// The indices `0..n` covered by the first and the last block of `per` items each: the
/// first tile and the last (partial) one.
fn first_last(n: usize, per: usize) -> Vec<usize> {
    let last = n.div_ceil(per).saturating_sub(1) * per;
    let mut v: Vec<usize> = (0..per.min(n)).collect();
    v.extend((last.max(per.min(n))..n).collect::<Vec<_>>());
    v
}

/// Contiguous `(start, len)` runs of the sorted indices `ix`.
fn runs(ix: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &i in ix {
        match out.last_mut() {
            Some((s, l)) if *s + *l == i => *l += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

struct L<'a, D: Device> {
    gpu: &'a mut Gpu<D>,
    rng: ChaCha8Rng,
    rows: Vec<Row>,
}

impl<D: Device> L<'_, D> {
    fn rv(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        super::nonzero_uniform(&mut self.rng, n, lo, hi)
    }
    fn up(&mut self, x: &[f32]) -> Result<Buf<f32>> {
        self.gpu.alloc_from(x)
    }
    /// Entries `(r, c)` for `r` in `rows`, `c` in `cols` of a row-major buffer of width `width`,
    /// as runs of elements.
    fn cells(rows: &[usize], cols: &[usize], width: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for &r in rows {
            out.extend(runs(cols).into_iter().map(|(s, l)| (r * width + s, l)));
        }
        out
    }
    /// A buffer of `len` elements whose sampled `runs` are poisoned (NaN).
    fn out_at(&mut self, len: usize, runs: &[(usize, usize)]) -> Result<Buf<f32>> {
        let b = self.gpu.alloc::<f32>(len)?;
        for &(s, l) in runs {
            self.gpu.upload(b.sub(s, l), &vec![f32::NAN; l])?;
        }
        Ok(b)
    }
    fn get_at(&mut self, b: Buf<f32>, runs: &[(usize, usize)]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for &(s, l) in runs {
            out.extend(self.gpu.to_vec(b.sub(s, l))?);
        }
        Ok(out)
    }
    fn check(&mut self, kernel: &str, size: String, got: &[f32], want: &[f64], tol: (f64, f64)) {
        self.rows
            .push(compare(kernel, &size, got, want, tol.0, tol.1));
    }
}

/// `C = A B^T` (a linear layer's forward, `gemm_nt_f32`) at `m x n x k`, sampled rows, all
/// columns of them (the first and last column tiles included).
fn linear<D: Device>(l: &mut L<'_, D>, what: &str, m: usize, n: usize, k: usize) -> Result<()> {
    let a = l.rv(m * k, -1.0, 1.0);
    let w = l.rv(n * k, -1.0, 1.0);
    let bias = l.rv(n, -1.0, 1.0);
    let (rows, cols) = (ends(m, 3), first_last(n, 64));
    let at = L::<D>::cells(&rows, &cols, n);
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
    // f32 sums of k products of values in (-1, 1): |err| ~ sqrt(k) eps.
    l.check(
        "gemm_nt_f32",
        format!("{what} {m}x{n}x{k}"),
        &got,
        &want,
        (1e-5, 2e-5 * (k as f64).sqrt() / 8.0),
    );
    Ok(())
}

fn layernorm<D: Device>(l: &mut L<'_, D>, n: usize, d: usize) -> Result<()> {
    let x = l.rv(n * d, -2.0, 2.0);
    let gamma = l.rv(d, 0.5, 1.5);
    let beta = l.rv(d, -0.5, 0.5);
    // One warp per row, 4 rows per block: the first and the last block's rows.
    let rows = first_last(n, 4);
    let all: Vec<usize> = (0..d).collect();
    let (at_y, at_r) = (L::<D>::cells(&rows, &all, d), runs(&rows));
    let (dx, dg, db) = (l.up(&x)?, l.up(&gamma)?, l.up(&beta)?);
    let y = l.out_at(n * d, &at_y)?;
    let (mean, rstd) = (l.out_at(n, &at_r)?, l.out_at(n, &at_r)?);
    l.gpu
        .layernorm_forward(y, mean, rstd, dx, dg, db, n, d, 1e-6)?;
    let mut got = l.get_at(y, &at_y)?;
    got.extend(l.get_at(mean, &at_r)?);
    got.extend(l.get_at(rstd, &at_r)?);
    let (mut wy, mut wm, mut wr) = (Vec::new(), Vec::new(), Vec::new());
    for &r in &rows {
        let (mut y1, mut m1, mut r1) = (vec![0f64; d], [0f64], [0f64]);
        let xr: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
        let g64: Vec<f64> = gamma.iter().map(|&v| v as f64).collect();
        let b64: Vec<f64> = beta.iter().map(|&v| v as f64).collect();
        ops::layernorm_forward(&mut y1, &mut m1, &mut r1, &xr, &g64, &b64, 1, d, 1e-6);
        wy.extend(y1);
        wm.push(m1[0]);
        wr.push(r1[0]);
    }
    wy.extend(wm);
    wy.extend(wr);
    l.check(
        "layernorm_forward",
        format!("{n}x{d}"),
        &got,
        &wy,
        (2e-5, 2e-6),
    );
    Ok(())
}

/// Attention probabilities: `softmax(scale s)` over `t` keys for `n_rows` rows.
fn softmax<D: Device>(l: &mut L<'_, D>, n_rows: usize, t: usize, scale: f32) -> Result<()> {
    let s = l.rv(n_rows * t, -4.0, 4.0);
    let rows = first_last(n_rows, 4);
    let all: Vec<usize> = (0..t).collect();
    let at = L::<D>::cells(&rows, &all, t);
    let ds = l.up(&s)?;
    l.gpu.softmax_rows(ds, n_rows, t, scale)?;
    let got = l.get_at(ds, &at)?;
    let mut want = Vec::new();
    for &r in &rows {
        let z: Vec<f64> = s[r * t..(r + 1) * t]
            .iter()
            .map(|&v| v as f64 * scale as f64)
            .collect();
        let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v - mx).exp()).sum();
        want.extend(z.iter().map(|v| (v - mx).exp() / sum));
    }
    l.check(
        "softmax_rows",
        format!("{n_rows}x{t}"),
        &got,
        &want,
        (1e-5, 1e-7),
    );
    Ok(())
}

/// The student logits GEMM at `m x K x bottleneck`: sampled rows of `dots` (every column, so the
/// first and the last 64-column tile) and their per-tile LSE states of `scale dots + bias`.
fn logits<D: Device>(l: &mut L<'_, D>, m: usize, n: usize, k: usize) -> Result<()> {
    let y = l.rv(m * k, -0.2, 0.2);
    let mu = l.rv(n * k, -0.2, 0.2);
    let scale = l.rv(n, 5.0, 15.0);
    let bias = l.rv(n, -1.0, 1.0);
    let ntiles = n.div_ceil(64);
    let (rows, cols) = (ends(m, 3), first_last(n, 64));
    let at = L::<D>::cells(&rows, &cols, n);
    let tiles = [0, 1, 2 * ntiles - 2, 2 * ntiles - 1];
    let at_part = L::<D>::cells(&rows, &tiles, ntiles * 2);
    let (dy, dmu, ds, db) = (l.up(&y)?, l.up(&mu)?, l.up(&scale)?, l.up(&bias)?);
    let dots = l.out_at(m * n, &at)?;
    let part = l.out_at(m * ntiles * 2, &at_part)?;
    gemm_logits_f32(l.gpu, dots, part, dy, dmu, ds, db, (m, n, k))?;
    let got = l.get_at(dots, &at)?;
    let parts = l.get_at(part, &at_part)?;
    let mut want = Vec::new();
    let (mut got_lse, mut want_lse) = (Vec::new(), Vec::new());
    for (ri, &r) in rows.iter().enumerate() {
        let dot = |j: usize| -> f64 {
            (0..k)
                .map(|t| y[r * k + t] as f64 * mu[j * k + t] as f64)
                .sum()
        };
        for (ti, tile) in [0, ntiles - 1].into_iter().enumerate() {
            let z: Vec<f64> = (tile * 64..((tile + 1) * 64).min(n))
                .map(|j| scale[j] as f64 * dot(j) + bias[j] as f64)
                .collect();
            let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            want_lse.push(mx + z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln());
            let o = (ri * 2 + ti) * 2;
            got_lse.push(parts[o] + parts[o + 1].ln());
        }
        want.extend(cols.iter().map(|&j| dot(j)));
    }
    l.check(
        "gemm_logits_f32",
        format!("dots {m}x{n}x{k}"),
        &got,
        &want,
        (1e-4, 1e-5),
    );
    l.check(
        "gemm_logits_f32",
        format!("tile lse {m}x{n}"),
        &got_lse,
        &want_lse,
        (1e-5, 1e-5),
    );
    Ok(())
}

/// iBOT: the masked student rows gathered from the patch tokens (`gather_rows`), at the global
/// crops' patch count and the iBOT mask's typical number of masked rows.
fn gather<D: Device>(l: &mut L<'_, D>, n: usize, d: usize, src_rows: usize) -> Result<()> {
    let src = l.rv(src_rows * d, -1.0, 1.0);
    // Every index a real row (the last one included), with a few past the end (zero rows).
    let idx: Vec<u64> = (0..n)
        .map(|i| match i {
            0 => 0,
            1 => (src_rows - 1) as u64,
            2 => src_rows as u64,
            _ => l.rng.gen_range(0..src_rows as u64),
        })
        .collect();
    // One element per thread: the first and the last block's elements.
    let elems = first_last(n * d, 256);
    let at = runs(&elems);
    let dsrc = l.up(&src)?;
    let didx = l.gpu.alloc_from(&idx)?;
    let out = l.out_at(n * d, &at)?;
    gather_rows(l.gpu, out, dsrc, didx, (n, d, src_rows))?;
    let got = l.get_at(out, &at)?;
    let want: Vec<f64> = elems
        .iter()
        .map(|&e| {
            let s = idx[e / d] as usize;
            if s < src_rows {
                src[s * d + e % d] as f64
            } else {
                0.0
            }
        })
        .collect();
    l.check(
        "gather_rows",
        format!("{n}x{d} of {src_rows}"),
        &got,
        &want,
        (0.0, 0.0),
    );
    Ok(())
}

/// iBOT's patch loss (`xent_masked`) at its production shape: `m` masked student rows against
/// `t_rows` teacher patch rows of K columns (`t_rows * K` = 1.6e9 at batch 64: a 6.6 GB target
/// buffer; on the simulator it is lazily zeroed and only the corner blocks' columns are
/// written). Checks the gradient on sampled rows of the first and last 256-column block, `dr`
/// on those columns (sums over every row) and the two blocks' loss parts.
fn patch_loss<D: Device>(l: &mut L<'_, D>, m: usize, t_rows: usize, k: usize) -> Result<()> {
    let cols = first_last(k, 256);
    let col_runs = runs(&cols);
    let nc = cols.len();
    let (tau, grad_scale) = (0.1f32, 0.5f32);
    let scale = l.rv(k, 5.0, 15.0);
    let bias = l.rv(k, -1.0, 1.0);
    let dbias = l.rv(k, -0.5, 0.5);
    let dr0 = l.rv(k, -1.0, 1.0);
    let lse = l.rv(m, 7.0, 9.0);
    let w = l.rv(m, 0.1, 1.0);
    let tgt: Vec<u64> = (0..m)
        .map(|i| match i {
            0 => 0,
            1 => (t_rows - 1) as u64,
            _ => l.rng.gen_range(0..t_rows as u64),
        })
        .collect();
    // Only the sampled columns of each row hold data (the rest is never read by these blocks).
    let dots_c = l.rv(m * nc, -0.2, 0.2);
    let pt_c = l.rv(t_rows * nc, 0.0, 1.0);
    let dots = l.gpu.alloc::<f32>(m * k)?;
    let p_t = l.gpu.alloc::<f32>(t_rows * k)?;
    for (rows, buf, vals) in [(m, dots, &dots_c), (t_rows, p_t, &pt_c)] {
        for r in 0..rows {
            let mut o = 0;
            for &(s, len) in &col_runs {
                l.gpu
                    .upload(buf.sub(r * k + s, len), &vals[r * nc + o..r * nc + o + len])?;
                o += len;
            }
        }
    }
    let (ds, db, ddb, dlse, dw) = (
        l.up(&scale)?,
        l.up(&bias)?,
        l.up(&dbias)?,
        l.up(&lse)?,
        l.up(&w)?,
    );
    let dr = l.up(&dr0)?;
    let dtgt = l.gpu.alloc_from(&tgt)?;
    let nb = k.div_ceil(256);
    let part = l.out_at(nb, &[(0, 1), (nb - 1, 1)])?;
    let args = XentMasked {
        dots,
        dr: Some(dr),
        loss_part: part,
        lse: dlse,
        p_t,
        tgt: dtgt,
        w: dw,
        terms: LogitTerms {
            scale: ds,
            bias: db,
            dbias: ddb,
        },
        tau,
        grad_scale,
        m,
        k,
        t_rows,
    };
    xent_masked(l.gpu, &args)?;
    let rows = ends(m, 3);
    let got = l.get_at(dots, &L::<D>::cells(&rows, &cols, k))?;
    let got_dr = l.get_at(dr, &col_runs)?;
    let got_part = l.get_at(part, &[(0, 1), (nb - 1, 1)])?;
    // f64 reference of the kernel's documented formula.
    let term = |i: usize, ci: usize| -> (f64, f64, f64) {
        let j = cols[ci];
        let tv = pt_c[tgt[i] as usize * nc + ci] as f64;
        let d = dots_c[i * nc + ci] as f64;
        let nls = lse[i] as f64 - (scale[j] as f64 * d + bias[j] as f64);
        let dl = ((-nls).exp() - tv) * w[i] as f64 * grad_scale as f64;
        (
            dl * scale[j] as f64,
            dl * (d / tau as f64 + dbias[j] as f64),
            w[i] as f64 * tv * nls,
        )
    };
    let mut want = Vec::new();
    for &i in &rows {
        want.extend((0..nc).map(|ci| term(i, ci).0));
    }
    let mut want_dr: Vec<f64> = cols.iter().map(|&j| dr0[j] as f64).collect();
    let mut want_part = [0f64; 2];
    for i in 0..m {
        for ci in 0..nc {
            let (_, r, loss) = term(i, ci);
            want_dr[ci] += r;
            want_part[usize::from(cols[ci] >= 256)] += loss;
        }
    }
    let size = format!("{m}x{k} of {t_rows} rows");
    l.check(
        "xent_masked",
        format!("dL/d dots {size}"),
        &got,
        &want,
        (1e-5, 1e-6),
    );
    l.check(
        "xent_masked",
        format!("dr {size}"),
        &got_dr,
        &want_dr,
        (1e-4, 1e-2),
    );
    l.check(
        "xent_masked",
        format!("loss parts {size}"),
        &got_part,
        &want_part,
        (1e-4, 1e-3),
    );
    Ok(())
}

/// The case table at one shape: `(what, case)`; a case that fails to launch becomes a failed
/// row naming the error (a size or grid check, say).
pub fn run_large<D: Device>(gpu: &mut Gpu<D>, s: &LargeShape, seed: u64) -> Vec<Row> {
    let mut l = L {
        gpu,
        rng: ChaCha8Rng::seed_from_u64(seed),
        rows: Vec::new(),
    };
    let s = *s;
    let tokens = s.batch * 2 * s.global_tokens;
    let local_tokens = s.batch * s.n_local * s.local_tokens;
    let head_dim = s.dim / s.heads;
    let students = s.batch * (2 + s.n_local);
    type Case<'b, D> = Box<dyn Fn(&mut L<'b, D>) -> Result<()>>;
    let d = s.dim;
    let cases: Vec<(String, Case<'_, D>)> = vec![
        (
            "qkv".into(),
            Box::new(move |l| linear(l, "qkv", tokens, 3 * d, d)),
        ),
        (
            "mlp fc1".into(),
            Box::new(move |l| linear(l, "fc1", tokens, 4 * d, d)),
        ),
        (
            "mlp fc1 local".into(),
            Box::new(move |l| linear(l, "fc1 local", local_tokens, 4 * d, d)),
        ),
        (
            "layernorm".into(),
            Box::new(move |l| layernorm(l, tokens, d)),
        ),
        (
            "attention softmax".into(),
            Box::new(move |l| {
                softmax(
                    l,
                    s.batch * 2 * s.heads * s.global_tokens,
                    s.global_tokens,
                    1.0 / (head_dim as f32).sqrt(),
                )
            }),
        ),
        (
            "logits".into(),
            Box::new(move |l| logits(l, students, s.k, s.bottleneck)),
        ),
        (
            "qkv dx".into(),
            Box::new(move |l| gemms::linear_dx(l, "qkv", tokens, d, 3 * d)),
        ),
        (
            "qkv dw".into(),
            Box::new(move |l| gemms::linear_dw(l, "qkv", tokens, d, 3 * d)),
        ),
        (
            "mlp fc1 dx".into(),
            Box::new(move |l| gemms::linear_dx(l, "fc1", tokens, d, 4 * d)),
        ),
        (
            "mlp fc2 dx".into(),
            Box::new(move |l| gemms::linear_dx(l, "fc2", tokens, 4 * d, d)),
        ),
        (
            "attention global".into(),
            Box::new(move |l| gemms::attention(l, s.batch * 2, s.global_tokens, d, s.heads)),
        ),
        (
            "attention local".into(),
            Box::new(move |l| gemms::attention(l, s.batch * s.n_local, s.local_tokens, d, s.heads)),
        ),
        (
            "attention softmax backward".into(),
            Box::new(move |l| {
                rows::softmax_backward(
                    l,
                    s.batch * 2 * s.heads * s.global_tokens,
                    s.global_tokens,
                    1.0 / (head_dim as f32).sqrt(),
                )
            }),
        ),
        (
            "layernorm backward".into(),
            Box::new(move |l| rows::layernorm_backward(l, tokens, d)),
        ),
        (
            "mlp gelu".into(),
            Box::new(move |l| elementwise::gelu(l, tokens * 4 * d)),
        ),
    ];
    let head_cases: Vec<(String, Case<'_, D>)> = vec![
        (
            "lse_combine".into(),
            Box::new(move |l| head::lse_combine(l, students, s.k.div_ceil(64))),
        ),
        (
            "teacher targets".into(),
            Box::new(move |l| head::teacher(l, s.batch * 2, s.k)),
        ),
        (
            "xent_columns".into(),
            Box::new(move |l| head::xent_columns(l, 2 + s.n_local, s.batch, s.k)),
        ),
        (
            "prototype l2norm".into(),
            Box::new(move |l| elementwise::l2norm(l, "prototypes", s.k, s.bottleneck)),
        ),
        (
            "student l2norm".into(),
            Box::new(move |l| elementwise::l2norm(l, "students", students, s.bottleneck)),
        ),
        (
            "teacher row entropy".into(),
            Box::new(move |l| elementwise::row_entropy(l, s.batch * 2, s.k)),
        ),
        (
            "head backward".into(),
            Box::new(move |l| gemms::head_backward(l, students, s.k, s.bottleneck)),
        ),
    ];
    let ibot_cases: Vec<(String, Case<'_, D>)> = vec![
        (
            "ibot gather".into(),
            Box::new(move |l| gather(l, s.masked_rows, d, s.batch * 2 * (s.global_tokens - 1))),
        ),
        (
            "ibot patch loss".into(),
            Box::new(move |l| {
                patch_loss(l, s.masked_rows, s.batch * 2 * (s.global_tokens - 1), s.k)
            }),
        ),
    ];
    let head_cases = if s.head { head_cases } else { Vec::new() };
    for (what, f) in cases.into_iter().chain(head_cases).chain(ibot_cases) {
        if let Err(e) = l.gpu.dev.bind().and_then(|_| f(&mut l)) {
            l.rows.push(Row {
                kernel: format!("{} {what}", s.name),
                size: "-".into(),
                max_abs: f64::NAN,
                max_rel: f64::NAN,
                rtol: 0.0,
                atol: 0.0,
                ok: false,
                note: format!("{e:#}"),
            });
        }
    }
    for r in &mut l.rows {
        if !r.kernel.starts_with(s.name) {
            r.size = format!("{} {}", s.name, r.size);
        }
    }
    l.rows
}
