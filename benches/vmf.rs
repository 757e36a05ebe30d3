//! Throughput of the vMF normaliser's hot path: D_p and A_p over 65536 kappas (p = 256).
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use dinovmf_core::vmf::{self, BesselApprox};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const N: usize = 65536;
const P: usize = 256;

fn kappas() -> Vec<f32> {
    // ||w|| / tau with ||w|| in [0.1, 100] (log-uniform) and tau in [0.04, 0.1]: the training range.
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    (0..N)
        .map(|_| 10f32.powf(rng.gen_range(-1.0..2.0)) / rng.gen_range(0.04..0.1))
        .collect()
}

fn bench_vmf(c: &mut Criterion) {
    let ks = kappas();
    let ks16: Vec<f16> = ks.iter().map(|&k| f16::from_f32(k)).collect();
    let mut out = vec![0f32; N];
    let mut out2 = vec![0f32; N];
    let mut out16 = vec![f16::ZERO; N];
    let mut g = c.benchmark_group("vmf_p256_65536");
    g.throughput(Throughput::Elements(N as u64));
    for (name, approx) in [
        ("uniform", BesselApprox::Uniform),
        ("large_nu", BesselApprox::LargeNu),
    ] {
        g.bench_function(format!("d_f32_{name}"), |b| {
            b.iter(|| vmf::log_norm_shifted_slice(P, black_box(&ks), &mut out, approx))
        });
        g.bench_function(format!("a_f32_{name}"), |b| {
            b.iter(|| vmf::mean_resultant_slice(P, black_box(&ks), &mut out, approx))
        });
    }
    g.bench_function("d_and_a_f32_uniform", |b| {
        b.iter(|| {
            vmf::log_norm_and_mean_slice(
                P,
                black_box(&ks),
                &mut out,
                &mut out2,
                BesselApprox::Uniform,
            )
        })
    });
    g.bench_function("d_f16_uniform", |b| {
        b.iter(|| {
            vmf::log_norm_shifted_f16_slice(P, black_box(&ks16), &mut out16, BesselApprox::Uniform)
        })
    });
    g.bench_function("a_f16_uniform", |b| {
        b.iter(|| {
            vmf::mean_resultant_f16_slice(P, black_box(&ks16), &mut out16, BesselApprox::Uniform)
        })
    });
    // Small p goes through the order shift (m = 12 steps at p = 8).
    g.bench_function("d_f32_uniform_p8", |b| {
        b.iter(|| vmf::log_norm_shifted_slice(8, black_box(&ks), &mut out, BesselApprox::Uniform))
    });
    g.finish();
}

criterion_group!(benches, bench_vmf);
criterion_main!(benches);
