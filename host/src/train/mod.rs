//! The training loop: data -> backend step -> schedules, metrics, checkpoints, collapse watch,
//! k-NN evaluation at the start and the end.
pub mod collapse_watch;
pub mod config;
pub mod periodic;
pub mod run_dir;
pub mod run_length;
pub mod state;
pub mod validate;

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use dinovmf_core::schedule::Recipe;

use crate::backend::{self, Backend, Device, Net, StepHyper};
use crate::checkpoint::{write_atomic, LoadOptions};
use crate::config::{backend_config, crop_config};
use crate::data::{self, Dataset, Loader, OnError};
use crate::eval::knn::{knn_accuracy, KnnScore, KNN_KS, KNN_TEMPERATURE};
use collapse_watch::{below_init_warning, AntiCollapseInUse, CollapseWatch};
pub use config::{
    CenteringKind, DataSpec, IbotSpec, LossKind, Method, ModelSpec, Precision, TrainConfig,
};
pub use run_dir::ExistingRun;

/// How to run (not part of the method: nothing here changes the numbers).
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub out_dir: PathBuf,
    pub resume: Option<PathBuf>,
    pub device: Device,
    /// Data worker threads (0 = decode on the rayon pool).
    pub workers: usize,
    pub progress: bool,
    /// k-NN at initialisation and at the end.
    pub eval: bool,
    /// Stop after this many steps in total (the schedules still span every epoch).
    pub max_steps: Option<u64>,
    pub on_error: OnError,
    /// What a new run does when `out_dir` already holds a run.
    pub existing: ExistingRun,
    /// Checkpoint every this many epochs (and at the end).
    pub checkpoint_every: u64,
    /// Also checkpoint every this many steps (0 = off).
    pub checkpoint_every_steps: u64,
    /// Also checkpoint when this many minutes passed since the last save (0 = off). Saving reads
    /// the state only, so this wall-clock cadence never changes the run's numbers.
    pub checkpoint_every_minutes: f64,
    /// Set (by a SIGINT / SIGTERM handler) to stop: the loop finishes its step, saves, writes the
    /// summary and returns [`Interrupted`].
    pub stop: Option<Arc<AtomicBool>>,
    /// How the resumed checkpoint is read (checksum verification).
    pub load: LoadOptions,
    /// k-NN on the held-out split every this many epochs (0 = only at the start and the end).
    pub knn_every: u64,
    /// Prototype diagnostics every this many steps (`None`: once per epoch; 0 = off).
    pub diag_every: Option<u64>,
    /// Write the run's figures (PNG) at the end.
    pub figures: bool,
    /// How the batches are split over data-parallel ranks (never changes the config).
    pub parallel: Parallel,
}

/// How a run splits each global batch over data-parallel ranks. With N ranks every rank trains
/// on `batch_size / N` images of each batch and the reduce phase makes the gradients and the
/// batch statistics global; the numbers depend on N only through the order of the sums
/// (`Shards(N)` and N MPI ranks give the same bits).
#[derive(Clone, Default)]
pub enum Parallel {
    /// One process, one rank (the default numbers).
    #[default]
    Single,
    /// N ranks as threads of this process (`--shards N`).
    Shards(usize),
    /// This process is one rank of an MPI job (`mpirun -np N dinovmf train ...`).
    #[cfg(feature = "mpi")]
    Mpi(Arc<crate::backend::mpi::MpiWorld>),
}

impl Parallel {
    /// `(rank, ranks)` of this process: the one that writes files is rank 0. In-process shards
    /// are one process: rank 0 of 1.
    pub fn process_rank(&self) -> (usize, usize) {
        match self {
            Parallel::Single | Parallel::Shards(_) => (0, 1),
            #[cfg(feature = "mpi")]
            Parallel::Mpi(w) => (w.rank(), w.size()),
        }
    }

    /// Data-parallel ranks in all.
    pub fn ranks(&self) -> usize {
        match self {
            Parallel::Single => 1,
            Parallel::Shards(n) => (*n).max(1),
            #[cfg(feature = "mpi")]
            Parallel::Mpi(w) => w.size(),
        }
    }

    /// A collective over the processes of the run (for the trainer's own agreements).
    fn process_collective(&self) -> Box<dyn backend::Collective> {
        match self {
            Parallel::Single | Parallel::Shards(_) => Box::new(backend::SingleProcess),
            #[cfg(feature = "mpi")]
            Parallel::Mpi(w) => Box::new(w.collective()),
        }
    }

    /// The backend of this process.
    fn open_backend(
        &self,
        cfg: &backend::BackendConfig,
        device: Device,
    ) -> Result<Box<dyn Backend>> {
        match self {
            Parallel::Single => backend::open(cfg, device),
            Parallel::Shards(n) => backend::open_shards(cfg, device, *n),
            #[cfg(feature = "mpi")]
            Parallel::Mpi(w) => backend::open_rank(cfg, device, Box::new(w.collective())),
        }
    }

    /// What the banner says.
    pub fn describe(&self) -> String {
        match self {
            Parallel::Single => "1 rank".into(),
            Parallel::Shards(n) => format!("{n} ranks (in-process shards)"),
            #[cfg(feature = "mpi")]
            Parallel::Mpi(w) => format!("{} ranks (MPI)", w.size()),
        }
    }
}

impl std::fmt::Debug for Parallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("runs/latest"),
            resume: None,
            device: Device::Cpu,
            workers: 1,
            progress: true,
            eval: true,
            max_steps: None,
            on_error: OnError::Skip,
            existing: ExistingRun::Refuse,
            checkpoint_every: 1,
            checkpoint_every_steps: DEFAULT_CHECKPOINT_STEPS,
            checkpoint_every_minutes: DEFAULT_CHECKPOINT_MINUTES,
            stop: None,
            load: LoadOptions::verified(),
            knn_every: 1,
            diag_every: None,
            figures: true,
            parallel: Parallel::Single,
        }
    }
}

/// Default step cadence of checkpoints (on top of the epoch ends).
pub const DEFAULT_CHECKPOINT_STEPS: u64 = 1000;
/// Default wall-clock cadence of checkpoints, minutes.
pub const DEFAULT_CHECKPOINT_MINUTES: f64 = 10.0;

/// A run stopped by a signal after saving its checkpoint and summary.
#[derive(Debug, thiserror::Error)]
#[error(
    "interrupted: stopped after step {step}; checkpoint {} and the summary are saved. \
     Continue with the same options and --resume {}",
    checkpoint.display(),
    checkpoint.display()
)]
pub struct Interrupted {
    pub step: u64,
    pub checkpoint: PathBuf,
}

/// What a run reports at its end.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub losses: Vec<f32>,
    pub images_per_sec: f64,
    pub knn_init: Option<Vec<(usize, f64)>>,
    pub knn_final: Option<Vec<(usize, f64)>>,
    pub knn_pixels: Option<Vec<(usize, f64)>>,
    pub checkpoint: PathBuf,
    /// The run folder (a new numbered one under [`ExistingRun::NewNumbered`]).
    pub run_dir: PathBuf,
    /// Stopped by a signal before the end.
    pub interrupted: bool,
    /// The collapse warnings of the run (each kind once) and the end-of-run verdict.
    pub warnings: Vec<String>,
}

/// Training and held-out datasets of a run.
pub struct Datasets {
    pub train: Arc<dyn Dataset>,
    pub test: Option<Arc<dyn Dataset>>,
}

/// Opens the datasets a config names.
pub fn open_data(spec: &DataSpec, img_size: usize, on_error: OnError) -> Result<Datasets> {
    Ok(match spec {
        DataSpec::Builtin {
            seed,
            train_per_class,
            test_per_class,
        } => {
            let cfg = data::SyntheticConfig {
                seed: *seed,
                train_per_class: *train_per_class,
                test_per_class: *test_per_class,
                size: img_size.max(16),
                ..Default::default()
            };
            Datasets {
                train: Arc::new(data::Synthetic::new(cfg, data::Split::Train)),
                test: Some(Arc::new(data::Synthetic::new(cfg, data::Split::Test))),
            }
        }
        DataSpec::Folder { root, test_root } => {
            validate::validate_data(spec)?;
            let train = data::ImageFolder::open(root, on_error)?;
            let test = match test_root {
                Some(t) => Some(Arc::new(data::ImageFolder::open_with_classes(
                    t,
                    on_error,
                    train.classes(),
                )?) as Arc<dyn Dataset>),
                None => None,
            };
            Datasets {
                train: Arc::new(train),
                test,
            }
        }
        DataSpec::Cifar { root } => Datasets {
            train: Arc::new(data::Cifar::open(root, data::Split::Train)?),
            test: Some(Arc::new(data::Cifar::open(root, data::Split::Test)?)),
        },
    })
}

/// The per-step schedules of a config.
pub fn recipe(cfg: &TrainConfig, steps_per_epoch: u64) -> Recipe {
    let mut r = Recipe::new(cfg.epochs, steps_per_epoch, cfg.batch_size as u64);
    r.base_lr = cfg.lr;
    r.min_lr = cfg.min_lr;
    r.warmup_epochs = cfg.warmup_epochs;
    r.weight_decay = cfg.weight_decay;
    r.weight_decay_end = cfg.weight_decay_end;
    r.momentum_teacher = cfg.momentum_teacher;
    r.teacher_temp_start = cfg.warmup_teacher_temp;
    r.teacher_temp = cfg.teacher_temp;
    r.teacher_temp_warmup_epochs = cfg.warmup_teacher_temp_epochs;
    r.freeze_last_layer_epochs = cfg.freeze_last_layer_epochs;
    r
}

/// The patch teacher temperature's schedule (iBOT): the recipe with the patch settings in
/// place of the `[CLS]` teacher's.
pub fn patch_recipe(cfg: &TrainConfig, steps_per_epoch: u64) -> Recipe {
    let mut r = recipe(cfg, steps_per_epoch);
    r.teacher_temp_start = cfg.ibot.warmup_patch_teacher_temp;
    r.teacher_temp = cfg.ibot.patch_teacher_temp;
    r.teacher_temp_warmup_epochs = cfg.ibot.warmup_patch_teacher_temp_epochs;
    r
}

/// Seed of step `step`'s own randomness (drop path), independent of the data seed stream.
fn step_seed(seed: u64, step: u64) -> u64 {
    data::derive_seed(&[seed, 0x5354_4550, step])
}

/// Rows of a whole dataset in eval order: `map` turns each batch of eval-transformed images
/// (`[n, 3, size, size]`) into `[n, dim]` features. Returns (features, labels, dim).
fn dataset_rows(
    ds: &Arc<dyn Dataset>,
    size: usize,
    mut map: impl FnMut(Vec<f32>, usize) -> Result<Vec<f32>>,
) -> Result<(Vec<f32>, Vec<u32>, usize)> {
    let mut feats = Vec::new();
    let mut labels = Vec::new();
    let mut dim = 0;
    for b in data::eval_batches(ds.clone(), size, 256) {
        let (imgs, labs) = b?;
        let n = labs.len();
        let f = map(imgs, n)?;
        dim = f.len() / n.max(1);
        feats.extend_from_slice(&f);
        labels.extend_from_slice(&labs);
    }
    Ok((feats, labels, dim))
}

/// A network's [CLS] features (final LayerNorm, not normalised) of a whole dataset, with labels.
pub fn dataset_features(
    backend: &mut dyn Backend,
    ds: &Arc<dyn Dataset>,
    size: usize,
    net: Net,
) -> Result<(Vec<f32>, Vec<u32>, usize)> {
    dataset_rows(ds, size, |imgs, n| backend.embed(net, &imgs, n, size))
}

/// A network's [CLS] tokens after each of its last `blocks` blocks (final LayerNorm each,
/// concatenated: the linear probe's features) of a whole dataset, with labels.
pub fn dataset_block_features(
    backend: &mut dyn Backend,
    ds: &Arc<dyn Dataset>,
    size: usize,
    net: Net,
    blocks: usize,
) -> Result<(Vec<f32>, Vec<u32>, usize)> {
    dataset_rows(ds, size, |imgs, n| {
        backend.embed_blocks(net, &imgs, n, size, blocks)
    })
}

/// Raw pixels of a dataset (the eval transform's normalised values) as features.
pub fn dataset_pixels(ds: &Arc<dyn Dataset>, size: usize) -> Result<(Vec<f32>, Vec<u32>, usize)> {
    dataset_rows(ds, size, |imgs, _| Ok(imgs))
}

/// k-NN with the training split as memory and the held-out split as queries, on the features
/// `rows` computes for a dataset.
fn knn_split(
    data: &Datasets,
    mut rows: impl FnMut(&Arc<dyn Dataset>) -> Result<(Vec<f32>, Vec<u32>, usize)>,
) -> Result<Vec<KnnScore>> {
    let test = data
        .test
        .as_ref()
        .ok_or_else(|| anyhow!("no held-out split to evaluate on"))?;
    let (tr, trl, d) = rows(&data.train)?;
    let (te, tel, _) = rows(test)?;
    let classes = data.train.num_classes().max(test.num_classes());
    knn_accuracy(&tr, &trl, &te, &tel, d, classes, &KNN_KS, KNN_TEMPERATURE)
}

/// k-NN of the backend's teacher features.
pub fn knn_eval(backend: &mut dyn Backend, data: &Datasets, size: usize) -> Result<Vec<KnnScore>> {
    knn_split(data, |ds| dataset_features(backend, ds, size, Net::Teacher))
}

/// The raw-pixel k-NN baseline.
pub fn knn_pixels(data: &Datasets, size: usize) -> Result<Vec<KnnScore>> {
    knn_split(data, |ds| dataset_pixels(ds, size))
}

fn pairs(s: &[KnnScore]) -> Vec<(usize, f64)> {
    s.iter().map(|x| (x.k, x.top1)).collect()
}

#[derive(Serialize)]
struct MetricsLine<'a> {
    step: u64,
    epoch: u64,
    lr: f64,
    wd: f64,
    teacher_temp: f64,
    teacher_momentum: f64,
    loss: f32,
    teacher_entropy: f32,
    mean_entropy: f32,
    max_mass: f32,
    /// `mean_entropy - teacher_entropy`: the teacher's mean KL to its batch mean (0 = the
    /// teacher ignores its input).
    kl_to_mean: f32,
    kl: f32,
    grad_norm: f32,
    images_per_sec: f64,
    device: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    koleo_proto: Option<f32>,
    /// iBOT only: L_cls, L_mim (unweighted) and the patch targets' mean entropy.
    #[serde(skip_serializing_if = "Option::is_none")]
    loss_cls: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    loss_mim: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_teacher_entropy: Option<f32>,
    /// Data-parallel runs: bytes rank 0 sent in the step's collectives and the seconds they
    /// took (waiting for the slowest rank included).
    #[serde(skip_serializing_if = "Option::is_none")]
    reduce_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reduce_seconds: Option<f64>,
}

/// Runs training as configured; returns the summary, or an error that names the problem.
pub fn train(cfg: &TrainConfig, opts: &RunOptions) -> Result<TrainSummary> {
    cfg.validate()?;
    let data = open_data(&cfg.data, cfg.model.img_size, opts.on_error)?;
    let crops = crop_config(cfg);
    let (rank, processes) = opts.parallel.process_rank();
    // Rank 0 writes every file (run folder, metrics, checkpoints, evaluations, figures); the
    // other ranks only train.
    let lead = rank == 0;
    let mut agree = opts.parallel.process_collective();
    let loader = Loader::new(
        data.train.clone(),
        crops.clone(),
        cfg.batch_size,
        cfg.seed,
        opts.workers,
        4,
    )
    .sharded(rank, processes)?;
    let spe = loader.batches_per_epoch() as u64;
    if spe == 0 {
        bail!(
            "the training set ({}) has {} images, fewer than one batch of {}: lower --batch-size",
            data.train.describe(),
            data.train.len(),
            cfg.batch_size
        );
    }
    let recipe = recipe(cfg, spe);
    let precipe = patch_recipe(cfg, spe);
    let total = recipe.total_steps();
    let end = opts.max_steps.map_or(total, |m| m.min(total));
    if !(opts.checkpoint_every_minutes >= 0.0 && opts.checkpoint_every_minutes.is_finite()) {
        bail!(
            "--checkpoint-minutes must be finite and >= 0, got {}",
            opts.checkpoint_every_minutes
        );
    }
    let classes: Vec<String> = (0..data.train.num_classes())
        .map(|c| data.train.class_name(c))
        .collect();
    // Held until this function returns: a second live run into the same folder is refused.
    let folder = match lead {
        true => Some(run_dir::open_run_folder(
            &opts.out_dir,
            opts.existing,
            opts.resume.as_deref(),
        )?),
        false => None,
    };
    let out_dir = folder
        .as_ref()
        .map_or_else(|| opts.out_dir.clone(), |f| f.dir.clone());
    let ckpt_path = checkpoint_in(&out_dir);
    if lead {
        write_atomic(
            &out_dir.join("config.json"),
            serde_json::to_string_pretty(cfg)?.as_bytes(),
        )?;
    }

    let mut backend = opts
        .parallel
        .open_backend(&backend_config(cfg), opts.device)?;
    let (start, mut knn_init) = match &opts.resume {
        Some(path) => {
            let (st, step, saved_cfg, knn) = state::load_checkpoint_with(path, opts.load)?;
            if &saved_cfg != cfg {
                bail!(
                    "checkpoint {} was written with other options; resume with the same ones. \
                     Differences (saved -> now):\n  {}",
                    path.display(),
                    validate::config_diff(&saved_cfg, cfg).join("\n  ")
                );
            }
            check_classes(path, &classes)?;
            backend.set_state(&st)?;
            (step, knn)
        }
        None => {
            backend.set_state(&state::init_state(cfg))?;
            (0, None)
        }
    };
    if start >= end {
        bail!("nothing to do: the run is at step {start} of {end}");
    }
    let size = cfg.model.img_size;
    if lead && opts.eval && knn_init.is_none() && data.test.is_some() {
        eprintln!("evaluating the network at initialisation (k-NN on the held-out split)...");
        knn_init = Some(pairs(&knn_eval(backend.as_mut(), &data, size)?));
    }

    if cfg.koleo_proto > 0.0 {
        backend.set_koleo_proto(cfg.koleo_proto as f32)?;
    }
    if cfg.koleo > 0.0 {
        backend.set_koleo(cfg.koleo as f32)?;
    }
    if lead && opts.resume.is_some() {
        // A run killed after its last save wrote steps that the resumed run writes again.
        run_dir::truncate_jsonl(&out_dir.join("metrics.jsonl"), |s| s < start)?;
        run_dir::truncate_jsonl(&periodic::evals_in(&out_dir), |s| s <= start)?;
    }
    let mut periodic = match lead {
        true => Some(periodic::Periodic::new(
            &out_dir,
            opts.resume.is_some(),
            &data,
            size,
            spe,
            if opts.eval { opts.knn_every } else { 0 },
            opts.diag_every.unwrap_or(spe),
        )?),
        false => None,
    };
    if let (Some(periodic), None) = (periodic.as_mut(), &opts.resume) {
        let mut line = periodic::EvalLine {
            knn: knn_init.clone(),
            ..Default::default()
        };
        if opts.diag_every != Some(0) {
            line.diag =
                Some(periodic.diagnose(backend.as_mut(), cfg, recipe.at(0).teacher_temp)?);
        }
        if line.knn.is_some() || line.diag.is_some() {
            periodic.update_status(&line);
            periodic.write(&line)?;
        }
    }

    let metrics_path = out_dir.join("metrics.jsonl");
    let metrics_file: Box<dyn Write> = match (lead, opts.resume.is_some()) {
        (false, _) => Box::new(std::io::sink()),
        (true, true) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .with_context(|| format!("opening {}", metrics_path.display()))?,
        ),
        (true, false) => Box::new(
            File::create(&metrics_path)
                .with_context(|| format!("opening {}", metrics_path.display()))?,
        ),
    };
    let mut metrics = BufWriter::new(metrics_file);

    let bar = if opts.progress && lead {
        ProgressBar::with_draw_target(Some(end), ProgressDrawTarget::stderr_with_hz(4))
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}<{eta_precise}] {bar:30} {pos}/{len} steps  {msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_position(start);
    let warmup_steps = (cfg.warmup_epochs * spe).min(total / 4);
    let mut watch = CollapseWatch::new(cfg.model.prototypes, spe).with_grace(warmup_steps);
    let mut warnings = Vec::new();
    let device = backend.name();
    let ibot = cfg.method == Method::Ibot;
    let mut losses = Vec::new();
    let t0 = Instant::now();
    let mut last_save = opts.resume.is_some().then_some(start);
    let mut last_save_time = Instant::now();
    let save_period = Duration::from_secs_f64(60.0 * opts.checkpoint_every_minutes);
    let signalled = || opts.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
    // Every rank stops after the same step: a signal seen by any rank stops them all.
    let mut stopped = || -> Result<bool> {
        let mut flag = [if signalled() { 1.0f32 } else { 0.0 }];
        agree.sum_f32(&mut flag)?;
        Ok(flag[0] > 0.0)
    };
    let mut traffic = backend.traffic();
    let mut step = start;
    let mut ips = 0.0;
    let mut interrupted = false;
    'epochs: while step < end {
        let epoch = step / spe;
        let first = (step % spe) as usize;
        for batch in loader.epoch(epoch, first) {
            if stopped()? {
                interrupted = true;
                break 'epochs;
            }
            let batch = batch?;
            let t = Instant::now();
            let sv = recipe.at(step);
            let hp = StepHyper {
                lr: sv.lr as f32,
                weight_decay: sv.weight_decay as f32,
                teacher_momentum: sv.teacher_momentum as f32,
                teacher_temp: sv.teacher_temp as f32,
                freeze_last_layer: sv.freeze_last_layer,
                clip_grad: cfg.clip_grad as f32,
                seed: step_seed(cfg.seed, step),
                patch_teacher_temp: precipe.at(step).teacher_temp as f32,
            };
            let m = backend.train_step(&batch, &hp)?;
            if !m.loss.is_finite() {
                bar.abandon();
                let saved = match last_save {
                    Some(s) => format!(
                        "The last good checkpoint ({}, step {s}) is untouched.",
                        ckpt_path.display()
                    ),
                    None => "No checkpoint of this run was written yet.".to_string(),
                };
                bail!(
                    "the loss became {} at step {step} (epoch {epoch}): training stopped. {saved} \
                     The options are valid, so the optimisation diverged: lower --lr, raise \
                     --warmup-epochs or lower --clip-grad.",
                    m.loss,
                );
            }
            let dt = t.elapsed().as_secs_f64();
            // Bytes this rank sent and seconds it spent in the step's collectives.
            let reduce = backend
                .traffic()
                .zip(traffic)
                .map(|((b1, s1), (b0, s0))| (b1 - b0, s1 - s0));
            traffic = backend.traffic();
            ips = if ips == 0.0 {
                cfg.batch_size as f64 / dt
            } else {
                0.9 * ips + 0.1 * cfg.batch_size as f64 / dt
            };
            losses.push(m.loss);
            serde_json::to_writer(
                &mut metrics,
                &MetricsLine {
                    step,
                    epoch,
                    lr: sv.lr,
                    wd: sv.weight_decay,
                    teacher_temp: sv.teacher_temp,
                    teacher_momentum: sv.teacher_momentum,
                    loss: m.loss,
                    teacher_entropy: m.teacher_entropy,
                    mean_entropy: m.mean_entropy,
                    max_mass: m.max_mass,
                    kl_to_mean: m.mean_entropy - m.teacher_entropy,
                    kl: m.kl,
                    grad_norm: m.grad_norm,
                    images_per_sec: ips,
                    device: &device,
                    koleo_proto: backend.koleo_proto_loss(),
                    loss_cls: ibot.then_some(m.cls_loss),
                    loss_mim: ibot.then_some(m.mim_loss),
                    patch_teacher_entropy: ibot.then_some(m.patch_teacher_entropy),
                    reduce_bytes: reduce.map(|r| r.0),
                    reduce_seconds: reduce.map(|r| r.1),
                },
            )?;
            metrics.write_all(b"\n")?;
            // Whole lines only, so `tail -f metrics.jsonl` and plotting tools never see half a record.
            metrics.flush()?;
            if let Some(w) = watch.step(step, &m) {
                bar.suspend(|| eprintln!("{w}"));
                warnings.push(w);
            }
            step += 1;
            let diag = match periodic.as_mut() {
                Some(periodic) => periodic.after_step(
                    backend.as_mut(),
                    cfg,
                    &data,
                    step,
                    step / spe,
                    end,
                    sv.teacher_temp,
                )?,
                None => None,
            };
            if let Some(w) = diag.and_then(|d| watch.diag(step, &d)) {
                bar.suspend(|| eprintln!("{w}"));
                warnings.push(w);
            }
            let status = periodic.as_ref().map_or("", |p| &p.status[..]);
            bar.set_position(step);
            bar.set_message(if ibot {
                format!(
                    "ep {epoch} cls {:.3} mim {:.3} H(t) {:.2} H(patch) {:.2} max {:.2} | {:.0} img/s {}",
                    m.cls_loss, m.mim_loss, m.teacher_entropy, m.patch_teacher_entropy, m.max_mass, ips,
                    status
                )
            } else {
                format!(
                    "ep {epoch} loss {:.3} H(t) {:.2} H(mean) {:.2} KL(t|mean) {:.2} max {:.2} | {:.0} img/s {}",
                    m.loss, m.teacher_entropy, m.mean_entropy, m.mean_entropy - m.teacher_entropy,
                    m.max_mass, ips, status
                )
            });
            let epoch_done = step % spe == 0;
            let due = (epoch_done && (step / spe).is_multiple_of(opts.checkpoint_every.max(1)))
                || step == end
                || (opts.checkpoint_every_steps > 0
                    && step.is_multiple_of(opts.checkpoint_every_steps))
                || (opts.checkpoint_every_minutes > 0.0 && last_save_time.elapsed() >= save_period)
                || signalled();
            if due && lead {
                metrics.flush()?;
                let st = backend.state()?;
                state::save_checkpoint_meta(
                    &ckpt_path,
                    cfg,
                    &st,
                    step,
                    knn_init.as_deref(),
                    &[("classes", serde_json::to_string(&classes)?)],
                )?;
                last_save = Some(step);
                last_save_time = Instant::now();
            }
            if step >= end {
                break 'epochs;
            }
        }
    }
    metrics.flush()?;
    if interrupted {
        bar.abandon();
        if lead && last_save != Some(step) {
            let st = backend.state()?;
            state::save_checkpoint_meta(
                &ckpt_path,
                cfg,
                &st,
                step,
                knn_init.as_deref(),
                &[("classes", serde_json::to_string(&classes)?)],
            )?;
        }
    } else {
        bar.finish();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let images_per_sec = (step - start) as f64 * cfg.batch_size as f64 / elapsed.max(1e-9);

    let (mut knn_final, mut knn_px) = (None, None);
    if let Some(periodic) = periodic
        .as_mut()
        .filter(|_| opts.eval && data.test.is_some() && !interrupted)
    {
        eprintln!("evaluating the trained teacher (k-NN on the held-out split)...");
        knn_final = Some(pairs(&knn_eval(backend.as_mut(), &data, size)?));
        knn_px = Some(pairs(&knn_pixels(&data, size)?));
        periodic.write(&periodic::EvalLine {
            step,
            epoch: step / spe,
            knn: knn_final.clone(),
            diag: None,
        })?;
        let at20 = |v: &Option<Vec<(usize, f64)>>| {
            v.as_ref()
                .and_then(|v| v.iter().find(|x| x.0 == 20).or(v.first()).copied())
        };
        if let (Some((k, fin)), Some((_, init))) = (at20(&knn_final), at20(&knn_init)) {
            let in_use = AntiCollapseInUse {
                sinkhorn: cfg.centering == CenteringKind::Sinkhorn,
                koleo: cfg.koleo > 0.0,
            };
            if let Some(w) = below_init_warning(k, fin, init, watch.warned(), in_use) {
                eprintln!("{w}");
                warnings.push(w);
            }
        }
    }
    let summary = TrainSummary {
        steps: step,
        losses,
        images_per_sec,
        knn_init,
        knn_final,
        knn_pixels: knn_px,
        checkpoint: ckpt_path,
        run_dir: out_dir.clone(),
        interrupted,
        warnings,
    };
    if lead {
        write_atomic(
            &out_dir.join("summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
    }
    if interrupted {
        return Err(Interrupted {
            step,
            checkpoint: summary.checkpoint,
        }
        .into());
    }
    if opts.figures && lead {
        // Figures are a view of what is already saved: a failure costs the pictures only.
        match crate::report::write_figures(&out_dir) {
            Ok(files) => eprintln!("figures: {}", files.join(", ")),
            Err(e) => eprintln!("warning: could not draw the run's figures: {e:#}"),
        }
    }
    Ok(summary)
}

/// Prints the k-NN table of a summary.
pub fn print_knn_table(s: &TrainSummary, out: &mut dyn Write) -> std::io::Result<()> {
    let (Some(fin), Some(init)) = (&s.knn_final, &s.knn_init) else {
        return Ok(());
    };
    writeln!(
        out,
        "k-NN top-1 accuracy on the held-out split (weighted vote, T = 0.07):"
    )?;
    writeln!(
        out,
        "  {:>5}  {:>10}  {:>12}  {:>10}",
        "k", "trained", "at init", "raw pixels"
    )?;
    for (i, (k, acc)) in fin.iter().enumerate() {
        let a0 = init.get(i).map_or(f64::NAN, |x| x.1);
        let px = s
            .knn_pixels
            .as_ref()
            .and_then(|p| p.get(i))
            .map_or(f64::NAN, |x| x.1);
        writeln!(
            out,
            "  {:>5}  {:>9.1}%  {:>11.1}%  {:>9.1}%",
            k,
            100.0 * acc,
            100.0 * a0,
            100.0 * px
        )?;
    }
    Ok(())
}

/// Refuses to resume a checkpoint whose stored class list differs from the data's.
fn check_classes(path: &Path, classes: &[String]) -> Result<()> {
    let meta = crate::checkpoint::read_metadata(path)?;
    let Some(saved) = meta.get("classes") else {
        return Ok(()); // written before class lists were stored
    };
    let saved: Vec<String> = serde_json::from_str(saved)
        .with_context(|| format!("checkpoint {}: unreadable class list", path.display()))?;
    if saved != classes {
        let missing: Vec<&String> = saved.iter().filter(|c| !classes.contains(c)).collect();
        let added: Vec<&String> = classes.iter().filter(|c| !saved.contains(c)).collect();
        bail!(
            "checkpoint {} was trained on classes {:?}; the data now has {:?} (missing: {:?}, new: {:?})",
            path.display(),
            saved,
            classes,
            missing,
            added
        );
    }
    Ok(())
}

/// The checkpoint of a run folder.
pub fn checkpoint_in(dir: &Path) -> PathBuf {
    dir.join("checkpoint.safetensors")
}
