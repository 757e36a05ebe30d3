//! `--precision bf16` on the CPU backend against the f32 reference: the same step's loss and
//! gradients within the bf16 rounding bound, bits that repeat and do not depend on the thread
//! count, and the f32 path untouched by the option's existence.
mod common;
use common::{perturbed_state, tiny_config};
use dinovmf::backend::cpu::CpuBackend;
use dinovmf::backend::{random_batch, Backend, Precision, StepHyper};
use dinovmf::config::backend_config;
use dinovmf::train::{LossKind, Method};

fn hyper() -> StepHyper {
    common::step_hyper(5)
}

/// One step's raw gradients and loss in `prec` from a perturbed state, on `threads` threads.
fn gradients(loss: LossKind, prec: Precision, threads: usize) -> (Vec<f32>, f32) {
    let cfg = tiny_config(Method::Dino, loss);
    let mut bc = backend_config(&cfg);
    bc.precision = prec;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut be = CpuBackend::open(&bc).unwrap();
        be.set_state(&perturbed_state(&bc.model, &bc.loss, 3))
            .unwrap();
        let batch = random_batch(&bc.shapes, bc.model.vit.in_chans, 9);
        let m = be.compute_gradients(&batch, &hyper()).unwrap();
        (be.grads().to_vec(), m.loss)
    })
}

fn norm(x: impl Iterator<Item = f64>) -> f64 {
    x.map(|v| v * v).sum::<f64>().sqrt()
}

/// Each bf16 operand is off by at most 2^-8 relative, so each product by at most ~2^-7; with
/// random signs the sums' errors partly cancel. Bound: the whole gradient within 2^-7 of its
/// norm (the single-product worst case; measured 1.1e-3 to 1.4e-3 here) and the loss within
/// 2e-3 relative (measured ~1.5e-4); and not the f32 result (the bf16 kernels ran).
#[test]
fn bf16_step_is_the_f32_step_within_bf16_rounding() {
    for loss in [LossKind::Dino, LossKind::Vmf] {
        let (g32, l32) = gradients(loss, Precision::F32, 2);
        let (g16, l16) = gradients(loss, Precision::Bf16, 2);
        let rel_loss = ((l16 - l32) / l32).abs();
        assert!(rel_loss <= 2e-3, "{loss:?}: loss {l16} vs {l32}");
        let diff = norm(g16.iter().zip(&g32).map(|(a, b)| (*a - *b) as f64));
        let rel = diff / norm(g32.iter().map(|&v| v as f64));
        eprintln!("{loss:?}: loss rel {rel_loss:.2e}, gradient rel {rel:.2e}");
        assert!(
            rel <= 1.0 / 128.0,
            "{loss:?}: gradient off by {rel} of its norm"
        );
        assert!(rel > 1e-6, "{loss:?}: bf16 gave the f32 gradients ({rel})");
    }
}

/// The bf16 path is a pure function of its inputs on one machine: the same bits twice and on
/// 1 or 2 threads.
#[test]
fn bf16_step_bits_repeat_and_do_not_depend_on_threads() {
    let (a, la) = gradients(LossKind::Vmf, Precision::Bf16, 2);
    let (b, lb) = gradients(LossKind::Vmf, Precision::Bf16, 2);
    let (c, lc) = gradients(LossKind::Vmf, Precision::Bf16, 1);
    assert_eq!(la.to_bits(), lb.to_bits());
    assert_eq!(la.to_bits(), lc.to_bits());
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    assert!(a.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()));
}
