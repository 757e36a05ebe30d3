//! Whole-model checks: parameter layout against known model sizes and DINO's rules, the
//! initialiser's statistics, and the reference forward/backward against central finite
//! differences in f64 on `tiny_test()` for a global and a local crop size.
use dinovmf_core::logits;
use dinovmf_core::model::*;
use dinovmf_core::ops::*;
use dinovmf_core::optim::{adamw_step_model, clip_gradients, AdamW};
use dinovmf_core::reference_model::{backward, forward, ShapeError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn randn(r: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - r.gen::<f64>();
    let u2: f64 = r.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn rvec(r: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| scale * randn(r)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

// ------------------------------------------------------------------------------------------
// layout

#[test]
fn layout_table_agrees_with_offsets_and_known_sizes() {
    for cfg in [
        ModelConfig::tiny_test(),
        ModelConfig::tiny_test().with_stem(2),
        ModelConfig::small32(),
        ModelConfig::small32().with_stem(1),
        ModelConfig::vit_s16(),
        ModelConfig::vit_b16(),
    ] {
        assert!(cfg.is_valid());
        let lay = Layout::new(&cfg);
        let mut next = 0;
        let mut names = std::collections::HashSet::new();
        for_each_param(&cfg, |p| {
            assert_eq!(p.offset, next, "{}: consecutive offsets", p.name);
            assert_eq!(p.numel, p.shape().iter().product::<usize>());
            assert!(names.insert(p.name.to_string()), "{} unique", p.name);
            next += p.numel;
            let name = p.name.as_str();
            let want = match name {
                "backbone.cls_token" => Some(lay.cls),
                "backbone.pos_embed" => Some(lay.pos),
                "backbone.patch_embed.proj.weight" => Some(lay.patch_w),
                "backbone.patch_embed.proj.bias" => Some(lay.patch_b),
                "backbone.norm.weight" => Some(lay.norm_w),
                "backbone.norm.bias" => Some(lay.norm_b),
                "head.last_layer.weight_g" => Some(lay.last_g),
                "head.last_layer.weight_v" => Some(lay.last_v),
                _ => None,
            };
            let want = want.or_else(|| {
                let rest = name.strip_prefix("backbone.blocks.")?;
                let (i, field) = rest.split_once('.')?;
                let o = lay.block(i.parse().ok()?);
                Some(match field {
                    "norm1.weight" => o.norm1_w,
                    "norm1.bias" => o.norm1_b,
                    "attn.qkv.weight" => o.qkv_w,
                    "attn.qkv.bias" => o.qkv_b?,
                    "attn.proj.weight" => o.proj_w,
                    "attn.proj.bias" => o.proj_b,
                    "norm2.weight" => o.norm2_w,
                    "norm2.bias" => o.norm2_b,
                    "mlp.fc1.weight" => o.fc1_w,
                    "mlp.fc1.bias" => o.fc1_b,
                    "mlp.fc2.weight" => o.fc2_w,
                    "mlp.fc2.bias" => o.fc2_b,
                    _ => return None,
                })
            });
            let want = want.or_else(|| {
                let rest = name.strip_prefix("backbone.patch_embed.stem.")?;
                let (i, field) = rest.split_once('.')?;
                let i: usize = i.parse().ok()?;
                let l = cfg.vit.stem_layer(i);
                assert_eq!(
                    p.shape(),
                    &[l.c_out, l.c_in, 3, 3][..if field == "weight" { 4 } else { 1 }]
                );
                let (w, b) = lay.stem_layer(i);
                Some(if field == "weight" { w } else { b })
            });
            let want = want.or_else(|| {
                let rest = name.strip_prefix("head.mlp.")?;
                let (i, field) = rest.split_once('.')?;
                let l = lay.head_layer(i.parse::<usize>().ok()? / 2);
                Some(if field == "weight" { l.w } else { l.b })
            });
            assert_eq!(want, Some(p.offset), "{name}: Layout offset");
        });
        assert_eq!(next, num_params(&cfg));
        assert_eq!(next, lay.total);
        assert_eq!(
            lay.head_start,
            find_param(&cfg, "head.mlp.0.weight").unwrap().offset
        );
    }
    // Published sizes: timm's vit_small_patch16_224 has 22,050,664 parameters and
    // vit_base_patch16_224 86,567,656, each including a 1000-class head (D * 1000 + 1000).
    let backbone = |c: &ModelConfig| Layout::new(c).head_start;
    assert_eq!(
        backbone(&ModelConfig::vit_s16()),
        22_050_664 - (384 * 1000 + 1000)
    );
    assert_eq!(
        backbone(&ModelConfig::vit_b16()),
        86_567_656 - (768 * 1000 + 1000)
    );
    // DINO head of ViT-S/16: 384 -> 2048 -> 2048 -> 256, then g [65536, 1] and v [65536, 256].
    let s = ModelConfig::vit_s16();
    let head = num_params(&s) - backbone(&s);
    assert_eq!(
        head,
        384 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 256 + 256 + 65536 * 257
    );
}

#[test]
fn decay_trainable_and_last_layer_flags_follow_the_spec() {
    for norm_last in [true, false] {
        let cfg = ModelConfig::tiny_test().with_norm_last_layer(norm_last);
        for_each_param(&cfg, |p| {
            let n = p.name.as_str();
            // DINO's rule (no decay on biases and norms), plus: weight_g holds one norm per
            // prototype, a 1-d parameter in method.md's sense, so it is not decayed either.
            let decay = !(n.ends_with(".bias")
                || n.contains("norm1")
                || n.contains("norm2")
                || n.starts_with("backbone.norm.")
                || n == "head.last_layer.weight_g");
            assert_eq!(p.decay, decay, "{n}: decay");
            assert_eq!(
                p.last_layer,
                n.starts_with("head.last_layer"),
                "{n}: last layer"
            );
            assert_eq!(
                p.trainable,
                !(norm_last && n == "head.last_layer.weight_g"),
                "{n}: trainable"
            );
        });
    }
    let cls = find_param(&ModelConfig::tiny_test(), "backbone.cls_token").unwrap();
    assert_eq!(cls.shape(), &[1, 1, 8]);
    let g = find_param(&ModelConfig::tiny_test(), "head.last_layer.weight_g").unwrap();
    assert_eq!(g.shape(), &[12, 1]);
    let pw = find_param(
        &ModelConfig::tiny_test(),
        "backbone.patch_embed.proj.weight",
    )
    .unwrap();
    assert_eq!(pw.shape(), &[8, 3, 4, 4]);
}

/// The stem's convolutions: He uniform U(-sqrt(6 / fan_in), +) (sd sqrt(2 / fan_in)), biases 0;
/// the 1 x 1 patch embedding after it keeps PyTorch's Conv2d default with fan_in = D.
#[test]
fn stem_init_is_he_uniform() {
    let cfg = ModelConfig::small32().with_stem(2);
    let mut r = ChaCha8Rng::seed_from_u64(22);
    let mut p = vec![f32::NAN; num_params(&cfg)];
    init_params(&cfg, &mut p, &mut || randn(&mut r));
    let mut seen = 0;
    for_each_param(&cfg, |s| {
        let x = &p[s.range()];
        let fan_in = (s.numel / s.shape[0]) as f64;
        match s.kind {
            ParamKind::StemWeight => {
                seen += 1;
                let bound = (6.0 / fan_in).sqrt();
                assert!(x.iter().all(|&v| (v as f64).abs() <= bound), "{}", s.name);
                let sd =
                    (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt();
                let want = (2.0 / fan_in).sqrt();
                assert!(
                    (sd / want - 1.0).abs() < 0.1,
                    "{}: sd {sd} vs {want}",
                    s.name
                );
            }
            ParamKind::StemBias => assert!(x.iter().all(|&v| v == 0.0), "{}", s.name),
            ParamKind::PatchWeight => {
                assert_eq!(fan_in, 96.0, "1 x 1 embedding of D channels");
                assert!(x.iter().all(|&v| (v as f64).abs() <= 1.0 / fan_in.sqrt()));
            }
            _ => {}
        }
    });
    assert_eq!(seen, 4, "patch 4: two stages of two convolutions");
}

#[test]
fn init_statistics_match_dino() {
    let cfg = ModelConfig::small32();
    let mut r = ChaCha8Rng::seed_from_u64(21);
    let mut p = vec![f32::NAN; num_params(&cfg)];
    init_params(&cfg, &mut p, &mut || randn(&mut r));
    let mut lin = Vec::new();
    for_each_param(&cfg, |s| {
        let x = &p[s.range()];
        let (mean, sd) = {
            let m = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
            let v = x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / x.len() as f64;
            (m, v.sqrt())
        };
        match s.kind {
            ParamKind::LinearWeight => lin.extend_from_slice(x),
            ParamKind::ClsToken | ParamKind::PosEmbed => {
                assert!(x.iter().all(|v| v.abs() < 0.2), "{}: std 0.02", s.name)
            }
            ParamKind::PatchWeight | ParamKind::LastLayerV => {
                let fan_in = if s.kind == ParamKind::PatchWeight {
                    48.0
                } else {
                    128.0
                };
                let bound = 1.0 / f64::sqrt(fan_in);
                assert!(
                    x.iter().all(|&v| (v as f64).abs() <= bound),
                    "{}: U(-b, b)",
                    s.name
                );
                // Var of U(-b, b) = b^2 / 3; 2% with >= 4608 samples.
                let want = bound / 3f64.sqrt();
                assert!(
                    (sd / want - 1.0).abs() < 0.05,
                    "{}: sd {sd} vs {want}",
                    s.name
                );
                assert!(mean.abs() < 0.05 * bound, "{}: mean {mean}", s.name);
            }
            ParamKind::NormWeight | ParamKind::LastLayerG => {
                assert!(x.iter().all(|&v| v == 1.0), "{}", s.name)
            }
            ParamKind::NormBias | ParamKind::LinearBias | ParamKind::MaskToken => {
                assert!(x.iter().all(|&v| v == 0.0), "{}", s.name)
            }
            ParamKind::PatchBias => {
                assert!(
                    x.iter().all(|&v| (v as f64).abs() <= 1.0 / 48f64.sqrt()),
                    "patch bias U"
                )
            }
            ParamKind::StemWeight | ParamKind::StemBias => panic!("small32 has no stem"),
        }
    });
    let n = lin.len() as f64;
    let m = lin.iter().map(|&v| v as f64).sum::<f64>() / n;
    let sd = (lin.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n).sqrt();
    assert!(
        (sd - 0.02).abs() < 0.0002,
        "linear weights sd {sd} vs 0.02 (1%)"
    );
    assert!(m.abs() < 1e-4, "linear weights mean {m}");
}

#[test]
fn optimiser_drivers_respect_groups_and_freezing() {
    let cfg = ModelConfig::tiny_test().with_norm_last_layer(true);
    let n = num_params(&cfg);
    let mut r = ChaCha8Rng::seed_from_u64(22);
    let p0 = rvec(&mut r, n, 1.0);
    // Zero gradient and zero moments: AdamW reduces to the decoupled decay p (1 - lr wd) on
    // decayed tensors and leaves the others alone, which exposes the two groups.
    let (lr, wd) = (0.01, 0.5);
    let zeros = vec![0.0; n];
    for frozen in [true, false] {
        let mut p = p0.clone();
        let (mut m, mut v) = (zeros.clone(), zeros.clone());
        let ll = if frozen { None } else { Some(1) };
        adamw_step_model(
            &cfg,
            &mut p,
            &zeros,
            &mut m,
            &mut v,
            &AdamW::default(),
            lr,
            wd,
            7,
            ll,
        );
        for_each_param(&cfg, |s| {
            let moved = s.trainable && s.decay && !(frozen && s.last_layer);
            for i in s.range() {
                let want = if moved {
                    p0[i] * (1.0 - lr * wd)
                } else {
                    p0[i]
                };
                assert!((p[i] - want).abs() < 1e-15, "{} frozen={frozen}", s.name);
            }
        });
    }
    // Per-tensor clipping: every trainable tensor ends with norm <= clip; untrainable untouched.
    let mut g = rvec(&mut r, n, 1.0);
    let g0 = g.clone();
    let total = clip_gradients(&cfg, &mut g, 0.5);
    let mut sq = 0.0;
    for_each_param(&cfg, |s| {
        let nrm = g0[s.range()].iter().map(|v| v * v).sum::<f64>().sqrt();
        let after = g[s.range()].iter().map(|v| v * v).sum::<f64>().sqrt();
        if s.trainable {
            sq += nrm * nrm;
            assert!(after <= 0.5 + 1e-9, "{} clipped", s.name);
        } else {
            assert_eq!(after, nrm, "{} untouched", s.name);
        }
    });
    assert!((total - sq.sqrt()).abs() < 1e-9 * total, "global norm");
}

// ------------------------------------------------------------------------------------------
// reference model

/// Parameters with every tensor random and O(1)-scaled activations, so that no term of the
/// gradient is hidden behind a zero bias or a unit LayerNorm weight.
fn random_params(cfg: &ModelConfig, r: &mut ChaCha8Rng) -> Vec<f64> {
    let mut p = vec![0.0; num_params(cfg)];
    for_each_param(cfg, |s| {
        let fan_in = if s.ndim >= 2 { s.numel / s.shape[0] } else { 1 };
        for x in &mut p[s.range()] {
            let z = randn(r);
            *x = match s.kind {
                ParamKind::LinearWeight | ParamKind::PatchWeight | ParamKind::StemWeight => {
                    z / (fan_in as f64).sqrt()
                }
                ParamKind::NormWeight => 1.0 + 0.3 * z,
                ParamKind::LastLayerG => 1.0 + 0.3 * z.abs(),
                ParamKind::ClsToken | ParamKind::PosEmbed | ParamKind::LastLayerV => z,
                _ => 0.2 * z,
            };
        }
    });
    p
}

struct Case {
    cfg: ModelConfig,
    images: Vec<f64>,
    b: usize,
    img: usize,
    masks: Option<Vec<f64>>,
    /// Random weights on the logits: the loss is the linear functional <R, logits>.
    r_logits: Vec<f64>,
}

/// `w = r mu` through core's one weight norm (`logits::weight_norm_forward`), with `mu`, `r`
/// and `||v||` for the backward.
fn weight_norm_w(
    v: &[f64],
    g: &[f64],
    k: usize,
    p: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut mu, mut rad, mut nv) = (vec![0.0; k * p], vec![0.0; k], vec![0.0; k]);
    logits::weight_norm_forward(&mut mu, &mut rad, &mut nv, v, Some(g), k, p);
    let w = (0..k * p).map(|i| rad[i / p] * mu[i]).collect();
    (w, mu, rad, nv)
}

impl Case {
    /// Loss through backbone, head MLP, L2 norm, weight-normalised prototypes.
    fn loss(&self, params: &[f64]) -> f64 {
        let c = &self.cfg;
        let (p, k, b) = (c.head.bottleneck, c.head.out_dim, self.b);
        let lay = Layout::new(c);
        let acts = forward(c, params, &self.images, b, self.img, self.masks.as_deref()).unwrap();
        let (mut y, mut nz) = (vec![0.0; b * p], vec![0.0; b]);
        l2norm_forward(&mut y, &mut nz, &acts.z, b, p, L2NORM_EPS);
        let (w, ..) = weight_norm_w(
            &params[lay.last_v..lay.last_v + k * p],
            &params[lay.last_g..lay.last_g + k],
            k,
            p,
        );
        let mut logits = vec![0.0; b * k];
        linear_forward(&mut logits, &y, &w, None, b, p, k);
        dot(&logits, &self.r_logits)
    }

    fn grad(&self, params: &[f64]) -> Vec<f64> {
        let c = &self.cfg;
        let (p, k, b) = (c.head.bottleneck, c.head.out_dim, self.b);
        let lay = Layout::new(c);
        let acts = forward(c, params, &self.images, b, self.img, self.masks.as_deref()).unwrap();
        let (mut y, mut nz) = (vec![0.0; b * p], vec![0.0; b]);
        l2norm_forward(&mut y, &mut nz, &acts.z, b, p, L2NORM_EPS);
        let (v, g) = (
            &params[lay.last_v..lay.last_v + k * p],
            &params[lay.last_g..lay.last_g + k],
        );
        let (w, mu, rad, nv) = weight_norm_w(v, g, k, p);
        let mut grads = vec![0.0; params.len()];
        let mut dy = vec![0.0; b * p];
        let mut dw = vec![0.0; k * p];
        linear_backward(
            Some(&mut dy),
            &mut dw,
            None,
            &self.r_logits,
            &y,
            &w,
            b,
            p,
            k,
        );
        // w = r mu: dmu = r dw, dr = <dw, mu>.
        let dmu: Vec<f64> = (0..k * p).map(|i| rad[i / p] * dw[i]).collect();
        let dr: Vec<f64> = (0..k)
            .map(|i| dot(&dw[i * p..(i + 1) * p], &mu[i * p..(i + 1) * p]))
            .collect();
        let (lo, hi) = grads.split_at_mut(lay.last_v);
        logits::weight_norm_backward(
            &mut hi[..k * p],
            Some(&mut lo[lay.last_g..lay.last_g + k]),
            &dmu,
            &dr,
            &mu,
            &nv,
            k,
            p,
        );
        let mut dz = vec![0.0; b * p];
        l2norm_backward(&mut dz, &dy, &y, &nz, b, p, L2NORM_EPS);
        backward(c, params, &acts, &dz, &mut grads).unwrap();
        grads
    }
}

fn make_case(seed: u64, img: usize, b: usize, with_masks: bool) -> (Case, Vec<f64>) {
    make_case_for(ModelConfig::tiny_test(), seed, img, b, with_masks)
}

fn make_case_for(
    cfg: ModelConfig,
    seed: u64,
    img: usize,
    b: usize,
    with_masks: bool,
) -> (Case, Vec<f64>) {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let params = random_params(&cfg, &mut r);
    let images = rvec(&mut r, b * cfg.vit.in_chans * img * img, 1.0);
    let masks = with_masks.then(|| {
        // [depth, 2, B]; block 0 has rate 0 (never drops), later blocks drop some samples.
        let mut m = vec![1.0; cfg.vit.depth * 2 * b];
        for (i, x) in m.iter_mut().enumerate().skip(2 * b) {
            *x = if (i + seed as usize) % 3 == 1 {
                0.0
            } else {
                1.0
            };
        }
        m
    });
    let r_logits = rvec(&mut r, b * cfg.head.out_dim, 1.0);
    (
        Case {
            cfg,
            images,
            b,
            img,
            masks,
            r_logits,
        },
        params,
    )
}

const H: f64 = 1e-5;

/// Every entry of every tensor by central differences, plus one random direction per tensor.
/// Tolerance: per tensor, max |analytic - numeric| <= 1e-6 * max(max |numeric| in the
/// tensor, 1e-3 * max |numeric| overall).
fn check_case(case: &Case, params: &[f64], tag: &str) {
    let grad = case.grad(params);
    let mut pp = params.to_vec();
    let mut num = vec![0.0; params.len()];
    for i in 0..params.len() {
        let x0 = pp[i];
        pp[i] = x0 + H;
        let lp = case.loss(&pp);
        pp[i] = x0 - H;
        let lm = case.loss(&pp);
        pp[i] = x0;
        num[i] = (lp - lm) / (2.0 * H);
    }
    let global = num.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut worst = 0.0f64;
    let mut r = ChaCha8Rng::seed_from_u64(99);
    let mut worst_dir = 0.0f64;
    for_each_param(&case.cfg, |s| {
        let rg = s.range();
        let scale = num[rg.clone()]
            .iter()
            .fold(0.0f64, |m, v| m.max(v.abs()))
            .max(1e-3 * global);
        let err = grad[rg.clone()]
            .iter()
            .zip(&num[rg.clone()])
            .fold(0.0f64, |m, (a, n)| m.max((a - n).abs()));
        worst = worst.max(err / scale);
        assert!(
            err <= 1e-6 * scale,
            "{tag} {}: entrywise FD err {err:e} vs scale {scale:e} (tol 1e-6 rel)",
            s.name
        );
        // Random direction restricted to this tensor.
        let dir = rvec(&mut r, s.numel, 1.0);
        let mut pp = params.to_vec();
        for (x, dv) in pp[rg.clone()].iter_mut().zip(&dir) {
            *x += H * dv;
        }
        let lp = case.loss(&pp);
        for (x, dv) in pp[rg.clone()].iter_mut().zip(&dir) {
            *x -= 2.0 * H * dv;
        }
        let lm = case.loss(&pp);
        let fd = (lp - lm) / (2.0 * H);
        let an = dot(&grad[rg.clone()], &dir);
        // Relative to Σ |g_i d_i|: the size of the terms the dot product adds up.
        let terms: f64 = grad[rg.clone()]
            .iter()
            .zip(&dir)
            .map(|(g, d)| (g * d).abs())
            .sum();
        let e = (fd - an).abs() / terms.max(1e-3 * global);
        worst_dir = worst_dir.max(e);
        assert!(
            e < 1e-6,
            "{tag} {}: directional FD {fd:e} vs {an:e} (tol 1e-6 rel)",
            s.name
        );
        // No tensor may be silently disconnected.
        assert!(
            num[s.range()].iter().any(|v| v.abs() > 0.0),
            "{tag} {}: zero gradient",
            s.name
        );
    });
    eprintln!("{tag}: worst entrywise rel err {worst:.1e}, worst directional {worst_dir:.1e}");
}

#[test]
fn whole_model_gradient_global_crop_fd_tol_1e6() {
    // 12 px on tiny_test is the base grid (3 x 3, T = 10).
    let (case, params) = make_case(31, 12, 2, true);
    check_case(&case, &params, "global 12px, drop path");
}

#[test]
fn whole_model_gradient_local_crops_fd_tol_1e6() {
    // 8 px: 2 x 2 grid (T = 5), the position embedding bilinearly downsampled; 16 px: 4 x 4
    // (T = 17), upsampled. No drop path on the second (the teacher's path).
    let (case, params) = make_case(32, 8, 3, true);
    check_case(&case, &params, "local 8px, drop path");
    let (case, params) = make_case(33, 16, 1, false);
    check_case(&case, &params, "16px, no drop path");
}

#[test]
fn whole_model_gradient_conv_stem_fd_tol_1e6() {
    // tiny_test's patch 4 as two stride-2 stages of two convolutions each (4 and 8 channels):
    // 12 px -> 6 -> 6 -> 3 -> 3 (the base grid), and an 8 px local crop down to 2 x 2.
    let cfg = ModelConfig::tiny_test().with_stem(2);
    assert_eq!(cfg.vit.stem_len(), 4);
    let (case, params) = make_case_for(cfg, 34, 12, 2, true);
    check_case(&case, &params, "conv stem 12px, drop path");
    let (case, params) = make_case_for(ModelConfig::tiny_test().with_stem(1), 35, 8, 2, false);
    check_case(&case, &params, "conv stem 8px");
}

#[test]
fn f32_forward_matches_f64_tol_1e5() {
    let cfg = ModelConfig::small32();
    let mut r = ChaCha8Rng::seed_from_u64(41);
    let mut p32 = vec![0.0f32; num_params(&cfg)];
    init_params(&cfg, &mut p32, &mut || randn(&mut r));
    let p64: Vec<f64> = p32.iter().map(|&v| v as f64).collect();
    for img in [32, 16] {
        let b = 2;
        let im32: Vec<f32> = (0..b * 3 * img * img)
            .map(|_| randn(&mut r) as f32)
            .collect();
        let im64: Vec<f64> = im32.iter().map(|&v| v as f64).collect();
        let a32 = forward(&cfg, &p32, &im32, b, img, None).unwrap();
        let a64 = forward(&cfg, &p64, &im64, b, img, None).unwrap();
        for (what, x, y) in [("z", &a32.z, &a64.z), ("cls", &a32.cls, &a64.cls)] {
            let scale = y.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let err = x
                .iter()
                .zip(y.iter())
                .fold(0.0f64, |m, (a, c)| m.max((*a as f64 - c).abs()));
            eprintln!(
                "small32 {img}px {what}: f32 vs f64 rel err {:.1e}",
                err / scale
            );
            assert!(
                err < 1e-5 * scale,
                "small32 {img}px {what}: f32 vs f64 rel err {:e} >= 1e-5",
                err / scale
            );
        }
        let att = a32.last_cls_attention(cfg.vit.heads);
        let t = a32.tokens;
        assert_eq!(att.len(), b * cfg.vit.heads * t);
        for row in att.chunks(t) {
            let s: f32 = row.iter().sum();
            assert!(
                (s - 1.0).abs() < 1e-5,
                "[CLS] attention rows are distributions"
            );
        }
    }
}

#[test]
fn forward_rejects_bad_shapes() {
    let cfg = ModelConfig::tiny_test();
    let p = vec![0.0f64; num_params(&cfg)];
    let im = vec![0.0f64; 3 * 12 * 12];
    assert_eq!(
        forward(&cfg, &p, &im, 1, 10, None).err(),
        Some(ShapeError::ImageSize)
    );
    assert_eq!(
        forward(&cfg, &p[1..], &im, 1, 12, None).err(),
        Some(ShapeError::Length("params"))
    );
    assert_eq!(
        forward(&cfg, &p, &im, 2, 12, None).err(),
        Some(ShapeError::Length("images"))
    );
    let mut bad = cfg;
    bad.vit.heads = 3;
    assert_eq!(
        forward(&bad, &p, &im, 1, 12, None).err(),
        Some(ShapeError::Config)
    );
}
