//! `dinovmf import`: a timm / official-DINO / iBOT state dict (safetensors) as a dinovmf
//! checkpoint at step 0, for `eval`, `attention`, `export` and fine-tuning with
//! `train --resume` (same options as the import).
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::config::model_config;
use crate::interop::{import_state_dict, read_state_dict, StateDict};
use crate::train::state;

#[derive(Args, Debug, Clone)]
pub struct ImportArgs {
    /// A PyTorch state dict as safetensors: a timm / DINO / iBOT ViT backbone, optionally with
    /// its DINO head (`backbone.*` + `head.*`, as in DINO's `teacher` entry).
    pub weights: PathBuf,
    /// The DINOHead's state dict in its own file (`mlp.*`, `last_layer.*`, as `export --format
    /// timm` writes it), to go with a bare backbone in WEIGHTS.
    #[arg(long)]
    pub head: Option<PathBuf>,
    /// The run the weights start: the same options as `dinovmf train` (preset and shape
    /// overrides must describe the model of the file); the checkpoint goes to
    /// OUT/checkpoint.safetensors.
    #[command(flatten)]
    pub run: super::train::TrainArgs,
}

pub fn run(a: &ImportArgs) -> Result<()> {
    if a.run.resume.is_some() {
        bail!("import writes a new checkpoint; --resume belongs to the `train` that continues it");
    }
    let Some(out_dir) = a.run.out.clone() else {
        bail!("import needs -o DIR: the folder of the new run it starts (nothing was written)");
    };
    let out = out_dir.join("checkpoint.safetensors");
    if out.exists() {
        bail!(
            "{} exists: import starts a new run, choose another -o (nothing was written)",
            out.display()
        );
    }
    let mut cfg = a.run.config()?;
    let mut sd = read_state_dict(&a.weights)?;
    if let Some(h) = &a.head {
        sd = with_head(sd, read_state_dict(h)?)
            .with_context(|| format!("joining {} and {}", a.weights.display(), h.display()))?;
    }
    if cfg.model.stem_convs > 0 && !sd.tensors.keys().any(|k| k.contains("patch_embed.stem.")) {
        // DINO's and timm's ViTs embed patches with one convolution: the run takes their
        // patch embedding instead of the preset's convolutional stem.
        eprintln!(
            "import: {} has no convolutional stem, so the new run uses DINO's patch embedding (--stem-convs 0 instead of the preset's {})",
            a.weights.display(),
            cfg.model.stem_convs
        );
        cfg.model.stem_convs = 0;
    }
    let mc = model_config(&cfg);
    let mut st = state::init_state(&cfg);
    let imp = import_state_dict(&sd, &mc, &st.teacher)
        .with_context(|| format!("importing {}", a.weights.display()))?;
    st.teacher = imp.params.clone();
    st.student = imp.params;
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    state::save_checkpoint(&out, &cfg, &st, 0, None)?;
    crate::checkpoint::write_atomic(
        &out_dir.join("config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )
    .with_context(|| format!("writing {}/config.json", out_dir.display()))?;
    println!(
        "imported {} ({}, {} tensors) as preset {} (dim {}, depth {}, {} heads, K {}); head {}",
        a.weights.display(),
        imp.layout,
        sd.tensors.len(),
        cfg.preset,
        cfg.model.dim,
        cfg.model.depth,
        cfg.model.heads,
        cfg.model.prototypes,
        if imp.head_imported {
            "from the file"
        } else {
            "initialised"
        }
    );
    for n in &imp.notes {
        println!("note: {n}");
    }
    println!("wrote {}", out.display());
    Ok(())
}

/// A bare backbone and a head file as one `backbone.*` + `head.*` state dict (DINO's layout).
pub fn with_head(backbone: StateDict, head: StateDict) -> Result<StateDict> {
    if !backbone.tensors.contains_key("cls_token") {
        bail!("--head needs a bare backbone (keys like 'cls_token', no prefix) in WEIGHTS");
    }
    if let Some(k) = head.tensors.keys().find(|k| k.starts_with("head.")) {
        bail!("the head file's key '{k}' has a 'head.' prefix: give DINOHead's own keys (mlp.0.weight, ...)");
    }
    let mut out = StateDict::default();
    for (prefix, sd) in [("backbone.", backbone), ("head.", head)] {
        for (k, t) in sd.tensors {
            out.insert(&format!("{prefix}{k}"), &t.shape, t.data);
        }
    }
    Ok(out)
}
