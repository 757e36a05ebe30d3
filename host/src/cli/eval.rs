//! `dinovmf eval ...`: evaluations of a trained checkpoint.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::data::OnError;
use crate::train::{self, state, DataSpec};

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// k-NN accuracy of the teacher's [CLS] features (weighted vote, T = 0.07).
    Knn(KnnArgs),
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

pub fn run(c: &EvalCommand) -> Result<()> {
    match c {
        EvalCommand::Knn(a) => knn(a),
    }
}

fn knn(a: &KnnArgs) -> Result<()> {
    let (st, step, cfg, _) = state::load_checkpoint(&a.checkpoint)?;
    let spec = if a.data == "run" {
        cfg.data.clone()
    } else {
        super::train::parse_data(&a.data, &cfg.data)?
    };
    if let DataSpec::Folder {
        test_root: None, ..
    } = spec
    {
        anyhow::bail!("k-NN needs a held-out split: use --data folder:TRAIN,TEST");
    }
    let data = train::open_data(&spec, cfg.model.img_size, OnError::Skip)?;
    let mut backend = state::cpu_backend(&cfg)?;
    backend.set_state(&st)?;
    let scores = train::knn_eval(backend.as_mut(), &data, cfg.model.img_size)?;
    let px = if a.pixels {
        Some(train::knn_pixels(&data, cfg.model.img_size)?)
    } else {
        None
    };
    println!(
        "checkpoint {} (step {step}), data {}",
        a.checkpoint.display(),
        data.train.describe()
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
