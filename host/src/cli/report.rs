//! `dinovmf report RUN_DIR`: one Markdown page with the run's figures and final numbers.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::report::{write_report, Extras};
use crate::train::checkpoint_in;

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// A run folder written by `dinovmf train` (holds metrics.jsonl).
    pub run_dir: PathBuf,
    /// Skip the linear probe (it embeds both splits once more).
    #[arg(long)]
    pub no_probe: bool,
    /// Skip the fresh prototype diagnostics on the checkpoint (the report then shows the last
    /// ones the trainer logged, if any).
    #[arg(long)]
    pub no_diag: bool,
    /// Blocks whose [CLS] tokens the linear probe concatenates.
    #[arg(long, default_value_t = 4)]
    pub blocks: usize,
}

pub fn run(a: &ReportArgs) -> Result<()> {
    // Fails early, with the reason, on a folder that is not a run.
    crate::report::read_metrics(&a.run_dir)?;
    let mut extras = Extras::default();
    let ck = checkpoint_in(&a.run_dir);
    if ck.exists() && !(a.no_probe && a.no_diag) {
        let mut l = super::eval::load(&ck, "run", false)?;
        if !a.no_probe && l.data.test.is_some() {
            eprintln!("linear probe on the checkpoint's teacher...");
            extras.probe = Some(super::eval::probe(&mut l, a.blocks)?);
        }
        if !a.no_diag {
            eprintln!("prototype diagnostics on the checkpoint's teacher...");
            extras.diag = Some(super::eval::proto_diag(&mut l, 2048, None)?);
        }
    } else if !ck.exists() {
        eprintln!(
            "no checkpoint in {}: figures and logged numbers only",
            a.run_dir.display()
        );
    }
    let out = write_report(&a.run_dir, &extras)?;
    println!("wrote {}", out.display());
    Ok(())
}
