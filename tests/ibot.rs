//! iBOT's new parts in core: the block-mask generator's properties, the mask-token op and the
//! patch loss (L_mim) against a direct formula and central finite differences (f64), and the
//! whole model with masks and the head on every token against finite differences.
#![allow(clippy::needless_range_loop)]
use dinovmf_suite::core_math::centering::Centering;
use dinovmf_suite::core_math::logits::LogitKind;
use dinovmf_suite::core_math::loss::LossConfig;
use dinovmf_suite::core_math::masking::{
    block_mask, block_mask_with, image_mask, mask_seed, step_masks, MaskConfig, SplitMix64,
};
use dinovmf_suite::core_math::mim_loss::{
    mim_loss_forward_backward, mim_scratch_len, MimDims, MimGrads, MimInputs, MimOutput,
};
use dinovmf_suite::core_math::model::{init_params, num_params, IbotParts, Layout, ModelConfig};
use dinovmf_suite::core_math::ops::{mask_tokens_backward, mask_tokens_forward};
use dinovmf_suite::core_math::reference_model::{backward, forward_ibot};
use dinovmf_suite::core_math::vmf;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

// ------------------------------------------------------------------------------------------
// block masks

#[test]
fn block_mask_count_never_exceeds_target_and_is_mostly_reached() {
    let (gh, gw) = (8, 8);
    let mut mask = vec![false; gh * gw];
    for target in [1usize, 6, 13, 20, 32] {
        let mut sum = 0usize;
        let trials = 300;
        for s in 0..trials {
            let mut rng = SplitMix64::new(1000 + s);
            let c = block_mask(&mut mask, gh, gw, target, (0.3, 1.0 / 0.3), &mut rng);
            assert_eq!(c, mask.iter().filter(|&&m| m).count(), "returned count");
            assert!(c <= target, "target {target}: masked {c}");
            sum += c;
        }
        let mean = sum as f64 / trials as f64;
        // BEiT's generator can fall short (ten failed tries end it), but on average it gets
        // most of the way (below the minimum block area, (8 / 3)^2 = 4, it often cannot).
        assert!(
            target < 4 || mean >= 0.75 * target as f64,
            "target {target}: mean masked {mean}"
        );
    }
}

#[test]
fn block_mask_is_a_union_of_rectangles_within_the_aspect_bounds() {
    let (gh, gw) = (8, 8);
    let (lo, hi) = (0.3, 1.0 / 0.3);
    let mut mask = vec![false; gh * gw];
    let mut n_blocks = 0;
    for s in 0..200 {
        let mut rng = SplitMix64::new(s);
        let mut cover = vec![false; gh * gw];
        let c = block_mask_with(&mut mask, gh, gw, 24, (lo, hi), &mut rng, |b| {
            n_blocks += 1;
            assert!(b.h >= 1 && b.w >= 1 && b.top + b.h <= gh && b.left + b.w <= gw);
            assert!(b.h < gh && b.w < gw, "a block must fit strictly inside");
            // h = round(sqrt(A a)), w = round(sqrt(A / a)): h / w is within the bounds up to
            // the rounding of each side by 1/2.
            let (h, w) = (b.h as f64, b.w as f64);
            assert!(
                (h + 0.5) / (w - 0.5).max(0.5) >= lo && (h - 0.5) / (w + 0.5) <= hi,
                "block {b:?} outside the aspect range"
            );
            for i in b.top..b.top + b.h {
                for j in b.left..b.left + b.w {
                    cover[i * gw + j] = true;
                }
            }
        });
        assert_eq!(cover, mask, "seed {s}: mask is not the union of its blocks");
        assert!(c > 0);
    }
    assert!(n_blocks >= 200);
}

#[test]
fn image_masks_are_deterministic_and_follow_prob_and_ratio() {
    let cfg = MaskConfig::default();
    let (gh, gw) = (8, 8);
    let n = gh * gw;
    let mut a = vec![false; n];
    let mut b = vec![false; n];
    let mut masked_images = 0;
    let mut differ = 0;
    let trials = 2000;
    for s in 0..trials {
        let ca = image_mask(&mut a, gh, gw, &cfg, s);
        let cb = image_mask(&mut b, gh, gw, &cfg, s);
        assert_eq!((ca, &a), (cb, &b), "same seed, same mask");
        if ca > 0 {
            masked_images += 1;
            // ratio <= 0.5: at most round(0.5 * 64) = 32 patches.
            assert!(ca <= 32, "seed {s}: {ca} masked");
        }
        image_mask(&mut b, gh, gw, &cfg, s + 7919);
        differ += (a != b) as usize;
    }
    let frac = masked_images as f64 / trials as f64;
    assert!(
        (frac - 0.5).abs() < 0.05,
        "fraction of masked images {frac}"
    );
    assert!(
        differ > trials as usize / 3,
        "different seeds give different masks"
    );
    // prob 0: nothing masked; prob 1: every image masked.
    let never = MaskConfig { prob: 0.0, ..cfg };
    let always = MaskConfig { prob: 1.0, ..cfg };
    for s in 0..200 {
        assert_eq!(image_mask(&mut a, gh, gw, &never, s), 0);
        assert!(a.iter().all(|&m| !m));
        let c = image_mask(&mut a, gh, gw, &always, s);
        assert!(c >= 1, "seed {s}: ratio >= 0.1 of 64 must mask something");
    }
}

#[test]
fn step_masks_are_per_image_streams() {
    let cfg = MaskConfig {
        prob: 1.0,
        ..Default::default()
    };
    let (views, batch, g) = (2, 3, 4);
    let n = g * g;
    let mut out = vec![0.5f32; views * batch * n];
    let mut counts = vec![99usize; views * batch];
    let mut scratch = vec![false; n];
    step_masks(
        &mut out,
        &mut counts,
        &mut scratch,
        views,
        batch,
        g,
        g,
        &cfg,
        42,
    );
    for v in 0..views {
        for b in 0..batch {
            let i = v * batch + b;
            let mut m = vec![false; n];
            let c = image_mask(&mut m, g, g, &cfg, mask_seed(42, v, b));
            assert_eq!(c, counts[i]);
            for j in 0..n {
                assert_eq!(out[i * n + j], if m[j] { 1.0 } else { 0.0 });
            }
        }
    }
    assert_ne!(mask_seed(42, 0, 1), mask_seed(42, 1, 0));
    assert_ne!(mask_seed(42, 0, 0), mask_seed(43, 0, 0));
}

// ------------------------------------------------------------------------------------------
// mask-token op

#[test]
fn mask_token_op_matches_definition_and_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (n, d) = (6, 4);
    let x = uniform(&mut rng, n * d, -1.0, 1.0);
    let tok = uniform(&mut rng, d, -1.0, 1.0);
    let mask: Vec<f64> = (0..n).map(|i| (i % 3 == 1) as u8 as f64).collect();
    let c = uniform(&mut rng, n * d, -1.0, 1.0);
    let f = |x: &[f64], tok: &[f64]| -> f64 {
        let mut y = x.to_vec();
        mask_tokens_forward(&mut y, &mask, tok, n, d);
        y.iter().zip(&c).map(|(a, b)| a * b).sum()
    };
    let mut y = x.clone();
    mask_tokens_forward(&mut y, &mask, &tok, n, d);
    for i in 0..n {
        for k in 0..d {
            let want = if mask[i] == 1.0 { tok[k] } else { x[i * d + k] };
            assert_eq!(y[i * d + k], want);
        }
    }
    let mut dx = c.clone();
    let mut dtok = vec![0.25; d];
    mask_tokens_backward(&mut dx, &mut dtok, &mask, n, d);
    let h = 1e-6;
    for j in 0..n * d {
        let (mut a, mut b) = (x.clone(), x.clone());
        a[j] += h;
        b[j] -= h;
        let fd = (f(&a, &tok) - f(&b, &tok)) / (2.0 * h);
        assert!((fd - dx[j]).abs() < 1e-9, "dx[{j}] {} vs {fd}", dx[j]);
    }
    for k in 0..d {
        let (mut a, mut b) = (tok.clone(), tok.clone());
        a[k] += h;
        b[k] -= h;
        let fd = (f(&x, &a) - f(&x, &b)) / (2.0 * h);
        // dtoken accumulates onto its previous 0.25.
        assert!((fd + 0.25 - dtok[k]).abs() < 1e-9, "dtoken[{k}]");
    }
}

// ------------------------------------------------------------------------------------------
// patch loss

#[derive(Clone, Debug)]
struct Case {
    dims: MimDims,
    z_s: Vec<f64>,
    z_t: Vec<f64>,
    mask: Vec<f64>,
    v_s: Vec<f64>,
    g_s: Vec<f64>,
    v_t: Vec<f64>,
    g_t: Vec<f64>,
    center: Vec<f64>,
}

const DIMS: MimDims = MimDims {
    views: 2,
    batch: 3,
    n: 4,
    k: 7,
    p: 5,
};

fn case(seed: u64, centering: Centering) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let MimDims { k, p, n, .. } = DIMS;
    let rows = DIMS.rows();
    // Image 1 of view 0 is unmasked (it must count in the mean with 0); others mixed.
    let mask: Vec<f64> = (0..rows)
        .map(|r| {
            let img = r / n;
            if img == 1 {
                0.0
            } else {
                ((r * 7 + img) % 3 != 0) as u8 as f64
            }
        })
        .collect();
    Case {
        dims: DIMS,
        z_s: uniform(&mut rng, rows * p, -1.0, 1.0),
        z_t: uniform(&mut rng, rows * p, -1.0, 1.0),
        mask,
        v_s: uniform(&mut rng, k * p, -1.0, 1.0),
        g_s: uniform(&mut rng, k, 0.5, 2.0),
        v_t: uniform(&mut rng, k * p, -1.0, 1.0),
        g_t: uniform(&mut rng, k, 0.5, 2.0),
        center: match centering {
            Centering::Logit => uniform(&mut rng, k, -0.3, 0.3),
            Centering::Probability | Centering::Sinkhorn { .. } => uniform(&mut rng, k, 0.3, 1.7)
                .into_iter()
                .map(|x| x / k as f64)
                .collect(),
        },
    }
}

fn cfg(kind: LogitKind, centering: Centering, norm_last: bool) -> LossConfig {
    LossConfig {
        kind,
        centering,
        norm_last_layer: norm_last,
        teacher_temp: 0.05,
        center_momentum: 0.8,
        ..LossConfig::dino()
    }
}

struct Run {
    out: MimOutput<f64>,
    dz: Vec<f64>,
    dv: Vec<f64>,
    dg: Vec<f64>,
    center: Vec<f64>,
}

fn run(cfg: &LossConfig, c: &Case) -> Run {
    let MimDims { k, p, .. } = c.dims;
    let mut dz = vec![f64::NAN; c.dims.rows() * p];
    // dv / dg accumulate: start them away from zero and subtract afterwards.
    let mut dv = vec![0.5; k * p];
    let mut dg = vec![0.5; k];
    let mut center = c.center.clone();
    let mut scratch = vec![f64::NAN; mim_scratch_len(c.dims)];
    let out = mim_loss_forward_backward(
        cfg,
        c.dims,
        MimInputs {
            z_s: &c.z_s,
            z_t: &c.z_t,
            mask: &c.mask,
            v_s: &c.v_s,
            g_s: &c.g_s,
            v_t: &c.v_t,
            g_t: &c.g_t,
        },
        MimGrads {
            dz_s: &mut dz,
            dv_s: &mut dv,
            dg_s: &mut dg,
        },
        &mut center,
        &mut scratch,
    )
    .unwrap();
    dv.iter_mut().for_each(|x| *x -= 0.5);
    dg.iter_mut().for_each(|x| *x -= 0.5);
    Run {
        out,
        dz,
        dv,
        dg,
        center,
    }
}

fn normalize(x: &[f64]) -> Vec<f64> {
    let n = x.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
    x.iter().map(|v| v / n).collect()
}

fn log_softmax(l: &[f64]) -> Vec<f64> {
    let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = l.iter().map(|x| (x - m).exp()).sum();
    l.iter().map(|x| x - m - s.ln()).collect()
}

/// Logits of one row written from method.md: `w_k . y / tau` (+ `D_p(|g_k| / tau)` for vMF).
fn logits(cfg: &LossConfig, z: &[f64], v: &[f64], g: &[f64], tau: f64, p: usize) -> Vec<f64> {
    let y = normalize(z);
    let k = v.len() / p;
    (0..k)
        .map(|kk| {
            let mu = normalize(&v[kk * p..(kk + 1) * p]);
            let gk = if cfg.norm_last_layer { 1.0 } else { g[kk] };
            let wy: f64 = (0..p).map(|j| gk * mu[j] * y[j]).sum();
            match cfg.kind {
                LogitKind::Dino => wy / tau,
                LogitKind::Vmf => wy / tau + vmf::reference::log_norm_shifted(p, gk.abs() / tau),
            }
        })
        .collect()
}

/// L_mim and the new center, directly: per image, masked positions' CE / max(1, count), mean
/// over images and views.
fn direct(cfg: &LossConfig, c: &Case) -> (f64, Vec<f64>) {
    let MimDims {
        views,
        batch,
        n,
        k,
        p,
    } = c.dims;
    let rows = c.dims.rows();
    let mut stat = vec![0.0; k];
    let mut total = 0.0;
    for img in 0..views * batch {
        let mut sum = 0.0;
        let mut count = 0;
        for j in 0..n {
            let r = img * n + j;
            let lt = logits(
                cfg,
                &c.z_t[r * p..(r + 1) * p],
                &c.v_t,
                &c.g_t,
                cfg.teacher_temp,
                p,
            );
            let shifted: Vec<f64> = match cfg.centering {
                Centering::Logit => {
                    for kk in 0..k {
                        stat[kk] += cfg.teacher_temp * lt[kk] / rows as f64;
                    }
                    (0..k)
                        .map(|kk| lt[kk] - c.center[kk] / cfg.teacher_temp)
                        .collect()
                }
                Centering::Probability => {
                    let pt: Vec<f64> = log_softmax(&lt).iter().map(|x| x.exp()).collect();
                    for kk in 0..k {
                        stat[kk] += pt[kk] / rows as f64;
                    }
                    (0..k).map(|kk| lt[kk] - c.center[kk].ln()).collect()
                }
                Centering::Sinkhorn { .. } => {
                    unreachable!("the direct L_mim formula here is per row (Sinkhorn is checked in cpu_ibot)")
                }
            };
            let target: Vec<f64> = log_softmax(&shifted).iter().map(|x| x.exp()).collect();
            if c.mask[r] != 0.0 {
                count += 1;
                let ls = log_softmax(&logits(
                    cfg,
                    &c.z_s[r * p..(r + 1) * p],
                    &c.v_s,
                    &c.g_s,
                    cfg.student_temp,
                    p,
                ));
                sum -= (0..k).map(|kk| target[kk] * ls[kk]).sum::<f64>();
            }
        }
        total += sum / (count.max(1) as f64);
    }
    let m = cfg.center_momentum;
    let center = (0..k)
        .map(|kk| m * c.center[kk] + (1.0 - m) * stat[kk])
        .collect();
    (total / (views * batch) as f64, center)
}

const COMBOS: [(LogitKind, Centering, bool); 6] = [
    (LogitKind::Dino, Centering::Logit, true),
    (LogitKind::Dino, Centering::Probability, false),
    (LogitKind::Dino, Centering::Logit, false),
    (LogitKind::Vmf, Centering::Probability, false),
    (LogitKind::Vmf, Centering::Logit, false),
    (LogitKind::Vmf, Centering::Probability, true),
];

#[test]
fn patch_loss_matches_direct_formula_f64_rel_1e12() {
    for (i, &(kind, centering, norm_last)) in COMBOS.iter().enumerate() {
        let cf = cfg(kind, centering, norm_last);
        let c = case(10 + i as u64, centering);
        let r = run(&cf, &c);
        let (want, center) = direct(&cf, &c);
        let e = (r.out.loss - want).abs() / want.abs();
        assert!(
            e < 1e-12,
            "{kind:?} {centering:?}: loss {} vs {want}",
            r.out.loss
        );
        for kk in 0..c.dims.k {
            let e = (r.center[kk] - center[kk]).abs() / center[kk].abs().max(1e-3);
            assert!(e < 1e-12, "{kind:?} {centering:?}: center[{kk}]");
        }
        let masked = c.mask.iter().filter(|&&m| m != 0.0).count();
        assert_eq!(r.out.masked, masked);
        // Unmasked positions get no gradient; masked ones do.
        for row in 0..c.dims.rows() {
            let g = &r.dz[row * c.dims.p..(row + 1) * c.dims.p];
            if c.mask[row] == 0.0 {
                assert!(
                    g.iter().all(|&x| x == 0.0),
                    "row {row}: unmasked but dz != 0"
                );
            } else {
                assert!(g.iter().any(|&x| x != 0.0), "row {row}: masked but dz == 0");
            }
        }
        if norm_last {
            assert!(r.dg.iter().all(|&x| x == 0.0));
        }
    }
}

#[test]
fn patch_loss_gradients_match_central_differences_f64() {
    let h = 1e-6;
    for (i, &(kind, centering, norm_last)) in COMBOS.iter().enumerate() {
        let cf = cfg(kind, centering, norm_last);
        let c = case(40 + i as u64, centering);
        let r = run(&cf, &c);
        let loss = |x: &Case| run(&cf, x).out.loss;
        let fd = |set: &dyn Fn(&mut Case, f64)| {
            let mut a = c.clone();
            set(&mut a, h);
            let mut b = c.clone();
            set(&mut b, -h);
            (loss(&a) - loss(&b)) / (2.0 * h)
        };
        let mut worst = 0.0f64;
        let mut gmax = 0.0f64;
        for j in 0..c.z_s.len() {
            let d = fd(&|x: &mut Case, e| x.z_s[j] += e);
            worst = worst.max((d - r.dz[j]).abs());
            gmax = gmax.max(r.dz[j].abs());
        }
        for j in 0..c.v_s.len() {
            let d = fd(&|x: &mut Case, e| x.v_s[j] += e);
            worst = worst.max((d - r.dv[j]).abs());
            gmax = gmax.max(r.dv[j].abs());
        }
        if !norm_last {
            for j in 0..c.g_s.len() {
                let d = fd(&|x: &mut Case, e| x.g_s[j] += e);
                worst = worst.max((d - r.dg[j]).abs());
                gmax = gmax.max(r.dg[j].abs());
            }
        }
        // The teacher side carries no gradient: moving it changes the loss, but the composite
        // has no output for it, by design (stop-gradient).
        let rel = worst / gmax;
        println!("{kind:?} {centering:?} norm_last={norm_last}: FD rel {rel:e}");
        assert!(
            rel < 1e-6,
            "{kind:?} {centering:?} norm_last={norm_last}: FD rel {rel:e}"
        );
    }
}

#[test]
fn patch_loss_rejects_short_inputs() {
    let cf = cfg(LogitKind::Dino, Centering::Logit, true);
    let c = case(1, Centering::Logit);
    let mut dz = vec![0.0; c.z_s.len()];
    let mut dv = vec![0.0; c.v_s.len()];
    let mut dg = vec![0.0; c.g_s.len()];
    let mut center = c.center.clone();
    let mut scratch = vec![0.0; mim_scratch_len(c.dims)];
    let err = mim_loss_forward_backward(
        &cf,
        c.dims,
        MimInputs {
            z_s: &c.z_s,
            z_t: &c.z_t,
            mask: &c.mask[..3],
            v_s: &c.v_s,
            g_s: &c.g_s,
            v_t: &c.v_t,
            g_t: &c.g_t,
        },
        MimGrads {
            dz_s: &mut dz,
            dv_s: &mut dv,
            dg_s: &mut dg,
        },
        &mut center,
        &mut scratch,
    );
    assert_eq!(
        err.unwrap_err(),
        dinovmf_suite::core_math::loss::LossError::ShortSlice("mask")
    );
}

// ------------------------------------------------------------------------------------------
// whole model with masks

fn randn(r: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - r.gen::<f64>();
    let u2: f64 = r.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[test]
fn layout_with_ibot_parts_keeps_dino_offsets_and_adds_named_tensors() {
    let base = ModelConfig::tiny_test();
    for sep in [false, true] {
        let cfg = base.with_ibot(IbotParts {
            mask_token: true,
            separate_patch_head: sep,
        });
        let lay = Layout::new(&cfg);
        let b = Layout::new(&base);
        let d = cfg.vit.dim;
        let (k, p) = (cfg.head.out_dim, cfg.head.bottleneck);
        assert_eq!(lay.mask_token, Some(b.norm_b + d));
        assert_eq!(lay.head_start, b.head_start + d);
        let tok =
            dinovmf_suite::core_math::model::find_param(&cfg, "backbone.masked_embed").unwrap();
        assert_eq!(tok.offset, b.norm_b + d);
        assert_eq!(tok.shape(), &[1, d]);
        assert!(!tok.decay && tok.trainable && !tok.last_layer);
        let g2 = dinovmf_suite::core_math::model::find_param(&cfg, "head.last_layer2.weight_g");
        if sep {
            let g2 = g2.unwrap();
            assert_eq!(g2.offset, lay.patch_g);
            assert!(g2.last_layer);
            assert_eq!(lay.patch_v, lay.patch_g + k);
            assert_eq!(num_params(&cfg), num_params(&base) + d + k + k * p);
        } else {
            assert!(g2.is_none());
            assert_eq!((lay.patch_g, lay.patch_v), (lay.last_g, lay.last_v));
            assert_eq!(num_params(&cfg), num_params(&base) + d);
        }
        assert_eq!(lay.total, num_params(&cfg));
        // The mask token starts at zero, and the draws of every other tensor are unchanged.
        let mut a = vec![0.0f32; num_params(&base)];
        let mut r = ChaCha8Rng::seed_from_u64(3);
        init_params(&base, &mut a, &mut || randn(&mut r));
        let mut c = vec![1.0f32; num_params(&cfg)];
        let mut r = ChaCha8Rng::seed_from_u64(3);
        init_params(&cfg, &mut c, &mut || randn(&mut r));
        assert!(c[tok.range()].iter().all(|&x| x == 0.0));
        assert_eq!(&a[..b.head_start], &c[..b.head_start]);
        assert_eq!(
            &a[b.head_start..],
            &c[lay.head_start..lay.head_start + a.len() - b.head_start]
        );
    }
}

#[test]
fn whole_model_with_masks_and_all_token_head_fd_tol_1e6() {
    let cfg = ModelConfig::tiny_test().with_ibot(IbotParts {
        mask_token: true,
        separate_patch_head: false,
    });
    let mut r = ChaCha8Rng::seed_from_u64(77);
    let n = num_params(&cfg);
    let mut p32 = vec![0.0f32; n];
    init_params(&cfg, &mut p32, &mut || randn(&mut r));
    let mut params: Vec<f64> = p32
        .iter()
        .map(|&x| x as f64 + 0.05 * randn(&mut r))
        .collect();
    let lay = Layout::new(&cfg);
    let tok = lay.mask_token.unwrap();
    for x in &mut params[tok..tok + cfg.vit.dim] {
        *x = 0.3 * randn(&mut r);
    }
    let (b, img) = (2, 12);
    let np = (img / 4) * (img / 4);
    let t = np + 1;
    let images: Vec<f64> = (0..b * 3 * img * img).map(|_| randn(&mut r)).collect();
    // Image 0 has three masked patches, image 1 none.
    let mut mask = vec![0.0; b * np];
    for j in [1, 4, 5] {
        mask[j] = 1.0;
    }
    let pdim = cfg.head.bottleneck;
    let c: Vec<f64> = (0..b * t * pdim).map(|_| randn(&mut r)).collect();
    let f = |prm: &[f64]| -> f64 {
        let a = forward_ibot(&cfg, prm, &images, b, img, None, Some(&mask), true).unwrap();
        a.z.iter().zip(&c).map(|(x, y)| x * y).sum()
    };
    let acts = forward_ibot(&cfg, &params, &images, b, img, None, Some(&mask), true).unwrap();
    assert_eq!(acts.z.len(), b * t * pdim);
    let mut grads = vec![0.0; n];
    backward(&cfg, &params, &acts, &c, &mut grads).unwrap();
    // Every tensor up to the head's last MLP layer (the prototype layer belongs to the loss).
    let h = 1e-5;
    let mut worst = 0.0f64;
    let mut gmax = 0.0f64;
    let mut checked_token = false;
    for j in (0..lay.last_g).step_by(7).chain(tok..tok + cfg.vit.dim) {
        let mut a = params.clone();
        a[j] += h;
        let mut bb = params.clone();
        bb[j] -= h;
        let fd = (f(&a) - f(&bb)) / (2.0 * h);
        worst = worst.max((fd - grads[j]).abs());
        gmax = gmax.max(grads[j].abs());
        checked_token |= j >= tok && j < tok + cfg.vit.dim && grads[j] != 0.0;
    }
    assert!(checked_token, "the mask token must receive gradient");
    let rel = worst / gmax;
    assert!(rel < 1e-6, "whole model FD rel {rel:e}");
    // Unmasked images do not depend on the mask token: masking nothing makes its gradient 0.
    let none = vec![0.0; b * np];
    let acts = forward_ibot(&cfg, &params, &images, b, img, None, Some(&none), true).unwrap();
    let mut g2 = vec![0.0; n];
    backward(&cfg, &params, &acts, &c, &mut g2).unwrap();
    assert!(g2[tok..tok + cfg.vit.dim].iter().all(|&x| x == 0.0));
}
