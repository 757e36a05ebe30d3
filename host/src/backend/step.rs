//! THE training step, written once: the order of its phases, generic over the [`Passes`] each
//! backend implements with its own fused ops.
//!
//! ```text
//! check -> masks (drop path; iBOT: patch masks) -> upload -> teacher forward (global crops)
//!   -> teacher head -> student forward (every crop) -> student head -> zero grads -> [CLS] loss
//!   [-> patch loss (iBOT)] -> head backward -> backward (global, local) [-> KoLeo-proto]
//!   -> reduce -> clip -> AdamW + teacher EMA + center update -> metrics
//! ```
//!
//! DINO is the same step with no patch mask and no patch loss: [`Passes::ibot`] says which
//! optional phases run. A method change is a change in core (the math), here (the order), and
//! one pass per backend where it needs a new fused op.
use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use dinovmf_core::masking::step_masks;
use dinovmf_core::mim_loss::IbotConfig;
use dinovmf_core::model::ModelConfig;

use super::{grown, Net, StepHyper, StepMetrics, StepShapes, TrainState};
use crate::data::Batch;

/// Which crops a forward or backward pass runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crops {
    /// The two global crops, `2B` images.
    Global,
    /// The local crops, `n_local B` images.
    Local,
}

/// Options of one backbone forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    pub net: Net,
    /// Multiply the residual branches by the step's drop-path factors.
    pub drop_path: bool,
    /// Keep every block's activations for the backward.
    pub save: bool,
    /// Substitute the mask token at the step's masked patches (iBOT's student).
    pub patch_mask: bool,
    /// Run the last block and the final LayerNorm on every token, not only `[CLS]`.
    pub all_tokens: bool,
}

impl Forward {
    /// The teacher: no drop path, nothing saved, `[CLS]` only.
    pub const fn teacher() -> Self {
        Self {
            net: Net::Teacher,
            drop_path: false,
            save: false,
            patch_mask: false,
            all_tokens: false,
        }
    }

    /// The student: drop path on, activations saved for the backward, `[CLS]` only.
    pub const fn student() -> Self {
        Self {
            net: Net::Student,
            drop_path: true,
            save: true,
            patch_mask: false,
            all_tokens: false,
        }
    }

    /// With every token's final-LayerNorm output (the patch loss reads the patch tokens).
    pub const fn all_tokens(mut self) -> Self {
        self.all_tokens = true;
        self
    }

    /// With the step's patch mask applied (the student's global crops under iBOT).
    pub const fn masked(mut self) -> Self {
        self.patch_mask = true;
        self
    }
}

/// Options of one backbone backward (of a forward with the same options).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backward {
    /// The forward substituted the mask token (its gradient goes there).
    pub patch_mask: bool,
    /// The gradient arrives at every token, not only `[CLS]`.
    pub all_tokens: bool,
}

impl Backward {
    /// Of [`Forward::student`].
    pub const fn cls() -> Self {
        Self {
            patch_mask: false,
            all_tokens: false,
        }
    }

    /// Of [`Forward::student`]`.masked().all_tokens()`.
    pub const fn masked_all_tokens() -> Self {
        Self {
            patch_mask: true,
            all_tokens: true,
        }
    }
}

/// Which rows go through the projection head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub net: Net,
    /// After the `[CLS]` rows: the teacher's every patch row, the student's masked patch rows.
    pub patches: bool,
}

impl Head {
    pub const fn teacher(patches: bool) -> Self {
        Self {
            net: Net::Teacher,
            patches,
        }
    }

    pub const fn student(patches: bool) -> Self {
        Self {
            net: Net::Student,
            patches,
        }
    }
}

/// The phases [`train_step`] times (a backend that can time them on the host does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    TeacherForward = 0,
    StudentForward = 1,
    Loss = 2,
    HeadBackward = 3,
    BackboneBackward = 4,
    ReduceClip = 5,
    Update = 6,
}

/// Names of the [`Phase`]s, in order.
pub const PHASES: [&str; 7] = [
    "teacher forward",
    "student forward",
    "loss",
    "head backward",
    "backbone backward",
    "reduce + clip",
    "adamw + ema",
];

/// The step's randomness, drawn on the host from `StepHyper::seed` so every backend sees the
/// same masks: drop-path keep masks and (iBOT) the patch masks of the global crops.
#[derive(Clone, Debug, Default)]
pub struct StepMasks {
    /// 0/1 keep masks `[depth][2][2B]` (attention branch, then MLP branch, per block).
    pub drop_global: Vec<f32>,
    /// Likewise `[depth][2][n_local B]`.
    pub drop_local: Vec<f32>,
    /// iBOT: 0/1 mask of the global crops' patches `[2B, np]` and the masked count per image.
    pub patch: Vec<f32>,
    pub counts: Vec<usize>,
    scratch: Vec<bool>,
    /// [`StepMasks::draw_shard`]'s masks of the whole batch (every rank's images), kept from
    /// step to step so that drawing allocates nothing once warm.
    whole: WholeBatch,
}

/// The whole batch's masks, which [`StepMasks::draw_shard`] draws before keeping its rank's.
#[derive(Clone, Debug, Default)]
struct WholeBatch {
    global: Vec<f32>,
    local: Vec<f32>,
    patch: Vec<f32>,
    counts: Vec<usize>,
}

impl StepMasks {
    /// Buffers for `shapes` (patch masks only when `ibot`).
    pub fn new(model: &ModelConfig, shapes: &StepShapes, ibot: bool) -> Self {
        let depth = model.vit.depth;
        let (n_g, n_l) = (2 * shapes.batch, shapes.n_local * shapes.batch);
        let grid = shapes.global_size / model.vit.patch;
        let np = if ibot { grid * grid } else { 0 };
        Self {
            drop_global: vec![0.0; depth * 2 * n_g],
            drop_local: vec![0.0; depth * 2 * n_l],
            patch: vec![0.0; n_g * np],
            counts: vec![0; if ibot { n_g } else { 0 }],
            scratch: vec![false; np],
            whole: WholeBatch::default(),
        }
    }

    /// Draws the step's masks from `seed` for rank `rank` of `ranks`: its images' rows of the
    /// masks one process draws for the whole batch (`ranks` shards of `shapes.batch` images),
    /// so an image gets the same drop path and (iBOT) the same patch mask whichever rank runs
    /// it.
    pub fn draw_shard(
        &mut self,
        model: &ModelConfig,
        shapes: &StepShapes,
        ibot: Option<&IbotConfig>,
        seed: u64,
        (rank, ranks): (usize, usize),
    ) {
        let b = shapes.batch;
        let whole = b * ranks;
        let (n_g, n_l) = (2 * whole, shapes.n_local * whole);
        let depth = model.vit.depth;
        let w = &mut self.whole;
        let global = grown(&mut w.global, depth * 2 * n_g);
        let local = grown(&mut w.local, depth * 2 * n_l);
        draw_drop_masks(model, seed, n_g, n_l, global, local);
        for (mine, all, crops) in [
            (&mut self.drop_global, &*global, 2),
            (&mut self.drop_local, &*local, shapes.n_local),
        ] {
            // `[depth][2][crops][whole]` -> `[depth][2][crops][b]`: this rank's rows of each crop.
            for (o, a) in mine.chunks_exact_mut(b).zip(all.chunks_exact(whole)) {
                o.copy_from_slice(&a[rank * b..(rank + 1) * b]);
            }
            debug_assert_eq!(mine.len(), depth * 2 * crops * b);
        }
        if let Some(ib) = ibot {
            let grid = shapes.global_size / model.vit.patch;
            let np = grid * grid;
            let patch = grown(&mut w.patch, n_g * np);
            let counts = grown(&mut w.counts, n_g);
            step_masks(
                patch,
                counts,
                &mut self.scratch,
                2,
                whole,
                grid,
                grid,
                &ib.mask,
                seed,
            );
            // `[2][whole][np]` -> `[2][b][np]`, counts `[2][whole]` -> `[2][b]`.
            for (o, a) in self
                .patch
                .chunks_exact_mut(b * np)
                .zip(patch.chunks_exact(whole * np))
            {
                o.copy_from_slice(&a[rank * b * np..(rank + 1) * b * np]);
            }
            for (o, a) in self
                .counts
                .chunks_exact_mut(b)
                .zip(counts.chunks_exact(whole))
            {
                o.copy_from_slice(&a[rank * b..(rank + 1) * b]);
            }
        }
    }

    /// Draws the step's masks from `seed`.
    pub fn draw(
        &mut self,
        model: &ModelConfig,
        shapes: &StepShapes,
        ibot: Option<&IbotConfig>,
        seed: u64,
    ) {
        let b = shapes.batch;
        let (n_g, n_l) = (2 * b, shapes.n_local * b);
        draw_drop_masks(
            model,
            seed,
            n_g,
            n_l,
            &mut self.drop_global,
            &mut self.drop_local,
        );
        if let Some(ib) = ibot {
            let grid = shapes.global_size / model.vit.patch;
            step_masks(
                &mut self.patch,
                &mut self.counts,
                &mut self.scratch,
                2,
                b,
                grid,
                grid,
                &ib.mask,
                seed,
            );
        }
    }
}

/// Draws the step's drop-path keep masks (0/1) from `ChaCha8Rng::seed_from_u64(seed)`:
/// `global` is `[depth][2][n_global_images]` (attention branch, then MLP branch, per block),
/// then `local` likewise; mask = `u < keep_prob(block)` for `u` uniform in [0, 1) (f64), the
/// rule of core's `drop_path_mask_from_uniform`.
pub fn draw_drop_masks(
    model: &ModelConfig,
    seed: u64,
    n_global_images: usize,
    n_local_images: usize,
    global: &mut [f32],
    local: &mut [f32],
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let depth = model.vit.depth;
    for (buf, n) in [(global, n_global_images), (local, n_local_images)] {
        for i in 0..depth {
            let keep = model.vit.keep_prob(i);
            for m in buf[2 * i * n..(2 * i + 2) * n].iter_mut() {
                let u: f64 = rng.gen();
                *m = if u < keep { 1.0 } else { 0.0 };
            }
        }
    }
}

/// The passes of one training step, each with the backend's own fused ops. Each pass reads
/// what the earlier ones left in the backend's buffers; [`train_step`] calls them in order.
pub trait Passes {
    fn model(&self) -> &ModelConfig;
    fn shapes(&self) -> &StepShapes;
    /// iBOT's settings, or `None` for DINO (no patch mask, no patch loss).
    fn ibot(&self) -> Option<&IbotConfig>;
    /// The host-side masks [`train_step`] draws into before [`Passes::upload`].
    fn masks_mut(&mut self) -> &mut StepMasks;

    /// Moves the batch and the drawn masks to where the passes run.
    fn upload(&mut self, batch: &Batch) -> Result<()>;
    fn forward(&mut self, crops: Crops, opts: Forward) -> Result<()>;
    /// The projection head on the rows `opts` names (training rows: teacher without saving,
    /// student saved for the backward).
    fn head(&mut self, opts: Head) -> Result<()>;
    fn zero_grads(&mut self) -> Result<()>;
    /// The `[CLS]` loss against the teacher targets at `teacher_temp`: `dL/dz` of the student's
    /// `[CLS]` rows, the prototype gradients, the next center and the collapse signals.
    fn cls_loss(&mut self, teacher_temp: f32) -> Result<()>;
    /// iBOT's patch loss at the masked rows (gradients ADDED to the patch prototypes').
    fn patch_loss(&mut self, patch_teacher_temp: f32) -> Result<()>;
    fn head_backward(&mut self) -> Result<()>;
    /// Backbone backward of `crops` from the head backward's input gradients (ACCUMULATES).
    fn backward(&mut self, crops: Crops, opts: Backward) -> Result<()>;
    /// Regularisers whose gradient joins the loss gradient before reduction (KoLeo-proto).
    fn regularisers(&mut self) -> Result<()>;
    /// `(rank, ranks)` of a data-parallel run (the batch the step gets is that rank's shard
    /// of the global batch); `(0, 1)` for one process.
    fn shard(&self) -> (usize, usize) {
        (0, 1)
    }
    /// The seam of data parallelism: the mean over ranks of the gradients and of every
    /// statistic over the batch, so that the next phases see the global batch's.
    fn reduce(&mut self) -> Result<()>;
    /// Per-tensor gradient clipping at `clip` (0 only measures the global norm).
    fn clip(&mut self, clip: f32) -> Result<()>;
    /// AdamW, teacher EMA, the centers moved to the step's next centers, the step count.
    fn update(&mut self, hp: &StepHyper) -> Result<()>;
    fn metrics(&mut self) -> Result<StepMetrics>;
    /// Marks the end of `phase` (host-timed backends accumulate its seconds).
    fn tick(&mut self, _phase: Phase) {}
}

/// Refuses hyper-parameters the step cannot use, saying which.
fn check_hyper(hp: &StepHyper, ibot: bool) -> Result<()> {
    ensure!(
        hp.teacher_temp.is_finite() && hp.teacher_temp > 0.0,
        "teacher temperature must be positive, got {}",
        hp.teacher_temp
    );
    if ibot {
        ensure!(
            hp.patch_teacher_temp.is_finite() && hp.patch_teacher_temp > 0.0,
            "patch teacher temperature must be positive, got {}",
            hp.patch_teacher_temp
        );
    }
    Ok(())
}

/// Everything of a step up to the raw (unreduced, unclipped) gradients: teacher and student
/// forward, losses, backward. Leaves the training state unchanged.
pub fn gradients<P: Passes>(p: &mut P, batch: &Batch, hp: &StepHyper) -> Result<()> {
    p.shapes().check_batch(p.model().vit.in_chans, batch)?;
    let ibot = p.ibot().copied();
    let patches = ibot.is_some();
    check_hyper(hp, patches)?;
    let (model, shapes) = (*p.model(), *p.shapes());
    match p.shard() {
        (_, 1) => p.masks_mut().draw(&model, &shapes, ibot.as_ref(), hp.seed),
        shard => p
            .masks_mut()
            .draw_shard(&model, &shapes, ibot.as_ref(), hp.seed, shard),
    }
    p.upload(batch)?;
    let has_local = shapes.n_local > 0;

    let teacher = match patches {
        true => Forward::teacher().all_tokens(),
        false => Forward::teacher(),
    };
    p.forward(Crops::Global, teacher)?;
    p.head(Head::teacher(patches))?;
    p.tick(Phase::TeacherForward);

    let student = match patches {
        true => Forward::student().masked().all_tokens(),
        false => Forward::student(),
    };
    p.forward(Crops::Global, student)?;
    if has_local {
        p.forward(Crops::Local, Forward::student())?;
    }
    p.head(Head::student(patches))?;
    p.tick(Phase::StudentForward);

    p.zero_grads()?;
    p.cls_loss(hp.teacher_temp)?;
    if patches {
        p.patch_loss(hp.patch_teacher_temp)?;
    }
    p.tick(Phase::Loss);

    p.head_backward()?;
    p.tick(Phase::HeadBackward);

    let back = match patches {
        true => Backward::masked_all_tokens(),
        false => Backward::cls(),
    };
    p.backward(Crops::Global, back)?;
    if has_local {
        p.backward(Crops::Local, Backward::cls())?;
    }
    p.tick(Phase::BackboneBackward);
    Ok(())
}

/// One full step: [`gradients`], regularisers, reduce, clip, update, metrics.
pub fn train_step<P: Passes>(p: &mut P, batch: &Batch, hp: &StepHyper) -> Result<StepMetrics> {
    gradients(p, batch, hp)?;
    p.regularisers()?;
    p.reduce()?;
    p.clip(hp.clip_grad)?;
    p.tick(Phase::ReduceClip);
    p.update(hp)?;
    p.tick(Phase::Update);
    p.metrics()
}

/// Refuses a state whose vectors do not fit a model of `n_params` parameters and `k`
/// prototypes (with a patch center when `ibot`), naming the vector.
pub fn check_state(s: &TrainState, n_params: usize, k: usize, ibot: bool) -> Result<()> {
    for (name, len, want) in [
        ("student", s.student.len(), n_params),
        ("teacher", s.teacher.len(), n_params),
        ("adam_m", s.adam_m.len(), n_params),
        ("adam_v", s.adam_v.len(), n_params),
        ("center", s.center.len(), k),
    ] {
        ensure!(
            len == want,
            "state: {name} has {len} values, the model needs {want}"
        );
    }
    if ibot {
        ensure!(
            s.patch_center.len() == k,
            "state: patch_center has {} values, iBOT needs {k}",
            s.patch_center.len()
        );
    }
    Ok(())
}
