//! `dinovmf train`: pre-train a ViT with DINO or DINO-vMF.
use std::path::PathBuf;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;

use super::recipe::RecipeArgs;
use crate::backend::Device;
use crate::checkpoint::LoadOptions;
use crate::data::OnError;
use crate::train::{self, DataSpec, ExistingRun, LossKind, Parallel, RunOptions, TrainConfig};

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
    /// The recipe: method, model, schedule and augmentation overrides of the preset.
    #[command(flatten)]
    pub recipe: RecipeArgs,
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
        let (mut c, _) = self.recipe.apply(&self.preset, self.loss)?;
        c.data = parse_data(&self.data, &c.data)?;
        if let Some(e) = self.epochs {
            c.epochs = e;
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
pub(crate) fn parse_pair(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("expected MIN,MAX, got '{s}'"))?;
    let a: f64 = a.trim().parse().map_err(|e| format!("'{a}': {e}"))?;
    let b: f64 = b.trim().parse().map_err(|e| format!("'{b}': {e}"))?;
    Ok((a, b))
}

/// `MIN,MAX` with 0 < MIN <= MAX <= 1.
pub(crate) fn parse_range(s: &str) -> Result<(f32, f32), String> {
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
    if args.recipe.warmup_epochs.is_none() {
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
        if cfg.model.stem_convs > 0 {
            let v = crate::config::model_config(cfg).vit;
            let widths: Vec<String> = (0..v.stem_stages())
                .map(|s| v.stem().channels(s).to_string())
                .collect();
            eprintln!(
                "convolutional stem: {} stride-2 stage(s) of {} 3 x 3 convolution(s) with GELU, widths {}, then a 1 x 1 convolution to the tokens (a change of method: docs/quality.md, \"Sixth round\")",
                v.stem_stages(),
                v.stem_convs,
                widths.join(" / ")
            );
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
