//! `dinovmf assign`: run an exported model on images with core's quantized inference (the code
//! that runs on the microcontroller), to check a model before flashing it.
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use clap::Args;
use dinovmf_core::quant::infer::{forward, top_n, NoObserver};
use dinovmf_core::quant::Model;

use crate::checkpoint::write_atomic;
use crate::quant::{self, image::load_model_input, ScratchBuf};

/// Most prototypes `--top` can ask for.
const MAX_TOP: usize = 32;

#[derive(Args, Debug, Clone)]
pub struct AssignArgs {
    /// A model file written by `dinovmf export`.
    pub model: PathBuf,
    /// Images (PNG or JPEG); each is resized to the model's input size.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// How many of the most probable prototypes to print (at most 32).
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Also print the L2-normalised [CLS] feature.
    #[arg(long)]
    pub embed: bool,
    /// Write the (single) image's model input, RGB u8 at the model size, to this file: the
    /// bytes the firmware build embeds (scripts/firmware.sh run MODEL FILE).
    #[arg(long)]
    pub save_input: Option<PathBuf>,
}

pub fn run(a: &AssignArgs) -> Result<()> {
    let bytes = quant::read_model_file(&a.model)?;
    let model = Model::parse(&bytes).map_err(|e| anyhow!("{e}"))?;
    let h = model.header;
    let size = h.model.vit.img_size;
    let top = a.top.clamp(1, MAX_TOP);
    println!(
        "model {}: {:?} weights, {} px, {:?} logits, tau {}",
        a.model.display(),
        h.dtype,
        size,
        h.logits,
        h.tau
    );
    if a.save_input.is_some() && a.images.len() != 1 {
        bail!("--save-input takes exactly one image");
    }
    let mut sb = ScratchBuf::new(&h.model);
    for path in &a.images {
        let img = load_model_input(path, size)?;
        if let Some(out) = &a.save_input {
            write_atomic(out, &img)?;
        }
        let f = forward(&model, &img, sb.scratch(), &mut NoObserver)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        if !f
            .feature
            .iter()
            .chain(f.probs.iter())
            .all(|v| v.is_finite())
        {
            bail!(
                "{}: the model {} produced non-finite features or probabilities (its weights are \
                 broken: re-export it from a good checkpoint)",
                path.display(),
                a.model.display()
            );
        }
        let best = top_n::<MAX_TOP>(f.probs);
        let list: Vec<String> = best
            .iter()
            .take(top)
            .map(|b| format!("{} ({:.4})", b.prototype, b.prob))
            .collect();
        println!("{}: {}", path.display(), list.join(", "));
        if a.embed {
            let s: Vec<String> = f.feature.iter().map(|v| format!("{v:.6}")).collect();
            println!("  feature: [{}]", s.join(", "));
        }
    }
    Ok(())
}
