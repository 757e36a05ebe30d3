//! One CPU training step of the default small preset: ViT img 32 / patch 4 / dim 96 / depth 4 /
//! 3 heads, head 512 / 128 / K = 4096, batch 64 with 2 x 32 px global + 4 x 16 px local crops,
//! DINO loss, on a synthetic random batch (no data loading). Prints images/s (= 64 / step time)
//! and where the time goes.
//!
//! `cargo bench -p dinovmf-suite --bench train_step`; set `DINOVMF_BENCH_VMF=1` for DINO-vMF.
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use dinovmf::backend::cpu::CpuBackend;
use dinovmf::backend::StepShapes;
use dinovmf::backend::{Backend, SingleProcess, StepHyper, TrainState};
use dinovmf::data::Batch;
use dinovmf_core::centering::center_init;
use dinovmf_core::loss::LossConfig;
use dinovmf_core::model::{init_params, num_params, ModelConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const B: usize = 64;
const N_LOCAL: usize = 4;
const G: usize = 32;
const L: usize = 16;

fn setup() -> (CpuBackend, Batch, StepHyper) {
    let vmf = std::env::var_os("DINOVMF_BENCH_VMF").is_some();
    let model = ModelConfig::small32().with_norm_last_layer(!vmf);
    let loss = if vmf {
        LossConfig::vmf()
    } else {
        LossConfig::dino()
    };
    let shapes = StepShapes {
        batch: B,
        n_global: 2,
        n_local: N_LOCAL,
        global_size: G,
        local_size: L,
    };
    let mut be = CpuBackend::new(model, loss, shapes, Box::new(SingleProcess)).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let n = num_params(&model);
    let mut student = vec![0.0f32; n];
    init_params(&model, &mut student, &mut || {
        // Box-Muller
        let u1: f64 = rng.gen::<f64>().max(1e-300);
        let u2: f64 = rng.gen();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    });
    let mut center = vec![0.0f32; model.head.out_dim];
    center_init(&mut center, loss.centering);
    be.set_state(&TrainState {
        teacher: student.clone(),
        student,
        adam_m: vec![0.0; n],
        adam_v: vec![0.0; n],
        center,
        patch_center: Vec::new(),
        adam_step: 0,
    })
    .unwrap();
    let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect() };
    let batch = Batch {
        global: r(2 * B * 3 * G * G),
        local: r(N_LOCAL * B * 3 * L * L),
        labels: vec![0; B],
        indices: (0..B).collect(),
        global_size: G,
        local_size: L,
        batch_size: B,
        n_global: 2,
        n_local: N_LOCAL,
    };
    let hp = StepHyper {
        lr: 1e-3,
        weight_decay: 0.04,
        teacher_momentum: 0.996,
        teacher_temp: 0.04,
        freeze_last_layer: false,
        clip_grad: 3.0,
        seed: 1,
        patch_teacher_temp: 0.04,
    };
    (be, batch, hp)
}

/// User + system CPU seconds of this process so far (Linux `/proc/self/stat`, 100 Hz ticks);
/// `None` elsewhere. On a machine shared with other jobs the wall time says little, the CPU time
/// what one step costs.
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn bench_step(c: &mut Criterion) {
    let (mut be, batch, mut hp) = setup();
    // Warm up, then a timed loop of our own for the phase split.
    be.train_step(&batch, &hp).unwrap();
    be.reset_phase_seconds();
    let steps = 10;
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    for i in 0..steps {
        hp.seed = i;
        be.train_step(&batch, &hp).unwrap();
    }
    let per = t.elapsed().as_secs_f64() / steps as f64;
    let threads = rayon::current_num_threads();
    eprintln!(
        "train_step small32 B={B} 2x{G}px + {N_LOCAL}x{L}px, {threads} threads: {:.1} ms/step, {:.1} images/s",
        per * 1e3,
        B as f64 / per
    );
    if let (Some(a), Some(b)) = (cpu0, cpu_seconds()) {
        let cpu = (b - a) / steps as f64;
        eprintln!(
            "  CPU time {:.1} ms/step; with {threads} cores to itself: {:.1} images/s",
            cpu * 1e3,
            B as f64 * threads as f64 / cpu
        );
    }
    for (name, s) in be.phase_seconds() {
        eprintln!(
            "  {name:<18} {:7.1} ms  {:4.1}%",
            s / steps as f64 * 1e3,
            100.0 * s / steps as f64 / per
        );
    }
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("small32_b64_2x32_4x16", |b| {
        b.iter(|| {
            hp.seed = hp.seed.wrapping_add(1);
            be.train_step(&batch, &hp).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_step);
criterion_main!(benches);
