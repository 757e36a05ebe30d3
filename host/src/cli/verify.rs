//! `dinovmf verify-kernels`: every kernel of `dinovmf.ptx` on the GPU against `dinovmf-core`
//! (one row per kernel and size), and with `--compare-cpu` a few training steps on the GPU and
//! on the CPU from the same state and batches, side by side. Exits non-zero on any mismatch.
//! `--sim` runs the same on the host simulator of the kernels (no GPU needed).
use anyhow::Result;
use clap::Args;

use crate::train::{LossKind, Method, TrainConfig};

#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    /// Run on the host simulator of the kernels instead of the GPU (slow; no GPU needed).
    #[arg(long)]
    pub sim: bool,
    /// Also run training steps on the device and on the CPU and compare them.
    #[arg(long)]
    pub compare_cpu: bool,
    /// Skip the per-kernel table (only `--compare-cpu` and/or `--large`).
    #[arg(long)]
    pub skip_kernels: bool,
    /// Also check kernels at production shapes (ViT-S/16 and ViT-B/16, batch 64, K = 65536) on
    /// sampled entries of the first and last blocks; with `--sim` only those corner blocks run.
    #[arg(long)]
    pub large: bool,
    /// Model and batch of the comparison.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    #[arg(long, value_enum, default_value = "vmf")]
    pub loss: LossKind,
    /// The comparison's method: `ibot` compares the iBOT step (masks, patch head and loss,
    /// patch center) with the CPU's.
    #[arg(long, value_enum, default_value = "dino")]
    pub method: Method,
    /// Training steps of the comparison.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Largest relative differences `--compare-cpu` accepts (f32 on both sides, different
/// summation orders): per-step loss, first-step gradients (L2), final state (L2).
pub const COMPARE_LOSS_RTOL: f64 = 1e-3;
pub const COMPARE_L2_RTOL: f64 = 1e-3;

pub fn run(args: &VerifyArgs) -> Result<()> {
    if args.skip_kernels && !args.compare_cpu && !args.large {
        anyhow::bail!("--skip-kernels leaves nothing to run: add --compare-cpu or --large");
    }
    let mut cfg = TrainConfig::preset_for(&args.preset, args.method, args.loss)?;
    if cfg.model.stem_convs > 0 {
        eprintln!(
            "verify-kernels: the CUDA backend has no convolutional stem yet; preset {} is compared with --stem-convs 0 (DINO's patch embedding)",
            cfg.preset
        );
        cfg.model.stem_convs = 0;
    }
    cfg.validate()?;
    imp::run(args, &cfg)
}

#[cfg(not(feature = "gpu-sim"))]
mod imp {
    use super::*;
    pub fn run(_: &VerifyArgs, _: &TrainConfig) -> Result<()> {
        anyhow::bail!(crate::backend::cuda::NOT_BUILT)
    }
}

#[cfg(feature = "gpu-sim")]
mod imp {
    use super::*;
    use crate::backend::cuda::compare::{compare_with_cpu_ext, print_comparison, Comparison};
    use crate::backend::cuda::device::{Device, Gpu};
    use crate::backend::cuda::sim::{SimDevice, SimOptions};
    use crate::backend::cuda::verify;
    use crate::config::backend_config;
    use anyhow::{bail, Context};
    use std::io::Write;

    fn open_device(
        sim: bool,
        options: SimOptions,
    ) -> Result<Box<dyn FnMut() -> Result<AnyDevice>>> {
        Ok(Box::new(move || {
            if sim {
                Ok(AnyDevice::Sim(SimDevice::with_options(options)))
            } else {
                gpu_device()
            }
        }))
    }

    #[cfg(feature = "cuda")]
    fn gpu_device() -> Result<AnyDevice> {
        Ok(AnyDevice::Cuda(
            crate::backend::cuda::driver::CudaDevice::open()?,
        ))
    }

    #[cfg(not(feature = "cuda"))]
    fn gpu_device() -> Result<AnyDevice> {
        bail!(
            "{} (this build can only run `verify-kernels --sim`)",
            crate::backend::cuda::NOT_BUILT
        )
    }

    /// The device a run uses (monomorphised paths for both).
    pub enum AnyDevice {
        Sim(SimDevice),
        #[cfg(feature = "cuda")]
        Cuda(crate::backend::cuda::driver::CudaDevice),
    }

    fn kernels<D: Device>(dev: D, seed: u64, out: &mut dyn Write) -> Result<()> {
        let mut gpu = Gpu::new(dev);
        writeln!(out, "verify-kernels on {}", gpu.dev.name())?;
        if let Some(r) = gpu.dev.load_report() {
            writeln!(out, "{r}")?;
        }
        let t = std::time::Instant::now();
        let rows = verify::run_all(&mut gpu, seed);
        verify::print_rows(&rows, out)?;
        writeln!(
            out,
            "{} checks, {} kernels, {} launches, {:.1} s",
            rows.len(),
            dinovmf_ptx::manifest::all().count(),
            gpu.counters.launches,
            t.elapsed().as_secs_f64()
        )?;
        verify::verdict(&rows)
    }

    fn large<D: Device>(dev: D, seed: u64, out: &mut dyn Write) -> Result<()> {
        let mut gpu = Gpu::new(dev);
        writeln!(
            out,
            "\nverify-kernels --large on {} (sampled first/last rows and tiles)",
            gpu.dev.name()
        )?;
        let t = std::time::Instant::now();
        let mut rows = Vec::new();
        for s in [verify::VIT_S16, verify::VIT_B16] {
            rows.extend(verify::run_large(&mut gpu, &s, seed));
        }
        verify::print_rows(&rows, out)?;
        writeln!(
            out,
            "{} large checks, {} launches, {:.1} s",
            rows.len(),
            gpu.counters.launches,
            t.elapsed().as_secs_f64()
        )?;
        // Only some kernels have a production-shape case: no coverage rule here.
        let bad: Vec<String> = rows
            .iter()
            .filter(|r| !r.ok)
            .map(|r| format!("{} {}", r.kernel, r.size))
            .collect();
        if !bad.is_empty() {
            bail!(
                "{} of {} large checks failed: {}",
                bad.len(),
                rows.len(),
                bad.join("; ")
            );
        }
        Ok(())
    }

    fn compare<D: Device>(dev: D, args: &VerifyArgs, cfg: &TrainConfig) -> Result<Comparison> {
        let bc = backend_config(cfg);
        compare_with_cpu_ext(
            dev, bc.model, bc.loss, bc.ibot, bc.shapes, args.steps, args.seed,
        )
    }

    fn judge(c: &Comparison) -> Result<()> {
        let mut bad = Vec::new();
        for p in &c.steps {
            let rel =
                ((p.dev.loss - p.cpu.loss) as f64 / (p.cpu.loss as f64).abs().max(1e-30)).abs();
            if rel.is_nan() || rel > COMPARE_LOSS_RTOL {
                bad.push(format!("step {} loss rel diff {rel:.2e}", p.step));
            }
        }
        for d in std::iter::once(&c.grads).chain(&c.state) {
            if d.non_finite > 0 || d.rel_l2.is_nan() || d.rel_l2 > COMPARE_L2_RTOL {
                bad.push(format!(
                    "{} rel L2 {:.2e} ({} non-finite)",
                    d.name, d.rel_l2, d.non_finite
                ));
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            bail!(
                "device and CPU differ beyond rel {COMPARE_LOSS_RTOL:e} (loss) / {COMPARE_L2_RTOL:e} (L2): {}",
                bad.join("; ")
            )
        }
    }

    pub fn run(args: &VerifyArgs, cfg: &TrainConfig) -> Result<()> {
        let mut open = open_device(args.sim, SimOptions::exhaustive())?;
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let mut result = Ok(());
        if !args.skip_kernels {
            result = match open()? {
                AnyDevice::Sim(d) => kernels(d, args.seed, &mut out),
                #[cfg(feature = "cuda")]
                AnyDevice::Cuda(d) => kernels(d, args.seed, &mut out),
            };
        }
        if args.large {
            let r = match open_device(args.sim, SimOptions::corners())?()? {
                AnyDevice::Sim(d) => large(d, args.seed, &mut out),
                #[cfg(feature = "cuda")]
                AnyDevice::Cuda(d) => large(d, args.seed, &mut out),
            };
            result = match (result, r) {
                (Err(a), Err(b)) => Err(a.context(b.to_string())),
                (Err(a), _) | (Ok(()), Err(a)) => Err(a),
                (Ok(()), Ok(())) => Ok(()),
            };
        }
        if args.compare_cpu {
            writeln!(
                out,
                "\ncompare-cpu: preset {} | method {:?} | loss {:?} | {} steps | batch {} | {} local crops",
                cfg.preset, cfg.method, cfg.loss, args.steps, cfg.batch_size, cfg.n_local
            )?;
            let c = match open()? {
                AnyDevice::Sim(d) => compare(d, args, cfg),
                #[cfg(feature = "cuda")]
                AnyDevice::Cuda(d) => compare(d, args, cfg),
            }
            .context("device vs CPU comparison")?;
            print_comparison(&c, &mut out)?;
            let j = judge(&c);
            result = match (result, j) {
                (Err(a), Err(b)) => Err(a.context(b.to_string())),
                (Err(a), _) | (Ok(()), Err(a)) => Err(a),
                (Ok(()), Ok(())) => Ok(()),
            };
        }
        result
    }
}
