//! How much one CPU training step allocates once warm (issue 16: "no allocation inside a
//! step"): a counting global allocator around the system one, two warm-up steps, then the
//! allocations and bytes of the next three steps, per step, for the tiny preset and the
//! default small32 one. Each allocation is counted as the `gemm` crate's (its per-call packing
//! buffers, which it gives no way to hand in) when
//! `dinovmf::backend::cpu::gemm::inside_gemm_crate` says so, else as the step's own.
//!
//! Each configuration runs twice: inside `install` of a rayon pool of the default thread
//! count (every parallel loop of the step starts on a pool thread; what `dinovmf train` gets
//! is the same but for the next line), and called from the main thread on the global pool, where
//! rayon's injector allocates to hand each parallel loop to the pool (the difference).
//! `tests/step_allocations.rs` asserts that the step's own count is zero on one thread.
//!
//! `cargo bench -p dinovmf-suite --bench step_allocations`; `DINOVMF_ALLOC_TRACE=1` prints a
//! backtrace of every allocation outside the `gemm` crate, `DINOVMF_BENCH_PRECISION=bf16` runs
//! `--precision bf16`.
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[path = "../tests/common/mod.rs"]
mod common;

use dinovmf::backend::cpu::gemm::inside_gemm_crate;
use dinovmf::backend::cpu::CpuBackend;
use dinovmf::backend::{random_batch, Backend, TrainState};
use dinovmf::config::backend_config;
use dinovmf::train::{LossKind, Method, TrainConfig};

struct Counting;
/// Allocations (count, bytes) inside the `gemm` crate, then outside it.
static GEMM: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static OWN: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static TRACE: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Set while this thread records a backtrace (whose own allocations are not counted).
    static TRACING: Cell<bool> = const { Cell::new(false) };
}

impl Counting {
    fn count(&self, size: usize) {
        if TRACING.with(|t| t.get()) {
            return;
        }
        let c = if inside_gemm_crate() { &GEMM } else { &OWN };
        c[0].fetch_add(1, Ordering::Relaxed);
        c[1].fetch_add(size as u64, Ordering::Relaxed);
        if TRACE.load(Ordering::Relaxed) && !inside_gemm_crate() {
            TRACING.with(|t| t.set(true));
            eprintln!(
                "allocation of {size} bytes outside gemm:\n{}",
                std::backtrace::Backtrace::force_capture()
            );
            TRACING.with(|t| t.set(false));
        }
    }
}

// SAFETY: every call goes to the system allocator unchanged; counting touches atomics and a
// const-initialised thread-local only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        self.count(l.size());
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        self.count(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        self.count(n);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Per warm step: `[gemm count, gemm bytes, own count, own bytes]`, the steps run inside
/// `pool.install` (`Some`) or from this thread on the global pool (`None`).
fn per_step(cfg: &TrainConfig, pool: Option<&rayon::ThreadPool>) -> [u64; 4] {
    let mut bc = backend_config(cfg);
    if std::env::var("DINOVMF_BENCH_PRECISION").is_ok_and(|v| v == "bf16") {
        bc.precision = dinovmf::backend::Precision::Bf16;
    }
    let mut be = CpuBackend::open(&bc).unwrap();
    be.set_state(&TrainState::initial(&bc.model, bc.loss.centering, 0))
        .unwrap();
    let batch = random_batch(&bc.shapes, bc.model.vit.in_chans, 1);
    let mut hp = common::step_hyper(0);
    let mut run = || {
        for s in 0..2 {
            hp.seed = s;
            be.train_step(&batch, &hp).unwrap();
        }
        let read = || [&GEMM[0], &GEMM[1], &OWN[0], &OWN[1]].map(|c| c.load(Ordering::Relaxed));
        let before = read();
        TRACE.store(
            std::env::var_os("DINOVMF_ALLOC_TRACE").is_some(),
            Ordering::Relaxed,
        );
        let steps = 3;
        for s in 2..2 + steps {
            hp.seed = s;
            be.train_step(&batch, &hp).unwrap();
        }
        TRACE.store(false, Ordering::Relaxed);
        let after = read();
        [0, 1, 2, 3].map(|i| (after[i] - before[i]) / steps)
    };
    match pool {
        Some(p) => p.install(run),
        None => run(),
    }
}

fn main() {
    let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
    println!(
        "{} threads; per warm step: allocations (bytes) inside the gemm crate / the step's own",
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
            let [gn, gb, on, ob] = per_step(&cfg, p);
            println!("{name}, {how}: gemm {gn} ({gb} B), own {on} ({ob} B)");
        }
    }
}
