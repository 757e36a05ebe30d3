//! `dinovmf export`: a checkpoint's teacher as a compact model file for `dinovmf assign` and
//! microcontrollers (core's quantized inference reads it in place).
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use dinovmf_core::quant::format::Dtype;
use dinovmf_core::quant::infer::scratch_len;

use crate::checkpoint::write_atomic;
use crate::data::OnError;
use crate::interop::{export_timm, write_state_dict, TimmExportOptions};
use crate::quant::{self, report, Teacher};
use crate::train;

#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("dtype").args(["int8", "f16", "f32"])))]
pub struct ExportArgs {
    /// A checkpoint written by `dinovmf train` (its teacher is exported).
    pub checkpoint: PathBuf,
    /// Where the model file goes (with `--format timm`: the backbone's state dict).
    #[arg(long, short = 'o', default_value = "model.bin")]
    pub out: PathBuf,
    /// edge: core's int8 / f16 / f32 model file (for `assign` and the firmware); timm: the
    /// teacher as PyTorch state dicts in safetensors, the backbone to OUT (loads with
    /// strict=True into DINO's and timm's VisionTransformer) and the head to --head-out.
    #[arg(long, value_enum, default_value = "edge")]
    pub format: ExportFormat,
    /// With `--format timm`: where the head's state dict (DINOHead: MLP and prototypes) goes;
    /// default OUT with `-head` before the extension.
    #[arg(long)]
    pub head_out: Option<PathBuf>,
    /// With `--format timm`: keep an iBOT run's `masked_embed` in the backbone (for iBOT's
    /// VisionTransformer(masked_im_modeling=True); timm's and DINO's have no such key).
    #[arg(long)]
    pub ibot_mask_token: bool,
    /// int8 weights, per output channel, symmetric (the default).
    #[arg(long)]
    pub int8: bool,
    /// f16 weights (twice the size of int8, closer to f32).
    #[arg(long)]
    pub f16: bool,
    /// f32 weights (a reference; the same inference code path).
    #[arg(long)]
    pub f32: bool,
    /// Training images whose activation ranges fix the int8 input scales of every layer.
    #[arg(long, default_value_t = 256)]
    pub calib_images: usize,
    /// Scale each int8 layer input by its own max at run time instead of the calibrated range.
    #[arg(long)]
    pub dynamic: bool,
    /// Then compare the export with the f32 teacher on the held-out split of the checkpoint's
    /// data: top-1 prototype agreement, feature cosine, k-NN accuracy.
    #[arg(long)]
    pub report: bool,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// What `dinovmf export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Edge,
    Timm,
}

impl ExportArgs {
    /// Where the head goes with `--format timm`.
    pub fn head_path(&self) -> PathBuf {
        self.head_out.clone().unwrap_or_else(|| {
            let stem = self
                .out
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "backbone".into());
            let ext = self
                .out
                .extension()
                .map(|e| format!(".{}", e.to_string_lossy()))
                .unwrap_or_default();
            self.out.with_file_name(format!("{stem}-head{ext}"))
        })
    }

    fn dtype(&self) -> Dtype {
        if self.f16 {
            Dtype::F16
        } else if self.f32 {
            Dtype::F32
        } else {
            Dtype::I8
        }
    }
}

pub fn run(a: &ExportArgs) -> Result<()> {
    let teacher = Teacher::load(&a.checkpoint)?;
    if teacher.model.vit.stem_convs > 0 {
        bail!(
            "{} was trained with --stem-convs {} (a convolutional stem): neither the edge model format nor timm's VisionTransformer has one, so it cannot be exported; train without --stem-convs to export",
            a.checkpoint.display(),
            teacher.model.vit.stem_convs
        );
    }
    if a.format == ExportFormat::Timm {
        return run_timm(a, &teacher);
    }
    let dtype = a.dtype();
    let size = teacher.model.vit.img_size;
    let data = || {
        train::open_data(&teacher.cfg.data, size, OnError::Skip)
            .context("opening the checkpoint's training data")
    };
    let amax = if dtype == Dtype::I8 && !a.dynamic {
        let d = data()?;
        let imgs = quant::sample_images(d.train.as_ref(), a.calib_images, size)?;
        Some(quant::calibrate(&teacher, &imgs)?)
    } else {
        None
    };
    let bytes = teacher.write(dtype, amax.as_deref())?;
    write_atomic(&a.out, &bytes)?;
    let s = scratch_len(&teacher.model);
    println!(
        "wrote {} ({:?}, {} bytes; teacher of {} at step {}; scratch {} floats + {} bytes = {} KiB)",
        a.out.display(),
        dtype,
        bytes.len(),
        a.checkpoint.display(),
        teacher.step,
        s.floats,
        s.bytes,
        (4 * s.floats + s.bytes).div_ceil(1024)
    );
    if a.report {
        let d = data()?;
        let c = report::compare(&teacher, &bytes, &d, !a.quiet)?;
        println!(
            "held-out images: {}\ntop-1 prototype agreement with f32: {:.2}%  (f32 top-1 in top-5: {:.2}%)\n\
             feature cosine to f32: mean {:.6}, min {:.6}\nmean total variation of the posterior: {:.4}",
            c.n_test,
            100.0 * c.top1_agreement,
            100.0 * c.top1_in_top5,
            c.cos_mean,
            c.cos_min,
            c.prob_tv
        );
        for (f, q) in c.knn_f32.iter().zip(&c.knn_quant) {
            println!(
                "k-NN k = {:>3}: f32 {:5.1}%   {:?} {:5.1}%",
                f.k,
                100.0 * f.top1,
                dtype,
                100.0 * q.top1
            );
        }
    }
    Ok(())
}

/// `--format timm`: the teacher's backbone and head as PyTorch state dicts.
fn run_timm(a: &ExportArgs, teacher: &Teacher) -> Result<()> {
    if a.int8 || a.f16 || a.report || a.dynamic {
        anyhow::bail!("--int8, --f16, --dynamic and --report belong to --format edge; --format timm writes f32");
    }
    let head = a.head_path();
    if head == a.out {
        anyhow::bail!("--head-out is the same file as -o ({})", a.out.display());
    }
    let opts = if a.ibot_mask_token {
        TimmExportOptions::ibot()
    } else {
        TimmExportOptions::timm()
    };
    let mut e = export_timm(&teacher.model, &teacher.params, opts)?;
    let step = teacher.step.to_string();
    for sd in [&mut e.backbone, &mut e.head] {
        sd.metadata.insert("dinovmf_step".into(), step.clone());
        sd.metadata
            .insert("dinovmf_preset".into(), teacher.cfg.preset.clone());
    }
    e.head.metadata.insert(
        "dinovmf_loss".into(),
        format!("{:?}", teacher.cfg.loss).to_lowercase(),
    );
    e.head
        .metadata
        .insert("teacher_temp".into(), teacher.cfg.teacher_temp.to_string());
    write_state_dict(&a.out, &e.backbone)?;
    write_state_dict(&head, &e.head)?;
    let v = &teacher.model.vit;
    println!(
        "wrote {} ({} tensors: VisionTransformer img_size {}, patch {}, dim {}, depth {}, {} heads, \
         mlp_ratio {}) and {} ({} tensors: DINOHead out_dim {}); teacher of {} at step {}",
        a.out.display(),
        e.backbone.tensors.len(),
        v.img_size,
        v.patch,
        v.dim,
        v.depth,
        v.heads,
        v.mlp_ratio,
        head.display(),
        e.head.tensors.len(),
        teacher.model.head.out_dim,
        a.checkpoint.display(),
        teacher.step
    );
    Ok(())
}
