//! The CPU backend's iBOT step against core's f64 reference: masks from the step seed, the
//! reference model with masks and the head on every token, the `[CLS]` composite and the patch
//! composite, every gradient tensor (mask token included), the loss and both centers.
mod common;
use common::{perturbed_state, random_batch, rel_err};
use dinovmf::backend::cpu::CpuBackend;
use dinovmf::backend::step::draw_drop_masks;
use dinovmf::backend::StepShapes;
use dinovmf::backend::{Backend, SingleProcess, StepHyper, TrainState};
use dinovmf::data::Batch;
use dinovmf_core::loss::{
    multicrop_loss_forward_backward, scratch_len, LossConfig, LossDims, LossGrads, LossInputs,
};
use dinovmf_core::masking::step_masks;
use dinovmf_core::mim_loss::{
    mim_loss_forward_backward, mim_scratch_len, IbotConfig, MimDims, MimGrads, MimInputs,
};
use dinovmf_core::model::{for_each_param, IbotParts, Layout, ModelConfig};
use dinovmf_core::reference_model;

const B: usize = 2;
const N_LOCAL: usize = 2;
const G: usize = 12;
const L: usize = 8;

/// [`common::test_model`] with the mask token (and a separate patch head when asked), drop path
/// 0.3.
fn model(norm_last: bool, separate: bool) -> ModelConfig {
    let ibot = IbotParts {
        mask_token: true,
        separate_patch_head: separate,
    };
    common::test_model(norm_last, 0.3, ibot)
}

fn shapes() -> StepShapes {
    common::shapes(B, N_LOCAL, G, L)
}

fn hyper(seed: u64) -> StepHyper {
    StepHyper {
        patch_teacher_temp: 0.05,
        ..common::step_hyper(seed)
    }
}

struct Reference {
    grads: Vec<f64>,
    loss: f64,
    mim: f64,
    center: Vec<f64>,
    patch_center: Vec<f64>,
    patch_entropy: f64,
    masked: usize,
}

fn reference(
    cfg: &ModelConfig,
    loss: &LossConfig,
    ib: &IbotConfig,
    st: &TrainState,
    bt: &Batch,
    hp: &StepHyper,
) -> Reference {
    let cv = |x: &[f32]| -> Vec<f64> { x.iter().map(|&v| v as f64).collect() };
    let (s, t) = (cv(&st.student), cv(&st.teacher));
    let (gi, li) = (cv(&bt.global), cv(&bt.local));
    let mut mg = vec![0.0f32; cfg.vit.depth * 2 * 2 * B];
    let mut ml = vec![0.0f32; cfg.vit.depth * 2 * N_LOCAL * B];
    draw_drop_masks(cfg, hp.seed, 2 * B, N_LOCAL * B, &mut mg, &mut ml);
    let (mg, ml) = (cv(&mg), cv(&ml));
    let grid = G / cfg.vit.patch;
    let np = grid * grid;
    let t_tok = np + 1;
    let mut mask = vec![0.0f64; 2 * B * np];
    let mut counts = vec![0usize; 2 * B];
    let mut scratch = vec![false; np];
    step_masks(
        &mut mask,
        &mut counts,
        &mut scratch,
        2,
        B,
        grid,
        grid,
        &ib.mask,
        hp.seed,
    );
    let teach = reference_model::forward_ibot(cfg, &t, &gi, 2 * B, G, None, None, true).unwrap();
    let ag = reference_model::forward_ibot(cfg, &s, &gi, 2 * B, G, Some(&mg), Some(&mask), true)
        .unwrap();
    let al = reference_model::forward(cfg, &s, &li, N_LOCAL * B, L, Some(&ml)).unwrap();
    let (k, p) = (cfg.head.out_dim, cfg.head.bottleneck);
    let split = |z: &[f64]| -> (Vec<f64>, Vec<f64>) {
        let mut cls = Vec::new();
        let mut patch = Vec::new();
        for img in 0..2 * B {
            cls.extend_from_slice(&z[img * t_tok * p..(img * t_tok + 1) * p]);
            patch.extend_from_slice(&z[(img * t_tok + 1) * p..(img + 1) * t_tok * p]);
        }
        (cls, patch)
    };
    let (zt_cls, zt_patch) = split(&teach.z);
    let (zs_cls, zs_patch) = split(&ag.z);
    let mut z_s = zs_cls.clone();
    z_s.extend_from_slice(&al.z);
    let lay = Layout::new(cfg);
    let dims = LossDims {
        n_crops: 2 + N_LOCAL,
        batch: B,
        k,
        p,
    };
    let mut lc = *loss;
    lc.teacher_temp = hp.teacher_temp as f64;
    let mut dz = vec![0.0; z_s.len()];
    let mut dv = vec![0.0; k * p];
    let mut dg = vec![0.0; k];
    let mut center = cv(&st.center);
    let mut sc = vec![0.0; scratch_len(dims)];
    let out = multicrop_loss_forward_backward(
        &lc,
        dims,
        LossInputs {
            z_s: &z_s,
            z_t: &zt_cls,
            v_s: &s[lay.last_v..lay.last_v + k * p],
            g_s: &s[lay.last_g..lay.last_g + k],
            v_t: &t[lay.last_v..lay.last_v + k * p],
            g_t: &t[lay.last_g..lay.last_g + k],
        },
        LossGrads {
            dz_s: &mut dz,
            dv_s: &mut dv,
            dg_s: &mut dg,
        },
        &mut center,
        &mut sc,
    )
    .unwrap();
    let mut grads = vec![0.0; s.len()];
    grads[lay.last_v..lay.last_v + k * p].copy_from_slice(&dv);
    if !cfg.head.norm_last_layer {
        grads[lay.last_g..lay.last_g + k].copy_from_slice(&dg);
    }
    // The patch loss, its gradients scaled by the weight and added.
    let mut pc = *loss;
    pc.teacher_temp = hp.patch_teacher_temp as f64;
    pc.center_momentum = ib.patch_center_momentum;
    let md = MimDims {
        views: 2,
        batch: B,
        n: np,
        k,
        p,
    };
    let mut dzp = vec![0.0; zs_patch.len()];
    let mut dv2 = vec![0.0; k * p];
    let mut dg2 = vec![0.0; k];
    let mut patch_center = cv(&st.patch_center);
    let mut sc = vec![0.0; mim_scratch_len(md)];
    let mo = mim_loss_forward_backward(
        &pc,
        md,
        MimInputs {
            z_s: &zs_patch,
            z_t: &zt_patch,
            mask: &mask,
            v_s: &s[lay.patch_v..lay.patch_v + k * p],
            g_s: &s[lay.patch_g..lay.patch_g + k],
            v_t: &t[lay.patch_v..lay.patch_v + k * p],
            g_t: &t[lay.patch_g..lay.patch_g + k],
        },
        MimGrads {
            dz_s: &mut dzp,
            dv_s: &mut dv2,
            dg_s: &mut dg2,
        },
        &mut patch_center,
        &mut sc,
    )
    .unwrap();
    let w = ib.mim_weight;
    for (i, x) in dv2.iter().enumerate() {
        grads[lay.patch_v + i] += w * x;
    }
    if !cfg.head.norm_last_layer {
        for (i, x) in dg2.iter().enumerate() {
            grads[lay.patch_g + i] += w * x;
        }
    }
    let mut dz_all = vec![0.0; 2 * B * t_tok * p];
    for img in 0..2 * B {
        dz_all[img * t_tok * p..(img * t_tok + 1) * p].copy_from_slice(&dz[img * p..(img + 1) * p]);
        for j in 0..np {
            let src = (img * np + j) * p;
            let dst = (img * t_tok + 1 + j) * p;
            for c in 0..p {
                dz_all[dst + c] = w * dzp[src + c];
            }
        }
    }
    reference_model::backward(cfg, &s, &ag, &dz_all, &mut grads).unwrap();
    reference_model::backward(cfg, &s, &al, &dz[2 * B * p..], &mut grads).unwrap();
    Reference {
        grads,
        loss: out.loss + w * mo.loss,
        mim: mo.loss,
        center,
        patch_center,
        patch_entropy: mo.teacher_entropy,
        masked: mo.masked,
    }
}

fn check(vmf: bool, norm_last: bool, separate: bool) {
    check_centering(vmf, norm_last, separate, None)
}

/// [`check`] with the loss's default centering (of [CLS] and patches) replaced by `centering`.
fn check_centering(
    vmf: bool,
    norm_last: bool,
    separate: bool,
    centering: Option<dinovmf_core::centering::Centering>,
) {
    let cfg = model(norm_last, separate);
    let mut lc = if vmf {
        LossConfig::vmf()
    } else {
        LossConfig::dino()
    };
    lc.norm_last_layer = norm_last;
    if let Some(c) = centering {
        lc.centering = c;
    }
    let ib = common::ibot_config();
    let st = perturbed_state(&cfg, &lc, 3 + vmf as u64);
    let bt = random_batch(&shapes(), 5);
    let hp = hyper(99);
    let mut be = CpuBackend::new(cfg, lc, shapes(), Box::new(SingleProcess))
        .unwrap()
        .with_ibot(ib)
        .unwrap();
    be.set_state(&st).unwrap();
    let rep = be.compute_gradients(&bt, &hp).unwrap();
    let r = reference(&cfg, &lc, &ib, &st, &bt, &hp);
    let what = format!(
        "vmf={vmf} norm_last={norm_last} separate={separate} centering={:?}",
        lc.centering
    );
    assert!(r.masked > 0, "{what}: the test needs masked patches");
    let tol = 2e-5;
    let e = (rep.loss as f64 - r.loss).abs() / r.loss.abs();
    assert!(e < tol, "{what}: loss {} vs {} ({e:e})", rep.loss, r.loss);
    let e = (rep.mim_loss as f64 - r.mim).abs() / r.mim.abs();
    assert!(
        e < tol,
        "{what}: L_mim {} vs {} ({e:e})",
        rep.mim_loss,
        r.mim
    );
    let e = (rep.patch_teacher_entropy as f64 - r.patch_entropy).abs() / r.patch_entropy;
    assert!(e < tol, "{what}: patch teacher entropy rel err {e:e}");
    let e = rel_err(be.next_center(), &r.center, 1e-6);
    assert!(e < tol, "{what}: center rel err {e:e}");
    let e = rel_err(be.next_patch_center(), &r.patch_center, 1e-6);
    assert!(e < tol, "{what}: patch center rel err {e:e}");
    let mut worst = (0.0f64, String::new());
    let mut token_grad = 0.0f64;
    for_each_param(&cfg, |p| {
        let rg = p.range();
        let e = rel_err(&be.grads()[rg.clone()], &r.grads[rg.clone()], 1e-12);
        if p.name.as_str() == "backbone.masked_embed" {
            token_grad = r.grads[rg].iter().fold(0.0f64, |m, x| m.max(x.abs()));
        }
        if e > worst.0 {
            worst = (e, p.name.to_string());
        }
    });
    assert!(token_grad > 0.0, "{what}: the mask token got no gradient");
    assert!(
        worst.0 < tol,
        "{what}: gradient of {} rel err {:e}",
        worst.1,
        worst.0
    );
    eprintln!("{what}: worst gradient rel err {:e} ({})", worst.0, worst.1);
}

#[test]
fn ibot_gradients_match_f64_reference_dino_logits_rel_2e5() {
    check(false, true, false);
    check(false, false, true);
}

/// Sinkhorn-Knopp on the [CLS] and on the patch teacher, DINO and vMF logits.
#[test]
fn ibot_gradients_match_f64_reference_sinkhorn_rel_2e5() {
    use dinovmf_core::centering::Centering;
    check_centering(false, true, false, Some(Centering::Sinkhorn { iters: 3 }));
    check_centering(true, false, true, Some(Centering::Sinkhorn { iters: 3 }));
}

#[test]
fn ibot_gradients_match_f64_reference_vmf_logits_rel_2e5() {
    check(true, false, false);
    check(true, false, true);
}

#[test]
fn ibot_step_is_deterministic_and_the_state_carries_the_patch_center() {
    let cfg = model(false, false);
    let lc = LossConfig::vmf();
    let st = perturbed_state(&cfg, &lc, 1);
    let mk = || {
        let mut be = CpuBackend::new(cfg, lc, shapes(), Box::new(SingleProcess))
            .unwrap()
            .with_ibot(common::ibot_config())
            .unwrap();
        be.set_state(&st).unwrap();
        be
    };
    let (mut a, mut b) = (mk(), mk());
    let bt = random_batch(&shapes(), 2);
    for i in 0..3 {
        let ma = a.train_step(&bt, &hyper(10 + i)).unwrap();
        let mb = b.train_step(&bt, &hyper(10 + i)).unwrap();
        assert_eq!(ma.loss.to_bits(), mb.loss.to_bits());
        assert!(ma.mim_loss.is_finite() && ma.cls_loss.is_finite());
    }
    let (sa, sb) = (a.state().unwrap(), b.state().unwrap());
    assert!(sa == sb);
    assert_eq!(sa.patch_center.len(), cfg.head.out_dim);
    assert_ne!(
        sa.patch_center, st.patch_center,
        "the patch center must move"
    );
    // A state without a patch center is refused by an iBOT backend, by name.
    let mut bad = st.clone();
    bad.patch_center.clear();
    let e = format!("{:#}", mk().set_state(&bad).unwrap_err());
    assert!(e.contains("patch_center"), "{e}");
    // A DINO model cannot be turned into an iBOT backend.
    let dino = ModelConfig {
        ibot: IbotParts::NONE,
        ..cfg
    };
    let e = CpuBackend::new(dino, lc, shapes(), Box::new(SingleProcess))
        .unwrap()
        .with_ibot(common::ibot_config())
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap();
    assert!(e.contains("mask token"), "{e}");
}
