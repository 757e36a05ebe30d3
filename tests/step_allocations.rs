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
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

mod common;

use dinovmf::backend::cpu::gemm::inside_gemm_crate;
use dinovmf::backend::cpu::CpuBackend;
use dinovmf::backend::{random_batch, Backend, Precision, TrainState};
use dinovmf::config::backend_config;
use dinovmf::train::{LossKind, Method, TrainConfig};

/// Counts allocations while [`COUNTING`] is set: those made inside the `gemm` crate and the rest.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static TRACE: AtomicBool = AtomicBool::new(false);
static IN_GEMM: AtomicU64 = AtomicU64::new(0);
static OUTSIDE: AtomicU64 = AtomicU64::new(0);
static OUTSIDE_BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set while this thread records a backtrace (whose own allocations are not counted).
    static TRACING: Cell<bool> = const { Cell::new(false) };
}

impl Counting {
    fn count(&self, size: usize) {
        if !COUNTING.load(Ordering::Relaxed) || TRACING.with(|t| t.get()) {
            return;
        }
        if inside_gemm_crate() {
            IN_GEMM.fetch_add(1, Ordering::Relaxed);
            return;
        }
        OUTSIDE.fetch_add(1, Ordering::Relaxed);
        OUTSIDE_BYTES.fetch_add(size as u64, Ordering::Relaxed);
        if TRACE.load(Ordering::Relaxed) {
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
// const-initialised thread-local only (no allocation, no panic).
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
    let mut hp = common::step_hyper(0);
    pool.install(|| {
        for s in 0..2 {
            hp.seed = s;
            be.train_step(&batch, &hp).unwrap();
        }
        TRACE.store(
            std::env::var_os("DINOVMF_ALLOC_TRACE").is_some(),
            Ordering::Relaxed,
        );
        let before = [&IN_GEMM, &OUTSIDE, &OUTSIDE_BYTES].map(|c| c.load(Ordering::Relaxed));
        COUNTING.store(true, Ordering::Relaxed);
        for s in 2..2 + steps {
            hp.seed = s;
            be.train_step(&batch, &hp).unwrap();
        }
        COUNTING.store(false, Ordering::Relaxed);
        let after = [&IN_GEMM, &OUTSIDE, &OUTSIDE_BYTES].map(|c| c.load(Ordering::Relaxed));
        (
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2],
        )
    })
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
