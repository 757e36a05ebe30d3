//! Issue 7: the probe features and attention maps against core's reference forward, the
//! KoLeo-proto gradient inside a CPU step, and a tiny run's periodic evaluations, figures and
//! report. Every test here takes seconds.
use std::path::PathBuf;

use dinovmf::backend::cpu::CpuBackend;
use dinovmf::backend::StepShapes;
use dinovmf::backend::{Backend, Net, SingleProcess, StepHyper, TrainState};
use dinovmf::data::Batch;
use dinovmf::train::{self, periodic, state, LossKind, Method, RunOptions, TrainConfig};
use dinovmf_core::centering::Centering;
use dinovmf_core::loss::LossConfig;
use dinovmf_core::model::{HeadConfig, IbotParts, Layout, ModelConfig, VitConfig};
use dinovmf_core::ops::layernorm_forward;
use dinovmf_core::prototypes::{koleo_proto, nearest_neighbours, KoleoGrad};
use dinovmf_core::reference_model;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn model() -> ModelConfig {
    ModelConfig {
        vit: VitConfig {
            img_size: 12,
            patch: 4,
            in_chans: 3,
            dim: 16,
            depth: 3,
            heads: 2,
            mlp_ratio: 2,
            qkv_bias: true,
            ln_eps: 1e-6,
            drop_path: 0.0,
            stem_convs: 0,
        },
        head: HeadConfig {
            hidden: 32,
            bottleneck: 16,
            n_layers: 3,
            out_dim: 40,
            norm_last_layer: false,
        },
        ibot: IbotParts::NONE,
    }
}

const B: usize = 2;

mod common;

fn shapes() -> StepShapes {
    common::shapes(B, 2, 12, 8)
}

fn backend(st: &TrainState) -> CpuBackend {
    let mut b = CpuBackend::new(
        model(),
        LossConfig::vmf(),
        shapes(),
        Box::new(SingleProcess),
    )
    .unwrap();
    b.set_state(st).unwrap();
    b
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect()
}

#[test]
fn block_features_and_attention_match_the_reference_forward() {
    let m = model();
    let st = TrainState::initial(&m, Centering::Probability, 5);
    let mut b = backend(&st);
    // More images than one probe chunk (16), at the training size and at a larger one.
    for (n, size) in [(19usize, 12usize), (3, 16)] {
        let imgs = random(n * 3 * size * size, 11 + size as u64);
        let p64: Vec<f64> = st.teacher.iter().map(|&x| x as f64).collect();
        let i64: Vec<f64> = imgs.iter().map(|&x| x as f64).collect();
        let act = reference_model::forward(&m, &p64, &i64, n, size, None).unwrap();
        let (d, depth, t) = (16, 3, act.tokens);
        let lay = Layout::new(&m);
        let feats = b.embed_blocks(Net::Teacher, &imgs, n, size, depth).unwrap();
        assert_eq!(feats.len(), n * depth * d);
        for blk in 0..depth {
            for i in 0..n {
                let x = &act.stream[blk + 1][i * t * d..i * t * d + d];
                let mut y = vec![0.0f64; d];
                let (mut mu, mut rs) = ([0.0f64], [0.0f64]);
                layernorm_forward(
                    &mut y,
                    &mut mu,
                    &mut rs,
                    x,
                    &p64[lay.norm_w..lay.norm_w + d],
                    &p64[lay.norm_b..lay.norm_b + d],
                    1,
                    d,
                    1e-6,
                );
                let got = &feats[i * depth * d + blk * d..][..d];
                for (g, w) in got.iter().zip(&y) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-4,
                        "block {blk} image {i}: {g} vs {w}"
                    );
                }
            }
        }
        // The last block's slot is the final [CLS] feature `embed` returns.
        let e = b.embed(Net::Teacher, &imgs, n, size).unwrap();
        for i in 0..n {
            let a = &feats[i * depth * d + (depth - 1) * d..][..d];
            let c = &e[i * d..(i + 1) * d];
            assert!(a.iter().zip(c).all(|(x, y)| (x - y).abs() < 1e-5));
        }
        // Two blocks: the last two slots.
        let f2 = b.embed_blocks(Net::Teacher, &imgs, n, size, 2).unwrap();
        assert_eq!(&f2[..2 * d], &feats[d..3 * d]);

        let att = b.cls_attention(Net::Teacher, &imgs, n, size).unwrap();
        let want = act.last_cls_attention(2);
        assert_eq!(att.len(), want.len());
        for (g, w) in att.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
        for row in att.chunks(t) {
            let s: f32 = row.iter().sum();
            assert!((s - 1.0).abs() < 1e-5, "attention row sums to {s}");
        }
    }
    assert!(b.embed_blocks(Net::Teacher, &[0.0; 432], 1, 12, 4).is_err());
    assert!(b.cls_attention(Net::Teacher, &[0.0; 10], 1, 12).is_err());
}

#[test]
fn koleo_proto_gradient_joins_the_step() {
    let m = model();
    let st = TrainState::initial(&m, Centering::Probability, 7);
    let batch = Batch {
        global: random(2 * B * 3 * 144, 1),
        local: random(2 * B * 3 * 64, 2),
        labels: vec![0; B],
        indices: (0..B).collect(),
        global_size: 12,
        local_size: 8,
        batch_size: B,
        n_global: 2,
        n_local: 2,
    };
    let hp = StepHyper {
        lr: 0.0,
        weight_decay: 0.0,
        teacher_momentum: 1.0,
        teacher_temp: 0.04,
        freeze_last_layer: false,
        clip_grad: 0.0,
        seed: 3,
        patch_teacher_temp: 0.04,
    };
    let mut plain = backend(&st);
    let mut reg = backend(&st);
    let w = 0.3f32;
    reg.set_koleo_proto(w).unwrap();
    assert!(reg.set_koleo_proto(-1.0).is_err());
    reg.set_koleo_proto(w).unwrap();
    let m0 = plain.train_step(&batch, &hp).unwrap();
    let m1 = reg.train_step(&batch, &hp).unwrap();
    assert_eq!(m0.loss, m1.loss);
    assert_eq!(plain.koleo_proto_loss(), None);
    let kl = reg.koleo_proto_loss().expect("KoLeo value reported");
    // The reference in f64 on the student's v.
    let lay = Layout::new(&m);
    let (k, p) = (40, 16);
    let v: Vec<f64> = st.student[lay.last_v..lay.last_v + k * p]
        .iter()
        .map(|&x| x as f64)
        .collect();
    let mut mu = v.clone();
    let mut vn = vec![0.0; k];
    for (r, n) in mu.chunks_mut(p).zip(vn.iter_mut()) {
        *n = r.iter().map(|x| x * x).sum::<f64>().sqrt();
        r.iter_mut().for_each(|x| *x /= *n);
    }
    let mut nn = vec![0; k];
    nearest_neighbours(&mu, k, p, &mut nn);
    let mut dv = vec![0.0f64; k * p];
    let mut dmu = vec![0.0f64; k * p];
    let want = koleo_proto(
        &mu,
        &nn,
        k,
        p,
        Some(KoleoGrad {
            vnorm: &vn,
            dv: &mut dv,
            dmu: &mut dmu,
            weight: w as f64,
        }),
    );
    assert!(
        (kl as f64 - want).abs() < 1e-4 * want.abs().max(1.0),
        "{kl} vs {want}"
    );
    let (g0, g1) = (plain.grads(), reg.grads());
    for i in 0..g0.len() {
        let in_v = (lay.last_v..lay.last_v + k * p).contains(&i);
        let extra = (g1[i] - g0[i]) as f64;
        let expect = if in_v { dv[i - lay.last_v] } else { 0.0 };
        assert!(
            (extra - expect).abs() < 1e-5 + 1e-3 * expect.abs(),
            "grad {i}: KoLeo added {extra}, expected {expect}"
        );
    }
    assert!(
        dv.iter().any(|x| x.abs() > 1e-4),
        "the KoLeo gradient is not trivial"
    );
}

fn tmp(name: &str) -> PathBuf {
    common::scratch_dir("insight", name)
}

fn tiny() -> TrainConfig {
    let mut c = common::tiny_run(Method::Dino, LossKind::Vmf);
    c.koleo_proto = 0.01;
    c
}

#[test]
fn a_tiny_run_logs_evaluations_draws_figures_and_reports() {
    let dir = tmp("run");
    let cfg = tiny();
    let opts = RunOptions {
        out_dir: dir.clone(),
        progress: false,
        workers: 2,
        diag_every: Some(3),
        ..Default::default()
    };
    let s = train::train(&cfg, &opts).unwrap();
    // KoLeo-proto is on: every metrics line carries it.
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count() as u64, s.steps);
    for l in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["koleo_proto"].as_f64().unwrap().is_finite());
    }
    let ev = periodic::read_evals(&dir).unwrap();
    // Start (k-NN + diagnostics), epoch 1 k-NN, diagnostics every 3 steps and at the end,
    // final k-NN.
    assert_eq!(ev[0].step, 0);
    assert!(ev[0].knn.is_some() && ev[0].diag.is_some());
    let knn_steps: Vec<u64> = ev
        .iter()
        .filter(|e| e.knn.is_some())
        .map(|e| e.step)
        .collect();
    let spe = s.steps / 2;
    assert_eq!(knn_steps, vec![0, spe, s.steps]);
    let diag_steps: Vec<u64> = ev
        .iter()
        .filter(|e| e.diag.is_some())
        .map(|e| e.step)
        .collect();
    assert!(
        diag_steps.contains(&3) && diag_steps.contains(&s.steps),
        "{diag_steps:?}"
    );
    let d = ev.iter().rev().find_map(|e| e.diag.clone()).unwrap();
    assert_eq!(d.prototypes, 64);
    assert!(d.used >= 1 && d.used <= 64 && d.unique >= 1 && d.unique <= 64);
    assert!(d.kappa.windows(2).all(|w| w[0] <= w[1]), "{:?}", d.kappa);
    assert!(d.assign_entropy >= 0.0 && d.assign_entropy <= (64f64).ln() + 1e-9);
    assert!(d.used_centered >= 1 && d.used_centered <= 64);
    assert!(d.assign_entropy_centered >= 0.0 && d.assign_entropy_centered <= (64f64).ln() + 1e-9);
    // Figures: valid PNGs of the documented sizes.
    for (f, w, h) in [
        ("loss_knn.png", 1120, 400),
        ("schedules.png", 1120, 400),
        ("utilisation.png", 1120, 400),
        ("kappa_hist.png", 560, 400),
    ] {
        let img = image::open(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!((img.width(), img.height()), (w, h), "{f}");
        // Not a blank canvas: some pixels are far from white.
        let rgb = img.to_rgb8();
        let dark = rgb
            .pixels()
            .filter(|p| p.0.iter().all(|&c| c < 128))
            .count();
        assert!(dark > 100, "{f} looks empty ({dark} dark pixels)");
    }
    // The report, without the (slower) fresh evaluations, then the CLI's full version.
    let out = dinovmf::report::write_report(&dir, &Default::default()).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    for want in [
        "k-NN top-1, k = 20",
        "unique prototypes",
        "![loss_knn.png]",
        "kappa",
    ] {
        assert!(text.contains(want), "report lacks {want:?}:\n{text}");
    }
    // Probe and diagnostics on the checkpoint through the CLI's functions.
    let mut l = dinovmf::cli::eval::load(&s.checkpoint, "run", true).unwrap();
    let p = dinovmf::cli::eval::probe(&mut l, 4).unwrap();
    assert!(p.top1 > 0.0 && p.top1 <= p.top5 && p.top5 <= 1.0, "{p:?}");
    assert_eq!(p.features, 2 * 16);
    let d2 = dinovmf::cli::eval::proto_diag(&mut l, 40, Some(0.04)).unwrap();
    assert_eq!((d2.images, d2.kappa_tau), (40, 0.04));
    let _ = state::load_checkpoint(&s.checkpoint).unwrap();
    // The attention figure: the image plus one panel per head (tiny: 2 heads), 64 px panels
    // under a 28 px title.
    let att = dir.join("att.png");
    let a = dinovmf::cli::attention::AttentionArgs {
        checkpoint: s.checkpoint.clone(),
        image: "heldout:1".into(),
        out: Some(att.clone()),
        size: None,
        panel: 64,
        student: false,
    };
    dinovmf::cli::attention::run(&a).unwrap();
    let img = image::open(&att).unwrap();
    assert_eq!((img.width(), img.height()), (3 * 64, 64 + 28));
    let bad = dinovmf::cli::attention::AttentionArgs {
        image: "heldout:100000".into(),
        ..a
    };
    let e = dinovmf::cli::attention::run(&bad).unwrap_err().to_string();
    assert!(e.contains("held-out split has"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn report_on_a_folder_without_metrics_says_so() {
    let dir = tmp("empty");
    std::fs::create_dir_all(&dir).unwrap();
    let e = dinovmf::report::write_figures(&dir)
        .unwrap_err()
        .to_string();
    assert!(e.contains("metrics.jsonl"), "{e}");
    let e = dinovmf::report::write_figures(&dir.join("nope"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a directory"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
