//! How much one CPU training step allocates once warm (issue 16: "no allocation inside a
//! step"): a counting global allocator around the system one, two warm-up steps, then the
//! allocations and bytes of the next three steps, in all, for the tiny preset and the
//! default small32 one (every allocation on every thread; the GEMMs pack on the stack or into
//! buffers allocated once, so a warm step makes none).
//!
//! Each configuration runs twice: inside `install` of a rayon pool of the default thread
//! count (every parallel loop of the step starts on a pool thread; what `dinovmf train` gets
//! is the same but for the next line), and called from the main thread on the global pool, where
//! rayon's injector allocates to hand each parallel loop to the pool (the difference).
//! `tests/step_allocations.rs` asserts that the count is zero on one and two threads.
//!
//! `cargo bench -p dinovmf-suite --bench step_allocations`; `DINOVMF_ALLOC_TRACE=1` prints a
//! backtrace of every allocation, `DINOVMF_BENCH_PRECISION=bf16` runs `--precision bf16`.
#[path = "../tests/common/mod.rs"]
mod common;

use common::alloc_count;
use dinovmf::backend::cpu::CpuBackend;
use dinovmf::backend::{random_batch, Backend, TrainState};
use dinovmf::config::backend_config;
use dinovmf::train::{LossKind, Method, TrainConfig};

#[global_allocator]
static A: alloc_count::Counting = alloc_count::Counting;

/// `[count, bytes]` over [`STEPS`] warm steps, run inside `pool.install` (`Some`) or from this
/// thread on the global pool (`None`). (Totals: a per-step mean would round 1 or 2 down to 0.)
fn warm_total(cfg: &TrainConfig, pool: Option<&rayon::ThreadPool>) -> [u64; 2] {
    let mut bc = backend_config(cfg);
    if std::env::var("DINOVMF_BENCH_PRECISION").is_ok_and(|v| v == "bf16") {
        bc.precision = dinovmf::backend::Precision::Bf16;
    }
    let mut be = CpuBackend::open(&bc).unwrap();
    be.set_state(&TrainState::initial(&bc.model, bc.loss.centering, 0))
        .unwrap();
    let batch = random_batch(&bc.shapes, bc.model.vit.in_chans, 1);
    let mut run = || alloc_count::warm_steps(&mut be, &batch, STEPS);
    match pool {
        Some(p) => p.install(run),
        None => run(),
    }
}

/// Warm steps counted per configuration.
const STEPS: u64 = 3;

fn main() {
    let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
    println!(
        "{} threads; in {STEPS} warm steps: allocations (bytes)",
        pool.current_num_threads()
    );
    let tiny = |loss| TrainConfig::preset_for("tiny", Method::Dino, loss).unwrap();
    for (name, cfg) in [
        ("tiny dino", tiny(LossKind::Dino)),
        ("tiny vmf", tiny(LossKind::Vmf)),
        (
            "small32 vmf",
            TrainConfig::preset("small32", LossKind::Vmf).unwrap(),
        ),
    ] {
        for (how, p) in [("in the pool", Some(&pool)), ("from outside", None)] {
            let [n, b] = warm_total(&cfg, p);
            println!("{name}, {how}: {n} ({b} B)");
        }
    }
}
