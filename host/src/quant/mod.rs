//! Export of a checkpoint's teacher to core's quantized model format (int8, f16 or f32), with
//! activation calibration, and the host side of quantized inference (`dinovmf assign`).
pub mod image;
pub mod report;

use std::path::Path;

use anyhow::{bail, Context, Result};
use dinovmf_core::logits::{branch_terms_forward, weight_norm_forward, LogitKind};
use dinovmf_core::model::{find_param, ModelConfig};
use dinovmf_core::quant::format::{Dtype, Header, Logits, Writer};
use dinovmf_core::quant::infer::{forward, scratch_len, Observer, Scratch};
use dinovmf_core::quant::Model;
use dinovmf_core::vmf::BesselApprox;
use rayon::prelude::*;

use crate::backend::TrainState;
use crate::config::model_config;
use crate::data::{Dataset, IMAGENET_MEAN, IMAGENET_STD};
use crate::train::state;
use crate::train::{LossKind, TrainConfig};

/// The f32 teacher of a checkpoint with what export needs to know about it.
pub struct Teacher {
    pub cfg: TrainConfig,
    pub model: ModelConfig,
    pub params: Vec<f32>,
    pub step: u64,
    /// The whole training state (the f32 comparison runs the teacher on the CPU backend).
    pub state: TrainState,
}

impl Teacher {
    pub fn load(path: &Path) -> Result<Self> {
        let (st, step, cfg, _) = state::load_checkpoint(path)
            .with_context(|| format!("loading checkpoint {}", path.display()))?;
        Ok(Self::from_state(cfg, st, step))
    }

    pub fn from_state(cfg: TrainConfig, st: TrainState, step: u64) -> Self {
        Teacher {
            model: model_config(&cfg),
            params: st.teacher.clone(),
            state: st,
            cfg,
            step,
        }
    }

    /// A teacher tensor by its timm / DINO name (so parameters other features add to the
    /// layout, and inference does not use, change nothing here).
    pub fn param(&self, name: &str) -> Result<&[f32]> {
        let p = find_param(&self.model, name)
            .with_context(|| format!("the model has no parameter '{name}'"))?;
        Ok(&self.params[p.range()])
    }

    pub fn logit_kind(&self) -> LogitKind {
        match self.cfg.loss {
            LossKind::Dino => LogitKind::Dino,
            LossKind::Vmf => LogitKind::Vmf,
        }
    }

    /// Temperature of the exported posterior: the teacher's final one (see core's
    /// `quant::infer` docs for why the center is not applied).
    pub fn tau(&self) -> f32 {
        self.cfg.teacher_temp as f32
    }

    pub fn header(&self, dtype: Dtype) -> Header {
        Header {
            dtype,
            model: self.model,
            logits: match self.logit_kind() {
                LogitKind::Dino => Logits::Dino,
                LogitKind::Vmf => Logits::Vmf,
            },
            tau: self.tau(),
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            payload_len: 0,
            checksum: 0,
        }
    }

    /// Refuses a teacher with a NaN or infinite weight, naming the first such tensor.
    pub fn check_finite(&self) -> Result<()> {
        let mut bad = None;
        dinovmf_core::model::for_each_param(&self.model, |p| {
            if bad.is_none() {
                let v = &self.params[p.range()];
                let n = v.iter().filter(|x| !x.is_finite()).count();
                if n > 0 {
                    bad = Some(format!("{} ({n} of {} values)", p.name, v.len()));
                }
            }
        });
        match bad {
            Some(what) => bail!(
                "the teacher of checkpoint step {} has non-finite weights in {what}: refusing to \
                 export a broken model",
                self.step
            ),
            None => Ok(()),
        }
    }

    /// The prototype layer as a linear: unit directions `mu [K, p]`, per-row scale `r_k / tau`
    /// and bias `D_p(kappa_k)` (vMF) or 0 (DINO), from core's logit stages.
    pub fn prototype_layer(&self) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let h = &self.model.head;
        let (k, p) = (h.out_dim, h.bottleneck);
        let v = self.param("head.last_layer.weight_v")?;
        let g = self.param("head.last_layer.weight_g")?;
        let mut mu = vec![0.0f32; k * p];
        let (mut r, mut vnorm) = (vec![0.0f32; k], vec![0.0f32; k]);
        let g = if h.norm_last_layer { None } else { Some(g) };
        weight_norm_forward(&mut mu, &mut r, &mut vnorm, v, g, k, p);
        let (mut scale, mut bias, mut dbias) = (vec![0.0; k], vec![0.0; k], vec![0.0; k]);
        branch_terms_forward(
            &mut scale,
            &mut bias,
            &mut dbias,
            &r,
            self.tau(),
            p,
            self.logit_kind(),
            BesselApprox::default(),
        );
        Ok((mu, scale, bias))
    }

    /// The model file in `dtype`; `act_amax[layer]` are calibrated input ranges for int8
    /// (`None`: each row is scaled by its own max at run time).
    pub fn write(&self, dtype: Dtype, act_amax: Option<&[f32]>) -> Result<Vec<u8>> {
        self.check_finite()?;
        let m = &self.model;
        let v = &m.vit;
        let d = v.dim;
        let mut w = Writer::new(self.header(dtype));
        let mut li = 0usize;
        let mut amax = || {
            let a = act_amax.map(|a| a[li]);
            li += 1;
            a
        };
        let cls = self.param("backbone.cls_token")?;
        let pos = self.param("backbone.pos_embed")?;
        let cls_pos: Vec<f32> = cls.iter().zip(pos).map(|(a, b)| a + b).collect();
        w.f32s(&cls_pos);
        w.f32s(&pos[d..]);
        w.linear(
            self.param("backbone.patch_embed.proj.weight")?,
            self.param("backbone.patch_embed.proj.bias")?,
            None,
            d,
            v.patch_len(),
            amax(),
        );
        let mh = v.mlp_hidden();
        let zeros = vec![0.0f32; 3 * d];
        for i in 0..v.depth {
            let n = |s: &str| format!("backbone.blocks.{i}.{s}");
            w.f32s(self.param(&n("norm1.weight"))?);
            w.f32s(self.param(&n("norm1.bias"))?);
            let qkv_b = if v.qkv_bias {
                self.param(&n("attn.qkv.bias"))?
            } else {
                &zeros
            };
            w.linear(
                self.param(&n("attn.qkv.weight"))?,
                qkv_b,
                None,
                3 * d,
                d,
                amax(),
            );
            w.linear(
                self.param(&n("attn.proj.weight"))?,
                self.param(&n("attn.proj.bias"))?,
                None,
                d,
                d,
                amax(),
            );
            w.f32s(self.param(&n("norm2.weight"))?);
            w.f32s(self.param(&n("norm2.bias"))?);
            w.linear(
                self.param(&n("mlp.fc1.weight"))?,
                self.param(&n("mlp.fc1.bias"))?,
                None,
                mh,
                d,
                amax(),
            );
            w.linear(
                self.param(&n("mlp.fc2.weight"))?,
                self.param(&n("mlp.fc2.bias"))?,
                None,
                d,
                mh,
                amax(),
            );
        }
        w.f32s(self.param("backbone.norm.weight")?);
        w.f32s(self.param("backbone.norm.bias")?);
        for l in 0..m.head.n_layers {
            let (di, dout) = m.head.layer_dims(d, l);
            w.linear(
                self.param(&format!("head.mlp.{}.weight", 2 * l))?,
                self.param(&format!("head.mlp.{}.bias", 2 * l))?,
                None,
                dout,
                di,
                amax(),
            );
        }
        let (mu, scale, bias) = self.prototype_layer()?;
        w.linear(
            &mu,
            &bias,
            Some(&scale),
            m.head.out_dim,
            m.head.bottleneck,
            amax(),
        );
        Ok(w.finish())
    }
}

/// Records max |x| of every linear layer's input.
struct Amax(Vec<f32>);

impl Observer for Amax {
    fn linear_input(&mut self, layer: usize, x: &[f32]) {
        let m = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if m > self.0[layer] {
            self.0[layer] = m;
        }
    }
}

/// Input ranges of every linear layer over `images` (RGB u8 at the model size), measured on the
/// f32 export through core's own forward pass (so the layers are numbered the same way).
pub fn calibrate(teacher: &Teacher, images: &[Vec<u8>]) -> Result<Vec<f32>> {
    let bytes = teacher.write(Dtype::F32, None)?;
    let model = Model::parse(&bytes).context("parsing the f32 export")?;
    let n = model.num_linears();
    let per_image: Vec<Vec<f32>> = images
        .par_iter()
        .map_init(
            || ScratchBuf::new(&teacher.model),
            |sb, img| -> Result<Vec<f32>> {
                let mut obs = Amax(vec![0.0; n]);
                forward(&model, img, sb.scratch(), &mut obs)
                    .map_err(|e| anyhow::anyhow!("calibration forward: {e}"))?;
                Ok(obs.0)
            },
        )
        .collect::<Result<_>>()?;
    let mut amax = vec![0.0f32; n];
    for a in per_image {
        for (m, v) in amax.iter_mut().zip(a) {
            *m = m.max(v);
        }
    }
    Ok(amax)
}

/// Owned scratch for host-side inference.
pub struct ScratchBuf {
    pub floats: Vec<f32>,
    pub bytes: Vec<i8>,
}

impl ScratchBuf {
    pub fn new(m: &ModelConfig) -> Self {
        let s = scratch_len(m);
        ScratchBuf {
            floats: vec![0.0; s.floats],
            bytes: vec![0; s.bytes],
        }
    }
    pub fn scratch(&mut self) -> Scratch<'_> {
        Scratch {
            floats: &mut self.floats,
            bytes: &mut self.bytes,
        }
    }
}

/// `n` images spread evenly over a dataset (every `len / n`-th), at the model size.
pub fn sample_images(ds: &dyn Dataset, n: usize, size: usize) -> Result<Vec<Vec<u8>>> {
    let len = ds.len();
    if len == 0 {
        bail!("calibration needs images, the dataset is empty");
    }
    let n = n.clamp(1, len);
    (0..n)
        .map(|i| {
            let idx = i * len / n;
            let img = ds
                .load(idx)
                .with_context(|| format!("loading calibration image {idx}"))?;
            Ok(image::to_model_input(&img, size))
        })
        .collect()
}

/// Reads and validates a model file, naming it in every error.
pub fn read_model_file(path: &Path) -> Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading model file {}", path.display()))?;
    Model::parse(&bytes).with_context(|| format!("model file {}", path.display()))?;
    Ok(bytes)
}
