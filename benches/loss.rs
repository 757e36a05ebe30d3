//! Multi-crop loss forward + backward at the paper's head size, on the CPU in f32: B = 64,
//! 10 crops (2 global + 8 local), K = 65536, p = 256, DINO-vMF (vMF logits, probability
//! centering, learned radii). First core's reference composite (single-threaded naive loops,
//! ~34 G multiply-adds per call), then the CPU backend's GEMM path on the same inputs.
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use dinovmf_suite::core_math::centering;
use dinovmf_suite::core_math::loss::{
    multicrop_loss_forward_backward, scratch_len, LossConfig, LossDims, LossGrads, LossInputs,
};
use dinovmf_suite::host::backend::cpu::loss::{forward_backward, LossBufs};
use dinovmf_suite::host::backend::SingleProcess;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

fn bench_loss(c: &mut Criterion) {
    let dims = LossDims {
        n_crops: 10,
        batch: 64,
        k: 65536,
        p: 256,
    };
    let cfg = LossConfig::vmf();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let ns = dims.n_crops * dims.batch;
    let z_s = random(&mut rng, ns * dims.p, -1.0, 1.0);
    let z_t = random(&mut rng, 2 * dims.batch * dims.p, -1.0, 1.0);
    let v_s = random(&mut rng, dims.k * dims.p, -1.0, 1.0);
    let v_t = random(&mut rng, dims.k * dims.p, -1.0, 1.0);
    let g_s = random(&mut rng, dims.k, 0.5, 2.0);
    let g_t = random(&mut rng, dims.k, 0.5, 2.0);
    let mut dz = vec![0.0f32; ns * dims.p];
    let mut dv = vec![0.0f32; dims.k * dims.p];
    let mut dg = vec![0.0f32; dims.k];
    let mut center = vec![0.0f32; dims.k];
    centering::center_init(&mut center, cfg.centering);
    let mut scratch = vec![0.0f32; scratch_len(dims)];

    let mut group = c.benchmark_group("loss");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("vmf_f32_fwd_bwd_B64_crops10_K65536_p256", |b| {
        b.iter(|| {
            multicrop_loss_forward_backward(
                &cfg,
                dims,
                LossInputs {
                    z_s: &z_s,
                    z_t: &z_t,
                    v_s: &v_s,
                    g_s: &g_s,
                    v_t: &v_t,
                    g_t: &g_t,
                },
                LossGrads {
                    dz_s: &mut dz,
                    dv_s: &mut dv,
                    dg_s: &mut dg,
                },
                &mut center,
                &mut scratch,
            )
            .expect("valid dims")
            .loss
        })
    });
    // The CPU backend's fast path: the same loss with GEMMs for the dot products and rayon over
    // rows (all cores), the code `dinovmf train` runs.
    let mut lb = LossBufs::new(dims.n_crops, dims.batch, dims.k, dims.p);
    let mut next_center = center.clone();
    group.bench_function("vmf_f32_fwd_bwd_B64_crops10_K65536_p256_cpu_backend", |b| {
        b.iter(|| {
            forward_backward(
                &cfg,
                &mut lb,
                &mut SingleProcess,
                &z_s,
                &z_t,
                &v_s,
                &g_s,
                &v_t,
                &g_t,
                &center,
                &mut next_center,
                &mut dv,
                &mut dg,
            )
            .expect("one process: no collective can fail")
            .loss
        })
    });
    group.finish();
}

criterion_group!(benches, bench_loss);
criterion_main!(benches);
