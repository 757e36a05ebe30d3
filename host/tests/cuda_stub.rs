//! The `--features cuda` binary on a machine without a GPU (CI, with the link stub of
//! `scripts/cuda-stub.sh` on LD_LIBRARY_PATH): `--device cuda` and `verify-kernels` must fail
//! with a clear message, never a panic. Runs only where `DINOVMF_CUDA_STUB=1` says that the
//! stub, not a real driver, is what the binary loads.
#![cfg(feature = "cuda")]
use std::process::Command;

fn stub() -> bool {
    std::env::var("DINOVMF_CUDA_STUB").is_ok_and(|v| v == "1")
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dinovmf"))
        .args(args)
        .output()
        .expect("the dinovmf binary starts (is libcuda.so.1 on LD_LIBRARY_PATH?)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn cuda_without_a_device_is_a_clear_error() {
    if !stub() {
        eprintln!("skipped: set DINOVMF_CUDA_STUB=1 with the stub on LD_LIBRARY_PATH");
        return;
    }
    let dir = std::env::temp_dir().join(format!("dinovmf-cuda-stub-{}", std::process::id()));
    let dir = dir.to_string_lossy().into_owned();
    for args in [
        &[
            "train", "--device", "cuda", "--preset", "tiny", "--out", &dir,
        ][..],
        &["verify-kernels"][..],
        &["verify-kernels", "--compare-cpu"][..],
    ] {
        let (ok, text) = run(args);
        assert!(!ok, "{args:?} must fail without a GPU:\n{text}");
        assert!(
            text.contains("no usable CUDA device") && text.contains("CUDA error 100"),
            "{args:?}: unclear message:\n{text}"
        );
        assert!(!text.contains("panicked"), "{args:?} panicked:\n{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_simulator_runs_in_the_cuda_build() {
    if !stub() {
        return;
    }
    let (ok, text) = run(&["verify-kernels", "--sim", "--compare-cpu", "--steps", "2"]);
    assert!(ok, "verify-kernels --sim --compare-cpu failed:\n{text}");
    assert!(
        text.contains("compare-cpu") && text.contains("grads (step 1)"),
        "{text}"
    );
    // The iBOT step too (what scripts/gpu-check.sh runs on a GPU).
    let (ok, text) = run(&[
        "verify-kernels",
        "--sim",
        "--compare-cpu",
        "--skip-kernels",
        "--method",
        "ibot",
        "--loss",
        "vmf",
        "--steps",
        "2",
    ]);
    assert!(
        ok,
        "verify-kernels --compare-cpu --method ibot failed:\n{text}"
    );
    assert!(
        text.contains("method Ibot") && text.contains("patch_center"),
        "{text}"
    );
}
