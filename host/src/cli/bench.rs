//! `dinovmf bench ...`: benchmarks of what the defaults learn.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::cli::recipe::RecipeArgs;
use crate::quality::sets::{gen_set, GEN_SETS};
use crate::quality::{markdown, run_suite, set_names, SuiteOptions};
use crate::train::LossKind;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Train with the defaults on each data set of the quality suite (the built-in set,
    /// MNIST-5k when its folder exists, generated sets) and print one table: k-NN k = 20
    /// trained / at init / raw pixels, linear probe, prototypes in use, RankMe, the teacher's
    /// entropies, NMI / purity, steps and wall time. Also writes OUT/quality.{json,md}.
    Quality(Box<QualityArgs>),
    /// Write a few images of each class of the generated sets as PNG, to look at.
    PreviewSets(PreviewArgs),
    /// Time training steps of a preset on a synthetic batch (no data loading): images/s, the
    /// matrix-product FLOPs per image counted from the model's shapes, the achieved TFLOP/s,
    /// MFU against the device's peak (f32 and bf16 tensor-core rows of a table per GPU name:
    /// H100, H200, A100), seconds per phase and the device memory held.
    Speed(SpeedArgs),
}

#[derive(Args, Debug, Clone)]
pub struct SpeedArgs {
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: crate::backend::Device,
    #[arg(long, default_value = "small32")]
    pub preset: String,
    #[arg(long, value_enum, default_value = "dino")]
    pub loss: LossKind,
    /// Images per step (default: the preset's).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Prototypes K (default: the preset's).
    #[arg(long)]
    pub prototypes: Option<usize>,
    /// Local crops per image (default: the preset's).
    #[arg(long)]
    pub n_local: Option<usize>,
    /// Convolutions per stem stage (default: the preset's; 0 = DINO's patch embedding, which
    /// the CUDA backend and the official code side by side need).
    #[arg(long, value_name = "N")]
    pub stem_convs: Option<usize>,
    /// Matrix products: f32 or bf16 (CPU: the linear layers, AMX / AVX512-BF16; CUDA: tensor
    /// cores).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: crate::backend::Precision,
    /// Timed steps, after one untimed warm-up step.
    #[arg(long, default_value_t = 5)]
    pub steps: u64,
}

#[derive(Args, Debug, Clone)]
pub struct QualityArgs {
    /// Comma-separated sets (default: every set but the held-out ones). Known: builtin, mnist,
    /// and the generated sets (`dinovmf bench preview-sets` draws them).
    #[arg(long, value_delimiter = ',')]
    pub sets: Option<Vec<String>>,
    /// Also run the held-out sets (counts, glyphs, holdout-a, holdout-b): they are not for
    /// tuning; run them once. With --sets naming some of them, only those run.
    #[arg(long)]
    pub heldout: bool,
    #[arg(long, default_value = "small32")]
    pub preset: String,
    #[arg(long, value_enum, default_value = "vmf")]
    pub loss: LossKind,
    /// Recipe overrides, as `dinovmf train` takes them (e.g. `--n-local 8 --koleo 0`): every
    /// set trains with them, and the table's heading names them.
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Stop each run after N steps (smoke tests; the schedules still span the full length).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Train each set for N epochs instead of the data-sized default.
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Scale the generated sets' image counts (e.g. 0.05 for a smoke test).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// MNIST-5k folder with train/ and test/ (skipped with a message when absent).
    #[arg(long, default_value = "../shared/data/mnist-5k")]
    pub mnist: PathBuf,
    /// Where the generated sets are written (once) as PNG folders.
    #[arg(long, default_value = "runs/quality-data")]
    pub cache: PathBuf,
    /// Run folders (one per set) and quality.{json,md}.
    #[arg(long, short = 'o', default_value = "runs/quality")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct PreviewArgs {
    /// Folder for the PNGs (`<set>-<class>-<i>.png`).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Comma-separated generated sets (default: all).
    #[arg(long, value_delimiter = ',')]
    pub sets: Option<Vec<String>>,
    /// Images per class.
    #[arg(long, default_value_t = 3)]
    pub per_class: usize,
}

pub fn run(c: &BenchCommand) -> Result<()> {
    match c {
        BenchCommand::Quality(a) => quality(a),
        BenchCommand::PreviewSets(a) => preview(a),
        BenchCommand::Speed(a) => speed(a),
    }
}

fn quality(a: &QualityArgs) -> Result<()> {
    let mut o = SuiteOptions::defaults();
    if let Some(s) = &a.sets {
        o.sets = s.clone();
    }
    o.heldout = a.heldout;
    o.preset = a.preset.clone();
    o.loss = a.loss;
    o.recipe = a.recipe.clone();
    o.max_steps = a.max_steps;
    o.epochs = a.epochs;
    o.scale = a.scale;
    o.mnist = a.mnist.clone();
    o.cache = a.cache.clone();
    o.out = a.out.clone();
    o.workers = a.workers;
    o.progress = !a.quiet;
    let rows = run_suite(&o)?;
    println!("{}", markdown(&rows, &o));
    println!(
        "wrote {} and {}",
        o.out.join("quality.json").display(),
        o.out.join("quality.md").display()
    );
    Ok(())
}

fn preview(a: &PreviewArgs) -> Result<()> {
    let names: Vec<String> = match &a.sets {
        Some(s) => s.clone(),
        None => GEN_SETS.iter().map(|s| s.name.to_string()).collect(),
    };
    std::fs::create_dir_all(&a.out)?;
    for n in &names {
        let Some(set) = gen_set(n) else {
            anyhow::bail!(
                "'{n}' is not a generated set (generated: {})",
                set_names()[2..].join(", ")
            );
        };
        // Also one contact sheet per set: a row per class, 4x nearest-neighbour upscaled.
        let (s, z) = (set.size, 4);
        let mut sheet = crate::data::Image::new(a.per_class * s * z, set.classes * s * z);
        for c in 0..set.classes {
            for i in 0..a.per_class {
                let img = set.draw(false, c, i);
                img.save(&a.out.join(format!("{n}-{c}-{i}.png")))?;
                for y in 0..s * z {
                    for x in 0..s * z {
                        let p = img.pixel(x / z, y / z);
                        let o = 3 * ((c * s * z + y) * sheet.width + i * s * z + x);
                        sheet.rgb[o..o + 3].copy_from_slice(&p);
                    }
                }
            }
        }
        sheet.save(&a.out.join(format!("{n}-sheet.png")))?;
    }
    println!(
        "wrote previews of {} into {}",
        names.join(", "),
        a.out.display()
    );
    Ok(())
}

/// `dinovmf bench speed`: see [`BenchCommand::Speed`].
fn speed(a: &SpeedArgs) -> Result<()> {
    use crate::backend::{self, random_batch, StepHyper, TrainState};
    use crate::flops::{flops_per_image, peak_tflops, PeakKind};
    use std::time::Instant;

    anyhow::ensure!(a.steps > 0, "--steps must be at least 1");
    let mut cfg = crate::train::TrainConfig::preset(&a.preset, a.loss)?;
    if let Some(b) = a.batch {
        anyhow::ensure!(b > 0, "--batch must be at least 1");
        cfg.batch_size = b;
    }
    if let Some(k) = a.prototypes {
        anyhow::ensure!(k > 0, "--prototypes must be at least 1");
        cfg.model.prototypes = k;
    }
    if let Some(s) = a.stem_convs {
        cfg.model.stem_convs = s;
    }
    if let Some(n) = a.n_local {
        cfg.n_local = n;
    }
    cfg.precision = a.precision;
    let bc = crate::config::backend_config(&cfg);
    let mut be = backend::open(&bc, a.device)?;
    be.set_state(&TrainState::initial(&bc.model, bc.loss.centering, 0))?;
    let s = bc.shapes;
    let batch = random_batch(&s, bc.model.vit.in_chans, 0);
    let mut hp = StepHyper {
        lr: 1e-4,
        weight_decay: 0.04,
        teacher_momentum: 0.996,
        teacher_temp: 0.04,
        freeze_last_layer: false,
        clip_grad: 3.0,
        seed: 1,
        patch_teacher_temp: 0.04,
    };
    let name = be.name();
    println!(
        "bench speed: {name}\n  preset {} ({:?} loss), batch {} x (2 x {} px + {} x {} px), K = {}",
        a.preset, a.loss, s.batch, s.global_size, s.n_local, s.local_size, cfg.model.prototypes
    );
    be.train_step(&batch, &hp)?;
    let timed = be.time_phases();
    let t0 = Instant::now();
    for i in 0..a.steps {
        hp.seed = 2 + i;
        be.train_step(&batch, &hp)?;
    }
    let per = t0.elapsed().as_secs_f64() / a.steps as f64;
    let fpi = flops_per_image(&cfg);
    let achieved = fpi * s.batch as f64 / per / 1e12;
    println!(
        "  {:.2} ms/step, {:.1} images/s over {} steps (after 1 warm-up){}",
        per * 1e3,
        s.batch as f64 / per,
        a.steps,
        if timed {
            " (phases timed; a device is waited for at each phase's end)"
        } else {
            ""
        }
    );
    println!(
        "  matrix-product FLOPs: {:.4} GFLOP/image (student fwd + bwd on every crop, teacher \
         fwd on the global crops), achieved {:.3} TFLOP/s",
        fpi / 1e9,
        achieved
    );
    let this = match a.precision {
        crate::backend::Precision::F32 => PeakKind::F32,
        crate::backend::Precision::Bf16 => PeakKind::Bf16,
    };
    for (kind, label) in [
        (PeakKind::F32, "f32 FMA"),
        (PeakKind::Bf16, "bf16 tensor cores (dense)"),
    ] {
        let what = format!("{label}{}", if kind == this { " (this run)" } else { "" });
        match peak_tflops(&name, kind) {
            Some((gpu, peak)) => println!(
                "  MFU vs {gpu} {what} peak {peak} TFLOP/s: {:.2} %",
                100.0 * achieved / peak
            ),
            None => println!(
                "  MFU vs {what}: no peak known for this device (table: H100, H100 PCIe, H200, \
                 A100)"
            ),
        }
    }
    if let Some(phases) = be.phase_times() {
        println!("  per phase (ms/step, share of the step):");
        for (p, secs) in phases {
            let ms = secs / a.steps as f64 * 1e3;
            println!("    {p:<18} {ms:9.2}  {:5.1} %", 100.0 * ms / (per * 1e3));
        }
    }
    match be.device_bytes() {
        Some(b) => println!(
            "  device memory held (allocated once, so the peak): {:.1} MiB",
            b as f64 / (1u64 << 20) as f64
        ),
        None => println!("  device memory: host backend (no device memory)"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(steps: u64) -> SpeedArgs {
        SpeedArgs {
            device: crate::backend::Device::Cpu,
            preset: "tiny".into(),
            loss: LossKind::Dino,
            batch: Some(4),
            prototypes: None,
            n_local: None,
            stem_convs: None,
            precision: crate::backend::Precision::F32,
            steps,
        }
    }

    #[test]
    fn speed_runs_a_tiny_preset_and_refuses_zero_steps() {
        speed(&args(1)).unwrap();
        let e = speed(&args(0)).unwrap_err().to_string();
        assert!(e.contains("--steps"), "{e}");
        let e = speed(&SpeedArgs {
            preset: "nope".into(),
            ..args(1)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("nope"), "{e}");
        // bf16 runs on the CPU backend too.
        speed(&SpeedArgs {
            precision: crate::backend::Precision::Bf16,
            ..args(1)
        })
        .unwrap();
    }
}
