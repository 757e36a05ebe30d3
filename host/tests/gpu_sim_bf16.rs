//! The CUDA step with its matrix products in bf16 (`MatmulPrecision::Bf16`: operands rounded
//! by `to_bf16`, products on `gemm_tc_*_bf16`) against the same step in f32, both on the host
//! simulator of `dinovmf.ptx`, from the same state and batch. Needs `--features gpu-sim`.
//!
//! Tolerance, from bf16's 8-bit mantissa: rounding both operands of a product costs at most
//! 2^-9 relative each, so one product term is within 2^-8 and a sum of them within 2^-8 of
//! `Σ |a_i b_i|` (f32 accumulation adds ~2^-24 K, negligible at these reduction lengths,
//! K <= 48 here). The test model chains `L` products from the image to the loss: the patch
//! embedding, 6 per block (qkv, q k^T, P v, proj, fc1, fc2) x depth 2, the head's 3 layers
//! (the prototype layer's logits stay f32): L = 16. Relative errors add along the chain, so
//! the loss and teacher statistics are held to L 2^-8 = 1/16 relative; the gradient (the
//! backward chain adds two products per forward one: 3 L) to 3 L 2^-8 = 3/16 in relative L2.
//! A bf16 step that multiplied the wrong operands, or skipped a conversion (NaN from the
//! poisoned scratch), lands far outside either.
#![cfg(feature = "gpu-sim")]
use dinovmf::backend::cuda::compare::{hyper, initial_state, random_batch};
use dinovmf::backend::cuda::ops::MatmulPrecision;
use dinovmf::backend::cuda::sim::SimDevice;
use dinovmf::backend::cuda::step::GpuBackend;
use dinovmf::backend::{Backend, SingleProcess, StepShapes};
use dinovmf_core::loss::LossConfig;
use dinovmf_core::model::ModelConfig;

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// The tiny model (head size 4: attention through the bf16 GEMMs).
#[test]
fn bf16_step_on_the_simulator_is_within_the_bf16_chain_tolerance_of_f32() {
    bf16_against_f32(ModelConfig::tiny_test());
}

/// Width 32 in 2 heads of 16: the fused tensor-core attention (forward and backward) runs in
/// the bf16 step, with the same chain tolerance (its `q k^T` and `P v` are the two products
/// per block the chain counts; P is rounded to bf16 like the GEMM path's operands).
#[test]
fn bf16_step_with_the_fused_attention_is_within_the_bf16_chain_tolerance_of_f32() {
    let mut model = ModelConfig::tiny_test();
    model.vit.dim = 32;
    assert_eq!(model.vit.dim / model.vit.heads, 16);
    bf16_against_f32(model);
}

fn bf16_against_f32(model: ModelConfig) {
    assert_eq!(model.vit.depth, 2, "the tolerance counts 2 blocks");
    let loss = LossConfig::vmf();
    let shapes = StepShapes {
        batch: 2,
        n_global: 2,
        n_local: 1,
        global_size: 12,
        local_size: 8,
    };
    let st = initial_state(&model, &loss, 21);
    let batch = random_batch(&shapes, model.vit.in_chans, 22);
    let hp = hyper(1, 23);
    let run = |p: MatmulPrecision| {
        let mut be = GpuBackend::new(
            SimDevice::new(),
            model,
            loss,
            shapes,
            Box::new(SingleProcess),
        )
        .unwrap()
        .with_precision(p);
        be.set_state(&st).unwrap();
        let m = be.train_step(&batch, &hp).unwrap();
        (m, be.grads().unwrap())
    };
    let (m32, g32) = run(MatmulPrecision::F32);
    let (m16, g16) = run(MatmulPrecision::Bf16);
    let chain = 16.0;
    let tol = chain / 256.0;
    for (name, a, b) in [
        ("loss", m16.loss, m32.loss),
        ("teacher entropy", m16.teacher_entropy, m32.teacher_entropy),
        ("mean entropy", m16.mean_entropy, m32.mean_entropy),
    ] {
        let rel = ((a - b) / b).abs() as f64;
        println!("{name}: bf16 {a} f32 {b} rel {rel:.2e} (tol {tol:.3})");
        assert!(
            a.is_finite() && rel <= tol,
            "{name}: bf16 {a} vs f32 {b}: rel {rel:e} > {tol}"
        );
    }
    assert!(
        g16.iter().all(|g| g.is_finite()),
        "non-finite bf16 gradient"
    );
    let r = rel_l2(&g16, &g32);
    println!("gradients: rel L2 {r:.2e} (tol {:.3})", 3.0 * tol);
    assert!(r <= 3.0 * tol, "gradients rel L2 {r:e} > {}", 3.0 * tol);
    // And bf16 is really used: the products differ from the f32 step's.
    assert!(
        r > 0.0 && m16.loss != m32.loss,
        "bf16 step identical to f32"
    );
}
