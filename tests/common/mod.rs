//! What the tests share: the small test model, step shapes, a random batch, a state away from
//! initialisation, a normal draw and the relative error they assert on; the iBOT settings; the tiny trainer
//! config, a scratch folder and quiet run options. Each test file includes it with
//! `mod common;` (`host/tests` by path) and uses the parts it needs.
#![allow(dead_code)]

pub mod alloc_count;

use std::path::{Path, PathBuf};

use dinovmf::backend::{StepHyper, StepShapes, TrainState};
use dinovmf::data::Batch;
use dinovmf::train::{LossKind, Method, RunOptions, TrainConfig};
use dinovmf_core::centering::{center_init, Centering};
use dinovmf_core::loss::LossConfig;
use dinovmf_core::masking::MaskConfig;
use dinovmf_core::mim_loss::IbotConfig;
use dinovmf_core::model::{
    init_params, num_params, HeadConfig, IbotParts, Layout, ModelConfig, VitConfig,
};
use dinovmf_core::Real;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The backend tests' model: small enough for the f64 reference to be quick, large enough that
/// every path is exercised: 12 px images in a 3 x 3 grid (8 px local crops: 2 x 2, the position
/// embedding resized), two blocks of two heads, p = 64 (the vMF f32 normaliser is at f32
/// rounding from p = 64 on), K = 48.
pub fn test_model(norm_last_layer: bool, drop_path: f32, ibot: IbotParts) -> ModelConfig {
    ModelConfig {
        vit: VitConfig {
            img_size: 12,
            patch: 4,
            in_chans: 3,
            dim: 16,
            depth: 2,
            heads: 2,
            mlp_ratio: 4,
            qkv_bias: true,
            ln_eps: 1e-6,
            drop_path,
            stem_convs: 0,
        },
        head: HeadConfig {
            hidden: 32,
            bottleneck: 64,
            n_layers: 3,
            out_dim: 48,
            norm_last_layer,
        },
        ibot,
    }
}

/// The `tiny` preset for a method and a loss.
/// The backend tests' step hyper-parameters (LR 1e-3, teacher and patch temperature 0.04,
/// momentum 0.99, clipping 3), with the step's seed.
pub fn step_hyper(seed: u64) -> StepHyper {
    StepHyper {
        lr: 1e-3,
        weight_decay: 0.04,
        teacher_momentum: 0.99,
        teacher_temp: 0.04,
        freeze_last_layer: false,
        clip_grad: 3.0,
        seed,
        patch_teacher_temp: 0.04,
    }
}

/// The backend tests' iBOT settings: most crops masked, a wide ratio, a patch loss weight and a
/// patch center momentum away from their defaults so that each shows in the results.
pub fn ibot_config() -> IbotConfig {
    IbotConfig {
        mask: MaskConfig {
            prob: 0.8,
            ratio: (0.2, 0.6),
            ..Default::default()
        },
        mim_weight: 0.7,
        patch_center_momentum: 0.8,
    }
}

pub fn tiny_config(method: Method, loss: LossKind) -> TrainConfig {
    TrainConfig::preset_for("tiny", method, loss).unwrap()
}

/// [`tiny_config`] for a two-epoch run (a few steps: the trainer tests).
pub fn tiny_run(method: Method, loss: LossKind) -> TrainConfig {
    let mut c = tiny_config(method, loss);
    c.epochs = 2;
    c
}

/// A fresh (removed if present) folder `dinovmf-{suite}-{pid}-{name}` in the temp dir.
pub fn scratch_dir(suite: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dinovmf-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Run options into `dir` without a progress bar or evaluations, two data workers.
pub fn quiet_options(dir: &Path) -> RunOptions {
    RunOptions {
        out_dir: dir.to_path_buf(),
        progress: false,
        eval: false,
        workers: 2,
        ..Default::default()
    }
}

/// Batches of `batch` images: two global crops of `global` px, `n_local` local crops of
/// `local` px.
pub fn shapes(batch: usize, n_local: usize, global: usize, local: usize) -> StepShapes {
    StepShapes {
        batch,
        n_global: 2,
        n_local,
        global_size: global,
        local_size: local,
    }
}

/// A standard normal draw (Box-Muller).
pub fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.gen::<f64>().max(1e-300);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// A batch of `s`'s shapes (3 channels), every value uniform in [-1, 1) from `seed`.
pub fn random_batch(s: &StepShapes, seed: u64) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect() };
    let (b, g, l) = (s.batch, s.global_size, s.local_size);
    Batch {
        global: r(2 * b * 3 * g * g),
        local: r(s.n_local * b * 3 * l * l),
        labels: vec![0; b],
        indices: (0..b).collect(),
        global_size: g,
        local_size: l,
        batch_size: b,
        n_global: 2,
        n_local: s.n_local,
    }
}

/// A state that is not at initialisation: every tensor perturbed (biases and LayerNorms not
/// 0 / 1), teacher != student, radii away from 1 when learned, a non-trivial center; a model
/// with the mask token (iBOT) also gets a random mask token and a non-trivial patch center.
pub fn perturbed_state(cfg: &ModelConfig, loss: &LossConfig, seed: u64) -> TrainState {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = num_params(cfg);
    let mut student = vec![0.0f32; n];
    init_params(cfg, &mut student, &mut || normal(&mut rng));
    let lay = Layout::new(cfg);
    let k = cfg.head.out_dim;
    // The gains of the [CLS] prototypes and (a separate patch head's) patch prototypes.
    let is_g = |i: usize| {
        (i >= lay.last_g && i < lay.last_g + k) || (i >= lay.patch_g && i < lay.patch_g + k)
    };
    for (i, x) in student.iter_mut().enumerate() {
        if is_g(i) {
            if !cfg.head.norm_last_layer {
                *x = 1.0 + 0.3 * (rng.gen::<f32>() - 0.5);
            }
        } else {
            *x += 0.05 * normal(&mut rng) as f32;
        }
    }
    let mut teacher = student.clone();
    for (i, x) in teacher.iter_mut().enumerate() {
        if !(is_g(i) && cfg.head.norm_last_layer) {
            *x += 0.01 * normal(&mut rng) as f32;
        }
    }
    let mut center = vec![0.0f32; k];
    center_init(&mut center, loss.centering);
    let mut patch_center = if cfg.ibot.mask_token {
        center.clone()
    } else {
        Vec::new()
    };
    for c in center.iter_mut().chain(patch_center.iter_mut()) {
        match loss.centering {
            Centering::Logit => *c = 0.1 * normal(&mut rng) as f32,
            Centering::Probability | Centering::Sinkhorn { .. } => *c *= 0.5 + rng.gen::<f32>(),
        }
    }
    TrainState {
        student,
        teacher,
        adam_m: vec![0.0; n],
        adam_v: vec![0.0; n],
        center,
        patch_center,
        adam_step: 0,
    }
}

/// Largest `|a - b|` over the slice, relative to `max(max |b|, floor)`.
pub fn rel_err<T: Real>(a: &[f32], b: &[T], floor: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(floor, |m, x| m.max(x.to_f64().abs()));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - y.to_f64()).abs()))
        / scale
}

/// Trains `cfg` whole into `scratch_dir(suite, "{name}-full")`, then again into
/// `"{name}-half"`, stopped mid-run (half the steps plus one) and resumed from its checkpoint;
/// asserts that the joined losses and the final training states equal the whole run's bit for
/// bit. Returns the whole run's summary (its folder is kept for the caller; the halved run's is
/// removed).
pub fn assert_resume_is_bit_exact(
    cfg: &TrainConfig,
    suite: &str,
    name: &str,
) -> dinovmf::train::TrainSummary {
    use dinovmf::train::{state, train};
    let full = train(
        cfg,
        &quiet_options(&scratch_dir(suite, &format!("{name}-full"))),
    )
    .unwrap();
    let n = full.steps;
    assert!(n >= 4, "{name}: need a few steps, got {n}");
    let half_dir = scratch_dir(suite, &format!("{name}-half"));
    let mut o = quiet_options(&half_dir);
    o.max_steps = Some(n / 2 + 1); // stop mid-epoch on purpose
    let first = train(cfg, &o).unwrap();
    let mut o2 = quiet_options(&half_dir);
    o2.resume = Some(first.checkpoint.clone());
    let second = train(cfg, &o2).unwrap();
    let mut joined = first.losses.clone();
    joined.extend_from_slice(&second.losses);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&joined),
        bits(&full.losses),
        "{name}: resumed losses differ"
    );
    let (a, ..) = state::load_checkpoint(&full.checkpoint).unwrap();
    let (b, ..) = state::load_checkpoint(&second.checkpoint).unwrap();
    assert!(a == b, "{name}: final states differ");
    std::fs::remove_dir_all(&half_dir).ok();
    full
}
