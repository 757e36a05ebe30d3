//! How much one CPU training step allocates once warm (issue 16: "no allocation inside a
//! step"): a counting global allocator around the system one, two warm-up steps, then the
//! allocations and bytes of the next three steps, per step, for the tiny preset and the
//! default small32 one.
//!
//! `cargo bench -p dinovmf-suite --bench step_allocations`
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

#[path = "../tests/common/mod.rs"]
mod common;

use dinovmf::backend::cpu::CpuBackend;
use dinovmf::backend::{random_batch, Backend, TrainState};
use dinovmf::config::backend_config;
use dinovmf::train::{LossKind, Method, TrainConfig};

struct Counting;
static COUNT: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        COUNT.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(l.size() as u64, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        COUNT.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(l.size() as u64, Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        COUNT.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(n as u64, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static A: Counting = Counting;

fn per_step(cfg: &TrainConfig) -> (u64, u64) {
    let bc = backend_config(cfg);
    let mut be = CpuBackend::open(&bc).unwrap();
    be.set_state(&TrainState::initial(&bc.model, bc.loss.centering, 0))
        .unwrap();
    let batch = random_batch(&bc.shapes, bc.model.vit.in_chans, 1);
    let mut hp = common::step_hyper(0);
    for s in 0..2 {
        hp.seed = s;
        be.train_step(&batch, &hp).unwrap();
    }
    let (c0, b0) = (COUNT.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed));
    let steps = 3;
    for s in 2..2 + steps {
        hp.seed = s;
        be.train_step(&batch, &hp).unwrap();
    }
    let (c1, b1) = (COUNT.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed));
    ((c1 - c0) / steps, (b1 - b0) / steps)
}

fn main() {
    let tiny = |loss| TrainConfig::preset_for("tiny", Method::Dino, loss).unwrap();
    for (name, cfg) in [
        ("tiny dino", tiny(LossKind::Dino)),
        ("tiny vmf", tiny(LossKind::Vmf)),
        (
            "small32 vmf",
            TrainConfig::preset("small32", LossKind::Vmf).unwrap(),
        ),
    ] {
        let (n, bytes) = per_step(&cfg);
        println!("{name}: {n} allocations, {bytes} bytes per warm step");
    }
}
