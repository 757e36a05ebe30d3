//! The device backend against the CPU backend from the same state, batches and schedules:
//! per-step metrics side by side, the first step's gradients, and the state after the last
//! step (`dinovmf verify-kernels --compare-cpu`, and the simulator tests in CI).
use anyhow::Result;

use dinovmf_core::loss::LossConfig;
use dinovmf_core::mim_loss::IbotConfig;
use dinovmf_core::model::{for_each_param, ModelConfig};

use super::device::Device;
use super::step::GpuBackend;
use crate::backend::cpu::CpuBackend;
use crate::backend::StepShapes;
use crate::backend::{Backend, SingleProcess, StepHyper, StepMetrics, TrainState};

/// How far one vector is from the CPU's.
#[derive(Clone, Debug)]
pub struct Diff {
    pub name: String,
    /// `||dev - cpu|| / ||cpu||`.
    pub rel_l2: f64,
    /// `max |dev - cpu|`.
    pub max_abs: f64,
    /// `max |cpu|`.
    pub max_ref: f64,
    /// Values that are NaN or infinite on the device.
    pub non_finite: usize,
}

pub fn diff(name: &str, dev: &[f32], cpu: &[f32]) -> Diff {
    let (mut num, mut den, mut max_abs, mut max_ref, mut bad) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0);
    for (&a, &b) in dev.iter().zip(cpu) {
        if !a.is_finite() {
            bad += 1;
            continue;
        }
        let (a, b) = (a as f64, b as f64);
        num += (a - b) * (a - b);
        den += b * b;
        max_abs = max_abs.max((a - b).abs());
        max_ref = max_ref.max(b.abs());
    }
    if dev.len() != cpu.len() {
        bad += dev.len().abs_diff(cpu.len());
    }
    Diff {
        name: name.to_string(),
        rel_l2: num.sqrt() / den.sqrt().max(f64::MIN_POSITIVE),
        max_abs,
        max_ref,
        non_finite: bad,
    }
}

/// One step's metrics on both backends.
#[derive(Clone, Copy, Debug)]
pub struct StepPair {
    pub step: usize,
    pub cpu: StepMetrics,
    pub dev: StepMetrics,
}

#[derive(Clone, Debug)]
pub struct Comparison {
    pub device: String,
    pub steps: Vec<StepPair>,
    /// The first step's (clipped) gradients.
    pub grads: Diff,
    /// student, teacher, adam_m, adam_v, center (and patch_center for iBOT) after the last
    /// step.
    pub state: Vec<Diff>,
    /// Per parameter tensor: the first step's gradient (`grad <name>`) and the student after the
    /// last step (`student <name>`).
    pub tensors: Vec<Diff>,
}

/// A random initial state (DINO initialisation, teacher = student, zero moments).
pub fn initial_state(model: &ModelConfig, loss: &LossConfig, seed: u64) -> TrainState {
    TrainState::initial(model, loss.centering, seed)
}

pub use crate::backend::shapes::random_batch;

/// Step `i`'s hyper-parameters: a real learning rate, clipping on, the last layer frozen in
/// step 0 only (both code paths run).
pub fn hyper(i: usize, seed: u64) -> StepHyper {
    StepHyper {
        lr: 1e-3,
        weight_decay: 0.04,
        teacher_momentum: 0.99,
        teacher_temp: 0.04,
        freeze_last_layer: i == 0,
        clip_grad: 3.0,
        seed: seed.wrapping_add(i as u64),
        patch_teacher_temp: 0.04,
    }
}

/// Runs `steps` steps on `dev` and on the CPU from the same state and batches.
pub fn compare_with_cpu<D: Device>(
    dev: D,
    model: ModelConfig,
    loss: LossConfig,
    shapes: StepShapes,
    steps: usize,
    seed: u64,
) -> Result<Comparison> {
    compare_with_cpu_ext(dev, model, loss, None, shapes, steps, seed)
}

/// [`compare_with_cpu`] with iBOT on both backends when `ibot` is given (the model must have
/// the mask token); the patch center joins the state compared.
pub fn compare_with_cpu_ext<D: Device>(
    dev: D,
    model: ModelConfig,
    loss: LossConfig,
    ibot: Option<IbotConfig>,
    shapes: StepShapes,
    steps: usize,
    seed: u64,
) -> Result<Comparison> {
    let st = initial_state(&model, &loss, seed);
    let mut gpu = GpuBackend::new(dev, model, loss, shapes, Box::new(SingleProcess))?;
    let mut cpu = CpuBackend::new(model, loss, shapes, Box::new(SingleProcess))?;
    if let Some(ib) = ibot {
        gpu = gpu.with_ibot(ib)?;
        cpu = cpu.with_ibot(ib)?;
    }
    gpu.set_state(&st)?;
    cpu.set_state(&st)?;
    let mut pairs = Vec::new();
    let mut grads = None;
    let mut step1 = (Vec::new(), Vec::new());
    for i in 0..steps {
        let batch = random_batch(&shapes, model.vit.in_chans, seed ^ (0xba7c4 + i as u64));
        let hp = hyper(i, seed);
        let c = cpu.train_step(&batch, &hp)?;
        let d = gpu.train_step(&batch, &hp)?;
        if i == 0 {
            step1 = (gpu.grads()?, cpu.grads().to_vec());
            grads = Some(diff("grads (step 1)", &step1.0, &step1.1));
        }
        pairs.push(StepPair {
            step: i + 1,
            cpu: c,
            dev: d,
        });
    }
    let (a, b) = (gpu.state()?, cpu.state()?);
    let mut state = vec![
        diff("student", &a.student, &b.student),
        diff("teacher", &a.teacher, &b.teacher),
        diff("adam_m", &a.adam_m, &b.adam_m),
        diff("adam_v", &a.adam_v, &b.adam_v),
        diff("center", &a.center, &b.center),
    ];
    if ibot.is_some() {
        state.push(diff("patch_center", &a.patch_center, &b.patch_center));
    }
    let mut tensors = Vec::new();
    for_each_param(&model, |p| {
        let r = p.offset..p.offset + p.numel;
        if step1.0.len() >= r.end && step1.1.len() >= r.end {
            let name = format!("grad {}", p.name.as_str());
            tensors.push(diff(&name, &step1.0[r.clone()], &step1.1[r.clone()]));
        }
        let name = format!("student {}", p.name.as_str());
        tensors.push(diff(&name, &a.student[r.clone()], &b.student[r]));
    });
    Ok(Comparison {
        device: gpu.name(),
        steps: pairs,
        grads: grads.unwrap_or_else(|| diff("grads", &[], &[])),
        state,
        tensors,
    })
}

/// The comparison as a table.
pub fn print_comparison(c: &Comparison, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    writeln!(out, "device: {}", c.device)?;
    writeln!(
        out,
        "{:>4}  {:>12} {:>12} {:>10}  {:>10} {:>10}  {:>10} {:>10}  {:>10} {:>10}",
        "step",
        "loss cpu",
        "loss dev",
        "rel diff",
        "H(P_t) cpu",
        "dev",
        "max m cpu",
        "dev",
        "|g| cpu",
        "dev"
    )?;
    for p in &c.steps {
        let rel = ((p.dev.loss - p.cpu.loss) / p.cpu.loss.abs().max(1e-30)).abs();
        writeln!(
            out,
            "{:>4}  {:>12.6} {:>12.6} {:>10.2e}  {:>10.5} {:>10.5}  {:>10.5} {:>10.5}  {:>10.4} {:>10.4}",
            p.step,
            p.cpu.loss,
            p.dev.loss,
            rel,
            p.cpu.teacher_entropy,
            p.dev.teacher_entropy,
            p.cpu.max_mass,
            p.dev.max_mass,
            p.cpu.grad_norm,
            p.dev.grad_norm
        )?;
    }
    writeln!(
        out,
        "{:<16} {:>12} {:>12} {:>12} {:>10}",
        "vector", "rel L2", "max |diff|", "max |cpu|", "non-finite"
    )?;
    for d in std::iter::once(&c.grads).chain(&c.state) {
        writeln!(
            out,
            "{:<16} {:>12.3e} {:>12.3e} {:>12.3e} {:>10}",
            d.name, d.rel_l2, d.max_abs, d.max_ref, d.non_finite
        )?;
    }
    Ok(())
}
