//! One CPU training step of the CLI's default preset (`small32`, from the same preset table as
//! `dinovmf train`: ViT img 32 / patch 4 / dim 96 / depth 4 / 3 heads, its head and prototypes,
//! batch 64 with 2 x 32 px global + 4 x 16 px local crops), DINO loss, on a synthetic random batch
//! (no data loading). Prints images/s (= batch / step time) and where the time goes.
//!
//! `cargo bench -p dinovmf-suite --bench train_step`; set `DINOVMF_BENCH_VMF=1` for DINO-vMF,
//! `DINOVMF_BENCH_PRECISION=bf16` for `--precision bf16`, `DINOVMF_BENCH_PATCH=4` for issue
//! 16's patch-4 model.
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use dinovmf::backend::cpu::CpuBackend;
use dinovmf::backend::random_batch;
use dinovmf::backend::{Backend, StepHyper, TrainState};
use dinovmf::config::backend_config;
use dinovmf::data::Batch;
use dinovmf::train::{LossKind, TrainConfig};

const PRESET: &str = "small32";

fn setup() -> (CpuBackend, Batch, StepHyper) {
    let vmf = std::env::var_os("DINOVMF_BENCH_VMF").is_some();
    let loss = if vmf { LossKind::Vmf } else { LossKind::Dino };
    let mut cfg = TrainConfig::preset(PRESET, loss).unwrap();
    if let Ok(p) = std::env::var("DINOVMF_BENCH_PATCH") {
        cfg.model.patch = p.parse().expect("DINOVMF_BENCH_PATCH: a patch size");
    }
    let mut bc = backend_config(&cfg);
    if std::env::var("DINOVMF_BENCH_PRECISION").is_ok_and(|v| v == "bf16") {
        bc.precision = dinovmf::backend::Precision::Bf16;
    }
    let mut be = CpuBackend::open(&bc).unwrap();
    be.set_state(&TrainState::initial(&bc.model, bc.loss.centering, 0))
        .unwrap();
    let s = bc.shapes;
    let c = bc.model.vit.in_chans;
    let batch = random_batch(&s, c, 0);
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
    let (imgs, g, nl, l) = (
        batch.batch_size,
        batch.global_size,
        batch.n_local,
        batch.local_size,
    );
    eprintln!(
        "train_step {PRESET} B={imgs} 2x{g}px + {nl}x{l}px, {threads} threads: {:.1} ms/step, {:.1} images/s",
        per * 1e3,
        imgs as f64 / per
    );
    if let (Some(a), Some(b)) = (cpu0, cpu_seconds()) {
        let cpu = (b - a) / steps as f64;
        eprintln!(
            "  CPU time {:.1} ms/step; with {threads} cores to itself: {:.1} images/s",
            cpu * 1e3,
            imgs as f64 * threads as f64 / cpu
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
