//! Issue 16, "no allocation inside a step": a warm CPU training step allocates nothing but the
//! `gemm` crate's per-call packing buffers (which that crate gives no way to hand in).
//!
//! This file is its own test binary so that it can install a counting `#[global_allocator]`:
//! every allocation is counted, and attributed to the `gemm` crate when
//! `dinovmf::backend::cpu::gemm::inside_gemm_crate` says so. The steps run on a one-thread
//! rayon pool (inside `install`, so rayon's injector never allocates for them and every
//! parallel loop runs on the calling thread): attribution is then exact.
//!
//! With `DINOVMF_ALLOC_TRACE=1` the test prints a backtrace of every allocation it counts
//! outside the `gemm` crate (for finding where they come from).
mod common;

use common::alloc_count;
use dinovmf::backend::cpu::CpuBackend;
use dinovmf::backend::{random_batch, Backend, Precision, TrainState};
use dinovmf::config::backend_config;
use dinovmf::train::{LossKind, Method, TrainConfig};

#[global_allocator]
static A: alloc_count::Counting = alloc_count::Counting;

/// `(inside gemm, outside gemm, bytes outside)` allocated by `steps` warm steps (after two
/// warm-up steps) of `cfg`'s backend in `precision` on a one-thread pool.
fn warm_step_allocations(cfg: &TrainConfig, precision: Precision, steps: u64) -> (u64, u64, u64) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut bc = backend_config(cfg);
    bc.precision = precision;
    let mut be = CpuBackend::open(&bc).unwrap();
    be.set_state(&TrainState::initial(&bc.model, bc.loss.centering, 0))
        .unwrap();
    let batch = random_batch(&bc.shapes, bc.model.vit.in_chans, 1);
    let [gemm, _, outside, bytes] =
        pool.install(|| alloc_count::warm_steps(&mut be, &batch, steps));
    (gemm, outside, bytes)
}

/// One test for every configuration: the counters are global, so the runs must not overlap.
/// The tiny preset: DINO-vMF, DINO and iBOT in f32, and DINO-vMF in bf16 (its packing memory
/// is per thread, grown once; on a CPU without AVX512-BF16 the emulation's rounded operands).
#[test]
fn warm_tiny_steps_allocate_only_inside_the_gemm_crate() {
    let tiny = |method, loss| TrainConfig::preset_for("tiny", method, loss).unwrap();
    for (name, cfg, precision) in [
        (
            "dino-vmf",
            tiny(Method::Dino, LossKind::Vmf),
            Precision::F32,
        ),
        ("dino", tiny(Method::Dino, LossKind::Dino), Precision::F32),
        (
            "ibot-vmf",
            tiny(Method::Ibot, LossKind::Vmf),
            Precision::F32,
        ),
        (
            "dino-vmf bf16",
            tiny(Method::Dino, LossKind::Vmf),
            Precision::Bf16,
        ),
    ] {
        let (gemm, outside, bytes) = warm_step_allocations(&cfg, precision, 3);
        eprintln!("{name}: {gemm} allocations inside gemm, {outside} ({bytes} bytes) outside");
        // The counter sees the step at all: gemm's packing buffers are there every step (bf16:
        // the weight gradients' products are f32 ones).
        assert!(gemm > 0, "{name}: no allocation counted inside gemm");
        assert_eq!(
            outside, 0,
            "{name}: 3 warm steps made {outside} allocations ({bytes} bytes) outside the gemm \
             crate (DINOVMF_ALLOC_TRACE=1 prints where)"
        );
    }
}
