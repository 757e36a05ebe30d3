//! `dinovmf bench ...`: benchmarks of what the defaults learn.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::quality::sets::{gen_set, GEN_SETS};
use crate::quality::{markdown, run_suite, set_names, SuiteOptions};
use crate::train::LossKind;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Train with the defaults on each data set of the quality suite (the built-in set,
    /// MNIST-5k when its folder exists, generated sets) and print one table: k-NN k = 20
    /// trained / at init / raw pixels, linear probe, prototypes in use, RankMe, the teacher's
    /// entropies, NMI / purity, steps and wall time. Also writes OUT/quality.{json,md}.
    Quality(QualityArgs),
    /// Write a few images of each class of the generated sets as PNG, to look at.
    PreviewSets(PreviewArgs),
}

#[derive(Args, Debug, Clone)]
pub struct QualityArgs {
    /// Comma-separated sets (default: every set but the held-out ones). Known: builtin, mnist,
    /// and the generated sets (`dinovmf bench preview-sets` draws them).
    #[arg(long, value_delimiter = ',')]
    pub sets: Option<Vec<String>>,
    /// Also run the two held-out sets (counts, glyphs): they are not for tuning; run them once.
    #[arg(long)]
    pub heldout: bool,
    #[arg(long, default_value = "small32")]
    pub preset: String,
    #[arg(long, value_enum, default_value = "vmf")]
    pub loss: LossKind,
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
