//! `dinovmf train`: pre-train a ViT with DINO or DINO-vMF.
use std::path::PathBuf;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;

use crate::backend::Device;
use crate::checkpoint::LoadOptions;
use crate::data::OnError;
use crate::train::{
    self, CenteringKind, DataSpec, ExistingRun, LossKind, Method, Parallel, RunOptions, TrainConfig,
};

/// The run folder link new runs update when no -o is given.
pub const DEFAULT_OUT: &str = "runs/latest";

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Model and recipe preset: small32 (default, 32 px images), tiny (smoke tests),
    /// vit-s16 / vit-b16 (the paper's backbones, 224 px).
    #[arg(long, default_value = "small32")]
    pub preset: String,
    /// dino: w.y/tau logits; vmf: kappa mu.y + log C_p(kappa) (DINO-vMF).
    #[arg(long, value_enum, default_value = "vmf")]
    pub loss: LossKind,
    /// dino: self-distillation of the [CLS] token; ibot: plus masked image modelling (the
    /// student's global crops are block-masked and must predict the teacher's patch
    /// distributions at the masked positions). Combine with --loss: ibot + vmf is iBOT-vMF.
    #[arg(long, value_enum, default_value = "dino")]
    pub method: Method,
    /// iBOT: weight of the patch loss in L = L_cls + w L_mim.
    #[arg(long)]
    pub mim_weight: Option<f64>,
    /// iBOT: patch teacher temperature after warm-up (small presets: 0.02; iBOT: 0.07).
    #[arg(long)]
    pub patch_teacher_temp: Option<f64>,
    /// iBOT: patch teacher temperature at step 0 (warms up linearly to --patch-teacher-temp).
    #[arg(long)]
    pub warmup_patch_teacher_temp: Option<f64>,
    #[arg(long)]
    pub warmup_patch_teacher_temp_epochs: Option<u64>,
    /// iBOT: momentum of the patch center (its own, next to the [CLS] one).
    #[arg(long)]
    pub patch_center_momentum: Option<f64>,
    /// iBOT: give patch tokens their own prototype layer instead of sharing [CLS]'s.
    #[arg(long)]
    pub separate_patch_head: bool,
    /// iBOT: probability that a student global crop is masked at all (iBOT: 0.5).
    #[arg(long)]
    pub mask_prob: Option<f64>,
    /// iBOT: masked fraction of a masked crop, uniform in `MIN,MAX` (iBOT: 0.1,0.5).
    #[arg(long, value_parser = parse_pair)]
    pub mask_ratio: Option<(f64, f64)>,
    /// iBOT: aspect ratio range of the mask blocks, log-uniform in `MIN,MAX` (0.3,3.33).
    #[arg(long, value_parser = parse_pair)]
    pub mask_aspect: Option<(f64, f64)>,
    /// Teacher centering. sinkhorn (the small presets' default): balance the batch's teacher
    /// assignments with Sinkhorn-Knopp (SwAV / DINOv2); logit / probability: DINO's and
    /// DINO-vMF's running centers (the 224 px presets' defaults, by loss).
    #[arg(long, value_enum)]
    pub centering: Option<CenteringKind>,
    /// KoLeo weight on the student's L2-normalised [CLS] backbone features of each global view,
    /// -(1/B) sum_i ln(d_i + 1e-8), d_i the distance to the nearest other image (small presets:
    /// 0.1 as DINOv2; 224 px presets: 0 = off).
    #[arg(long)]
    pub koleo: Option<f64>,
    /// Arithmetic of the matrix products. f32 (default): the reference. bf16: bf16 operands
    /// with f32 sums; on the CPU the linear layers' forward and input-gradient products (AMX or
    /// AVX512-BF16 where the CPU has them), on CUDA every GEMM of the step on tensor cores;
    /// master weights, optimiser, prototype logits, softmax and loss stay f32 on both.
    #[arg(long, value_enum)]
    pub precision: Option<crate::backend::Precision>,
    /// Rounds of Sinkhorn-Knopp balancing with --centering sinkhorn (default 3).
    #[arg(long)]
    pub sinkhorn_iters: Option<u32>,
    /// Fix the prototype norms g = 1 (default: on for dino, off for vmf).
    #[arg(long)]
    pub norm_last_layer: Option<bool>,
    /// Training data: `builtin` (procedural dataset in the binary), `folder:PATH`
    /// (PATH/<class>/<image>; held-out split from `folder:PATH,TEST_PATH`) or `cifar:PATH`
    /// (folder with the CIFAR-10/100 .bin files).
    #[arg(long, default_value = "builtin")]
    pub data: String,
    /// Where metrics.jsonl, checkpoint.safetensors and summary.json go. A folder that already
    /// holds a run is refused (unless --resume or --overwrite). Default: a new numbered folder
    /// runs/run-NNN, with runs/latest pointing at the newest.
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    /// Continue a run bit-exactly from its checkpoint (same options required); with no -o, in
    /// the checkpoint's own folder.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Replace the run already in the -o folder.
    #[arg(long)]
    pub overwrite: bool,
    /// Also checkpoint every N steps (0 = only at epoch ends and the end).
    #[arg(long, default_value_t = train::DEFAULT_CHECKPOINT_STEPS)]
    pub checkpoint_steps: u64,
    /// Also checkpoint when M minutes passed since the last save (0 = off); does not change the
    /// run's numbers.
    #[arg(long, default_value_t = train::DEFAULT_CHECKPOINT_MINUTES)]
    pub checkpoint_minutes: f64,
    /// Do not verify the resumed checkpoint's tensor checksum (huge files).
    #[arg(long)]
    pub skip_checksum: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    /// Epochs to train (default: small32 fits the run to about 10 minutes on a 2-core CPU from
    /// the number of training images; the other presets use their own).
    #[arg(long)]
    pub epochs: Option<u64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Base learning rate for batch 256 (scaled by batch/256).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub warmup_epochs: Option<u64>,
    /// Dimension p of the sphere the prototypes live on (the head's bottleneck).
    #[arg(long)]
    pub bottleneck: Option<usize>,
    /// Width of the head's hidden layers.
    #[arg(long)]
    pub head_hidden: Option<usize>,
    /// ViT width, depth and heads (override the preset's).
    #[arg(long)]
    pub dim: Option<usize>,
    #[arg(long)]
    pub depth: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    /// Side of the square input the crops are resized to (global crops; local crops follow it).
    #[arg(long)]
    pub img_size: Option<usize>,
    /// Side of a ViT patch in pixels (must divide the image and local crop sizes).
    #[arg(long)]
    pub patch: Option<usize>,
    /// Number of prototypes K.
    #[arg(long)]
    pub prototypes: Option<usize>,
    /// Final teacher temperature (after warm-up).
    #[arg(long)]
    pub teacher_temp: Option<f64>,
    /// Teacher temperature at step 0 (warms up linearly to --teacher-temp).
    #[arg(long)]
    pub warmup_teacher_temp: Option<f64>,
    #[arg(long)]
    pub warmup_teacher_temp_epochs: Option<u64>,
    #[arg(long)]
    pub student_temp: Option<f64>,
    /// Teacher EMA momentum at step 0 (cosine to 1).
    #[arg(long)]
    pub momentum_teacher: Option<f64>,
    #[arg(long)]
    pub center_momentum: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub weight_decay_end: Option<f64>,
    /// Per-tensor gradient-norm clip (0 = off).
    #[arg(long)]
    pub clip_grad: Option<f64>,
    /// Epochs during which the prototype layer gets no update (DINO: 1).
    #[arg(long)]
    pub freeze_last_layer_epochs: Option<u64>,
    /// Learning rate at the end of the cosine schedule.
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Area range of the global crops, as `MIN,MAX` fractions of the image (DINO: 0.4,1).
    #[arg(long, value_parser = parse_range)]
    pub global_scale: Option<(f32, f32)>,
    /// Area range of the local crops, as `MIN,MAX` fractions of the image (DINO: 0.05,0.4).
    #[arg(long, value_parser = parse_range)]
    pub local_scale: Option<(f32, f32)>,
    /// Scale of the colour augmentations' probabilities (1 = DINO's jitter 0.8 and grayscale
    /// 0.2; 0 = none).
    #[arg(long)]
    pub color_aug: Option<f32>,
    /// Probability of a horizontal flip of each crop (DINO: 0.5). Use 0 when a mirrored image
    /// means something else (digits, text).
    #[arg(long)]
    pub flip: Option<f32>,
    /// Number of local crops.
    #[arg(long)]
    pub n_local: Option<usize>,
    #[arg(long)]
    pub drop_path: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after this many steps (the schedules still span all epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Data worker threads decoding and augmenting ahead of the step.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Skip the k-NN evaluations at the start and the end.
    #[arg(long)]
    pub no_eval: bool,
    /// Stop at the first unreadable image instead of reporting and skipping it.
    #[arg(long)]
    pub strict_data: bool,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// k-NN on the held-out split every N epochs, logged to evals.jsonl and plotted
    /// (0 = only at the start and the end).
    #[arg(long, default_value_t = 1)]
    pub knn_every: u64,
    /// Prototype diagnostics (utilisation on the first 1024 held-out images, kappa quartiles,
    /// unique prototypes, entropies) every N steps (default: once per epoch; 0 = off).
    #[arg(long)]
    pub diag_every: Option<u64>,
    /// KoLeo-proto regulariser weight: pushes each student prototype away from its nearest
    /// neighbour, -(1/K) sum_k ln min_j ||mu_k - mu_j|| (0 = off; CPU backend).
    #[arg(long)]
    pub koleo_proto: Option<f64>,
    /// Do not draw the figures (PNG) into the run folder at the end.
    #[arg(long)]
    pub no_figures: bool,
    /// Data-parallel ranks as threads of this process, each with batch/N images of every
    /// batch: the same numbers as `mpirun -np N` (CPU backend; 1 = the plain single process).
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
}

impl TrainArgs {
    /// The configuration these arguments describe.
    pub fn config(&self) -> Result<TrainConfig> {
        let mut c = TrainConfig::preset_for(&self.preset, self.method, self.loss)?;
        if let Some(v) = self.centering {
            c.centering = v;
        }
        if let Some(v) = self.norm_last_layer {
            c.norm_last_layer = v;
        }
        c.data = parse_data(&self.data, &c.data)?;
        macro_rules! set {
            ($($f:ident => $($path:ident).+),* $(,)?) => {$(
                if let Some(v) = self.$f { c.$($path).+ = v; }
            )*};
        }
        set!(epochs => epochs, batch_size => batch_size, lr => lr, warmup_epochs => warmup_epochs,
             prototypes => model.prototypes, bottleneck => model.bottleneck,
             head_hidden => model.head_hidden, dim => model.dim, depth => model.depth, heads => model.heads, img_size => model.img_size, patch => model.patch, teacher_temp => teacher_temp,
             warmup_teacher_temp => warmup_teacher_temp,
             warmup_teacher_temp_epochs => warmup_teacher_temp_epochs, student_temp => student_temp,
             momentum_teacher => momentum_teacher, center_momentum => center_momentum,
             weight_decay => weight_decay, weight_decay_end => weight_decay_end,
             clip_grad => clip_grad, freeze_last_layer_epochs => freeze_last_layer_epochs,
             min_lr => min_lr, global_scale => global_scale, local_scale => local_scale, n_local => n_local, color_aug => color_aug, flip => flip, drop_path => model.drop_path, seed => seed);
        set!(mim_weight => ibot.mim_weight, patch_teacher_temp => ibot.patch_teacher_temp,
             warmup_patch_teacher_temp => ibot.warmup_patch_teacher_temp,
             warmup_patch_teacher_temp_epochs => ibot.warmup_patch_teacher_temp_epochs,
             patch_center_momentum => ibot.patch_center_momentum, mask_prob => ibot.mask_prob,
             mask_ratio => ibot.mask_ratio, mask_aspect => ibot.mask_aspect);
        if self.separate_patch_head {
            c.ibot.separate_patch_head = true;
        }
        if self.patch_teacher_temp.is_some()
            && self.warmup_patch_teacher_temp.is_none()
            && c.ibot.warmup_patch_teacher_temp_epochs == 0
        {
            c.ibot.warmup_patch_teacher_temp = c.ibot.patch_teacher_temp;
        }
        if c.method == Method::Dino
            && (self.separate_patch_head
                || self.mim_weight.is_some()
                || self.patch_teacher_temp.is_some()
                || self.mask_prob.is_some()
                || self.mask_ratio.is_some())
        {
            anyhow::bail!("the iBOT options (--mim-weight, --patch-*, --mask-*, --separate-patch-head) need --method ibot");
        }
        if self.teacher_temp.is_some()
            && self.warmup_teacher_temp.is_none()
            && c.warmup_teacher_temp_epochs == 0
        {
            c.warmup_teacher_temp = c.teacher_temp;
        }
        if let Some(v) = self.koleo_proto {
            c.koleo_proto = v;
        }
        if let Some(v) = self.precision {
            c.precision = v;
        }
        if let Some(v) = self.koleo {
            c.koleo = v;
        }
        if let Some(v) = self.precision {
            c.precision = v;
        }
        if let Some(v) = self.sinkhorn_iters {
            c.sinkhorn_iters = v;
        }
        c.validate()?;
        Ok(c)
    }

    pub fn options(&self) -> RunOptions {
        let existing = if self.overwrite {
            ExistingRun::Overwrite
        } else if self.out.is_none() {
            ExistingRun::NewNumbered
        } else {
            ExistingRun::Refuse
        };
        RunOptions {
            out_dir: self
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_OUT)),
            resume: self.resume.clone(),
            existing,
            checkpoint_every_steps: self.checkpoint_steps,
            checkpoint_every_minutes: self.checkpoint_minutes,
            stop: None,
            load: if self.skip_checksum {
                LoadOptions::unverified()
            } else {
                LoadOptions::verified()
            },
            device: self.device,
            workers: self.workers,
            progress: !self.quiet,
            eval: !self.no_eval,
            max_steps: self.max_steps,
            on_error: if self.strict_data {
                OnError::Stop
            } else {
                OnError::Skip
            },
            checkpoint_every: 1,
            knn_every: self.knn_every,
            diag_every: self.diag_every,
            figures: !self.no_figures,
            parallel: match self.shards {
                0 | 1 => Parallel::Single,
                n => Parallel::Shards(n),
            },
        }
    }
}

/// `MIN,MAX` (two numbers; the config's validation checks their range).
fn parse_pair(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("expected MIN,MAX, got '{s}'"))?;
    let a: f64 = a.trim().parse().map_err(|e| format!("'{a}': {e}"))?;
    let b: f64 = b.trim().parse().map_err(|e| format!("'{b}': {e}"))?;
    Ok((a, b))
}

/// `MIN,MAX` with 0 < MIN <= MAX <= 1.
fn parse_range(s: &str) -> Result<(f32, f32), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("expected MIN,MAX, got '{s}'"))?;
    let a: f32 = a.trim().parse().map_err(|e| format!("'{a}': {e}"))?;
    let b: f32 = b.trim().parse().map_err(|e| format!("'{b}': {e}"))?;
    if !(a > 0.0 && a <= b && b <= 1.0) {
        return Err(format!("need 0 < MIN <= MAX <= 1, got {a},{b}"));
    }
    Ok((a, b))
}

/// `builtin`, `folder:PATH[,TEST]`, `cifar:PATH`.
pub fn parse_data(s: &str, builtin: &DataSpec) -> Result<DataSpec> {
    if s == "builtin" {
        return Ok(match builtin {
            b @ DataSpec::Builtin { .. } => b.clone(),
            _ => DataSpec::Builtin {
                seed: 0,
                train_per_class: 500,
                test_per_class: 100,
            },
        });
    }
    if let Some(p) = s.strip_prefix("folder:") {
        let mut it = p.splitn(2, ',');
        let root = it.next().unwrap_or_default().to_string();
        let spec = DataSpec::Folder {
            root,
            test_root: it.next().map(str::to_string),
        };
        crate::train::validate::validate_data(&spec)?;
        return Ok(spec);
    }
    if let Some(p) = s.strip_prefix("cifar:") {
        return Ok(DataSpec::Cifar {
            root: p.to_string(),
        });
    }
    anyhow::bail!("--data '{s}': expected builtin, folder:PATH[,TEST_PATH] or cifar:PATH")
}

/// The config with the data-sized default run length applied when `--epochs` is not given
/// (see [`train::run_length`]); returns the choice for the banner.
pub fn sized_config(
    args: &TrainArgs,
) -> Result<(TrainConfig, Option<train::run_length::RunLength>)> {
    let mut cfg = args.config()?;
    if args.epochs.is_some() || !train::run_length::sized_by_data(&cfg.preset) {
        return Ok((cfg, None));
    }
    let on_error = if args.strict_data {
        OnError::Stop
    } else {
        OnError::Skip
    };
    let data = train::open_data(&cfg.data, cfg.model.img_size, on_error)?;
    let len = train::run_length::data_sized(&cfg, data.train.len())?;
    cfg.epochs = len.epochs;
    if args.warmup_epochs.is_none() {
        cfg.warmup_epochs = len.warmup_epochs;
    }
    cfg.validate()?;
    Ok((cfg, Some(len)))
}

/// Processes an MPI launcher (`mpirun` / `mpiexec` of Open MPI or MPICH) says this job has,
/// from the environment it gives every rank; `None` when it says nothing.
pub fn launcher_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// Whether an MPI launcher started this process: a size, or only a rank (a direct launch by
/// `srun --mpi=pmix` announces the rank but not the size).
fn under_launcher() -> bool {
    launcher_ranks().is_some()
        || ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"]
            .iter()
            .any(|v| std::env::var_os(v).is_some())
}

/// Where this process stands in a data-parallel run: under an MPI launcher with more than one
/// process, one rank of it (feature `mpi`), or a clear refusal without the feature.
fn parallel_for(args: &TrainArgs, opts: RunOptions) -> Result<RunOptions> {
    if !under_launcher() || launcher_ranks() == Some(1) {
        return Ok(opts);
    }
    #[cfg(feature = "mpi")]
    {
        let world = crate::backend::mpi::MpiWorld::init()?;
        let n = world.size();
        if n == 1 {
            return Ok(opts);
        }
        anyhow::ensure!(
            args.shards <= 1,
            "--shards {} under an MPI launcher with {n} processes: use one or the other",
            args.shards
        );
        let lead = world.rank() == 0;
        Ok(RunOptions {
            parallel: Parallel::Mpi(Arc::new(world)),
            progress: opts.progress && lead,
            ..opts
        })
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = (args, opts);
        let n = launcher_ranks().map_or_else(|| "several".to_string(), |n| n.to_string());
        anyhow::bail!(
            "started by an MPI launcher with {n} processes, but this dinovmf was built without \
             MPI: each process would train alone on the whole batch. Build with \
             `cargo build --release --features mpi` (scripts/mpi-deps.sh installs Open MPI)"
        )
    }
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let (cfg, length) = sized_config(args)?;
    let mut opts = parallel_for(args, args.options())?;
    let (rank, _) = opts.parallel.process_rank();
    let result = run_with(&cfg, length.as_ref(), &mut opts, rank == 0);
    #[cfg(feature = "mpi")]
    if let (Err(e), Parallel::Mpi(world)) = (&result, &opts.parallel) {
        // An error on one rank would leave the others waiting in a collective: end them all
        // (a signal's orderly stop is the same on every rank and ends normally).
        if !e.is::<train::Interrupted>() {
            eprintln!("error on rank {rank}: {e:#}");
            world.abort(1);
        }
    }
    result
}

fn run_with(
    cfg: &TrainConfig,
    length: Option<&train::run_length::RunLength>,
    opts: &mut RunOptions,
    lead: bool,
) -> Result<()> {
    // First SIGINT / SIGTERM: finish the step, save, write the summary, exit 130. A second one
    // exits at once.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop))?;
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    opts.stop = Some(stop);
    if lead {
        eprintln!(
            "dinovmf train: preset {} | method {:?} | loss {:?} | centering {:?} | norm_last_layer {} | K {} | {} epochs x batch {} | device {:?} | {}",
            cfg.preset, cfg.method, cfg.loss, cfg.centering, cfg.norm_last_layer, cfg.model.prototypes, cfg.epochs,
            cfg.batch_size, opts.device, opts.parallel.describe()
        );
        if let Some(l) = length {
            eprintln!("{}", l.describe());
        }
        if cfg.precision == crate::backend::Precision::Bf16 {
            eprintln!(
                "precision bf16: linear layers' forward and input-gradient products in bf16 \
                 with f32 sums ({:?} kernel), everything else f32",
                crate::backend::cpu::gemm_bf16::bf16_kernel()
            );
            if crate::backend::cpu::gemm_bf16::bf16_kernel()
                == crate::backend::cpu::gemm_bf16::Bf16Kernel::Emulated
            {
                eprintln!(
                    "  this CPU has no bf16 instructions (AVX512-BF16 or AMX): the bf16 products \
                     are emulated (operands rounded to bf16, then the f32 GEMM), so the run has \
                     bf16's numerics but is slower than --precision f32"
                );
            }
        }
    }
    let s = train::train(cfg, opts)?;
    if !lead {
        return Ok(());
    }
    eprintln!(
        "trained {} steps at {:.0} images/s; final loss {:.4}; checkpoint {} (run folder {})",
        s.steps,
        s.images_per_sec,
        s.losses.last().copied().unwrap_or(f32::NAN),
        s.checkpoint.display(),
        s.run_dir.display()
    );
    train::print_knn_table(&s, &mut std::io::stdout())?;
    Ok(())
}
