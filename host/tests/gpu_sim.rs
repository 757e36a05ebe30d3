//! The CUDA backend's training step, run on the host simulator of `dinovmf.ptx`, against the
//! CPU backend: same state, batches and schedules. Needs `--features gpu-sim`.
#![cfg(feature = "gpu-sim")]
use dinovmf::backend::cpu::StepShapes;
use dinovmf::backend::cuda::compare::{compare_with_cpu, print_comparison, Comparison};
use dinovmf::backend::cuda::sim::SimDevice;
use dinovmf_core::loss::LossConfig;
use dinovmf_core::model::ModelConfig;

fn shapes(batch: usize, n_local: usize) -> StepShapes {
    StepShapes {
        batch,
        n_global: 2,
        n_local,
        global_size: 12,
        local_size: 8,
    }
}

fn check(c: &Comparison, what: &str) {
    let mut s = Vec::new();
    print_comparison(c, &mut s).unwrap();
    println!("{what}\n{}", String::from_utf8_lossy(&s));
    for p in &c.steps {
        let rel = ((p.dev.loss - p.cpu.loss) / p.cpu.loss).abs();
        assert!(
            rel < 1e-4,
            "{what}: step {} loss rel diff {rel:e} >= 1e-4",
            p.step
        );
        for (name, a, b) in [
            (
                "teacher entropy",
                p.dev.teacher_entropy,
                p.cpu.teacher_entropy,
            ),
            ("mean entropy", p.dev.mean_entropy, p.cpu.mean_entropy),
            ("max mass", p.dev.max_mass, p.cpu.max_mass),
            ("kl", p.dev.kl, p.cpu.kl),
            ("grad norm", p.dev.grad_norm, p.cpu.grad_norm),
        ] {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{what}: step {} {name}: dev {a} cpu {b} (tol 1e-4 max(1, |cpu|))",
                p.step
            );
        }
    }
    assert_eq!(c.grads.non_finite, 0, "{what}: non-finite gradients");
    assert!(
        c.grads.rel_l2 < 1e-4,
        "{what}: gradients rel L2 {:e} >= 1e-4",
        c.grads.rel_l2
    );
    for d in &c.state {
        assert_eq!(d.non_finite, 0, "{what}: non-finite {}", d.name);
        assert!(
            d.rel_l2 < 1e-4,
            "{what}: {} rel L2 {:e} >= 1e-4",
            d.name,
            d.rel_l2
        );
    }
}

#[test]
fn vmf_step_on_the_simulator_matches_cpu_rel_1e4() {
    let model = ModelConfig::tiny_test();
    let loss = LossConfig::vmf();
    let c = compare_with_cpu(SimDevice::new(), model, loss, shapes(2, 2), 2, 11).unwrap();
    check(&c, "vmf, learned radii, 2 local crops");
}

#[test]
fn dino_step_on_the_simulator_matches_cpu_rel_1e4() {
    let model = ModelConfig::tiny_test().with_norm_last_layer(true);
    let loss = LossConfig::dino();
    let c = compare_with_cpu(SimDevice::new(), model, loss, shapes(3, 0), 2, 12).unwrap();
    check(&c, "dino, fixed radii, no local crops");
}
