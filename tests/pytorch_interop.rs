//! Our forward pass against the official DINO code in PyTorch, both ways, from the fixtures
//! `scripts/pytorch_fixture.py` writes (tests/fixtures/pytorch_{tiny,small32}.safetensors; see
//! the script's header for how to regenerate them; CI needs no PyTorch).
//!
//! - ours: weights under our names, exported with `export_timm`; the export's keys and shapes
//!   must be exactly the official `VisionTransformer`'s / `DINOHead`'s / timm's `state_dict()`
//!   (what `load_state_dict(strict=True)` demands), and PyTorch's outputs on them must match ours;
//! - theirs: weights under the official modules' keys (DINO's teacher layout `backbone.*` +
//!   `head.*`, and a bare timm backbone), through `import_state_dict`, then our forward.
//!
//! Both sides compute in f32 (different summation orders). Tolerance, measured differences far
//! below it (the test prints them): |ours - torch| <= 2e-5 (1 + |torch|) for [CLS] features,
//! attention probabilities and DINOHead logits; the same for the vMF logits against scipy's exact
//! `ive` in f64 (our f32 log C_p carries the relative error of core's Bessel approximation).
use dinovmf::backend::Net;
use dinovmf::interop::synthetic_weights::{images, tensor};
use dinovmf::interop::{
    export_timm, import_state_dict, read_state_dict, StateDict, TimmExportOptions,
};
use dinovmf::train::{state, LossKind, TrainConfig};
use dinovmf_core::logits::{branch_terms_forward, weight_norm_forward, LogitKind};
use dinovmf_core::model::{for_each_param, num_params, Layout, ModelConfig};
use dinovmf_core::reference_model;
use dinovmf_core::vmf::{log_norm_const, BesselApprox};
use std::path::Path;

const TOL: f64 = 2e-5;

struct Fixture {
    sd: StateDict,
    cfg: TrainConfig,
    model: ModelConfig,
    batch: usize,
    tau: f32,
}

fn keys(f: &Fixture, which: &str) -> Vec<(String, Vec<usize>)> {
    serde_json::from_str(&f.sd.metadata[which]).unwrap()
}

fn fixture(preset: &str) -> Fixture {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("pytorch_{preset}.safetensors"));
    let sd = read_state_dict(&path).unwrap();
    let mut cfg = TrainConfig::preset(preset, LossKind::Vmf).unwrap();
    if preset == "small32" {
        // The fixture holds small32's network as it was when it was written, with patch 4 and
        // DINO's patch embedding (the preset now uses patch 8 and a convolutional stem, which
        // DINO's ViT lacks); what it checks is the weight layout of every tensor kind.
        cfg.model.patch = 4;
        cfg.model.stem_convs = 0;
    }
    let shape: serde_json::Value = serde_json::from_str(&sd.metadata["shape"]).unwrap();
    let m = &cfg.model;
    for (k, ours) in [
        ("img_size", m.img_size),
        ("patch", m.patch),
        ("dim", m.dim),
        ("depth", m.depth),
        ("heads", m.heads),
        ("mlp_ratio", m.mlp_ratio),
        ("hidden", m.head_hidden),
        ("bottleneck", m.bottleneck),
        ("prototypes", m.prototypes),
    ] {
        assert_eq!(
            shape[k].as_u64(),
            Some(ours as u64),
            "fixture {preset}: {k}"
        );
    }
    Fixture {
        batch: sd.metadata["batch"].parse().unwrap(),
        tau: sd.metadata["tau"].parse().unwrap(),
        model: dinovmf::config::model_config(&cfg),
        cfg,
        sd,
    }
}

/// Largest |a - b| and |a - b| / |b| (over |b| > 1e-3), failing past `TOL (1 + |b|)`.
fn compare(what: &str, ours: &[f32], torch: &[f32]) -> (f64, f64) {
    assert_eq!(ours.len(), torch.len(), "{what}: lengths");
    let (mut abs, mut rel) = (0.0f64, 0.0f64);
    for (i, (&a, &b)) in ours.iter().zip(torch).enumerate() {
        let (a, b) = (a as f64, b as f64);
        let d = (a - b).abs();
        assert!(
            d <= TOL * (1.0 + b.abs()),
            "{what}[{i}]: ours {a} torch {b} (|diff| {d:e})"
        );
        abs = abs.max(d);
        if b.abs() > 1e-3 {
            rel = rel.max(d / b.abs());
        }
    }
    eprintln!(
        "{what}: max abs {abs:.3e}, max rel {rel:.3e} ({} values)",
        ours.len()
    );
    (abs, rel)
}

/// Our outputs for `params`: [CLS] (CPU backend, the evaluation path), the last block's full
/// attention (core's reference model), DINOHead logits and vMF logits (core's logit stages).
fn our_outputs(f: &Fixture, params: &[f32]) -> [Vec<f32>; 4] {
    let (mc, b) = (&f.model, f.batch);
    let size = mc.vit.img_size;
    let x = images(b, size);
    let act = reference_model::forward(mc, params, &x, b, size, None).unwrap();
    let mut st = state::init_state(&f.cfg);
    st.teacher = params.to_vec();
    st.student = params.to_vec();
    let mut be = dinovmf::backend::open(
        &dinovmf::config::backend_config(&f.cfg),
        dinovmf::backend::Device::Cpu,
    )
    .unwrap();
    be.set_state(&st).unwrap();
    let cls = be.embed(Net::Teacher, &x, b, size).unwrap();
    compare("  CPU backend vs reference [CLS]", &cls, &act.cls);
    let attn = act.blocks.last().unwrap().att.clone();
    let cls_att = be.cls_attention(Net::Teacher, &x, b, size).unwrap();
    compare(
        "  CPU backend vs reference [CLS] attention",
        &cls_att,
        &act.last_cls_attention(mc.vit.heads),
    );

    let (k, p) = (mc.head.out_dim, mc.head.bottleneck);
    let lay = Layout::new(mc);
    let v = &params[lay.last_v..lay.last_v + k * p];
    let g = &params[lay.last_g..lay.last_g + k];
    let (mut mu, mut r, mut vn) = (vec![0.0f32; k * p], vec![0.0f32; k], vec![0.0f32; k]);
    weight_norm_forward(&mut mu, &mut r, &mut vn, v, Some(g), k, p);
    let terms = |tau: f32, kind| {
        let (mut s, mut bias, mut db) = (vec![0.0f32; k], vec![0.0f32; k], vec![0.0f32; k]);
        branch_terms_forward(
            &mut s,
            &mut bias,
            &mut db,
            &r,
            tau,
            p,
            kind,
            BesselApprox::default(),
        );
        (s, bias)
    };
    let (dino_scale, _) = terms(1.0, LogitKind::Dino);
    let (vmf_scale, vmf_bias) = terms(f.tau, LogitKind::Vmf);
    let c_p = log_norm_const(p);
    let (mut dino, mut vmf) = (Vec::new(), Vec::new());
    for i in 0..b {
        let z = &act.z[i * p..(i + 1) * p];
        let n = z.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt() as f32;
        let y: Vec<f32> = z.iter().map(|&a| a / n).collect();
        for j in 0..k {
            let dot: f32 = mu[j * p..(j + 1) * p]
                .iter()
                .zip(&y)
                .map(|(a, b)| a * b)
                .sum();
            dino.push(dino_scale[j] * dot);
            // kappa mu.y + log C_p(kappa) = scale dot + D_p(kappa) + c_p.
            vmf.push((vmf_scale[j] * dot + vmf_bias[j]) + c_p as f32);
        }
    }
    [cls, attn, dino, vmf]
}

fn check_outputs(f: &Fixture, direction: &str, params: &[f32]) {
    let ours = our_outputs(f, params);
    for (name, o) in ["cls", "attn", "dino_logits", "vmf_logits"]
        .iter()
        .zip(&ours)
    {
        let t = &f.sd.tensors[&format!("{direction}.{name}")];
        compare(&format!("{direction}.{name}"), o, &t.data);
    }
}

/// Weights keyed by our own names, as `dinovmf train` would hold them.
fn our_params(mc: &ModelConfig) -> Vec<f32> {
    let mut params = vec![0.0f32; num_params(mc)];
    for_each_param(mc, |p| {
        params[p.range()].copy_from_slice(&tensor(&p.name, p.shape()));
    });
    params
}

fn ours_in_pytorch(preset: &str) {
    let f = fixture(preset);
    let params = our_params(&f.model);
    let e = export_timm(&f.model, &params, TimmExportOptions::timm()).unwrap();
    // strict=True: exactly the official modules' keys and shapes (and timm's, for the backbone).
    for (which, sd) in [
        ("backbone_keys", &e.backbone),
        ("timm_keys", &e.backbone),
        ("head_keys", &e.head),
    ] {
        let mut want = keys(&f, which);
        want.sort();
        let got: Vec<(String, Vec<usize>)> = sd
            .tensors
            .values()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        assert_eq!(got, want, "{preset}: export vs PyTorch's {which}");
    }
    // What PyTorch loaded under key K is what we hold under our name for K.
    for (k, t) in &e.backbone.tensors {
        assert_eq!(t.data, tensor(&format!("backbone.{k}"), &t.shape), "{k}");
    }
    check_outputs(&f, "ours", &params);
}

fn theirs_in_ours(preset: &str) {
    let f = fixture(preset);
    let mut teacher = StateDict::default();
    let mut bare = StateDict::default();
    for (k, shape) in keys(&f, "backbone_keys") {
        teacher.insert(&format!("backbone.{k}"), &shape, tensor(&k, &shape));
        bare.insert(&k, &shape, tensor(&k, &shape));
    }
    for (k, shape) in keys(&f, "head_keys") {
        teacher.insert(&format!("head.{k}"), &shape, tensor(&k, &shape));
    }
    let poison = vec![f32::NAN; num_params(&f.model)];
    let imp = import_state_dict(&teacher, &f.model, &poison).unwrap();
    assert!(imp.head_imported && imp.notes.is_empty(), "{:?}", imp.notes);
    assert!(imp.params.iter().all(|x| x.is_finite()), "every tensor set");
    // timm's backbone-only file maps onto the same backbone.
    let only = import_state_dict(&bare, &f.model, &poison).unwrap();
    let head = Layout::new(&f.model).head_start;
    assert_eq!(only.params[..head], imp.params[..head]);
    check_outputs(&f, "theirs", &imp.params);
}

#[test]
fn tiny_our_weights_in_official_dino() {
    ours_in_pytorch("tiny");
}

#[test]
fn tiny_official_dino_weights_in_ours() {
    theirs_in_ours("tiny");
}

#[test]
fn small32_our_weights_in_official_dino() {
    ours_in_pytorch("small32");
}

#[test]
fn small32_official_dino_weights_in_ours() {
    theirs_in_ours("small32");
}
