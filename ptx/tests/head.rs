//! The head's GPU chain (normalise, branch terms, logits GEMM with fused LSE, teacher targets,
//! fused multi-crop cross-entropy, backward GEMMs, center update) on the simulator against
//! `core::loss::multicrop_loss_forward_backward` in f32, for DINO and DINO-vMF.
mod common;
use common::*;
use dinovmf_core::loss::{self, LossConfig, LossDims, LossGrads, LossInputs};
use dinovmf_core::vmf::BesselApprox;
use dinovmf_ptx::kernels::gemm::{gemm, gemm_logits, GemmShape};
use dinovmf_ptx::kernels::reduce::{self, RedOp};
use dinovmf_ptx::kernels::{elementwise, head, rows};

const EPS: f32 = 1e-12;

struct Out {
    loss: f32,
    dz: Vec<f32>,
    dv: Vec<f32>,
    dg: Vec<f32>,
    center: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn branch(
    v: &[f32],
    g: &[f32],
    norm_last: bool,
    tau: f32,
    cfg: &LossConfig,
    k: usize,
    p: usize,
) -> (Vec<f32>, Vec<f32>, [Vec<f32>; 3]) {
    let (mut mu, mut vn) = (poison(k * p), poison(k));
    launch("l2norm_forward", grid_rows("l2norm_forward", k), |b| {
        rows::l2norm_forward(b, &mut mu, &mut vn, v, k, p, EPS)
    });
    let mut r = poison(k);
    if norm_last {
        launch("fill", grid1("fill", k), |b| {
            elementwise::fill(b, &mut r, 1.0, k)
        });
    } else {
        r.copy_from_slice(&g[..k]);
    }
    let (mut sc, mut bi, mut db) = (poison(k), poison(k), poison(k));
    let kind = cfg.kind;
    let approx = cfg.approx;
    launch("branch_terms", grid1("branch_terms", k), |b| {
        head::branch_terms(b, &mut sc, &mut bi, &mut db, &r, k, tau, p, kind, approx)
    });
    (mu, vn, [sc, bi, db])
}

#[allow(clippy::too_many_arguments)]
fn gpu_chain(cfg: &LossConfig, dims: LossDims, inp: &LossInputs<'_, f32>, center0: &[f32]) -> Out {
    let LossDims {
        n_crops,
        batch,
        k,
        p,
    } = dims;
    let (nt, ns) = (2 * batch, n_crops * batch);
    let norm_last = cfg.norm_last_layer;
    let (tau_s, tau_t) = (cfg.student_temp as f32, cfg.teacher_temp as f32);
    let centering = cfg.centering;

    // Teacher.
    let (mu_t, _, [sc_t, bi_t, _]) = branch(inp.v_t, inp.g_t, norm_last, tau_t, cfg, k, p);
    let (mut y_t, mut zn_t) = (poison(nt * p), poison(nt));
    launch("l2norm_forward", grid_rows("l2norm_forward", nt), |b| {
        rows::l2norm_forward(b, &mut y_t, &mut zn_t, inp.z_t, nt, p, EPS)
    });
    let mut dots_t = poison(nt * k);
    let s = GemmShape::plain(nt, k, p, false, true);
    launch("gemm_nt_f32", s.grid(1), |b| {
        gemm::<_, f32, f32, false, true>(b, &mut dots_t, &y_t, &mu_t, None, &s)
    });
    let (mut p_t, mut lse_raw) = (poison(nt * k), poison(nt));
    launch("teacher_targets", [nt as u32, 1, 1], |b| {
        head::teacher_targets(
            b,
            &mut p_t,
            &mut lse_raw,
            &dots_t,
            &sc_t,
            &bi_t,
            center0,
            tau_t,
            centering,
            nt,
            k,
        )
    });
    let mut stat = poison(k);
    launch("teacher_stat", grid1("teacher_stat", k), |b| {
        head::teacher_stat(
            b, &mut stat, &dots_t, &sc_t, &bi_t, &lse_raw, tau_t, centering, nt, k,
        )
    });

    // Student forward: logits GEMM with the fused LSE pass, row LSEs.
    let (mu_s, vn_s, [sc, bi, dbias]) = branch(inp.v_s, inp.g_s, norm_last, tau_s, cfg, k, p);
    let (mut y_s, mut zn_s) = (poison(ns * p), poison(ns));
    launch("l2norm_forward", grid_rows("l2norm_forward", ns), |b| {
        rows::l2norm_forward(b, &mut y_s, &mut zn_s, inp.z_s, ns, p, EPS)
    });
    let ntiles = k.div_ceil(64);
    let (mut dots, mut lse_part) = (poison(ns * k), poison(ns * ntiles * 2));
    let s = GemmShape::plain(ns, k, p, false, true);
    launch("gemm_logits_f32", s.grid(1), |b| {
        gemm_logits(b, &mut dots, &mut lse_part, &y_s, &mu_s, &sc, &bi, ns, k, p)
    });
    let mut lse = poison(ns);
    launch("lse_combine", [ns as u32, 1, 1], |b| {
        head::lse_combine(b, &mut lse, &lse_part, ns, ntiles)
    });

    // Loss + gradient, fused; dots become dL/d dots.
    let mut dr = vec![0f32; k];
    let parts = k.div_ceil(256);
    let mut loss_part = poison(parts);
    launch("xent_columns", grid1("xent_columns", k), |b| {
        head::xent_columns(
            b,
            &mut dots,
            if norm_last { None } else { Some(&mut dr) },
            &mut loss_part,
            &lse,
            &p_t,
            &sc,
            &bi,
            &dbias,
            tau_s,
            n_crops,
            batch,
            k,
        )
    });
    let gs = 1.0 / (batch * loss::n_pairs(n_crops)) as f32;
    let mut lossv = poison(1);
    launch("reduce_final", [1, 1, 1], |b| {
        reduce::reduce_final(b, &mut lossv, &loss_part, parts, 1, RedOp::Sum, gs)
    });

    // Backward: dy = ddots mu ("nn"), dmu = ddots^T y ("tn"), through the normalisations.
    let mut dy = poison(ns * p);
    let s = GemmShape::plain(ns, p, k, false, false);
    launch("gemm_nn_f32", s.grid(1), |b| {
        gemm::<_, f32, f32, false, false>(b, &mut dy, &dots, &mu_s, None, &s)
    });
    let mut dmu = poison(k * p);
    let s = GemmShape::plain(k, p, ns, true, false);
    launch("gemm_tn_f32", s.grid(1), |b| {
        gemm::<_, f32, f32, true, false>(b, &mut dmu, &dots, &y_s, None, &s)
    });
    let (mut dz, mut dv) = (poison(ns * p), poison(k * p));
    launch("l2norm_backward", grid_rows("l2norm_backward", ns), |b| {
        rows::l2norm_backward(b, &mut dz, &dy, &y_s, &zn_s, ns, p, EPS)
    });
    launch("l2norm_backward", grid_rows("l2norm_backward", k), |b| {
        rows::l2norm_backward(b, &mut dv, &dmu, &mu_s, &vn_s, k, p, EPS)
    });
    let mut center = center0.to_vec();
    let mom = cfg.center_momentum as f32;
    launch("center_update", grid1("center_update", k), |b| {
        head::center_update(b, &mut center, &stat, mom, k)
    });
    Out {
        loss: lossv[0],
        dz,
        dv,
        dg: dr,
        center,
    }
}

fn check(cfg: LossConfig, dims: LossDims, seed: u64) {
    let mut r = rng(seed);
    let LossDims {
        n_crops,
        batch,
        k,
        p,
    } = dims;
    let z_s = rand_vec(&mut r, n_crops * batch * p, -1.0, 1.0);
    let z_t = rand_vec(&mut r, 2 * batch * p, -1.0, 1.0);
    let v_s = rand_vec(&mut r, k * p, -1.0, 1.0);
    let v_t = rand_vec(&mut r, k * p, -1.0, 1.0);
    let g_s = rand_vec(&mut r, k, 0.3, 1.5);
    let g_t = rand_vec(&mut r, k, 0.3, 1.5);
    let center0 = match cfg.centering {
        // Sinkhorn keeps no running center; the chain here is only run with the EMA centerings.
        dinovmf_core::centering::Centering::Logit
        | dinovmf_core::centering::Centering::Sinkhorn { .. } => rand_vec(&mut r, k, -0.2, 0.2),
        dinovmf_core::centering::Centering::Probability => {
            rand_vec(&mut r, k, 0.2 / k as f32, 2.0 / k as f32)
        }
    };
    let inp = LossInputs {
        z_s: &z_s,
        z_t: &z_t,
        v_s: &v_s,
        g_s: &g_s,
        v_t: &v_t,
        g_t: &g_t,
    };
    let got = gpu_chain(&cfg, dims, &inp, &center0);

    let (mut dz, mut dv, mut dg) = (vec![0f32; z_s.len()], vec![0f32; k * p], vec![0f32; k]);
    let mut center = center0.clone();
    let mut scratch = vec![0f32; loss::scratch_len(dims)];
    let want = loss::multicrop_loss_forward_backward(
        &cfg,
        dims,
        inp,
        LossGrads {
            dz_s: &mut dz,
            dv_s: &mut dv,
            dg_s: &mut dg,
        },
        &mut center,
        &mut scratch,
    )
    .unwrap();
    let tag = format!("{:?}/{:?} {dims:?}", cfg.kind, cfg.centering);
    assert_close(
        &format!("{tag} loss (rtol 2e-5)"),
        &[got.loss],
        &[want.loss],
        2e-5,
        0.0,
    );
    let scale = |x: &[f32]| x.iter().fold(0f64, |a, &v| a.max(v.abs() as f64));
    // Gradients: relative to the largest entry (rows mix many terms of both signs).
    let (sz, sv, sg) = (scale(&dz), scale(&dv), scale(&dg));
    assert_close(
        &format!("{tag} dz (atol 1e-4 max|dz|)"),
        &got.dz,
        &dz,
        1e-4,
        1e-4 * sz,
    );
    assert_close(
        &format!("{tag} dv (atol 1e-4 max|dv|)"),
        &got.dv,
        &dv,
        1e-4,
        1e-4 * sv,
    );
    assert_close(
        &format!("{tag} dg (atol 1e-4 max|dg|)"),
        &got.dg,
        &dg,
        1e-4,
        1e-4 * sg + 1e-30,
    );
    assert_close(
        &format!("{tag} center (rtol 1e-5)"),
        &got.center,
        &center,
        1e-5,
        1e-9,
    );
}

const DIMS: [LossDims; 3] = [
    LossDims {
        n_crops: 2,
        batch: 1,
        k: 7,
        p: 5,
    },
    LossDims {
        n_crops: 4,
        batch: 3,
        k: 200,
        p: 24,
    },
    LossDims {
        n_crops: 3,
        batch: 5,
        k: 600,
        p: 40,
    },
];

#[test]
fn dino_chain_matches_core_loss_rtol_2e5_grads_1e4() {
    for (i, d) in DIMS.into_iter().enumerate() {
        check(LossConfig::dino(), d, 40 + i as u64);
    }
}

#[test]
fn vmf_chain_matches_core_loss_rtol_2e5_grads_1e4() {
    for (i, d) in DIMS.into_iter().enumerate() {
        let mut cfg = LossConfig::vmf();
        cfg.approx = if i == 1 {
            BesselApprox::LargeNu
        } else {
            BesselApprox::Uniform
        };
        check(cfg, d, 50 + i as u64);
    }
}

#[test]
fn vmf_with_logit_centering_and_dino_with_learned_radii_match_core() {
    let mut cfg = LossConfig::vmf();
    cfg.centering = dinovmf_core::centering::Centering::Logit;
    check(cfg, DIMS[1], 60);
    let mut cfg = LossConfig::dino();
    cfg.norm_last_layer = false;
    cfg.centering = dinovmf_core::centering::Centering::Probability;
    check(cfg, DIMS[2], 61);
}
