//! Issue 16, "no allocation inside a step": a warm CPU training step allocates nothing, and
//! neither does a warm matrix product (`backend::cpu::gemm_f32`, our driver around the
//! `gemm-f32` microkernels, packs on the stack or into buffers allocated once).
//!
//! This file is its own test binary so that it can install a counting `#[global_allocator]`
//! that counts every allocation on every thread while a measurement runs. The steps run on a
//! rayon pool of one and of two threads, inside `install` (so rayon's injector never allocates
//! for them: every parallel loop starts on a pool thread, as in `dinovmf train`, whose
//! one-rank step runs inside `rayon::scope`).
//!
//! With `DINOVMF_ALLOC_TRACE=1` the test prints a backtrace of every allocation it counts (for
//! finding where they come from).
mod common;

use std::sync::{Mutex, OnceLock};

use common::alloc_count;
use dinovmf::backend::cpu::gemm::{matmul, matmul_strided, Op, View};
use dinovmf::backend::cpu::CpuBackend;
use dinovmf::backend::{random_batch, Backend, Precision, TrainState};
use dinovmf::config::backend_config;
use dinovmf::train::{LossKind, Method, TrainConfig};

#[global_allocator]
static A: alloc_count::Counting = alloc_count::Counting;

/// The counters are global: the tests take this lock so that their measurements never overlap.
static SERIAL: Mutex<()> = Mutex::new(());

/// The rayon pool of `threads` (1 or 2), built on first use and never dropped. A pool per
/// measurement would be dropped before the next one, and its worker threads exit
/// asynchronously: a worker's exit allocates (crossbeam-epoch hands the thread's garbage bag,
/// 2072 bytes, to its global queue), which then fell into the next measurement now and then
/// (seen once in CI as "dino, 1 threads: 1 allocations (2072 bytes)").
fn pool(threads: usize) -> &'static rayon::ThreadPool {
    static POOLS: [OnceLock<rayon::ThreadPool>; 2] = [OnceLock::new(), OnceLock::new()];
    assert!((1..=2).contains(&threads), "pools of 1 or 2 threads only");
    POOLS[threads - 1].get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    })
}

/// `(allocations, bytes)` made by `steps` warm steps (after two warm-up steps) of `cfg`'s
/// backend in `precision` on a pool of `threads`.
fn warm_step_allocations(
    cfg: &TrainConfig,
    precision: Precision,
    threads: usize,
    steps: u64,
) -> (u64, u64) {
    let pool = pool(threads);
    let mut bc = backend_config(cfg);
    bc.precision = precision;
    let mut be = CpuBackend::open(&bc).unwrap();
    be.set_state(&TrainState::initial(&bc.model, bc.loss.centering, 0))
        .unwrap();
    let batch = random_batch(&bc.shapes, bc.model.vit.in_chans, 1);
    let [count, bytes] = pool.install(|| alloc_count::warm_steps(&mut be, &batch, steps));
    (count, bytes)
}

/// The tiny preset: DINO-vMF, DINO and iBOT in f32, and DINO-vMF in bf16 (its packing memory
/// is per thread, grown once; its weight gradients are f32 products), on one and two threads.
#[test]
fn warm_tiny_steps_allocate_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
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
        for threads in [1, 2] {
            let (count, bytes) = warm_step_allocations(&cfg, precision, threads, 3);
            eprintln!("{name}, {threads} threads: {count} allocations ({bytes} bytes)");
            assert_eq!(
                count, 0,
                "{name}, {threads} threads: 3 warm steps made {count} allocations ({bytes} \
                 bytes) (DINOVMF_ALLOC_TRACE=1 prints where)"
            );
        }
    }
}

/// Warm products of every kind (small and large, every transpose, the parallel path, strided
/// views as the attention uses them) allocate nothing on a two-thread pool.
#[test]
fn warm_matrix_products_allocate_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let shapes = [
        (1, 1, 1),
        (17, 17, 32),
        (65, 40, 700),
        (300, 200, 96),
        (2176, 96, 384),
        (384, 96, 2176),
    ];
    let big = 2176 * 2176;
    let (a, b) = (vec![0.5f32; big], vec![0.25f32; big]);
    let mut c = vec![0f32; big];
    let products = |c: &mut [f32]| {
        for &(m, n, k) in &shapes {
            for op_a in [Op::N, Op::T] {
                for op_b in [Op::N, Op::T] {
                    matmul(m, n, k, &a, op_a, &b, op_b, c, false);
                    matmul(m, n, k, &a, op_a, &b, op_b, c, true);
                }
            }
            let (va, vb, vc) = (
                View::rows(3, k + 5),
                View::t(1, k + 2),
                View::rows(2, n + 3),
            );
            matmul_strided(m, n, k, &a, va, &b, vb, c, vc, 0.5, false, false);
            matmul_strided(m, n, k, &a, va, &b, vb, c, vc, 0.5, true, true);
        }
    };
    pool(2).install(|| {
        products(&mut c);
        let ((), [count, bytes]) = alloc_count::counted(|| products(&mut c));
        eprintln!("warm products: {count} allocations ({bytes} bytes)");
        assert_eq!(
            count, 0,
            "warm products made {count} allocations ({bytes} bytes)"
        );
    });
}
