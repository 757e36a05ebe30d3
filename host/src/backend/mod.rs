//! Backends run the training step; the trainer never sees which one it has.
//!
//! A backend owns the whole training state (student, teacher, optimiser moments, centers) where
//! its ops run, so a GPU backend keeps everything on the device: only batches go in and
//! metrics come out.
//!
//! The step itself is written once, in [`step`]: the order of its phases, generic over the
//! [`step::Passes`] each backend implements with its own fused ops (`cpu/passes.rs`,
//! `cuda/step/passes.rs`). [`open`] builds a backend from a [`BackendConfig`].
use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use dinovmf_core::centering::{center_init, Centering};
use dinovmf_core::loss::LossConfig;
use dinovmf_core::mim_loss::IbotConfig;
use dinovmf_core::model::{init_params, num_params, ModelConfig};
use serde::Serialize;

use crate::data::Batch;

pub mod cpu;
pub mod cuda;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod reduce;
pub mod shapes;
pub mod step;

pub use reduce::{Collective, SingleProcess, ThreadCollective};
pub use shapes::{random_batch, Precision, StepShapes};

/// The first `len` elements of a scratch buffer kept from step to step, growing it (with
/// zeros) when it is shorter, so that a warm step allocates nothing; what the elements held
/// before is left for the caller to overwrite.
pub(crate) fn grown<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::default());
    }
    &mut v[..len]
}

/// Where the training step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Cuda,
}

/// Everything a backend is built from (`crate::config::backend_config` makes it for a run).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackendConfig {
    pub model: ModelConfig,
    pub loss: LossConfig,
    pub shapes: StepShapes,
    /// iBOT's settings (the model must have the mask token), `None` for DINO.
    pub ibot: Option<IbotConfig>,
    /// The matrix products' precision (CPU: the linear layers; CUDA: every GEMM of the step).
    pub precision: Precision,
}

/// The backend for `cfg` on `device` (single process), or why there is none.
pub fn open(cfg: &BackendConfig, device: Device) -> Result<Box<dyn Backend>> {
    match device {
        Device::Cpu => Ok(Box::new(cpu::CpuBackend::open(cfg)?)),
        Device::Cuda => cuda::open(cfg),
    }
}

/// The backend of one rank of a data-parallel run (the batch `cfg` describes is split over
/// the collective's ranks), or why there is none.
pub fn open_rank(
    cfg: &BackendConfig,
    device: Device,
    collective: Box<dyn Collective>,
) -> Result<Box<dyn Backend>> {
    if collective.world_size() == 1 {
        return open(cfg, device);
    }
    match device {
        Device::Cpu => Ok(Box::new(cpu::CpuBackend::open_rank(cfg, collective)?)),
        Device::Cuda => cuda::open_rank(cfg, collective),
    }
}

/// One process running `shards` data-parallel ranks on threads (`--shards`; 1 = [`open`]).
pub fn open_shards(cfg: &BackendConfig, device: Device, shards: usize) -> Result<Box<dyn Backend>> {
    if shards <= 1 {
        return open(cfg, device);
    }
    match device {
        Device::Cpu => Ok(Box::new(cpu::ShardedCpu::open(cfg, shards)?)),
        Device::Cuda => anyhow::bail!("--shards runs on the CPU backend only"),
    }
}

/// Which network's features to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    Student,
    Teacher,
}

/// The values of the per-step schedules, computed by the trainer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepHyper {
    pub lr: f32,
    pub weight_decay: f32,
    pub teacher_momentum: f32,
    pub teacher_temp: f32,
    /// Last layer gets no update (DINO freezes it during the first epoch).
    pub freeze_last_layer: bool,
    /// Per-tensor gradient-norm clip; 0 disables.
    pub clip_grad: f32,
    /// Seeds the step's randomness (drop path, iBOT's masks) so a step is a pure function of
    /// state + batch.
    pub seed: u64,
    /// iBOT: the patch teacher temperature (its own schedule; unused by DINO).
    pub patch_teacher_temp: f32,
}

/// What one step reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepMetrics {
    pub loss: f32,
    /// Mean over teacher rows of the entropy of P_t (ln K = uniform targets).
    pub teacher_entropy: f32,
    /// Entropy of the batch-mean teacher distribution (low = few prototypes used).
    pub mean_entropy: f32,
    /// Largest mass of the batch-mean teacher distribution (near 1 = one prototype wins all).
    pub max_mass: f32,
    /// Mean KL(P_t || P_s) over the loss pairs.
    pub kl: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// iBOT: L_cls and L_mim (unweighted; `loss = cls_loss + mim_weight * mim_loss`), and the
    /// mean entropy of the patch targets. DINO: `cls_loss = loss`, the others 0.
    pub cls_loss: f32,
    pub mim_loss: f32,
    pub patch_teacher_entropy: f32,
}

/// The full training state in host memory, in the flat parameter layout of `dinovmf_core::model`.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    pub student: Vec<f32>,
    pub teacher: Vec<f32>,
    pub adam_m: Vec<f32>,
    pub adam_v: Vec<f32>,
    pub center: Vec<f32>,
    /// iBOT's patch center `[K]`; empty for DINO.
    pub patch_center: Vec<f32>,
    /// AdamW steps taken (bias correction).
    pub adam_step: u64,
}

impl TrainState {
    /// Fresh parameters drawn as DINO initialises them from `seed` (teacher = student), zero
    /// optimiser moments, the centering's initial center.
    pub fn initial(model: &ModelConfig, centering: Centering, seed: u64) -> Self {
        let n = num_params(model);
        let mut student = vec![0.0f32; n];
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        init_params(model, &mut student, &mut || StandardNormal.sample(&mut rng));
        let mut center = vec![0.0f32; model.head.out_dim];
        center_init(&mut center, centering);
        // The mask token marks an iBOT model: it has a patch center, initialised as the other.
        let patch_center = if model.ibot.mask_token {
            center.clone()
        } else {
            Vec::new()
        };
        TrainState {
            patch_center,
            teacher: student.clone(),
            adam_m: vec![0.0; n],
            adam_v: vec![0.0; n],
            student,
            center,
            adam_step: 0,
        }
    }
}

pub trait Backend: Send {
    fn name(&self) -> String;
    /// Loads the state onto the backend.
    fn set_state(&mut self, s: &TrainState) -> Result<()>;
    /// Reads the state back (for checkpoints).
    fn state(&mut self) -> Result<TrainState>;
    /// One full step: student forward on every crop, teacher on the global crops, loss, backward,
    /// gradient reduction, clipping, AdamW, teacher EMA, center update.
    fn train_step(&mut self, batch: &Batch, hp: &StepHyper) -> Result<StepMetrics>;
    /// Final-LayerNorm [CLS] features ([n, dim]) of `images` ([n, 3, size, size]).
    fn embed(&mut self, net: Net, images: &[f32], n: usize, size: usize) -> Result<Vec<f32>>;
    /// `[n, blocks * dim]`: the [CLS] token after each of the last `blocks` blocks (oldest
    /// first), each through the final LayerNorm (the linear probe's features).
    fn embed_blocks(
        &mut self,
        _net: Net,
        _images: &[f32],
        _n: usize,
        _size: usize,
        _blocks: usize,
    ) -> Result<Vec<f32>> {
        anyhow::bail!(
            "the {} backend cannot read per-block features; evaluations run them on the CPU backend",
            self.name()
        )
    }
    /// `[n, heads, tokens]`: the last block's [CLS]-query attention probabilities.
    fn cls_attention(
        &mut self,
        _net: Net,
        _images: &[f32],
        _n: usize,
        _size: usize,
    ) -> Result<Vec<f32>> {
        anyhow::bail!(
            "the {} backend cannot read attention maps; evaluations run them on the CPU backend",
            self.name()
        )
    }
    /// Turns on the KoLeo-proto regulariser on the student's prototypes with this weight
    /// (0 = off): its gradient joins the loss gradient before clipping.
    fn set_koleo_proto(&mut self, weight: f32) -> Result<()> {
        if weight == 0.0 {
            return Ok(());
        }
        anyhow::bail!(
            "--koleo-proto is implemented on the CPU backend only (this run uses {})",
            self.name()
        )
    }
    /// Turns on KoLeo on the student's [CLS] backbone features of each global view with this
    /// weight (0 = off; method.md): its gradient joins the head backward's input gradient.
    fn set_koleo(&mut self, weight: f32) -> Result<()> {
        if weight == 0.0 {
            return Ok(());
        }
        anyhow::bail!(
            "--koleo is implemented on the CPU backend only (this run uses {})",
            self.name()
        )
    }
    /// The KoLeo-proto value of the last step, when the regulariser is on.
    fn koleo_proto_loss(&self) -> Option<f32> {
        None
    }
    /// Data-parallel runs: bytes sent and seconds spent in collectives so far (`None` on one
    /// rank).
    fn traffic(&self) -> Option<(u64, f64)> {
        None
    }
    /// Starts timing the step's phases ([`step::PHASES`]) from zero; `false` where the
    /// backend cannot (the CUDA backend then waits for the device at each phase boundary,
    /// which changes no result).
    fn time_phases(&mut self) -> bool {
        false
    }
    /// Seconds per phase since [`Backend::time_phases`], where timed.
    fn phase_times(&self) -> Option<Vec<(&'static str, f64)>> {
        None
    }
    /// Device memory the backend holds, in bytes (allocated once up front, so also its peak);
    /// `None` for host backends.
    fn device_bytes(&self) -> Option<usize> {
        None
    }
}
