//! Per-step schedules as pure functions of (step, config), in f64 (host-side scalars).
//!
//! The cosine schedule has the semantics of DINO's `cosine_scheduler(base, final, epochs,
//! niter_per_ep, warmup_epochs, start_warmup_value)` expressed per step: with `W` warm-up steps
//! and `T` steps in all,
//! - steps `0 .. W`: `linspace(start_warmup, base, W)` (both ends included, so step `W - 1` is
//!   exactly `base`; a single warm-up step is `start_warmup`);
//! - steps `W .. T`: `final + (base - final) (1 + cos(pi i / N)) / 2` with `i = step - W`,
//!   `N = T - W`, so step `W` is `base` again and the last step is just above `final` (the cosine
//!   never quite reaches `final`, as in DINO).
//!
//! Steps at or past `T` keep the value of step `T - 1` (training may run a step over).
use core::f64::consts::PI;

/// Cosine schedule with a linear warm-up (learning rate, weight decay, teacher momentum).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineSchedule {
    pub base: f64,
    pub final_value: f64,
    pub total_steps: u64,
    pub warmup_steps: u64,
    pub start_warmup: f64,
}

impl CosineSchedule {
    /// No warm-up: a plain cosine from `base` to `final_value`.
    pub fn cosine(base: f64, final_value: f64, total_steps: u64) -> Self {
        Self {
            base,
            final_value,
            total_steps,
            warmup_steps: 0,
            start_warmup: 0.0,
        }
    }

    /// The value at `step` (see the module doc).
    pub fn value(&self, step: u64) -> f64 {
        if self.total_steps == 0 {
            return self.base;
        }
        let step = step.min(self.total_steps - 1);
        let w = self.warmup_steps.min(self.total_steps);
        if step < w {
            return linspace_at(self.start_warmup, self.base, w, step);
        }
        let n = (self.total_steps - w) as f64;
        let i = (step - w) as f64;
        self.final_value + 0.5 * (self.base - self.final_value) * (1.0 + libm::cos(PI * i / n))
    }
}

/// `numpy.linspace(start, end, n)[i]`.
fn linspace_at(start: f64, end: f64, n: u64, i: u64) -> f64 {
    if n <= 1 {
        start
    } else {
        start + (end - start) * (i as f64 / (n - 1) as f64)
    }
}

/// Linear warm-up from `start` to `end` over `warmup_steps` (linspace, end included at step
/// `warmup_steps - 1`), then constant `end`: the teacher temperature. DINO applies it per epoch;
/// pass the epoch as `step` and epochs as `warmup_steps` to get exactly that, or steps for a
/// per-step warm-up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmupConstant {
    pub start: f64,
    pub end: f64,
    pub warmup_steps: u64,
}

impl WarmupConstant {
    pub fn value(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            linspace_at(self.start, self.end, self.warmup_steps, step)
        } else {
            self.end
        }
    }
}

/// The training recipe's schedules (method.md, "Training recipe"), in epochs and steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Recipe {
    pub epochs: u64,
    pub steps_per_epoch: u64,
    pub batch_size: u64,
    /// Learning rate per 256 images; the peak is `base_lr * batch_size / 256`.
    pub base_lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: u64,
    pub weight_decay: f64,
    pub weight_decay_end: f64,
    pub momentum_teacher: f64,
    pub teacher_temp_start: f64,
    pub teacher_temp: f64,
    pub teacher_temp_warmup_epochs: u64,
    /// The last layer gets no update during these first epochs.
    pub freeze_last_layer_epochs: u64,
}

/// Every scheduled value at one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepValues {
    pub lr: f64,
    pub weight_decay: f64,
    pub teacher_momentum: f64,
    pub teacher_temp: f64,
    pub freeze_last_layer: bool,
}

impl Recipe {
    /// The spec's defaults for a run of `epochs` x `steps_per_epoch` at `batch_size`.
    pub fn new(epochs: u64, steps_per_epoch: u64, batch_size: u64) -> Self {
        Self {
            epochs,
            steps_per_epoch,
            batch_size,
            base_lr: 5e-4,
            min_lr: 1e-6,
            warmup_epochs: 10,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            momentum_teacher: 0.996,
            teacher_temp_start: 0.04,
            teacher_temp: 0.07,
            teacher_temp_warmup_epochs: 30,
            freeze_last_layer_epochs: 1,
        }
    }

    pub fn total_steps(&self) -> u64 {
        self.epochs * self.steps_per_epoch
    }

    /// LR: linear warm-up from 0 to `base_lr * batch / 256`, then cosine to `min_lr`.
    pub fn lr(&self) -> CosineSchedule {
        CosineSchedule {
            base: self.base_lr * self.batch_size as f64 / 256.0,
            final_value: self.min_lr,
            total_steps: self.total_steps(),
            warmup_steps: self.warmup_epochs * self.steps_per_epoch,
            start_warmup: 0.0,
        }
    }

    /// Weight decay: cosine from `weight_decay` up to `weight_decay_end`.
    pub fn weight_decay(&self) -> CosineSchedule {
        CosineSchedule::cosine(self.weight_decay, self.weight_decay_end, self.total_steps())
    }

    /// Teacher EMA momentum: cosine from `momentum_teacher` up to 1.
    pub fn teacher_momentum(&self) -> CosineSchedule {
        CosineSchedule::cosine(self.momentum_teacher, 1.0, self.total_steps())
    }

    /// Teacher temperature, warmed up per step.
    pub fn teacher_temp(&self) -> WarmupConstant {
        WarmupConstant {
            start: self.teacher_temp_start,
            end: self.teacher_temp,
            warmup_steps: self.teacher_temp_warmup_epochs * self.steps_per_epoch,
        }
    }

    pub fn at(&self, step: u64) -> StepValues {
        StepValues {
            lr: self.lr().value(step),
            weight_decay: self.weight_decay().value(step),
            teacher_momentum: self.teacher_momentum().value(step),
            teacher_temp: self.teacher_temp().value(step),
            freeze_last_layer: step < self.freeze_last_layer_epochs * self.steps_per_epoch,
        }
    }
}
