//! Every kernel of `dinovmf.ptx` against `dinovmf-core` (or an f64 restatement of the kernel's
//! documented formula where core has no per-kernel function): random inputs (never zeros),
//! outputs poisoned (NaN) first, several sizes including ones that are not multiples of the
//! block or tile. This is the one table of kernel checks: one case function per kernel group
//! (its sizes, inputs, launches through the typed launchers the step calls, `launch/` and
//! `ops.rs`, reference and tolerances),
//! run on a GPU by `dinovmf verify-kernels` and on the simulator by `cargo test -p dinovmf
//! --features gpu-sim` (`host/tests/gpu_sim.rs`); `large.rs` holds the production shapes.
use anyhow::{anyhow, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use dinovmf_core::centering::{center_update, Centering, CENTER_FLOOR};
use dinovmf_core::collapse::entropy;
use dinovmf_core::logits::{branch_terms_forward, LogitKind};
use dinovmf_core::loss::{n_pairs, n_teacher_views};
use dinovmf_core::ops;
use dinovmf_core::optim::{adamw_step, ema_update, AdamW};
use dinovmf_core::vmf::BesselApprox;

use super::device::{Buf, Device, Elem, Gpu};
use super::launch::head::{
    branch_terms as branch_terms_launch, center_update as center_update_launch, gemm_logits_f32,
    lse_combine, row_entropy, teacher_stat, teacher_targets, xent_columns as xent_columns_launch,
    BranchDims, LogitTerms, TeacherIn, XentColumns,
};
use super::launch::optim::{adamw, ema, AdamwBufs};
use super::launch::reduce::{clip_coef, scale_segments};
use super::launch::tokens::{
    patchify, pos_resize_backward, pos_resize_forward, tokens_backward_params,
    tokens_backward_patch, tokens_forward, ImageDims, ResizeDims,
};
use super::ops::{Gemm, Segments};

mod attention_tc;
mod gemm_tc;
mod ibot;
pub mod large;
mod loss;
mod sinkhorn;

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Row {
    pub kernel: String,
    pub size: String,
    pub max_abs: f64,
    /// `max |err| / max(|want|, atol)`.
    pub max_rel: f64,
    pub rtol: f64,
    pub atol: f64,
    pub ok: bool,
    /// Why it failed, when it did not just miss the tolerance.
    pub note: String,
}

/// `|got - want| <= atol + rtol |want|` everywhere, no NaN, equal lengths.
pub fn compare(kernel: &str, size: &str, got: &[f32], want: &[f64], rtol: f64, atol: f64) -> Row {
    let mut row = Row {
        kernel: kernel.to_string(),
        size: size.to_string(),
        max_abs: 0.0,
        max_rel: 0.0,
        rtol,
        atol,
        ok: got.len() == want.len(),
        note: String::new(),
    };
    if !row.ok {
        row.note = format!("{} values, expected {}", got.len(), want.len());
    }
    let mut nan = 0;
    for (&g, &w) in got.iter().zip(want) {
        let g = g as f64;
        if g.is_nan() != w.is_nan() {
            nan += 1;
            row.ok = false;
            continue;
        }
        if g == w || (g.is_nan() && w.is_nan()) {
            continue;
        }
        let err = (g - w).abs();
        row.max_abs = row.max_abs.max(err);
        row.max_rel = row
            .max_rel
            .max(err / w.abs().max(atol).max(f64::MIN_POSITIVE));
        if err.is_nan() || err > atol + rtol * w.abs() {
            row.ok = false;
        }
    }
    if nan > 0 {
        row.note = format!("{nan} NaN (unwritten or invalid) values");
    }
    row
}

/// The table (one row per kernel and size).
pub fn print_rows(rows: &[Row], out: &mut dyn std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<26} {:<22} {:>11} {:>11} {:>18} {:>4}",
        "kernel", "size", "max abs err", "max rel err", "tolerance", "ok"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:<26} {:<22} {:>11.3e} {:>11.3e} {:>18} {:>4}{}",
            r.kernel,
            r.size,
            r.max_abs,
            r.max_rel,
            format!("rtol {:.0e} atol {:.0e}", r.rtol, r.atol),
            if r.ok { "ok" } else { "FAIL" },
            if r.note.is_empty() {
                String::new()
            } else {
                format!("  ({})", r.note)
            }
        )?;
    }
    Ok(())
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// `n` values uniform in `[lo, hi)`, nudged away from exact zero (inputs are never zeros).
fn nonzero_uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let x = rng.gen_range(lo..hi);
            if x == 0.0 {
                0.125
            } else {
                x
            }
        })
        .collect()
}

/// The verification run: a device, a random stream, the rows so far.
struct V<'a, D: Device> {
    gpu: &'a mut Gpu<D>,
    rng: ChaCha8Rng,
    rows: Vec<Row>,
}

impl<D: Device> V<'_, D> {
    fn rv(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        nonzero_uniform(&mut self.rng, n, lo, hi)
    }
    fn up<T: Elem>(&mut self, x: &[T]) -> Result<Buf<T>> {
        self.gpu.alloc_from(x)
    }
    /// A poisoned (NaN) output buffer.
    fn out(&mut self, n: usize) -> Result<Buf<f32>> {
        self.gpu.alloc(n)
    }
    fn get<T: Elem>(&mut self, b: Buf<T>) -> Result<Vec<T>> {
        self.gpu.to_vec(b)
    }
    fn check(
        &mut self,
        kernel: &str,
        size: String,
        got: &[f32],
        want: &[f64],
        rtol: f64,
        atol: f64,
    ) {
        self.rows
            .push(compare(kernel, &size, got, want, rtol, atol));
    }
}

/// Runs every check on `gpu`; a case whose launch fails becomes a failed row (a trapped kernel
/// leaves a CUDA context unusable, so later cases then fail too, each saying why).
pub fn run_all<D: Device>(gpu: &mut Gpu<D>, seed: u64) -> Vec<Row> {
    let mut v = V {
        gpu,
        rng: ChaCha8Rng::seed_from_u64(seed),
        rows: Vec::new(),
    };
    type Case<'a, D> = (&'static str, fn(&mut V<'a, D>) -> Result<()>);
    let cases: Vec<Case<'_, D>> = vec![
        ("gemm f32", gemm_f32),
        ("gemm batched", gemm_batched),
        ("elementwise", elementwise),
        ("tokens", tokens),
        ("layernorm", layernorm),
        ("softmax", softmax),
        ("l2norm", l2norm),
        ("branch_terms", branch_terms),
        ("logits", logits),
        ("teacher", teacher),
        ("xent_columns", xent_columns),
        ("cls loss chain", loss::cls_loss_chain),
        ("ibot", ibot::ibot),
        ("sinkhorn", sinkhorn::sinkhorn),
        ("optimiser", optimiser),
        ("reductions", reductions),
        ("gemm tensor cores bf16", gemm_tc::gemm_tc),
        ("attention tensor cores bf16", attention_tc::attention_tc),
    ];
    for (what, f) in cases {
        if let Err(e) = v.gpu.dev.bind().and_then(|_| f(&mut v)) {
            v.rows.push(Row {
                kernel: what.to_string(),
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
    v.rows
}

/// `C = alpha op(A) op(B)` of batch `z`, in f64.
fn ref_gemm(a: &[f64], b: &[f64], g: &Gemm, z: (usize, usize)) -> Vec<f64> {
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
const SHAPES: [(usize, usize, usize); 6] = [
    (1, 1, 1),
    (17, 33, 5),
    (64, 64, 16),
    (65, 130, 47),
    (3, 200, 70),
    (100, 7, 129),
];

fn layouts() -> [(bool, bool, &'static str); 3] {
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
                1e-5,
                1e-5,
            );
            // beta 1 accumulates.
            let c0 = v.rv(m * n, -1.0, 1.0);
            let c = v.up(&c0)?;
            v.gpu.gemm(&g.beta(1.0), c, da, db, None)?;
            let got = v.get(c)?;
            let w: Vec<f64> = (0..m * n).map(|i| want[i] + c0[i] as f64).collect();
            v.check(&name, format!("{m}x{n}x{k} beta 1"), &got, &w, 1e-5, 1e-5);
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
        // S = scale Q K^T per (image, head), as the attention forward launches it.
        let g = Gemm {
            lda: 3 * d,
            ldb: 3 * d,
            ldc: t,
            outer: imgs,
            inner: heads,
            sa: [t * 3 * d, hd],
            sb: [t * 3 * d, hd],
            sc: [heads * t * t, t * t],
            alpha: 0.5,
            ..Gemm::plain(false, true, t, t, hd)
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
            1e-5,
            1e-5,
        );
    }
    Ok(())
}

const EW_SIZES: [usize; 4] = [1, 255, 256, 1000];

fn elementwise<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for n in EW_SIZES {
        let x = v.rv(n, -4.0, 4.0);
        let dy = v.rv(n, -1.0, 1.0);
        let (dx_, ddy) = (v.up(&x)?, v.up(&dy)?);
        let y = v.out(n)?;
        v.gpu.gelu_forward(y, dx_, n)?;
        let got = v.get(y)?;
        let mut w = vec![0f64; n];
        ops::gelu_forward(&mut w, &f64s(&x));
        v.check("gelu_forward", format!("n {n}"), &got, &w, 1e-6, 1e-7);
        let dx = v.out(n)?;
        v.gpu.gelu_backward(dx, dx_, ddy, n)?;
        let got = v.get(dx)?;
        ops::gelu_backward(&mut w, &f64s(&x), &f64s(&dy));
        v.check("gelu_backward", format!("n {n}"), &got, &w, 1e-6, 1e-7);

        let f = v.rv(n, -2.0, 2.0);
        let df = v.up(&f)?;
        let y = v.out(n)?;
        v.gpu.residual(y, dx_, df, n)?;
        let got = v.get(y)?;
        let w: Vec<f64> = x.iter().zip(&f).map(|(&a, &b)| (a + b) as f64).collect();
        v.check("residual_forward", format!("n {n}"), &got, &w, 0.0, 0.0);

        let acc = v.up(&f)?;
        v.gpu.axpy(acc, dx_, 0.5, n)?;
        let got = v.get(acc)?;
        let w: Vec<f64> = f
            .iter()
            .zip(&x)
            .map(|(&a, &b)| (a + 0.5 * b) as f64)
            .collect();
        v.check("axpy", format!("n {n}"), &got, &w, 0.0, 0.0);

        let z = v.out(n)?;
        v.gpu.fill(z, 0.25)?;
        let got = v.get(z)?;
        v.check("fill", format!("n {n}"), &got, &vec![0.25; n], 0.0, 0.0);
    }
    for (batch, per) in [(1, 7), (3, 100), (5, 256)] {
        let x = v.rv(batch * per, -2.0, 2.0);
        let mask: Vec<f32> = (0..batch).map(|i| (i % 2) as f32).collect();
        let (dx, dm) = (v.up(&x)?, v.up(&mask)?);
        let y = v.out(batch * per)?;
        v.gpu.drop_path(y, dx, dm, 0.8, batch, per)?;
        let got = v.get(y)?;
        let mut w = vec![0f32; batch * per];
        ops::drop_path_forward(&mut w, &x, &mask, 0.8, batch, per);
        v.check(
            "drop_path",
            format!("{batch}x{per}"),
            &got,
            &f64s(&w),
            0.0,
            0.0,
        );
    }
    Ok(())
}

fn tokens<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for (batch, c, hh, ww, p, d) in [
        (1, 1, 4, 4, 2, 5),
        (2, 3, 8, 12, 4, 33),
        (3, 3, 6, 6, 3, 40),
    ] {
        let img = v.rv(batch * c * hh * ww, -1.0, 1.0);
        let n = (hh / p) * (ww / p);
        let k = c * p * p;
        let di = v.up(&img)?;
        let patches = v.out(batch * n * k)?;
        let img_dims = ImageDims {
            n: batch,
            chans: c,
            h: hh,
            w: ww,
            patch: p,
        };
        patchify(v.gpu, patches, di, img_dims)?;
        let got = v.get(patches)?;
        let mut w = vec![0f32; batch * n * k];
        ops::patchify(&mut w, &img, batch, c, hh, ww, p);
        let size = format!("b{batch} c{c} {hh}x{ww} p{p} d{d}");
        v.check("patchify", size.clone(), &got, &f64s(&w), 0.0, 0.0);

        let patch = v.rv(batch * n * d, -1.0, 1.0);
        let cls = v.rv(d, -1.0, 1.0);
        let pos = v.rv((n + 1) * d, -1.0, 1.0);
        let t = n + 1;
        let (dpt, dcl, dpo) = (v.up(&patch)?, v.up(&cls)?, v.up(&pos)?);
        let x = v.out(batch * t * d)?;
        tokens_forward(v.gpu, x, dpt, dcl, dpo, (batch, n, d))?;
        let got = v.get(x)?;
        let mut w = vec![0f32; batch * t * d];
        ops::tokens_forward(&mut w, &patch, &cls, &pos, batch, n, d);
        v.check("tokens_forward", size.clone(), &got, &f64s(&w), 0.0, 0.0);

        let gx = v.rv(batch * t * d, -1.0, 1.0);
        let dgx = v.up(&gx)?;
        let dpatch = v.out(batch * n * d)?;
        let dcls0 = v.rv(d, -1.0, 1.0);
        let dpos0 = v.rv(t * d, -1.0, 1.0);
        let (dcls, dpos) = (v.up(&dcls0)?, v.up(&dpos0)?);
        tokens_backward_patch(v.gpu, dpatch, dgx, (batch, n, d))?;
        tokens_backward_params(v.gpu, dcls, dpos, dgx, (batch, n, d))?;
        let (mut wp, mut wc, mut wpos) = (vec![0f32; batch * n * d], dcls0.clone(), dpos0.clone());
        ops::tokens_backward(&mut wp, &mut wc, &mut wpos, &gx, batch, n, d);
        let got = v.get(dpatch)?;
        v.check(
            "tokens_backward_patch",
            size.clone(),
            &got,
            &f64s(&wp),
            0.0,
            0.0,
        );
        let mut got = v.get(dcls)?;
        got.extend(v.get(dpos)?);
        let mut w = f64s(&wc);
        w.extend(f64s(&wpos));
        v.check("tokens_backward_params", size, &got, &w, 1e-6, 1e-6);
    }
    for (sh, sw, gh, gw, d) in [
        (4, 4, 2, 2, 3),
        (2, 2, 4, 4, 5),
        (7, 5, 3, 6, 40),
        (3, 3, 3, 3, 2),
    ] {
        let src = v.rv(sh * sw * d, -1.0, 1.0);
        let ds = v.up(&src)?;
        let dst = v.out(gh * gw * d)?;
        let dims = ResizeDims {
            src_h: sh,
            src_w: sw,
            dst_h: gh,
            dst_w: gw,
            d,
        };
        pos_resize_forward(v.gpu, dst, ds, dims)?;
        let got = v.get(dst)?;
        let mut w = vec![0f64; gh * gw * d];
        ops::pos_resize_forward(&mut w, &f64s(&src), sh, sw, gh, gw, d);
        let size = format!("{sh}x{sw} -> {gh}x{gw} d{d}");
        v.check("pos_resize_forward", size.clone(), &got, &w, 1e-6, 1e-6);

        let g = v.rv(gh * gw * d, -1.0, 1.0);
        let dsrc0 = v.rv(sh * sw * d, -1.0, 1.0);
        let (dg, dsrc) = (v.up(&g)?, v.up(&dsrc0)?);
        pos_resize_backward(v.gpu, dsrc, dg, dims)?;
        let got = v.get(dsrc)?;
        let mut w = f64s(&dsrc0);
        ops::pos_resize_backward(&mut w, &f64s(&g), sh, sw, gh, gw, d);
        v.check("pos_resize_backward", size, &got, &w, 1e-5, 1e-6);
    }
    Ok(())
}

/// Rows x width of the row kernels (LayerNorm, L2 norm): one element, below, at and above the
/// 32-lane warp and the 128-thread block, and ViT-S's width.
const ROW_SHAPES: [(usize, usize); 9] = [
    (1, 1),
    (1, 7),
    (3, 31),
    (3, 32),
    (5, 33),
    (5, 64),
    (13, 100),
    (9, 384),
    (70, 33),
];

fn layernorm<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for (n, d) in ROW_SHAPES {
        let x = v.rv(n * d, -2.0, 2.0);
        let gamma = v.rv(d, 0.5, 1.5);
        let beta = v.rv(d, -0.5, 0.5);
        let (dx_, dg, db) = (v.up(&x)?, v.up(&gamma)?, v.up(&beta)?);
        let (y, mean, rstd) = (v.out(n * d)?, v.out(n)?, v.out(n)?);
        v.gpu
            .layernorm_forward(y, mean, rstd, dx_, dg, db, n, d, 1e-6)?;
        let mut got = v.get(y)?;
        got.extend(v.get(mean)?);
        got.extend(v.get(rstd)?);
        let (mut wy, mut wm, mut wr) = (vec![0f64; n * d], vec![0f64; n], vec![0f64; n]);
        ops::layernorm_forward(
            &mut wy,
            &mut wm,
            &mut wr,
            &f64s(&x),
            &f64s(&gamma),
            &f64s(&beta),
            n,
            d,
            1e-6,
        );
        let mut w = wy;
        w.extend(&wm);
        w.extend(&wr);
        let size = format!("{n}x{d}");
        v.check("layernorm_forward", size.clone(), &got, &w, 2e-5, 2e-6);

        // Backward from the device's own statistics (as the backbone does).
        let dy = v.rv(n * d, -1.0, 1.0);
        let ddy = v.up(&dy)?;
        let dx = v.out(n * d)?;
        let dgam0 = v.rv(d, -1.0, 1.0);
        let dbet0 = v.rv(d, -1.0, 1.0);
        let (dgam, dbet) = (v.up(&dgam0)?, v.up(&dbet0)?);
        v.gpu
            .layernorm_backward(dx, dgam, dbet, ddy, dx_, mean, rstd, dg, n, d)?;
        let (m32, r32) = (v.get(mean)?, v.get(rstd)?);
        let mut wdx = vec![0f64; n * d];
        let (mut wdg, mut wdb) = (f64s(&dgam0), f64s(&dbet0));
        ops::layernorm_backward(
            &mut wdx,
            &mut wdg,
            &mut wdb,
            &f64s(&dy),
            &f64s(&x),
            &f64s(&m32),
            &f64s(&r32),
            &f64s(&gamma),
            n,
            d,
        );
        let got = v.get(dx)?;
        v.check(
            "layernorm_backward_dx",
            size.clone(),
            &got,
            &wdx,
            1e-4,
            2e-5,
        );
        // dgamma sums dy * xhat (rtol 1e-4), dbeta sums dy alone (rtol 1e-5).
        let got = v.get(dgam)?;
        v.check(
            "layernorm_backward_params",
            format!("{size} dgamma"),
            &got,
            &wdg,
            1e-4,
            2e-5,
        );
        let got = v.get(dbet)?;
        v.check(
            "layernorm_backward_params",
            format!("{size} dbeta"),
            &got,
            &wdb,
            1e-5,
            2e-6,
        );
    }
    Ok(())
}

fn softmax<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for (heads, t) in [(1, 1), (2, 5), (3, 33), (2, 70)] {
        let batch = 2;
        let n_rows = batch * heads * t;
        let s0 = v.rv(n_rows * t, -3.0, 3.0);
        // A key mask per image: the first key always kept, some others masked out.
        let mask: Vec<f32> = (0..batch * t)
            .map(|i| {
                if i % t != 0 && i % 3 == 1 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let (s, dm) = (v.up(&s0)?, v.up(&mask)?);
        let scale = 0.7f32;
        v.gpu
            .softmax_rows_masked(s, Some(dm), n_rows, t, heads * t, scale)?;
        let p = v.get(s)?;
        let mut want = vec![0f64; n_rows * t];
        for r in 0..n_rows {
            let mrow = &mask[(r / (heads * t)) * t..][..t];
            let w = &mut want[r * t..(r + 1) * t];
            for j in 0..t {
                w[j] = scale as f64 * s0[r * t + j] as f64 + mrow[j] as f64;
            }
            ops::softmax_in_place(w);
        }
        let size = format!("{n_rows} rows x {t}");
        v.check("softmax_rows", size.clone(), &p, &want, 1e-5, 1e-7);

        // Backward, unscaled (core's softmax_backward) and with an attention scale.
        let dp0 = v.rv(n_rows * t, -1.0, 1.0);
        for sc in [1.0f32, 0.25] {
            let dp = v.up(&dp0)?;
            v.gpu.softmax_backward_rows(dp, s, n_rows, t, sc)?;
            let got = v.get(dp)?;
            let mut w = vec![0f64; n_rows * t];
            ops::softmax_backward(&mut w, &f64s(&p), &f64s(&dp0), n_rows, t);
            w.iter_mut().for_each(|x| *x *= sc as f64);
            let size = format!("{size} scale {sc}");
            v.check("softmax_backward_rows", size, &got, &w, 1e-5, 1e-6);
        }
    }
    // No mask (a null pointer), one row per mask row.
    let (n_rows, t) = (7, 45);
    let s0 = v.rv(n_rows * t, -5.0, 5.0);
    let s = v.up(&s0)?;
    v.gpu.softmax_rows(s, n_rows, t, 1.0)?;
    let got = v.get(s)?;
    let mut want = vec![0f64; n_rows * t];
    ops::softmax_forward(&mut want, &f64s(&s0), n_rows, t);
    let size = format!("{n_rows} rows x {t} no mask");
    v.check("softmax_rows", size, &got, &want, 1e-5, 1e-7);
    Ok(())
}

fn l2norm<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    // eps 1e-12 (the head's) on plain rows; eps 1e-6 with one row far below it (the clamped
    // branch) where there are more than two rows.
    for (eps, clamp) in [(1e-12f32, false), (1e-6, true)] {
        for (n, d) in ROW_SHAPES {
            let mut x = v.rv(n * d, -1.0, 1.0);
            if clamp && n > 2 {
                x[2 * d..3 * d].iter_mut().for_each(|e| *e *= 1e-7);
            }
            let dx_ = v.up(&x)?;
            let (y, norm) = (v.out(n * d)?, v.out(n)?);
            v.gpu.l2norm_forward(y, norm, dx_, n, d, eps)?;
            let (mut wy, mut wn) = (vec![0f64; n * d], vec![0f64; n]);
            ops::l2norm_forward(&mut wy, &mut wn, &f64s(&x), n, d, eps as f64);
            let size = format!("{n}x{d} eps {eps:e}");
            let got = v.get(y)?;
            v.check("l2norm_forward", size.clone(), &got, &wy, 1e-5, 1e-7);
            let got = v.get(norm)?;
            let what = format!("{size} norms");
            v.check("l2norm_forward", what, &got, &wn, 1e-5, 1e-12);

            let dy = v.rv(n * d, -1.0, 1.0);
            let ddy = v.up(&dy)?;
            let dx = v.out(n * d)?;
            v.gpu.l2norm_backward(dx, ddy, y, norm, n, d, eps)?;
            let got = v.get(dx)?;
            let mut w = vec![0f64; n * d];
            ops::l2norm_backward(&mut w, &f64s(&dy), &wy, &wn, n, d, eps as f64);
            v.check("l2norm_backward", size, &got, &w, 1e-4, 1e-5);
        }
    }
    Ok(())
}

fn branch_terms<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for kind in [LogitKind::Dino, LogitKind::Vmf] {
        for approx in [BesselApprox::Uniform, BesselApprox::LargeNu] {
            for (k, p) in [(1, 16), (255, 128), (300, 256)] {
                let r = v.rv(k, 0.2, 3.0);
                let dr = v.up(&r)?;
                let (sc, bi, db) = (v.out(k)?, v.out(k)?, v.out(k)?);
                let tau = 0.1f32;
                let terms = LogitTerms {
                    scale: sc,
                    bias: bi,
                    dbias: db,
                };
                let dims = BranchDims {
                    k,
                    p,
                    tau,
                    kind,
                    approx,
                };
                branch_terms_launch(v.gpu, terms, dr, dims)?;
                let mut got = v.get(sc)?;
                got.extend(v.get(bi)?);
                got.extend(v.get(db)?);
                // The kernel calls core's f32 function per prototype.
                let (mut ws, mut wb, mut wd) = (vec![0f32; k], vec![0f32; k], vec![0f32; k]);
                branch_terms_forward(&mut ws, &mut wb, &mut wd, &r, tau, p, kind, approx);
                let mut want = f64s(&ws);
                want.extend(f64s(&wb));
                want.extend(f64s(&wd));
                v.check(
                    "branch_terms",
                    format!("{kind:?} {approx:?} k{k} p{p}"),
                    &got,
                    &want,
                    1e-5,
                    1e-5,
                );
            }
        }
    }
    Ok(())
}

/// `ln Σ exp(x)` in f64.
fn lse(x: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = x.clone().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + x.map(|v| (v - m).exp()).sum::<f64>().ln()
}

fn logits<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    {
        let name = "gemm_logits_f32";
        for (m, n, k) in [(1, 1, 1), (17, 130, 16), (65, 64, 33), (6, 300, 128)] {
            let y = v.rv(m * k, -1.0, 1.0);
            let mu = v.rv(n * k, -1.0, 1.0);
            let scale = v.rv(n, 1.0, 10.0);
            let bias = v.rv(n, -1.0, 1.0);
            let (dy, dmu) = (v.up(&y)?, v.up(&mu)?);
            let (ds, db) = (v.up(&scale)?, v.up(&bias)?);
            let ntiles = n.div_ceil(64);
            let (dots, part) = (v.out(m * n)?, v.out(m * ntiles * 2)?);
            gemm_logits_f32(v.gpu, dots, part, dy, dmu, ds, db, (m, n, k))?;
            let mut got = v.get(dots)?;
            let pt = v.get(part)?;
            let mut want = Vec::with_capacity(m * n + m * ntiles);
            for i in 0..m {
                for j in 0..n {
                    want.push(
                        (0..k)
                            .map(|c| y[i * k + c] as f64 * mu[j * k + c] as f64)
                            .sum(),
                    );
                }
            }
            // Each tile's state (max, sum) as one log-sum-exp of its columns' logits.
            for i in 0..m {
                for t in 0..ntiles {
                    let (mx, s) = (pt[(i * ntiles + t) * 2], pt[(i * ntiles + t) * 2 + 1]);
                    got.push(mx + s.ln());
                    let cols = (t * 64..((t + 1) * 64).min(n))
                        .map(|j| scale[j] as f64 * want[i * n + j] + bias[j] as f64);
                    want.push(lse(cols));
                }
            }
            let atol = 1e-5 * (k as f64).sqrt() * 10.0;
            v.check(
                name,
                format!("{m}x{n}x{k} (+tile LSE)"),
                &got,
                &want,
                1e-5,
                atol,
            );
        }
    }
    for (m, ntiles) in [(1, 1), (3, 5), (7, 300)] {
        let mut part = Vec::with_capacity(m * ntiles * 2);
        for _ in 0..m * ntiles {
            part.push(v.rng.gen_range(-5.0f32..5.0));
            part.push(v.rng.gen_range(1.0f32..64.0));
        }
        let dp = v.up(&part)?;
        let out = v.out(m)?;
        lse_combine(v.gpu, out, dp, m, ntiles)?;
        let got = v.get(out)?;
        let want: Vec<f64> = (0..m)
            .map(|i| {
                let terms = (0..ntiles).map(|t| {
                    let o = (i * ntiles + t) * 2;
                    part[o] as f64 + (part[o + 1] as f64).ln()
                });
                lse(terms)
            })
            .collect();
        v.check(
            "lse_combine",
            format!("{m} rows x {ntiles} tiles"),
            &got,
            &want,
            1e-5,
            1e-5,
        );
    }
    Ok(())
}

fn teacher<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    // Per-row centerings only (Sinkhorn has kernels of its own, checked in `sinkhorn.rs`): the
    // matches below treat anything but logit as probability, as `Centering::from_code` does.
    for centering in [Centering::Logit, Centering::Probability] {
        for (nt, k) in [(2, 1), (4, 255), (6, 300), (3, 1030)] {
            let dots = v.rv(nt * k, -1.0, 1.0);
            let scale = v.rv(k, 1.0, 10.0);
            let bias = v.rv(k, -1.0, 1.0);
            let center: Vec<f32> = match centering {
                Centering::Logit => v.rv(k, -2.0, 2.0),
                Centering::Probability | Centering::Sinkhorn { .. } => v.rv(k, 0.0, 2.0 / k as f32),
            };
            let tau_t = 0.04f32;
            let (dd, ds, db, dc) = (v.up(&dots)?, v.up(&scale)?, v.up(&bias)?, v.up(&center)?);
            let (p_t, lse_raw) = (v.out(nt * k)?, v.out(nt)?);
            let t_in = TeacherIn {
                dots: dd,
                scale: ds,
                bias: db,
                tau_t,
                centering,
                n: nt,
                k,
            };
            teacher_targets(v.gpu, p_t, lse_raw, dc, &t_in)?;
            let mut got = v.get(p_t)?;
            got.extend(v.get(lse_raw)?);
            let l = |r: usize, j: usize| scale[j] as f64 * dots[r * k + j] as f64 + bias[j] as f64;
            let shift = |j: usize| match centering {
                Centering::Logit => center[j] as f64 / tau_t as f64,
                Centering::Probability | Centering::Sinkhorn { .. } => {
                    (center[j].max(CENTER_FLOOR as f32) as f64).ln()
                }
            };
            let mut want = Vec::new();
            let mut lse_w = Vec::new();
            for r in 0..nt {
                let z = lse((0..k).map(|j| l(r, j) - shift(j)));
                want.extend((0..k).map(|j| (l(r, j) - shift(j) - z).exp()));
                lse_w.push(lse((0..k).map(|j| l(r, j))));
            }
            want.extend(&lse_w);
            let size = format!("{centering:?} nt{nt} k{k}");
            v.check("teacher_targets", size.clone(), &got, &want, 1e-4, 1e-6);

            let stat = v.out(k)?;
            teacher_stat(v.gpu, stat, lse_raw, &t_in)?;
            let got = v.get(stat)?;
            let want: Vec<f64> = (0..k)
                .map(|j| {
                    (0..nt)
                        .map(|r| match centering {
                            Centering::Logit => tau_t as f64 * l(r, j),
                            Centering::Probability | Centering::Sinkhorn { .. } => {
                                (l(r, j) - lse_w[r]).exp()
                            }
                        })
                        .sum::<f64>()
                        / nt as f64
                })
                .collect();
            v.check("teacher_stat", size.clone(), &got, &want, 1e-4, 1e-6);

            // Rows of P_t (and the batch mean as one row) for the collapse signals.
            let ent = v.out(nt)?;
            row_entropy(v.gpu, ent, p_t, nt, k)?;
            let got = v.get(ent)?;
            let pt = v.get(p_t)?;
            let want: Vec<f64> = pt.chunks_exact(k).map(|r| entropy(&f64s(r))).collect();
            v.check("row_entropy", size.clone(), &got, &want, 1e-5, 1e-6);

            let c0 = v.rv(k, -1.0, 1.0);
            let st = v.rv(k, -1.0, 1.0);
            let (dc0, dst) = (v.up(&c0)?, v.up(&st)?);
            center_update_launch(v.gpu, dc0, dst, 0.9, k)?;
            let got = v.get(dc0)?;
            let mut w = c0.clone();
            center_update(&mut w, &st, 0.9f32);
            v.check("center_update", format!("k{k}"), &got, &f64s(&w), 0.0, 0.0);
        }
    }
    // Probability rows of their own (softmax of logits in [-6, 6)), one exact zero per row
    // (0 ln 0 = 0): one value, below, at and above the 256-thread block, and wide.
    for (rows, k) in [(1, 1), (3, 255), (5, 256), (2, 257), (4, 1000)] {
        let mut p = v.rv(rows * k, -6.0, 6.0);
        for row in p.chunks_exact_mut(k) {
            let z = lse(row.iter().map(|&x| x as f64));
            row.iter_mut()
                .for_each(|x| *x = (*x as f64 - z).exp() as f32);
            row[k / 3] = 0.0;
        }
        let dp = v.up(&p)?;
        let ent = v.out(rows)?;
        row_entropy(v.gpu, ent, dp, rows, k)?;
        let got = v.get(ent)?;
        let want: Vec<f64> = p.chunks_exact(k).map(|r| entropy(&f64s(r))).collect();
        let size = format!("{rows} rows k{k}, a zero each");
        v.check("row_entropy", size, &got, &want, 1e-5, 1e-6);
    }
    Ok(())
}

fn xent_columns<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for (n_crops, batch, k, with_dr) in [
        (2, 1, 1, true),
        (4, 3, 255, false),
        (6, 2, 300, true),
        (2, 5, 700, true),
    ] {
        let ns = n_crops * batch;
        let dots = v.rv(ns * k, -1.0, 1.0);
        let scale = v.rv(k, 1.0, 10.0);
        let bias = v.rv(k, -1.0, 1.0);
        let dbias = v.rv(k, -1.0, 1.0);
        // Teacher rows: softmax of random logits.
        let mut p_t = v.rv(2 * batch * k, -3.0, 3.0);
        for row in p_t.chunks_exact_mut(k) {
            let z = lse(row.iter().map(|&x| x as f64));
            for x in row.iter_mut() {
                *x = (*x as f64 - z).exp() as f32;
            }
        }
        let tau = 0.1f32;
        let l = |i: usize, j: usize| scale[j] as f64 * dots[i * k + j] as f64 + bias[j] as f64;
        let lse_rows: Vec<f64> = (0..ns).map(|i| lse((0..k).map(|j| l(i, j)))).collect();
        let lse32: Vec<f32> = lse_rows.iter().map(|&x| x as f32).collect();
        let dr0 = v.rv(k, -1.0, 1.0);
        let (ddots, dl, dp, ds, db, ddb) = (
            v.up(&dots)?,
            v.up(&lse32)?,
            v.up(&p_t)?,
            v.up(&scale)?,
            v.up(&bias)?,
            v.up(&dbias)?,
        );
        let ddr = v.up(&dr0)?;
        let nparts = k.div_ceil(256);
        let lp = v.out(nparts)?;
        let args = XentColumns {
            dots: ddots,
            dr: with_dr.then_some(ddr),
            loss_part: lp,
            lse: dl,
            p_t: dp,
            terms: LogitTerms {
                scale: ds,
                bias: db,
                dbias: ddb,
            },
            tau,
            n_crops,
            batch,
            k,
        };
        xent_columns_launch(v.gpu, &args)?;
        let gs = 1.0 / (batch * n_pairs(n_crops)).max(1) as f64;
        let (mut wd, mut wdr, mut wlp) = (vec![0f64; ns * k], f64s(&dr0), vec![0f64; nparts]);
        for j in 0..k {
            let mut acc = 0.0;
            for vv in 0..n_crops {
                let nq = n_teacher_views(vv) as f64;
                for bi in 0..batch {
                    let i = vv * batch + bi;
                    let tgt: f64 = (0..2)
                        .filter(|&q| q != vv)
                        .map(|q| p_t[(q * batch + bi) * k + j] as f64)
                        .sum();
                    let x = l(i, j);
                    let nls = lse32[i] as f64 - x;
                    wlp[j / 256] += tgt * nls;
                    let dlv = (nq * (-nls).exp() - tgt) * gs;
                    wd[i * k + j] = dlv * scale[j] as f64;
                    acc += dlv * (dots[i * k + j] as f64 / tau as f64 + dbias[j] as f64);
                }
            }
            if with_dr {
                wdr[j] += acc;
            }
        }
        let mut got = v.get(ddots)?;
        got.extend(v.get(lp)?);
        got.extend(v.get(ddr)?);
        let mut want = wd;
        want.extend(wlp);
        want.extend(wdr);
        v.check(
            "xent_columns",
            format!("crops{n_crops} B{batch} k{k} dr={with_dr}"),
            &got,
            &want,
            1e-4,
            1e-5,
        );
    }
    Ok(())
}

fn optimiser<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    let hp = AdamW::default();
    for n in [1, 300, 1025] {
        for (step, wd) in [(1u64, 0.04), (17, 0.0), (5000, 0.4)] {
            let p = v.rv(n, -1.0, 1.0);
            let g = v.rv(n, -1.0, 1.0);
            let m = v.rv(n, -0.1, 0.1);
            let vv = v.rv(n, 0.001, 0.1);
            let (dp, dg, dm, dv) = (v.up(&p)?, v.up(&g)?, v.up(&m)?, v.up(&vv)?);
            let bufs = AdamwBufs {
                param: dp,
                grad: dg,
                m: dm,
                v: dv,
            };
            adamw(v.gpu, bufs, n, &hp, (5e-4, wd, step))?;
            let (mut wp, mut wm, mut wv) = (p.clone(), m.clone(), vv.clone());
            adamw_step(&mut wp, &g, &mut wm, &mut wv, &hp, 5e-4, wd, step);
            let mut got = v.get(dp)?;
            got.extend(v.get(dm)?);
            got.extend(v.get(dv)?);
            let mut want = f64s(&wp);
            want.extend(f64s(&wm));
            want.extend(f64s(&wv));
            v.check(
                "adamw",
                format!("n {n} step {step} wd {wd}"),
                &got,
                &want,
                0.0,
                0.0,
            );
        }
        let t = v.rv(n, -1.0, 1.0);
        let s = v.rv(n, -1.0, 1.0);
        let (dt, ds) = (v.up(&t)?, v.up(&s)?);
        ema(v.gpu, dt, ds, n, 0.996)?;
        let got = v.get(dt)?;
        let mut w = t.clone();
        ema_update(&mut w, &s, 0.996);
        v.check("ema", format!("n {n}"), &got, &f64s(&w), 0.0, 0.0);
    }
    Ok(())
}

fn reductions<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    use dinovmf_ptx::kernels::reduce::{RedOp, CHUNK};
    // Segments: empty-ish, below and across the 4096-element chunk, and large.
    let lens = [1usize, 255, 4096, 4097, 10000, 33];
    let mut segs = Vec::new();
    let mut off = 0;
    for &l in &lens {
        segs.push((off, l));
        off += l + 3;
    }
    let total = off;
    let x = v.rv(total, -1.0, 1.0);
    let sg = Segments::new(v.gpu, &segs)?;
    let dx = v.up(&x)?;
    let parts = sg.parts();
    let size = format!("{} segments, {total} values", lens.len());
    {
        let vals = f64s(&x);
        for op in [RedOp::Sum, RedOp::SumSq, RedOp::MaxAbs] {
            let part = v.out(lens.len() * parts)?;
            let name = "reduce_segments_f32";
            v.gpu.reduce_segments(part, dx, &sg, op)?;
            let got = v.get(part)?;
            let mut want = Vec::new();
            for &(o, l) in &segs {
                for pi in 0..parts {
                    let lo = (pi * CHUNK).min(l);
                    let hi = ((pi + 1) * CHUNK).min(l);
                    let s = &vals[o + lo..o + hi];
                    want.push(match op {
                        RedOp::Sum => s.iter().sum(),
                        RedOp::SumSq => s.iter().map(|a| a * a).sum(),
                        RedOp::MaxAbs => s.iter().fold(0.0, |a: f64, b| a.max(b.abs())),
                    });
                }
            }
            let atol = if op == RedOp::Sum { 1e-4 } else { 0.0 };
            v.check(
                name,
                format!("{size} op {}", op.code()),
                &got,
                &want,
                1e-5,
                atol,
            );
        }
    }
    for (parts, nseg) in [(1, 1), (3, 7), (40, 300)] {
        let part = v.rv(parts * nseg, 0.0, 2.0);
        let dp = v.up(&part)?;
        for op in [RedOp::Sum, RedOp::MaxAbs] {
            let out = v.out(nseg)?;
            v.gpu.reduce_final(out, dp, parts, nseg, op, 0.5)?;
            let got = v.get(out)?;
            let want: Vec<f64> = part
                .chunks_exact(parts)
                .map(|p| {
                    if op == RedOp::MaxAbs {
                        p.iter().fold(0.0f64, |a, &b| a.max(b as f64))
                    } else {
                        0.5 * p.iter().map(|&b| b as f64).sum::<f64>()
                    }
                })
                .collect();
            v.check(
                "reduce_final",
                format!("{nseg} seg x {parts} parts op {}", op.code()),
                &got,
                &want,
                1e-6,
                0.0,
            );
        }
        let (coef, norm) = (v.out(nseg)?, v.out(nseg)?);
        let clip = 1.5f64;
        clip_coef(v.gpu, coef, norm, dp, (parts, nseg), clip)?;
        let mut got = v.get(norm)?;
        got.extend(v.get(coef)?);
        let norms: Vec<f64> = part
            .chunks_exact(parts)
            .map(|p| p.iter().map(|&b| b as f64).sum::<f64>().sqrt())
            .collect();
        let mut want = norms.clone();
        want.extend(norms.iter().map(|&nr| (clip / (nr + 1e-6)).min(1.0)));
        v.check(
            "clip_coef",
            format!("{nseg} seg x {parts} parts"),
            &got,
            &want,
            1e-6,
            0.0,
        );
    }
    {
        let coef: Vec<f32> = (0..segs.len())
            .map(|i| {
                if i % 2 == 0 {
                    1.0
                } else {
                    0.37 + i as f32 * 0.1
                }
            })
            .collect();
        let dc = v.up(&coef)?;
        let g = v.up(&x)?;
        scale_segments(v.gpu, g, &sg, dc)?;
        let got = v.get(g)?;
        let mut want = x.clone();
        for (s, &(o, l)) in segs.iter().enumerate() {
            for e in &mut want[o..o + l] {
                if coef[s] != 1.0 {
                    *e *= coef[s];
                }
            }
        }
        v.check("scale_segments", size.clone(), &got, &f64s(&want), 0.0, 0.0);
    }
    // Per-tensor clipping as the step runs it (sums of squares, coefficients, scaling) against
    // core's clip_grad_tensor per tensor; the gaps between tensors stay untouched.
    {
        let g0 = v.rv(total, -0.2, 0.2);
        let clip = 3.0f64;
        let g = v.up(&g0)?;
        let part = v.out(lens.len() * parts)?;
        v.gpu.reduce_segments(part, g, &sg, RedOp::SumSq)?;
        let (coef, norm) = (v.out(sg.n)?, v.out(sg.n)?);
        clip_coef(v.gpu, coef, norm, part, (parts, sg.n), clip)?;
        scale_segments(v.gpu, g, &sg, coef)?;
        let mut wg = g0.clone();
        let wnorm: Vec<f64> = segs
            .iter()
            .map(|&(o, l)| dinovmf_core::optim::clip_grad_tensor(&mut wg[o..o + l], clip))
            .collect();
        let coefs = v.get(coef)?;
        let mut row = compare(
            "clip_coef",
            &format!("{size}: norms vs core clip_grad_tensor"),
            &v.get(norm)?,
            &wnorm,
            1e-6,
            0.0,
        );
        // The case must clip some tensors and leave others.
        if !(coefs.iter().any(|&c| c < 1.0) && coefs.contains(&1.0)) {
            row.ok = false;
            row.note = format!("clips all or none: coefficients {coefs:?}");
        }
        v.rows.push(row);
        let got = v.get(g)?;
        let what = format!("{size}: clipped vs core clip_grad_tensor, gaps untouched");
        v.check("scale_segments", what, &got, &f64s(&wg), 1e-6, 0.0);
    }
    for (rows, cols) in [(1, 1), (37, 300), (130, 257)] {
        let xs = v.rv(rows * cols, -1.0, 1.0);
        let d32 = v.up(&xs)?;
        for accumulate in [false, true] {
            let o0 = v.rv(cols, -1.0, 1.0);
            let out = if accumulate { v.up(&o0)? } else { v.out(cols)? };
            let name = "column_sum_f32";
            v.gpu.column_sum(out, d32, rows, cols, accumulate)?;
            let got = v.get(out)?;
            let want: Vec<f64> = (0..cols)
                .map(|c| {
                    let s: f64 = (0..rows).map(|r| xs[r * cols + c] as f64).sum();
                    s + if accumulate { o0[c] as f64 } else { 0.0 }
                })
                .collect();
            v.check(
                name,
                format!("{rows}x{cols} acc={accumulate}"),
                &got,
                &want,
                1e-5,
                1e-5,
            );
        }
    }
    Ok(())
}

/// Kernels of the manifest no row covers (must be empty).
pub fn uncovered(rows: &[Row]) -> Vec<&'static str> {
    dinovmf_ptx::manifest::all()
        .map(|k| k.name)
        .filter(|n| !rows.iter().any(|r| r.kernel == *n))
        .collect()
}

/// Fails when any row failed or a kernel was not covered.
pub fn verdict(rows: &[Row]) -> Result<()> {
    let bad = rows.iter().filter(|r| !r.ok).count();
    let missing = uncovered(rows);
    if bad > 0 || !missing.is_empty() {
        return Err(anyhow!(
            "{bad} of {} kernel checks failed{}",
            rows.len(),
            if missing.is_empty() {
                String::new()
            } else {
                format!("; not covered: {}", missing.join(", "))
            }
        ));
    }
    Ok(())
}
