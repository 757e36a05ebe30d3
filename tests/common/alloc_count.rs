//! A counting global allocator for `tests/step_allocations.rs` and the `step_allocations`
//! bench (issue 16, "no allocation inside a step"): while [`counted`] runs its closure, every
//! allocation (on any thread) is counted. A binary installs it with
//! `#[global_allocator] static A: common::alloc_count::Counting = common::alloc_count::Counting;`.
//!
//! With `DINOVMF_ALLOC_TRACE=1` it prints a backtrace of every allocation it counts (for
//! finding where they come from).
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dinovmf::backend::cpu::CpuBackend;
use dinovmf::backend::Backend;
use dinovmf::data::Batch;

pub struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static TRACE: AtomicBool = AtomicBool::new(false);
/// Allocations counted: how many, how many bytes.
static COUNT: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

thread_local! {
    /// Set while this thread records a backtrace (whose own allocations are not counted).
    static TRACING: Cell<bool> = const { Cell::new(false) };
}

impl Counting {
    fn count(&self, size: usize) {
        if !COUNTING.load(Ordering::Relaxed) || TRACING.with(|t| t.get()) {
            return;
        }
        COUNT[0].fetch_add(1, Ordering::Relaxed);
        COUNT[1].fetch_add(size as u64, Ordering::Relaxed);
        if TRACE.load(Ordering::Relaxed) {
            TRACING.with(|t| t.set(true));
            eprintln!(
                "allocation of {size} bytes:\n{}",
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

/// `f`'s result and what was allocated while it ran: `[count, bytes]`. The counters are
/// global: calls must not overlap.
pub fn counted<R>(f: impl FnOnce() -> R) -> (R, [u64; 2]) {
    let read = || COUNT.each_ref().map(|c| c.load(Ordering::Relaxed));
    TRACE.store(
        std::env::var_os("DINOVMF_ALLOC_TRACE").is_some(),
        Ordering::Relaxed,
    );
    let before = read();
    COUNTING.store(true, Ordering::Relaxed);
    let r = f();
    COUNTING.store(false, Ordering::Relaxed);
    let after = read();
    (r, [0, 1].map(|i| after[i] - before[i]))
}

/// What `steps` training steps of `be` on `batch` allocate after two warm-up steps, as
/// [`counted`] gives it, on the calling thread's rayon pool.
pub fn warm_steps(be: &mut CpuBackend, batch: &Batch, steps: u64) -> [u64; 2] {
    let mut hp = super::step_hyper(0);
    for s in 0..2 {
        hp.seed = s;
        be.train_step(batch, &hp).unwrap();
    }
    counted(|| {
        for s in 2..2 + steps {
            hp.seed = s;
            be.train_step(batch, &hp).unwrap();
        }
    })
    .1
}
