//! A build without the `cuda` feature: `--device cuda` and `verify-kernels` say so clearly.
#![cfg(not(feature = "cuda"))]
use std::process::Command;

#[test]
fn cuda_requests_explain_the_missing_feature() {
    let cfg = dinovmf::train::TrainConfig::preset("tiny", dinovmf::train::LossKind::Vmf).unwrap();
    let err = dinovmf::backend::cuda::open(&dinovmf::config::backend_config(&cfg))
        .err()
        .expect("no CUDA backend in this build");
    assert!(
        format!("{err}").contains("built without CUDA support"),
        "{err}"
    );
    let dir = std::env::temp_dir().join(format!("dinovmf-no-cuda-{}", std::process::id()));
    let dir = dir.to_string_lossy().into_owned();
    for args in [
        &["verify-kernels"][..],
        &[
            "train",
            "--device",
            "cuda",
            "--preset",
            "tiny",
            "--no-eval",
            "-q",
            "--out",
            &dir,
        ][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_dinovmf"))
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(
            text.contains("built without CUDA support"),
            "{args:?}: {text}"
        );
        assert!(!text.contains("panicked"), "{args:?}: {text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
