//! End-to-end trainer tests on the tiny preset: a few steps, resume bit-exactness, divergence
//! handling, checkpoint errors. Every run here takes seconds.
use std::path::PathBuf;

use dinovmf::train::{self, state, LossKind, Method, TrainConfig};

mod common;
use common::quiet_options as opts;

fn tmp(name: &str) -> PathBuf {
    common::scratch_dir("train", name)
}

fn tiny(loss: LossKind) -> TrainConfig {
    common::tiny_run(Method::Dino, loss)
}

#[test]
fn tiny_runs_write_a_finite_history_checkpoint_and_metrics_for_both_losses() {
    for loss in [LossKind::Dino, LossKind::Vmf] {
        let dir = tmp(&format!("run-{loss:?}"));
        let cfg = tiny(loss);
        let s = train::train(&cfg, &opts(&dir)).unwrap();
        assert!(s.steps > 0 && s.losses.len() as u64 == s.steps);
        assert!(
            s.losses.iter().all(|l| l.is_finite()),
            "{loss:?}: {:?}",
            s.losses
        );
        // The checkpoint and metrics exist and reload into the same configuration.
        let (_, step, saved, _) = state::load_checkpoint(&s.checkpoint).unwrap();
        assert_eq!(step, s.steps);
        assert_eq!(saved, cfg);
        let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count() as u64, s.steps);
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn resume_is_bit_exact() {
    for loss in [LossKind::Dino, LossKind::Vmf] {
        let full = common::assert_resume_is_bit_exact(&tiny(loss), "train", &format!("{loss:?}"));
        std::fs::remove_dir_all(full.checkpoint.parent().unwrap()).ok();
    }
}

#[test]
fn divergence_stops_with_a_clear_error_and_keeps_the_last_checkpoint() {
    let dir = tmp("diverge");
    let cfg = tiny(LossKind::Vmf);
    let first = train::train(&cfg, &opts(&dir)).unwrap();
    let before = std::fs::read(&first.checkpoint).unwrap();
    // Absurd learning rate in a second run into the same folder: it must blow up and say so.
    let mut bad = cfg.clone();
    bad.lr = 1e30;
    bad.clip_grad = 0.0;
    bad.warmup_epochs = 0;
    let mut o = opts(&dir);
    o.existing = train::ExistingRun::Overwrite;
    let err = train::train(&bad, &o).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("loss became"), "{msg}");
    assert_eq!(
        std::fs::read(&first.checkpoint).unwrap(),
        before,
        "checkpoint was overwritten"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_configs_and_checkpoints_are_clear_errors() {
    let mut c = tiny(LossKind::Dino);
    c.model.heads = 3; // dim 16 is not divisible by 3
    assert!(format!("{:#}", c.validate().unwrap_err()).contains("divisible"));
    assert!(TrainConfig::preset("nope", LossKind::Dino).is_err());
    let dir = tmp("badckpt");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("x.safetensors");
    std::fs::write(&p, b"not a checkpoint").unwrap();
    let e = format!("{:#}", state::load_checkpoint(&p).unwrap_err());
    assert!(e.contains("x.safetensors"), "{e}");
    let mut o = opts(&dir);
    o.resume = Some(p);
    assert!(train::train(&tiny(LossKind::Dino), &o).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

/// The convolutional stem (`--stem-convs`): a tiny run trains to finite losses, its
/// checkpoint holds the stem's tensors and reloads, resume is bit-exact, and `export` refuses
/// it (the edge format and timm have no stem) without writing a file.
#[test]
fn a_conv_stem_run_trains_resumes_bit_exactly_and_is_refused_by_export() {
    let mut cfg = tiny(LossKind::Vmf);
    cfg.model.stem_convs = 2;
    train::validate::validate_config(&cfg).unwrap();
    let full = common::assert_resume_is_bit_exact(&cfg, "train", "stem");
    let full_dir = full.checkpoint.parent().unwrap().to_path_buf();
    assert!(
        full.losses.iter().all(|l| l.is_finite()),
        "{:?}",
        full.losses
    );
    let (st, _, saved, _) = state::load_checkpoint(&full.checkpoint).unwrap();
    assert_eq!(saved.model.stem_convs, 2);
    let mc = dinovmf::config::model_config(&saved);
    let stem = dinovmf_core::model::find_param(&mc, "backbone.patch_embed.stem.0.weight")
        .expect("the stem's first convolution is in the layout");
    assert!(st.teacher[stem.range()].iter().all(|v| v.is_finite()));

    for format in [["--int8"], ["--f32"]] {
        let out = full_dir.join("model.bin");
        let ck = full.checkpoint.to_str().unwrap().to_string();
        let o = out.to_str().unwrap().to_string();
        let mut args = vec!["dinovmf", "export", &ck, "-o", &o];
        args.extend(format);
        let e = dinovmf::cli::run_args(args).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("--stem-convs 2") && e.contains("cannot be exported"),
            "{e}"
        );
        assert!(!out.exists(), "a refused export wrote {}", out.display());
    }
    std::fs::remove_dir_all(&full_dir).ok();
}
