//! The trainer with `--method ibot`: the four methods (DINO / iBOT x DINO / vMF logits) on the
//! tiny preset, iBOT resume bit-exactness, old DINO configs, and the CUDA backend's refusal.
use std::path::PathBuf;

use dinovmf::backend::{self, Device};
use dinovmf::config::{backend_config, model_config};
use dinovmf::train::{self, state, LossKind, Method, TrainConfig};
use dinovmf_core::model::find_param;

mod common;
use common::{quiet_options as opts, tiny_run as tiny};

fn tmp(name: &str) -> PathBuf {
    common::scratch_dir("ibot", name)
}

#[test]
fn four_methods_train_and_ibot_learns_its_mask_token() {
    for method in [Method::Dino, Method::Ibot] {
        for loss in [LossKind::Dino, LossKind::Vmf] {
            let what = format!("{method:?} + {loss:?}");
            let dir = tmp(&format!("run-{method:?}-{loss:?}"));
            let cfg = tiny(method, loss);
            let s = train::train(&cfg, &opts(&dir)).unwrap();
            assert!(
                s.steps > 0 && s.losses.iter().all(|l| l.is_finite()),
                "{what}"
            );
            let (st, _, saved, _) = state::load_checkpoint(&s.checkpoint).unwrap();
            assert_eq!(saved, cfg, "{what}");
            let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
            let recs: Vec<serde_json::Value> = lines
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let model = model_config(&cfg);
            let tok = find_param(&model, "backbone.masked_embed");
            match method {
                Method::Dino => {
                    assert!(tok.is_none(), "{what}: DINO has no mask token");
                    assert!(st.patch_center.is_empty());
                    assert!(recs.iter().all(|r| r.get("loss_mim").is_none()));
                }
                Method::Ibot => {
                    // The mask token starts at 0 and must have been trained.
                    let tok = tok.unwrap();
                    let norm: f32 = st.student[tok.range()].iter().map(|x| x * x).sum();
                    assert!(norm > 0.0, "{what}: mask token never moved");
                    assert_eq!(st.patch_center.len(), cfg.model.prototypes);
                    // Both losses are reported, L = L_cls + w L_mim, and some steps mask.
                    let ln_k = (cfg.model.prototypes as f64).ln();
                    let mut any_mim = false;
                    for r in &recs {
                        let (l, c, m) = (
                            r["loss"].as_f64().unwrap(),
                            r["loss_cls"].as_f64().unwrap(),
                            r["loss_mim"].as_f64().unwrap(),
                        );
                        assert!(
                            (l - (c + cfg.ibot.mim_weight * m)).abs() < 1e-4 * l.abs().max(1.0),
                            "{what}: {l} != {c} + {m}"
                        );
                        any_mim |= m > 0.0;
                        let h = r["patch_teacher_entropy"].as_f64().unwrap();
                        assert!(h > 0.0 && h < ln_k, "{what}: patch entropy {h}");
                    }
                    assert!(any_mim, "{what}: no step had a masked patch");
                }
            }
            std::fs::remove_dir_all(&dir).ok();
        }
    }
}

#[test]
fn ibot_resume_is_bit_exact() {
    for loss in [LossKind::Dino, LossKind::Vmf] {
        let mut cfg = tiny(Method::Ibot, loss);
        cfg.ibot.separate_patch_head = loss == LossKind::Vmf;
        let full = common::assert_resume_is_bit_exact(&cfg, "ibot", &format!("{loss:?}"));
        std::fs::remove_dir_all(full.checkpoint.parent().unwrap()).ok();
    }
}

#[test]
fn configs_written_before_ibot_read_back_as_dino() {
    let cfg = tiny(Method::Dino, LossKind::Vmf);
    let mut v: serde_json::Value = serde_json::to_value(&cfg).unwrap();
    let obj = v.as_object_mut().unwrap();
    assert!(obj.remove("method").is_some() && obj.remove("ibot").is_some());
    let old: TrainConfig = serde_json::from_value(v).unwrap();
    assert_eq!(
        old, cfg,
        "an old DINO config must equal today's DINO preset"
    );
    // The DINO preset is unchanged by the iBOT fields; iBOT's own preset differs where its
    // recipe does.
    let ib = tiny(Method::Ibot, LossKind::Vmf);
    assert_eq!(ib.global_scale, (0.25, 1.0));
    assert_eq!(cfg.global_scale, (0.4, 1.0));
}

#[test]
fn ibot_refusals_are_clear() {
    let cfg = tiny(Method::Ibot, LossKind::Dino);
    // The CUDA backend runs iBOT (host/tests/gpu_sim.rs); without a GPU (or CUDA in the build)
    // the error is about the device, never a refusal of the method.
    let e = format!(
        "{:#}",
        backend::open(&backend_config(&cfg), Device::Cuda)
            .err()
            .unwrap()
    );
    assert!(!e.contains("--method ibot"), "{e}");
    let mut bad = cfg.clone();
    bad.ibot.mask_ratio = (0.6, 0.2);
    let e = format!("{:#}", bad.validate().unwrap_err());
    assert!(e.contains("--mask-ratio"), "{e}");
    // A checkpoint of an iBOT run without its patch center is refused by name.
    let dir = tmp("nopc");
    let mut o = opts(&dir);
    o.max_steps = Some(1);
    let s = train::train(&cfg, &o).unwrap();
    let (mut st, step, saved, _) = state::load_checkpoint(&s.checkpoint).unwrap();
    st.patch_center.clear();
    let p = dir.join("nopc.safetensors");
    state::save_checkpoint(&p, &saved, &st, step, None).unwrap();
    let e = format!("{:#}", state::load_checkpoint(&p).unwrap_err());
    assert!(e.contains("patch_center"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
