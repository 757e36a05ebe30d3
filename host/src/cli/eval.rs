//! `dinovmf eval ...`: evaluations of a trained checkpoint. They run on the CPU backend whatever
//! device trained the checkpoint.
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::backend::{self, Backend, Device, Net, TrainState};
use crate::config::{backend_config, loss_config, model_config};
use crate::data::OnError;
use crate::eval::data_pass::{diagnose_backend, first_images};
use crate::eval::linear::{linear_probe, ProbeScore};
use crate::eval::prototypes::ProtoDiag;
use crate::train::{self, state, DataSpec, Datasets, TrainConfig};

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// k-NN accuracy of the teacher's [CLS] features (weighted vote, T = 0.07).
    Knn(KnnArgs),
    /// Linear probe on the frozen teacher's [CLS] tokens of the last blocks: ridge regression
    /// in closed form (lambda chosen on a fifth of the training split), top-1 / top-5 on the
    /// held-out split.
    Linear(LinearArgs),
    /// Prototype diagnostics: utilisation over a data pass, kappa quartiles, unique prototypes
    /// (partial collapse), teacher / student entropies, KoLeo-proto, RankMe, and the NMI /
    /// purity of the teacher's argmax prototype against the labels.
    Prototypes(ProtoArgs),
}

#[derive(Args, Debug, Clone)]
pub struct KnnArgs {
    /// A checkpoint written by `dinovmf train`.
    pub checkpoint: PathBuf,
    /// Data to evaluate on: `run` (the checkpoint's own data), `builtin`,
    /// `folder:TRAIN,TEST` or `cifar:PATH`.
    #[arg(long, default_value = "run")]
    pub data: String,
    /// Also report the raw-pixel baseline.
    #[arg(long)]
    pub pixels: bool,
}

#[derive(Args, Debug, Clone)]
pub struct LinearArgs {
    /// A checkpoint written by `dinovmf train`.
    pub checkpoint: PathBuf,
    /// Data to evaluate on: `run` (the checkpoint's own data), `builtin`,
    /// `folder:TRAIN,TEST` or `cifar:PATH`.
    #[arg(long, default_value = "run")]
    pub data: String,
    /// Concatenate the [CLS] token after each of the last N blocks (each through the final
    /// LayerNorm); DINO uses 4 for small ViTs. Clamped to the model's depth.
    #[arg(long, default_value_t = 4)]
    pub blocks: usize,
    /// Also print the k-NN accuracy of the same checkpoint for comparison.
    #[arg(long)]
    pub knn: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ProtoArgs {
    /// A checkpoint written by `dinovmf train`.
    pub checkpoint: PathBuf,
    /// Data for the utilisation pass: `run` (the checkpoint's own data), `builtin`,
    /// `folder:TRAIN,TEST` or `cifar:PATH`; the held-out split is used when there is one.
    #[arg(long, default_value = "run")]
    pub data: String,
    /// Images in the utilisation pass (the first N of the split).
    #[arg(long, default_value_t = 2048)]
    pub images: usize,
    /// Teacher temperature for kappa = |g| / tau and the teacher entropy (default: the run's
    /// final teacher temperature).
    #[arg(long)]
    pub teacher_temp: Option<f64>,
    /// Also write the kappa histogram as PNG here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

pub fn run(c: &EvalCommand) -> Result<()> {
    match c {
        EvalCommand::Knn(a) => knn(a),
        EvalCommand::Linear(a) => linear(a),
        EvalCommand::Prototypes(a) => prototypes(a),
    }
}

/// A checkpoint on the CPU backend with the data it asks for.
pub struct Loaded {
    pub backend: Box<dyn Backend>,
    pub state: TrainState,
    pub step: u64,
    pub cfg: TrainConfig,
    pub data: Datasets,
}

/// Loads `checkpoint` onto a CPU backend and opens `data` (`run` = the checkpoint's own).
pub fn load(checkpoint: &Path, data: &str, need_test: bool) -> Result<Loaded> {
    let (st, step, cfg, _) = state::load_checkpoint(checkpoint)?;
    let spec = if data == "run" {
        cfg.data.clone()
    } else {
        super::train::parse_data(data, &cfg.data)?
    };
    if need_test {
        if let DataSpec::Folder {
            test_root: None, ..
        } = spec
        {
            anyhow::bail!("this evaluation needs a held-out split: use --data folder:TRAIN,TEST");
        }
    }
    let data = train::open_data(&spec, cfg.model.img_size, OnError::Skip)?;
    let mut backend = backend::open(&backend_config(&cfg), Device::Cpu)?;
    backend.set_state(&st)?;
    Ok(Loaded {
        backend,
        state: st,
        step,
        cfg,
        data,
    })
}

fn knn(a: &KnnArgs) -> Result<()> {
    let mut l = load(&a.checkpoint, &a.data, true)?;
    let size = l.cfg.model.img_size;
    let scores = train::knn_eval(l.backend.as_mut(), &l.data, size)?;
    let px = if a.pixels {
        Some(train::knn_pixels(&l.data, size)?)
    } else {
        None
    };
    println!(
        "checkpoint {} (step {}), data {}",
        a.checkpoint.display(),
        l.step,
        l.data.train.describe()
    );
    for (i, s) in scores.iter().enumerate() {
        match &px {
            Some(p) => println!(
                "k = {:>3}: {:5.1}%   (raw pixels {:5.1}%)",
                s.k,
                100.0 * s.top1,
                100.0 * p[i].top1
            ),
            None => println!("k = {:>3}: {:5.1}%", s.k, 100.0 * s.top1),
        }
    }
    Ok(())
}

/// The linear probe of a loaded checkpoint on its train / held-out splits.
pub fn probe(l: &mut Loaded, blocks: usize) -> Result<ProbeScore> {
    let size = l.cfg.model.img_size;
    let blocks = blocks.clamp(1, l.cfg.model.depth);
    let test = l
        .data
        .test
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no held-out split to evaluate on"))?;
    let (tr, trl, f) = train::dataset_block_features(
        l.backend.as_mut(),
        &l.data.train,
        size,
        Net::Teacher,
        blocks,
    )?;
    let (te, tel, _) =
        train::dataset_block_features(l.backend.as_mut(), &test, size, Net::Teacher, blocks)?;
    let classes = l.data.train.num_classes().max(test.num_classes());
    linear_probe(&tr, &trl, &te, &tel, f, classes)
}

fn linear(a: &LinearArgs) -> Result<()> {
    let mut l = load(&a.checkpoint, &a.data, true)?;
    let blocks = a.blocks.clamp(1, l.cfg.model.depth);
    eprintln!(
        "linear probe: teacher [CLS] of the last {blocks} blocks ({} features), data {}",
        blocks * l.cfg.model.dim,
        l.data.train.describe()
    );
    let s = probe(&mut l, blocks)?;
    println!(
        "checkpoint {} (step {}): linear probe top-1 {:.1}%  top-5 {:.1}%  (ridge lambda {:e} x n, \
         validation top-1 {:.1}%)",
        a.checkpoint.display(),
        l.step,
        100.0 * s.top1,
        100.0 * s.top5,
        s.lambda,
        100.0 * s.val_top1
    );
    if a.knn {
        let scores = train::knn_eval(l.backend.as_mut(), &l.data, l.cfg.model.img_size)?;
        for s in scores {
            println!("k-NN k = {:>3}: {:5.1}%", s.k, 100.0 * s.top1);
        }
    }
    Ok(())
}

/// Prototype diagnostics of a loaded checkpoint on the first `images` of its held-out split
/// (the training split when there is none).
pub fn proto_diag(l: &mut Loaded, images: usize, teacher_temp: Option<f64>) -> Result<ProtoDiag> {
    let size = l.cfg.model.img_size;
    let ds = l.data.test.clone().unwrap_or_else(|| l.data.train.clone());
    let sample = first_images(&ds, size, images.max(1))?;
    let tau = teacher_temp.unwrap_or(l.cfg.teacher_temp);
    anyhow::ensure!(tau > 0.0, "--teacher-temp must be positive, got {tau}");
    diagnose_backend(
        l.backend.as_mut(),
        &model_config(&l.cfg),
        &loss_config(&l.cfg),
        &sample,
        tau,
    )
}

/// Prints diagnostics as a few readable lines.
pub fn print_diag(d: &ProtoDiag) {
    let k = d.prototypes;
    println!(
        "utilisation: {} of {k} prototypes win an argmax over {} images; assignment entropy {:.3} \
         nats (ln K = {:.3}, perplexity {:.1})",
        d.used,
        d.images,
        d.assign_entropy,
        (k as f64).ln(),
        d.assign_entropy.exp()
    );
    println!(
        "centered targets: {} of {k} prototypes win an argmax; assignment entropy {:.3} nats \
         (perplexity {:.1})",
        d.used_centered,
        d.assign_entropy_centered,
        d.assign_entropy_centered.exp()
    );
    match &d.agreement {
        Some(a) => println!(
            "assignment vs labels: NMI {:.3}, purity {:.1}% (teacher argmax prototype)",
            a.nmi,
            100.0 * a.purity
        ),
        None => println!("assignment vs labels: no labels (fewer than two classes)"),
    }
    println!(
        "unique prototypes: {} of {k} (angular threshold {} rad)",
        d.unique, d.unique_eps
    );
    let q = d.kappa;
    println!(
        "kappa = |g| / tau (tau = {}): min {:.2}  q1 {:.2}  median {:.2}  q3 {:.2}  max {:.2}",
        d.kappa_tau, q[0], q[1], q[2], q[3], q[4]
    );
    println!(
        "entropies: teacher {:.3}, student {:.3} nats per image; teacher batch mean {:.3} \
         (KL to the mean {:.3}; 0 = input-independent teacher); KoLeo-proto {:.4}",
        d.teacher_entropy,
        d.student_entropy,
        d.teacher_mean_entropy,
        d.kl_to_mean(),
        d.koleo
    );
    println!(
        "RankMe of the teacher's [CLS] features: {:.1} (1 = collapsed, at most the width)",
        d.rankme
    );
}

fn prototypes(a: &ProtoArgs) -> Result<()> {
    let mut l = load(&a.checkpoint, &a.data, false)?;
    let d = proto_diag(&mut l, a.images, a.teacher_temp)?;
    println!("checkpoint {} (step {})", a.checkpoint.display(), l.step);
    print_diag(&d);
    if let Some(p) = &a.plot {
        let model = model_config(&l.cfg);
        let k = crate::eval::prototypes::kappa_values(&model, &l.state.teacher, d.kappa_tau);
        crate::plot::kappa_histogram(p, &k, d.kappa_tau)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}
