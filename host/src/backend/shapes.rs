//! What every backend is built for: the batch shapes it accepts and the model constants its
//! passes read. One definition, one set of checks, so the CPU and CUDA backends refuse the same
//! configurations with the same messages.
use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use dinovmf_core::loss::LossConfig;
use dinovmf_core::model::{Layout, ModelConfig};

use crate::data::Batch;

/// The fixed shapes of the batches a backend is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepShapes {
    pub batch: usize,
    /// Must be 2 (the DINO loss pairs two global views).
    pub n_global: usize,
    pub n_local: usize,
    pub global_size: usize,
    pub local_size: usize,
}

impl StepShapes {
    /// Refuses a model, loss and shapes that cannot run together, saying which and why.
    pub fn validate(&self, model: &ModelConfig, loss: &LossConfig) -> Result<()> {
        ensure!(
            model.is_valid(),
            "model configuration is not runnable: {model:?}"
        );
        ensure!(
            self.n_global == 2,
            "the DINO loss needs exactly 2 global crops, got {}",
            self.n_global
        );
        ensure!(self.batch > 0, "batch size must be positive");
        let v = &model.vit;
        ensure!(
            v.accepts(self.global_size),
            "global crop size {} is not a positive multiple of the patch size {}",
            self.global_size,
            v.patch
        );
        ensure!(
            self.n_local == 0 || v.accepts(self.local_size),
            "local crop size {} is not a positive multiple of the patch size {}",
            self.local_size,
            v.patch
        );
        ensure!(
            loss.norm_last_layer == model.head.norm_last_layer,
            "loss and model disagree on norm_last_layer ({} vs {})",
            loss.norm_last_layer,
            model.head.norm_last_layer
        );
        Ok(())
    }

    /// Refuses a batch of other shapes than these (images of `channels` channels).
    pub fn check_batch(&self, channels: usize, b: &Batch) -> Result<()> {
        let (g, l) = (self.global_size, self.local_size);
        ensure!(
            b.batch_size == self.batch
                && b.n_global == self.n_global
                && b.n_local == self.n_local
                && b.global_size == g
                && (self.n_local == 0 || b.local_size == l),
            "batch shape (B {}, {} x {} px global, {} x {} px local) does not match the backend's \
             (B {}, {} x {} px, {} x {} px)",
            b.batch_size,
            b.n_global,
            b.global_size,
            b.n_local,
            b.local_size,
            self.batch,
            self.n_global,
            g,
            self.n_local,
            l
        );
        let c = channels;
        ensure!(
            b.global.len() == self.n_global * self.batch * c * g * g,
            "global crops hold {} values, expected {}",
            b.global.len(),
            self.n_global * self.batch * c * g * g
        );
        ensure!(
            b.local.len() == self.n_local * self.batch * c * l * l,
            "local crops hold {} values, expected {}",
            b.local.len(),
            self.n_local * self.batch * c * l * l
        );
        Ok(())
    }
}

/// The arithmetic of the matrix products of the backbone's and the head MLP's linear layers
/// (`--precision`). Master weights, the optimiser, the prototype logits, log C_p, the softmax
/// and the loss are f32 in both.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 everywhere (the reference).
    #[default]
    F32,
    /// bf16 operands with f32 accumulation for the forward and input-gradient products of the
    /// linear layers; their weight gradients stay f32 products (CPU: AMX or AVX512-BF16
    /// where the CPU has them, else emulated).
    Bf16,
}

/// Model constants every pass needs.
#[derive(Clone, Copy, Debug)]
pub struct Cx {
    pub cfg: ModelConfig,
    pub lay: Layout,
    pub d: usize,
    pub heads: usize,
    pub mh: usize,
    /// Inputs of one patch, `C P P`.
    pub kp: usize,
    pub eps: f32,
    /// The linear layers' matrix products (`BackendConfig::precision`).
    pub prec: Precision,
}

impl Cx {
    pub fn new(cfg: &ModelConfig) -> Self {
        let v = &cfg.vit;
        Self {
            cfg: *cfg,
            lay: Layout::new(cfg),
            d: v.dim,
            heads: v.heads,
            mh: v.mlp_hidden(),
            kp: v.patch_len(),
            eps: v.ln_eps as f32,
            prec: Precision::F32,
        }
    }
}

/// A batch of `s`'s shapes with `channels` channels, every pixel uniform in [-1, 1) from
/// `seed` (the simulator comparisons and the benchmarks step on it).
pub fn random_batch(s: &StepShapes, channels: usize, seed: u64) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect() };
    let (g, l) = (s.global_size, s.local_size);
    Batch {
        global: r(s.n_global * s.batch * channels * g * g),
        local: r(s.n_local * s.batch * channels * l * l),
        labels: vec![0; s.batch],
        indices: (0..s.batch).collect(),
        global_size: g,
        local_size: l,
        batch_size: s.batch,
        n_global: s.n_global,
        n_local: s.n_local,
    }
}
