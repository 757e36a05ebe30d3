//! The CUDA backend's training step, run on the host simulator of `dinovmf.ptx`, against the
//! CPU backend: same state, batches and schedules. Needs `--features gpu-sim`.
#![cfg(feature = "gpu-sim")]
use dinovmf::backend::cuda::compare::{
    compare_with_cpu, compare_with_cpu_ext, print_comparison, Comparison,
};
use dinovmf::backend::cuda::sim::SimDevice;
use dinovmf::backend::StepShapes;
use dinovmf_core::loss::LossConfig;
use dinovmf_core::model::{IbotParts, ModelConfig};

// The root suite's shared test helpers (host/tests is another crate's test folder).
#[path = "../../tests/common/mod.rs"]
mod common;

/// Two global crops of 12 px, `n_local` local crops of 8 px.
fn shapes(batch: usize, n_local: usize) -> StepShapes {
    common::shapes(batch, n_local, 12, 8)
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

/// Sinkhorn-Knopp teacher targets (3 rounds) with vMF and with DINO logits.
#[test]
fn sinkhorn_steps_on_the_simulator_match_cpu_rel_1e4() {
    use dinovmf_core::centering::Centering;
    let sinkhorn = Centering::Sinkhorn { iters: 3 };
    let model = ModelConfig::tiny_test();
    let loss = LossConfig {
        centering: sinkhorn,
        ..LossConfig::vmf()
    };
    let c = compare_with_cpu(SimDevice::new(), model, loss, shapes(2, 2), 2, 13).unwrap();
    check(&c, "vmf, Sinkhorn, learned radii, 2 local crops");
    let model = ModelConfig::tiny_test().with_norm_last_layer(true);
    let loss = LossConfig {
        centering: sinkhorn,
        ..LossConfig::dino()
    };
    let c = compare_with_cpu(SimDevice::new(), model, loss, shapes(3, 1), 2, 14).unwrap();
    check(&c, "dino, Sinkhorn, fixed radii, 1 local crop");
}

/// iBOT's tiny model: the test model with the mask token (and a separate patch head when
/// asked), `norm_last_layer` as given.
fn ibot_model(norm_last: bool, separate: bool) -> ModelConfig {
    let mut m = ModelConfig::tiny_test().with_norm_last_layer(norm_last);
    m.ibot = IbotParts {
        mask_token: true,
        separate_patch_head: separate,
    };
    m
}

/// [`check`] plus iBOT's own metrics: both losses and the patch target entropy per step, and
/// (through `c.state`) every parameter tensor, both centers and the moments after the steps.
fn check_ibot(c: &Comparison, what: &str) {
    check(c, what);
    assert!(
        c.state.iter().any(|d| d.name == "patch_center"),
        "{what}: patch center not compared"
    );
    let mut masked_step = false;
    for p in &c.steps {
        for (name, a, b) in [
            ("loss_cls", p.dev.cls_loss, p.cpu.cls_loss),
            ("loss_mim", p.dev.mim_loss, p.cpu.mim_loss),
            (
                "patch teacher entropy",
                p.dev.patch_teacher_entropy,
                p.cpu.patch_teacher_entropy,
            ),
        ] {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{what}: step {} {name}: dev {a} cpu {b} (tol 1e-4 max(1, |cpu|))",
                p.step
            );
        }
        masked_step |= p.cpu.mim_loss > 0.0;
    }
    assert!(masked_step, "{what}: no step had a masked patch");
    // Every tensor on its own, the mask token's gradient included (and not zero). Gradients:
    // rel L2 1e-4. Parameters after the steps: rel L2 1e-3, or within a tenth of one AdamW step
    // (lr 1e-3) where a tensor starts at zero and its gradient is (near) zero, as the attention
    // key bias's is: AdamW normalises each update to about lr, so rounding noise in a zero
    // gradient moves such an entry by up to lr on either backend.
    for d in &c.tensors {
        println!(
            "{what}: {:<44} rel L2 {:.3e} max |diff| {:.3e} max |cpu| {:.3e}",
            d.name, d.rel_l2, d.max_abs, d.max_ref
        );
    }
    for d in &c.tensors {
        assert_eq!(d.non_finite, 0, "{what}: non-finite {}", d.name);
        let ok = if d.name.starts_with("grad") {
            d.rel_l2 < 1e-4 || d.max_abs < 1e-7
        } else {
            d.rel_l2 < 1e-3 || d.max_abs < 1e-4
        };
        assert!(
            ok,
            "{what}: {} rel L2 {:e}, max |diff| {:e}",
            d.name, d.rel_l2, d.max_abs
        );
    }
    let tok = c
        .tensors
        .iter()
        .find(|d| d.name == "grad backbone.masked_embed")
        .expect("the mask token's gradient is compared");
    assert!(tok.max_ref > 0.0, "{what}: the mask token got no gradient");
    println!(
        "{what}: mask token gradient rel L2 {:.3e}, max |cpu| {:.3e}",
        tok.rel_l2, tok.max_ref
    );
}

#[test]
fn ibot_vmf_step_on_the_simulator_matches_cpu_rel_1e4() {
    let c = compare_with_cpu_ext(
        SimDevice::new(),
        ibot_model(false, false),
        LossConfig::vmf(),
        Some(common::ibot_config()),
        shapes(2, 2),
        2,
        21,
    )
    .unwrap();
    check_ibot(
        &c,
        "iBOT-vMF, learned radii, shared patch head, 2 local crops",
    );
}

/// iBOT-vMF with Sinkhorn-Knopp on the [CLS] and on the patch teacher.
#[test]
fn ibot_sinkhorn_step_on_the_simulator_matches_cpu_rel_1e4() {
    let loss = LossConfig {
        centering: dinovmf_core::centering::Centering::Sinkhorn { iters: 3 },
        ..LossConfig::vmf()
    };
    let c = compare_with_cpu_ext(
        SimDevice::new(),
        ibot_model(false, false),
        loss,
        Some(common::ibot_config()),
        shapes(2, 1),
        2,
        23,
    )
    .unwrap();
    check_ibot(&c, "iBOT-vMF, Sinkhorn on [CLS] and patches");
}

#[test]
fn ibot_dino_separate_head_step_on_the_simulator_matches_cpu_rel_1e4() {
    let c = compare_with_cpu_ext(
        SimDevice::new(),
        ibot_model(true, true),
        LossConfig::dino(),
        Some(common::ibot_config()),
        shapes(2, 1),
        2,
        22,
    )
    .unwrap();
    check_ibot(&c, "iBOT, fixed radii, separate patch head, 1 local crop");
}

mod launcher {
    use dinovmf::backend::cuda::device::{grid_of, Arg};
    use dinovmf::backend::cuda::grid::eval_grid;
    use dinovmf_ptx::manifest;

    fn vars<'a>(pairs: &'a [(&'a str, u64)]) -> impl Fn(&str) -> Option<u64> + 'a {
        move |n| pairs.iter().find(|p| p.0 == n).map(|p| p.1)
    }

    #[test]
    fn grid_formulas_of_each_shape() {
        let v = vars(&[
            ("n", 257),
            ("m", 65),
            ("outer", 3),
            ("inner", 4),
            ("batch", 2),
            ("d", 5),
        ]);
        assert_eq!(eval_grid("ceil(n/256)", &v).unwrap(), [2, 1, 1]);
        assert_eq!(eval_grid("m", &v).unwrap(), [65, 1, 1]);
        assert_eq!(
            eval_grid("(ceil(n/64), ceil(m/64), batches = outer * inner)", &v).unwrap(),
            [5, 2, 12]
        );
        assert_eq!(
            eval_grid("(ceil(n/64), ceil(m/64), 1)", &v).unwrap(),
            [5, 2, 1]
        );
        // 2 * 258 * 5 / 256 = 10.08 -> 11
        assert_eq!(
            eval_grid("ceil(batch*(n+1)*d/256)", &v).unwrap(),
            [11, 1, 1]
        );
        let v = vars(&[("max seg_len", 4097), ("nseg", 7)]);
        assert_eq!(
            eval_grid("(parts = ceil(max seg_len / 4096), nseg)", &v).unwrap(),
            [2, 7, 1]
        );
        assert_eq!(eval_grid("ceil(0/256)", &v).unwrap(), [0, 1, 1]);
    }

    #[test]
    fn bad_grid_formulas_are_errors_not_panics() {
        let v = vars(&[("n", 1)]);
        for f in [
            "ceil(n/0)",
            "ceil(q/2)",
            "n/2",
            "(1, 2, 3, 4)",
            "n +",
            "n $ 2",
            "(n",
        ] {
            assert!(eval_grid(f, &v).is_err(), "{f}");
        }
    }

    /// Every grid formula of the manifest evaluates from the kernel's own size parameters plus
    /// the documented extras, and the 1-D element kernels give `ceil(n / block)`.
    #[test]
    fn every_manifest_grid_evaluates() {
        let extra = [("outer", 3), ("max seg_len", 5000), ("nseg", 2)];
        for k in manifest::all() {
            let words: Vec<u64> = k.params.iter().map(|_| 1000).collect();
            let g = grid_of(k, &words, &extra).unwrap_or_else(|e| panic!("{e}"));
            assert!(g.iter().all(|&x| x > 0), "{}: {g:?}", k.name);
            if k.grid == "ceil(n/256)" {
                assert_eq!(g, [4, 1, 1], "{}", k.name);
            }
        }
    }

    #[test]
    fn argument_types_are_checked_against_the_manifest() {
        let k = manifest::kernel("fill").unwrap();
        let p = |i: usize| (k.params[i].name, k.params[i].ty);
        let ptr = |elem| Arg::Ptr {
            addr: 64,
            elem,
            len: 1,
        };
        assert_eq!(ptr("f32").word("fill", p(0).0, p(0).1).unwrap(), 64);
        assert!(ptr("u64").word("fill", p(0).0, p(0).1).is_err());
        assert!(Arg::U32(1).word("fill", p(1).0, p(1).1).is_err());
        assert_eq!(
            Arg::F32(1.5).word("fill", p(1).0, p(1).1).unwrap(),
            1.5f32.to_bits() as u64
        );
        assert_eq!(Arg::Null.word("fill", p(0).0, p(0).1).unwrap(), 0);
        // A pointer of the other element type: `gather_rows`'s u64 row indices.
        let g = manifest::kernel("gather_rows").unwrap();
        let (name, ty) = (g.params[2].name, g.params[2].ty);
        assert_eq!(name, "idx");
        assert!(ptr("u64").word("gather_rows", name, ty).is_ok());
        assert!(ptr("f32").word("gather_rows", name, ty).is_err());
    }
}

mod kernels {
    use dinovmf::backend::cuda::device::Gpu;
    use dinovmf::backend::cuda::sim::SimDevice;
    use dinovmf::backend::cuda::verify::{compare, run_all, uncovered, verdict, Tol};

    /// `dinovmf verify-kernels --sim`: every kernel covered, every check passes.
    #[test]
    fn verify_kernels_passes_on_the_simulator_and_covers_every_kernel() {
        let mut gpu = Gpu::new(SimDevice::new());
        let rows = run_all(&mut gpu, 3);
        for r in rows.iter().filter(|r| !r.ok) {
            eprintln!("{r:?}");
        }
        assert!(uncovered(&rows).is_empty(), "{:?}", uncovered(&rows));
        verdict(&rows).unwrap();
    }

    #[test]
    fn the_comparison_fails_on_nan_and_on_errors_beyond_tolerance() {
        assert!(compare("k", "s", &[1.0, 2.0], &[1.0, 2.0], Tol::new(0.0, 0.0)).ok);
        assert!(!compare("k", "s", &[1.0, f32::NAN], &[1.0, 2.0], Tol::new(1.0, 1.0)).ok);
        assert!(!compare("k", "s", &[1.0], &[1.0, 2.0], Tol::new(1.0, 1.0)).ok);
        let r = compare("k", "s", &[1.0, 2.001], &[1.0, 2.0], Tol::new(1e-4, 0.0));
        assert!(!r.ok && (r.max_abs - 1e-3).abs() < 1e-6, "{r:?}");
        assert!(compare("k", "s", &[1.0, 2.001], &[1.0, 2.0], Tol::new(1e-3, 0.0)).ok);
    }
}

/// The whole trainer (`dinovmf train --device cuda`: schedules, steps, k-NN embedding,
/// checkpoint) with the CUDA backend on the simulator (`DINOVMF_CUDA_SIM=1`), against the same
/// run on the CPU: per-step losses within rel 1e-4.
#[test]
fn train_device_cuda_on_the_simulator_matches_the_cpu_run() {
    train_matches(&[], &["loss"]);
}

/// The trainer with `--centering sinkhorn`: `loss` per step within rel 1e-4.
#[test]
fn train_sinkhorn_device_cuda_on_the_simulator_matches_the_cpu_run() {
    train_matches(
        &["--centering", "sinkhorn", "--sinkhorn-iters", "2"],
        &["loss"],
    );
}

/// The trainer with `--koleo 0.5` (KoLeo on the student's [CLS] features, computed by core on
/// the host from the downloaded rows): `loss` per step within rel 1e-4, with Sinkhorn as well.
#[test]
fn train_koleo_device_cuda_on_the_simulator_matches_the_cpu_run() {
    train_matches(&["--koleo", "0.5"], &["loss"]);
    train_matches(&["--koleo", "0.5", "--centering", "sinkhorn"], &["loss"]);
}

/// The same with `--method ibot --loss vmf` (iBOT-vMF): `loss`, `loss_cls` and `loss_mim` per
/// step within rel 1e-4.
#[test]
fn train_ibot_device_cuda_on_the_simulator_matches_the_cpu_run() {
    train_matches(
        &["--method", "ibot", "--loss", "vmf"],
        &["loss", "loss_cls", "loss_mim"],
    );
}

/// The whole trainer with `--precision bf16` on both backends (the CUDA step's GEMMs on the
/// simulated tensor cores; the CPU's linear layers on AMX / AVX512-BF16 / emulated bf16)
/// against the f32 CPU run: per-step losses within the bf16 chain tolerance of
/// `gpu_sim_bf16.rs`, 16 x 2^-8 relative (the tiny preset chains 16 products, each within
/// 2^-8), and not equal to the f32 losses.
#[test]
fn train_bf16_on_both_backends_is_within_the_bf16_chain_tolerance_of_f32() {
    let f32_run = train_metrics("cpu", false, &[]);
    for (device, sim) in [("cuda", true), ("cpu", false)] {
        let bf16 = train_metrics(device, sim, &["--precision", "bf16"]);
        assert_eq!(bf16.len(), f32_run.len());
        let mut differs = false;
        for (i, (a, b)) in bf16.iter().zip(&f32_run).enumerate() {
            let (a, b) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
            assert!(
                (a - b).abs() <= b.abs() / 16.0,
                "{device} bf16 step {i}: loss {a} vs f32 {b} (rel 1/16)"
            );
            differs |= a != b;
        }
        assert!(differs, "{device}: bf16 losses equal the f32 ones");
    }
}

/// `metrics.jsonl` of a 4-step tiny run on `device`.
fn train_metrics(device: &str, sim: bool, extra: &[&str]) -> Vec<serde_json::Value> {
    use std::process::Command;
    // One folder per call: tests run the same device and options concurrently.
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let out = std::env::temp_dir().join(format!(
        "dinovmf-gpu-sim-metrics-{}-{}-{device}",
        std::process::id(),
        RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&out);
    let mut c = Command::new(env!("CARGO_BIN_EXE_dinovmf"));
    c.args([
        "train",
        "--device",
        device,
        "--preset",
        "tiny",
        "-q",
        "--max-steps",
        "4",
        "--out",
    ])
    .arg(&out)
    .args(extra);
    if sim {
        c.env(dinovmf::backend::cuda::SIM_ENV, "1");
    }
    let o = c.output().expect("dinovmf starts");
    assert!(
        o.status.success(),
        "{device}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let m = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .collect();
    let _ = std::fs::remove_dir_all(&out);
    m
}

fn train_matches(extra: &[&str], keys: &[&str]) {
    let cpu = train_metrics("cpu", false, extra);
    let dev = train_metrics("cuda", true, extra);
    assert_eq!(cpu.len(), 4);
    assert_eq!(cpu.len(), dev.len());
    for &key in keys {
        let get = |v: &serde_json::Value| {
            v[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} missing from {v}"))
        };
        for (i, (a, b)) in dev.iter().zip(&cpu).enumerate() {
            let (a, b) = (get(a), get(b));
            assert!(
                (a - b).abs() <= 1e-4 * b.abs(),
                "{extra:?} step {i} {key}: cuda (sim) {a} vs cpu {b} (rel 1e-4)"
            );
        }
        assert!(
            cpu.iter().any(|v| get(v) > 0.0),
            "{extra:?}: {key} is never positive (nothing compared)"
        );
    }
}
