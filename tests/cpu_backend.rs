//! The fast CPU backend against core's reference: whole-model forward and gradients (f64 and
//! f32 references), the optimiser step, `embed`, determinism, and input validation.
mod common;
use common::{perturbed_state, random_batch, rel_err};
use dinovmf::backend::cpu::CpuBackend;
use dinovmf::backend::step::draw_drop_masks;
use dinovmf::backend::StepShapes;
use dinovmf::backend::{Backend, Net, SingleProcess, StepHyper, TrainState};
use dinovmf::data::Batch;
use dinovmf_core::loss::{
    multicrop_loss_forward_backward, scratch_len, LossConfig, LossDims, LossGrads, LossInputs,
};
use dinovmf_core::model::{convert_params, for_each_param, IbotParts, Layout, ModelConfig};
use dinovmf_core::optim::{adamw_step_model, clip_gradients, ema_update, AdamW};
use dinovmf_core::reference_model;
use dinovmf_core::vmf::BesselApprox;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// [`common::test_model`] without iBOT's parts.
fn model(norm_last_layer: bool, drop_path: f32) -> ModelConfig {
    common::test_model(norm_last_layer, drop_path, IbotParts::NONE)
}

const B: usize = 3;
const N_LOCAL: usize = 2;
const G: usize = 12;
const L: usize = 8;

fn shapes() -> StepShapes {
    common::shapes(B, N_LOCAL, G, L)
}

fn loss_cfg(vmf: bool, norm_last: bool) -> LossConfig {
    let mut c = if vmf {
        LossConfig::vmf()
    } else {
        LossConfig::dino()
    };
    c.norm_last_layer = norm_last;
    c.approx = BesselApprox::default();
    c
}

fn hyper(seed: u64) -> StepHyper {
    common::step_hyper(seed)
}

fn backend(cfg: &ModelConfig, loss: &LossConfig, st: &TrainState) -> CpuBackend {
    let mut b = CpuBackend::new(*cfg, *loss, shapes(), Box::new(SingleProcess)).unwrap();
    b.set_state(st).unwrap();
    b
}

/// The reference forward + loss + backward at precision `T`: (z_s, z_t, grads, loss, center').
struct Reference<T> {
    z_s: Vec<T>,
    z_t: Vec<T>,
    grads: Vec<T>,
    loss: T,
    center: Vec<T>,
}

fn reference<T: dinovmf_core::logits::VmfReal + dinovmf_core::loss::Stored<T>>(
    cfg: &ModelConfig,
    loss: &LossConfig,
    st: &TrainState,
    bt: &Batch,
    hp: &StepHyper,
    koleo: f32,
) -> Reference<T> {
    let cv = |x: &[f32]| -> Vec<T> {
        let mut o = vec![T::ZERO; x.len()];
        convert_params(&mut o, x);
        o
    };
    let (s, t) = (cv(&st.student), cv(&st.teacher));
    let (gi, li) = (cv(&bt.global), cv(&bt.local));
    let mut mg = vec![0.0f32; cfg.vit.depth * 2 * 2 * B];
    let mut ml = vec![0.0f32; cfg.vit.depth * 2 * N_LOCAL * B];
    draw_drop_masks(cfg, hp.seed, 2 * B, N_LOCAL * B, &mut mg, &mut ml);
    let (mg, ml) = (cv(&mg), cv(&ml));
    let teach = reference_model::forward(cfg, &t, &gi, 2 * B, G, None).unwrap();
    let ag = reference_model::forward(cfg, &s, &gi, 2 * B, G, Some(&mg)).unwrap();
    let al = reference_model::forward(cfg, &s, &li, N_LOCAL * B, L, Some(&ml)).unwrap();
    let mut z_s = ag.z.clone();
    z_s.extend_from_slice(&al.z);
    let lay = Layout::new(cfg);
    let (k, p) = (cfg.head.out_dim, cfg.head.bottleneck);
    let dims = LossDims {
        n_crops: 2 + N_LOCAL,
        batch: B,
        k,
        p,
    };
    let mut lc = *loss;
    lc.teacher_temp = hp.teacher_temp as f64;
    let mut dz = vec![T::ZERO; z_s.len()];
    let mut dv = vec![T::ZERO; k * p];
    let mut dg = vec![T::ZERO; k];
    let mut center = cv(&st.center);
    let mut scratch = vec![T::ZERO; scratch_len(dims)];
    let out = multicrop_loss_forward_backward(
        &lc,
        dims,
        LossInputs {
            z_s: &z_s,
            z_t: &teach.z,
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
        &mut scratch,
    )
    .unwrap();
    let mut grads = vec![T::ZERO; s.len()];
    grads[lay.last_v..lay.last_v + k * p].copy_from_slice(&dv);
    if !cfg.head.norm_last_layer {
        grads[lay.last_g..lay.last_g + k].copy_from_slice(&dg);
    }
    let ng = 2 * B * p;
    // KoLeo per global view on the student's [CLS] features (core's, in T).
    let d = cfg.vit.dim;
    let mut dcls = vec![T::ZERO; 2 * B * d];
    if koleo > 0.0 {
        let mut ks = vec![T::ZERO; dinovmf_core::koleo::koleo_scratch_len(B, d)];
        for (f, df) in ag.cls.chunks(B * d).zip(dcls.chunks_mut(B * d)) {
            let w = T::from_f64(koleo as f64);
            dinovmf_core::koleo::koleo_forward_backward(f, B, d, &mut ks, Some((df, w)));
        }
    }
    reference_model::backward_with_cls_grad(cfg, &s, &ag, &dz[..ng], Some(&dcls), &mut grads)
        .unwrap();
    reference_model::backward(cfg, &s, &al, &dz[ng..], &mut grads).unwrap();
    Reference {
        z_s,
        z_t: teach.z,
        grads,
        loss: out.loss,
        center,
    }
}

/// Compares forward features, loss, every gradient tensor and the center with `tol` relative
/// to each tensor's largest entry.
fn check_against<T: dinovmf_core::logits::VmfReal + dinovmf_core::loss::Stored<T>>(
    vmf: bool,
    norm_last: bool,
    drop_path: f32,
    tol: f64,
) {
    check_centering::<T>(vmf, norm_last, drop_path, None, 0.0, tol)
}

/// [`check_against`] with the loss's default centering replaced by `centering`.
fn check_centering<T: dinovmf_core::logits::VmfReal + dinovmf_core::loss::Stored<T>>(
    vmf: bool,
    norm_last: bool,
    drop_path: f32,
    centering: Option<dinovmf_core::centering::Centering>,
    koleo: f32,
    tol: f64,
) {
    check_model::<T>(&model(norm_last, drop_path), vmf, centering, koleo, tol)
}

/// [`check_centering`] on the model `cfg` (its `norm_last_layer` and drop path are the run's).
fn check_model<T: dinovmf_core::logits::VmfReal + dinovmf_core::loss::Stored<T>>(
    cfg: &ModelConfig,
    vmf: bool,
    centering: Option<dinovmf_core::centering::Centering>,
    koleo: f32,
    tol: f64,
) {
    let cfg = *cfg;
    let (norm_last, drop_path) = (cfg.head.norm_last_layer, cfg.vit.drop_path);
    let mut lc = loss_cfg(vmf, norm_last);
    if let Some(c) = centering {
        lc.centering = c;
    }
    let st = perturbed_state(&cfg, &lc, 7 + vmf as u64 + 2 * norm_last as u64);
    let bt = random_batch(&shapes(), 11);
    let hp = hyper(1234);
    let mut be = backend(&cfg, &lc, &st);
    be.set_koleo(koleo).unwrap();
    let rep = be.compute_gradients(&bt, &hp).unwrap();
    let r = reference::<T>(&cfg, &lc, &st, &bt, &hp, koleo);
    let what = format!(
        "vmf={vmf} norm_last={norm_last} drop_path={drop_path} centering={:?} koleo={koleo} stem_convs={}",
        lc.centering, cfg.vit.stem_convs
    );
    let e = rel_err(be.student_z(), &r.z_s, 1e-6);
    assert!(e < tol, "{what}: z_s rel err {e:e} >= {tol:e}");
    let e = rel_err(be.teacher_z(), &r.z_t, 1e-6);
    assert!(e < tol, "{what}: z_t rel err {e:e} >= {tol:e}");
    let e = (rep.loss as f64 - r.loss.to_f64()).abs() / r.loss.to_f64().abs();
    assert!(
        e < tol,
        "{what}: loss {} vs {} rel err {e:e}",
        rep.loss,
        r.loss.to_f64()
    );
    let e = rel_err(be.next_center(), &r.center, 1e-6);
    assert!(e < tol, "{what}: center rel err {e:e} >= {tol:e}");
    let mut worst = (0.0f64, String::new());
    for_each_param(&cfg, |p| {
        let rg = p.range();
        let e = rel_err(&be.grads()[rg.clone()], &r.grads[rg], 1e-12);
        if e > worst.0 {
            worst = (e, p.name.to_string());
        }
    });
    assert!(
        worst.0 < tol,
        "{what}: gradient of {} rel err {:e} >= {tol:e}",
        worst.1,
        worst.0
    );
    eprintln!("{what}: worst gradient rel err {:e} ({})", worst.0, worst.1);
}

#[test]
fn gradients_match_f64_reference_dino_rel_2e5() {
    check_against::<f64>(false, true, 0.0, 2e-5);
    check_against::<f64>(false, false, 0.0, 2e-5);
}

/// Sinkhorn-Knopp teacher targets (DINO and vMF logits) against core's composite in f64.
#[test]
fn gradients_match_f64_reference_sinkhorn_rel_2e5() {
    use dinovmf_core::centering::Centering;
    let sk = |iters| Some(Centering::Sinkhorn { iters });
    check_centering::<f64>(false, true, 0.0, sk(3), 0.0, 2e-5);
    check_centering::<f64>(true, false, 0.0, sk(3), 0.0, 2e-5);
    check_centering::<f64>(true, false, 0.0, sk(1), 0.0, 2e-5);
}

/// KoLeo on the student's [CLS] features (each global view) against core's KoLeo added to the
/// f64 reference's [CLS] gradient; with and without drop path, with Sinkhorn.
#[test]
fn gradients_match_f64_reference_with_koleo_rel_2e5() {
    use dinovmf_core::centering::Centering;
    let sk = Some(Centering::Sinkhorn { iters: 3 });
    check_centering::<f64>(true, false, 0.0, None, 0.5, 2e-5);
    check_centering::<f64>(false, true, 0.1, None, 0.1, 2e-5);
    check_centering::<f64>(true, false, 0.0, sk, 0.3, 2e-5);
}

/// The convolutional stem (one and two convolutions per stage; 12 px global and 8 px local
/// crops through two stride-2 stages) against the f64 reference, with drop path and Sinkhorn.
#[test]
fn gradients_match_f64_reference_with_conv_stem_rel_2e5() {
    use dinovmf_core::centering::Centering;
    let sk = Some(Centering::Sinkhorn { iters: 3 });
    check_model::<f64>(&model(false, 0.0).with_stem(1), true, None, 0.0, 2e-5);
    check_model::<f64>(&model(true, 0.6).with_stem(2), false, sk, 0.1, 2e-5);
}

#[test]
fn gradients_match_f64_reference_vmf_rel_2e5() {
    check_against::<f64>(true, false, 0.0, 2e-5);
    check_against::<f64>(true, true, 0.0, 2e-5);
}

#[test]
fn gradients_match_f64_reference_with_drop_path_rel_2e5() {
    // Drop path 0.6 on the last of 2 blocks: with 4 x 2 x 3 draws some samples are dropped
    // (checked below), so the masks really have to agree.
    let cfg = model(true, 0.6);
    let mut mg = vec![0.0f32; cfg.vit.depth * 2 * 2 * B];
    let mut ml = vec![0.0f32; cfg.vit.depth * 2 * N_LOCAL * B];
    draw_drop_masks(&cfg, 1234, 2 * B, N_LOCAL * B, &mut mg, &mut ml);
    assert!(mg.iter().chain(&ml).any(|&m| m == 0.0), "no sample dropped");
    check_against::<f64>(false, true, 0.6, 2e-5);
    check_against::<f64>(true, false, 0.6, 2e-5);
}

#[test]
fn gradients_match_f32_reference_rel_2e5() {
    check_against::<f32>(false, true, 0.3, 2e-5);
    check_against::<f32>(true, false, 0.3, 2e-5);
}

/// A full step = the backend's own raw gradients (checked above) through core's clip, AdamW with
/// DINO's parameter groups, EMA and center update, written out here: equal bit for bit.
#[test]
fn train_step_equals_core_optimiser_on_its_gradients_bitwise() {
    for (vmf, norm_last) in [(false, true), (true, false)] {
        let cfg = model(norm_last, 0.2);
        let lc = loss_cfg(vmf, norm_last);
        let st0 = perturbed_state(&cfg, &lc, 3);
        let mut be = backend(&cfg, &lc, &st0);
        let mut probe = backend(&cfg, &lc, &st0);
        let mut st = st0.clone();
        let lay = Layout::new(&cfg);
        for (step, (freeze, clip)) in [(true, 0.05f32), (false, 0.0), (false, 3.0)]
            .into_iter()
            .enumerate()
        {
            let bt = random_batch(&shapes(), 100 + step as u64);
            let mut hp = hyper(55 + step as u64);
            hp.freeze_last_layer = freeze;
            hp.clip_grad = clip;
            hp.lr = 1e-3 * (step + 1) as f32;
            // Reference: the same raw gradients through core's optimiser functions.
            probe.set_state(&st).unwrap();
            probe.compute_gradients(&bt, &hp).unwrap();
            let mut g = probe.grads().to_vec();
            let norm = if clip > 0.0 {
                clip_gradients(&cfg, &mut g, clip as f64)
            } else {
                clip_gradients(&cfg, &mut g.clone(), f64::INFINITY)
            };
            let t = st.adam_step + 1;
            adamw_step_model(
                &cfg,
                &mut st.student,
                &g,
                &mut st.adam_m,
                &mut st.adam_v,
                &AdamW::default(),
                hp.lr as f64,
                hp.weight_decay as f64,
                t,
                if freeze { None } else { Some(t) },
            );
            ema_update(&mut st.teacher, &st.student, hp.teacher_momentum as f64);
            st.center = probe.next_center().to_vec();
            st.adam_step = t;

            let m = be.train_step(&bt, &hp).unwrap();
            assert_eq!(m.grad_norm, norm as f32, "step {step}: grad norm");
            let got = be.state().unwrap();
            assert!(
                got == st,
                "step {step} (vmf={vmf}): state differs from the core step"
            );
            if freeze {
                let r = lay.last_g..lay.last_v + cfg.head.out_dim * cfg.head.bottleneck;
                assert_eq!(got.student[r.clone()], st0.student[r.clone()]);
                assert!(got.adam_m[r].iter().all(|&x| x == 0.0));
            }
        }
        // Untrainable tensors never move (weight_g under norm_last_layer).
        if norm_last {
            let st = be.state().unwrap();
            let r = lay.last_g..lay.last_v;
            assert!(st.student[r.clone()].iter().all(|&x| x == 1.0));
            assert!(st.teacher[r].iter().all(|&x| x == 1.0));
        }
    }
}

#[test]
fn embed_matches_reference_cls_rel_1e5() {
    let cfg = model(true, 0.1);
    let lc = loss_cfg(false, true);
    let st = perturbed_state(&cfg, &lc, 5);
    let mut be = backend(&cfg, &lc, &st);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    // 70 images > the 64 per internal chunk; 8 px is not the stored grid (resized pos-embed).
    for (n, size) in [(70usize, 8usize), (5, 12)] {
        let imgs: Vec<f32> = (0..n * 3 * size * size)
            .map(|_| rng.gen::<f32>() * 2.0 - 1.0)
            .collect();
        for (net, params) in [(Net::Teacher, &st.teacher), (Net::Student, &st.student)] {
            let f = be.embed(net, &imgs, n, size).unwrap();
            let mut p64 = vec![0.0f64; params.len()];
            convert_params(&mut p64, params);
            let i64: Vec<f64> = imgs.iter().map(|&x| x as f64).collect();
            let a = reference_model::forward(&cfg, &p64, &i64, n, size, None).unwrap();
            let e = rel_err(&f, a.cls_feature(), 1e-6);
            assert!(e < 1e-5, "embed {net:?} n={n} size={size}: rel err {e:e}");
        }
    }
}

fn run_steps(be: &mut CpuBackend, steps: usize) -> Vec<[f32; 6]> {
    (0..steps)
        .map(|i| {
            let m = be
                .train_step(
                    &random_batch(&shapes(), 40 + i as u64),
                    &hyper(77 + i as u64),
                )
                .unwrap();
            [
                m.loss,
                m.teacher_entropy,
                m.mean_entropy,
                m.max_mass,
                m.kl,
                m.grad_norm,
            ]
        })
        .collect()
}

#[test]
fn steps_are_bitwise_deterministic_across_runs_and_thread_counts() {
    let cfg = model(false, 0.3);
    let lc = loss_cfg(true, false);
    let st = perturbed_state(&cfg, &lc, 21);
    let mut results = Vec::new();
    for threads in [2usize, 2, 1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let (m, s) = pool.install(|| {
            let mut be = backend(&cfg, &lc, &st);
            let m = run_steps(&mut be, 3);
            (m, be.state().unwrap())
        });
        results.push((threads, m, s));
    }
    let (_, m0, s0) = &results[0];
    for (threads, m, s) in &results[1..] {
        assert!(
            m.iter()
                .flatten()
                .zip(m0.iter().flatten())
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "metrics differ with {threads} threads: {m:?} vs {m0:?}"
        );
        assert!(s == s0, "state differs with {threads} threads");
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let cfg = model(true, 0.1);
    let lc = loss_cfg(false, true);
    let st = perturbed_state(&cfg, &lc, 1);
    let mut be = backend(&cfg, &lc, &st);
    let hp = hyper(1);
    let good = random_batch(&shapes(), 1);
    let mut b = good.clone();
    b.batch_size = B + 1;
    assert!(be.train_step(&b, &hp).is_err());
    let mut b = good.clone();
    b.global.pop();
    assert!(be.train_step(&b, &hp).is_err());
    let mut b = good.clone();
    b.local.truncate(10);
    assert!(be.train_step(&b, &hp).is_err());
    let mut b = good.clone();
    b.n_local = 1;
    assert!(be.train_step(&b, &hp).is_err());
    let mut b = good.clone();
    b.global_size = 16;
    assert!(be.train_step(&b, &hp).is_err());
    let mut h = hp;
    h.teacher_temp = 0.0;
    assert!(be.train_step(&good, &h).is_err());
    assert!(be.embed(Net::Teacher, &[0.0; 3 * 10 * 10], 1, 10).is_err());
    assert!(be.embed(Net::Teacher, &[0.0; 3 * 8 * 8 + 1], 1, 8).is_err());
    assert!(be.embed(Net::Teacher, &[], 0, 8).unwrap().is_empty());
    let mut s = st.clone();
    s.center.pop();
    assert!(be.set_state(&s).is_err());
    let mut s = st.clone();
    s.adam_v.push(0.0);
    assert!(be.set_state(&s).is_err());
    for sh in [
        StepShapes {
            n_global: 3,
            ..shapes()
        },
        StepShapes {
            local_size: 10,
            ..shapes()
        },
        StepShapes {
            batch: 0,
            ..shapes()
        },
    ] {
        assert!(CpuBackend::new(cfg, lc, sh, Box::new(SingleProcess)).is_err());
    }
    // loss and model must agree on norm_last_layer
    assert!(CpuBackend::new(
        cfg,
        loss_cfg(false, false),
        shapes(),
        Box::new(SingleProcess)
    )
    .is_err());
    // still usable after the errors, and the state untouched by them
    assert!(be.state().unwrap() == st);
    be.train_step(&good, &hp).unwrap();
}
