//! The quality benchmark suite (`dinovmf bench quality`): trains with the defaults on each data
//! set and reports one table of k-NN (trained / at initialisation / raw pixels), the linear
//! probe, prototype use, the label-free signals (RankMe, the teacher's entropies), NMI /
//! purity, wall time and steps. Results and commands: docs/quality.md.
pub mod sets;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::cli::eval::{load, probe, proto_diag};
use crate::cli::recipe::RecipeArgs;
use crate::train::{self, run_length, DataSpec, ExistingRun, LossKind, RunOptions, TrainConfig};
use sets::{gen_set, GenSet, GEN_SETS};

/// The sets the suite knows: the built-in set, MNIST-5k (from a path) and the generated ones.
pub fn set_names() -> Vec<&'static str> {
    let mut v = vec!["builtin", "mnist"];
    v.extend(GEN_SETS.iter().map(|s| s.name));
    v
}

/// What a suite run does.
#[derive(Clone, Debug)]
pub struct SuiteOptions {
    pub sets: Vec<String>,
    /// Run the held-out sets too (they are refused without it).
    pub heldout: bool,
    pub preset: String,
    pub loss: LossKind,
    /// Overrides of the preset's recipe, as `dinovmf train` takes them (none by default).
    pub recipe: RecipeArgs,
    /// Cap on the steps of each run (the schedules still span the chosen length).
    pub max_steps: Option<u64>,
    /// Fixed epochs instead of the data-sized default.
    pub epochs: Option<u64>,
    /// Scales the generated sets' image counts.
    pub scale: f64,
    pub mnist: PathBuf,
    pub cache: PathBuf,
    pub out: PathBuf,
    pub workers: usize,
    pub progress: bool,
}

impl SuiteOptions {
    /// The default suite: every tuning set, small32, DINO-vMF.
    pub fn defaults() -> Self {
        Self {
            sets: set_names()
                .into_iter()
                .filter(|n| gen_set(n).is_none_or(|s| !s.heldout))
                .map(str::to_string)
                .collect(),
            heldout: false,
            preset: "small32".into(),
            loss: LossKind::Vmf,
            recipe: RecipeArgs::default(),
            max_steps: None,
            epochs: None,
            scale: 1.0,
            mnist: PathBuf::from("../shared/data/mnist-5k"),
            cache: PathBuf::from("runs/quality-data"),
            out: PathBuf::from("runs/quality"),
            workers: 1,
            progress: true,
        }
    }
}

/// One row of the table (accuracies in [0, 1]).
#[derive(Clone, Debug, Serialize)]
pub struct SuiteRow {
    pub set: String,
    pub heldout: bool,
    /// The recipe overrides the set trained with, as on the command line (empty: the defaults).
    pub options: Vec<String>,
    pub train_images: usize,
    pub steps: u64,
    pub epochs: u64,
    pub wall_seconds: f64,
    pub knn20_trained: f64,
    pub knn20_init: f64,
    pub knn20_pixels: f64,
    pub linear_top1: f64,
    pub prototypes_used: usize,
    pub prototypes: usize,
    pub rankme: f64,
    pub teacher_entropy: f64,
    pub teacher_mean_entropy: f64,
    pub nmi: Option<f64>,
    pub purity: Option<f64>,
    pub warnings: Vec<String>,
}

/// The data of a set: a training config's `DataSpec` (generated sets written first).
fn set_data(name: &str, o: &SuiteOptions, base: &TrainConfig) -> Result<Option<DataSpec>> {
    Ok(match name {
        "builtin" => Some(base.data.clone()),
        "mnist" => {
            let (tr, te) = (o.mnist.join("train"), o.mnist.join("test"));
            if !(tr.is_dir() && te.is_dir()) {
                eprintln!(
                    "mnist: skipped ({} has no train/ and test/ folders; give --mnist DIR)",
                    o.mnist.display()
                );
                return Ok(None);
            }
            Some(DataSpec::Folder {
                root: tr.display().to_string(),
                test_root: Some(te.display().to_string()),
            })
        }
        other => {
            let Some(set) = gen_set(other) else {
                bail!(
                    "unknown set '{other}' (choose from: {})",
                    set_names().join(", ")
                );
            };
            let set: GenSet = set.scaled(o.scale);
            eprintln!(
                "{}: writing / reusing {}",
                set.name,
                set.folder(&o.cache).display()
            );
            let (tr, te) = set.ensure_written(&o.cache)?;
            Some(DataSpec::Folder {
                root: tr.display().to_string(),
                test_root: Some(te.display().to_string()),
            })
        }
    })
}

fn at_k20(v: &Option<Vec<(usize, f64)>>) -> f64 {
    v.as_ref()
        .and_then(|v| v.iter().find(|x| x.0 == 20).or(v.first()))
        .map_or(f64::NAN, |x| x.1)
}

/// Trains and evaluates one set with `base` (the preset with the suite's recipe overrides,
/// spelled as `options`) on `data`.
fn run_set(
    name: &str,
    data: DataSpec,
    base: &TrainConfig,
    options: &[String],
    o: &SuiteOptions,
) -> Result<SuiteRow> {
    let mut cfg = base.clone();
    cfg.data = data;
    let ds = train::open_data(&cfg.data, cfg.model.img_size, crate::data::OnError::Skip)?;
    let train_images = ds.train.len();
    match o.epochs {
        Some(e) => cfg.epochs = e,
        None if run_length::sized_by_data(&cfg.preset) => {
            let l = run_length::data_sized(&cfg, train_images)?;
            eprintln!("{name}: {}", l.describe());
            cfg.epochs = l.epochs;
            if o.recipe.warmup_epochs.is_none() {
                cfg.warmup_epochs = l.warmup_epochs;
            }
        }
        None => {}
    }
    cfg.validate()?;
    let dir = o.out.join(name);
    let opts = RunOptions {
        out_dir: dir.clone(),
        existing: ExistingRun::Overwrite,
        progress: o.progress,
        workers: o.workers,
        max_steps: o.max_steps,
        knn_every: 0,
        figures: false,
        ..Default::default()
    };
    let t = Instant::now();
    let s = train::train(&cfg, &opts)?;
    let wall = t.elapsed().as_secs_f64();
    let mut l = load(&s.checkpoint, "run", true)?;
    let p = probe(&mut l, 4)?;
    let d = proto_diag(&mut l, 2048, None)?;
    Ok(SuiteRow {
        set: name.to_string(),
        heldout: gen_set(name).is_some_and(|s| s.heldout),
        options: options.to_vec(),
        train_images,
        steps: s.steps,
        epochs: cfg.epochs,
        wall_seconds: wall,
        knn20_trained: at_k20(&s.knn_final),
        knn20_init: at_k20(&s.knn_init),
        knn20_pixels: at_k20(&s.knn_pixels),
        linear_top1: p.top1,
        prototypes_used: d.used,
        prototypes: d.prototypes,
        rankme: d.rankme,
        teacher_entropy: d.teacher_entropy,
        teacher_mean_entropy: d.teacher_mean_entropy,
        nmi: d.agreement.map(|a| a.nmi),
        purity: d.agreement.map(|a| a.purity),
        warnings: s.warnings,
    })
}

/// The sets a suite runs, in order: `o.sets` checked (a held-out set only with `--heldout`),
/// then, with `--heldout` and no held-out set named, every held-out set. Naming held-out sets
/// runs just those (`--heldout --sets holdout-a` runs one set, not four).
pub fn sets_to_run(o: &SuiteOptions) -> Result<Vec<String>> {
    for n in &o.sets {
        if let Some(s) = gen_set(n) {
            if s.heldout && !o.heldout {
                bail!(
                    "set '{n}' is held out (not for tuning): it runs only with --heldout, once, \
                     at the end"
                );
            }
        } else if n != "builtin" && n != "mnist" {
            bail!(
                "unknown set '{n}' (choose from: {})",
                set_names().join(", ")
            );
        }
    }
    let mut sets = o.sets.clone();
    let names_heldout = sets.iter().any(|n| gen_set(n).is_some_and(|s| s.heldout));
    if o.heldout && !names_heldout {
        for s in GEN_SETS.iter().filter(|s| s.heldout) {
            if !sets.iter().any(|n| n == s.name) {
                sets.push(s.name.to_string());
            }
        }
    }
    Ok(sets)
}

/// Runs the suite; writes `quality.json` and `quality.md` into `o.out` and returns the rows.
pub fn run_suite(o: &SuiteOptions) -> Result<Vec<SuiteRow>> {
    anyhow::ensure!(
        o.scale > 0.0 && o.scale.is_finite(),
        "--scale must be positive, got {}",
        o.scale
    );
    let sets = sets_to_run(o)?;
    std::fs::create_dir_all(&o.out)?;
    // The overrides are checked before the first set trains (a typo fails now, not an hour in).
    let (base, options) = o.recipe.apply(&o.preset, o.loss)?;
    base.validate()?;
    let mut rows = Vec::new();
    for name in &sets {
        let Some(data) = set_data(name, o, &base)? else {
            continue;
        };
        eprintln!("== {name} ==");
        let row = run_set(name, data, &base, &options, o)?;
        rows.push(row);
        // Written after every set, so an interrupted suite keeps what it finished.
        write_results(&o.out, &rows, o)?;
    }
    Ok(rows)
}

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}", 100.0 * x)
    } else {
        "-".into()
    }
}

/// The table as markdown.
pub fn markdown(rows: &[SuiteRow], o: &SuiteOptions) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "preset {}, loss {:?}{}, {} (k-NN k = 20 on the held-out split, %)\n",
        o.preset,
        o.loss,
        // Every row trained with the same overrides.
        match rows.first() {
            Some(r) if !r.options.is_empty() => format!(", options {}", r.options.join(" ")),
            _ => String::new(),
        },
        match (o.epochs, o.max_steps) {
            (Some(e), _) => format!("{e} epochs"),
            (None, Some(m)) => format!("data-sized schedule capped at {m} steps"),
            (None, None) => "data-sized schedule (about 10 minutes on a quiet 2-core CPU)".into(),
        }
    );
    let _ = writeln!(
        t,
        "| set | images | k-NN trained | at init | raw pixels | linear | prototypes used | RankMe | H(teacher) / H(mean) | NMI / purity | steps | wall s | warnings |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            t,
            "| {}{} | {} | {} | {} | {} | {} | {} / {} | {:.1} | {:.2} / {:.2} | {} | {} | {:.0} | {} |",
            r.set,
            if r.heldout { " (held out)" } else { "" },
            r.train_images,
            pct(r.knn20_trained),
            pct(r.knn20_init),
            pct(r.knn20_pixels),
            pct(r.linear_top1),
            r.prototypes_used,
            r.prototypes,
            r.rankme,
            r.teacher_entropy,
            r.teacher_mean_entropy,
            match (r.nmi, r.purity) {
                (Some(n), Some(p)) => format!("{n:.2} / {}", pct(p)),
                _ => "-".into(),
            },
            r.steps,
            r.wall_seconds,
            r.warnings.len()
        );
    }
    t
}

fn write_results(dir: &Path, rows: &[SuiteRow], o: &SuiteOptions) -> Result<()> {
    crate::checkpoint::write_atomic(
        &dir.join("quality.json"),
        serde_json::to_string_pretty(rows)?.as_bytes(),
    )?;
    crate::checkpoint::write_atomic(&dir.join("quality.md"), markdown(rows, o).as_bytes())?;
    Ok(())
}
