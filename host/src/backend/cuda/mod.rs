//! The CUDA backend: the whole training step on the GPU with the kernels of `ptx/dinovmf.ptx`
//! (embedded in the binary, JIT-compiled by the driver at start-up).
//!
//! - `device.rs`: the [`device::Device`] seam and the manifest-checked launcher (block, shared
//!   memory and grid from `dinovmf_ptx::manifest`, argument types checked on every launch);
//! - `driver.rs` (feature `cuda`): the NVIDIA driver API, called directly (module loading with
//!   the JIT logs, per-kernel registers and local memory); `errors.rs`: `CUresult` names;
//! - `sim.rs` (feature `gpu-sim`): the same kernels on the host simulator of `dinovmf-ptx`, so
//!   everything above the driver is tested on machines without a GPU;
//! - `vit.rs`, `attention.rs`, `head.rs`: the ViT, its attention and the head's MLP as launches
//!   (mirroring `cpu/`); `loss.rs`: the `[CLS]` loss chain over explicit device buffers (run by
//!   the backend and by the kernel table); `step.rs`: the backend's resident buffers;
//!   `step/ibot.rs`: the patch loss; `step/optim.rs`: clipping, AdamW, EMA;
//!   `step/passes.rs`: its `Passes` of `backend/step.rs`'s one step;
//! - `launch/`: one typed launcher per kernel (beside `ops.rs`'s), called by the passes above and
//!   by the kernel table alike;
//! - `verify.rs`: every kernel against `dinovmf-core` on random inputs (`dinovmf verify-kernels`).
//!
//! Built without the `cuda` feature, [`open`] says so clearly; with it, a machine without a
//! driver or GPU gets an error from `cuInit`, never a crash.
use anyhow::Result;

use super::{Backend, BackendConfig};

#[cfg(feature = "gpu-sim")]
pub mod attention;
#[cfg(feature = "gpu-sim")]
pub mod compare;
#[cfg(feature = "gpu-sim")]
pub mod device;
#[cfg(feature = "cuda")]
pub mod driver;
pub mod errors;
#[cfg(feature = "gpu-sim")]
pub mod grid;
#[cfg(feature = "gpu-sim")]
pub mod head;
#[cfg(feature = "gpu-sim")]
pub mod launch;
#[cfg(feature = "gpu-sim")]
pub mod loss;
#[cfg(feature = "gpu-sim")]
pub mod ops;
#[cfg(feature = "gpu-sim")]
pub mod sim;
#[cfg(feature = "gpu-sim")]
pub mod step;
#[cfg(feature = "gpu-sim")]
pub mod verify;
#[cfg(feature = "gpu-sim")]
pub mod vit;

/// What a build without CUDA answers.
pub const NOT_BUILT: &str = "this dinovmf was built without CUDA support: rebuild with \
    `cargo build --release --features cuda` (needs the NVIDIA driver's libcuda at run time), or \
    use `--device cpu`";

/// Environment variable that makes `--device cuda` run the CUDA backend on the host simulator
/// of the kernels (builds with `gpu-sim`): the whole trainer path without a GPU, for tests.
pub const SIM_ENV: &str = "DINOVMF_CUDA_SIM";

/// The CUDA backend for a run on device 0, or why there is none.
pub fn open(cfg: &BackendConfig) -> Result<Box<dyn Backend>> {
    #[cfg(feature = "gpu-sim")]
    if std::env::var_os(SIM_ENV).is_some_and(|v| v == "1") {
        return on(sim::SimDevice::new(), cfg);
    }
    #[cfg(feature = "cuda")]
    {
        on(driver::CudaDevice::open()?, cfg)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = cfg;
        anyhow::bail!(NOT_BUILT)
    }
}

#[cfg(feature = "gpu-sim")]
fn on<D: device::Device + 'static>(dev: D, cfg: &BackendConfig) -> Result<Box<dyn Backend>> {
    let be = step::GpuBackend::new(
        dev,
        cfg.model,
        cfg.loss,
        cfg.shapes,
        Box::new(super::SingleProcess),
    )?
    .with_precision(match cfg.precision {
        crate::backend::Precision::F32 => ops::MatmulPrecision::F32,
        crate::backend::Precision::Bf16 => ops::MatmulPrecision::Bf16,
    });
    Ok(Box::new(match cfg.ibot {
        None => be,
        Some(ib) => be.with_ibot(ib)?,
    }))
}
