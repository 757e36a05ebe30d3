//! The one validation of a run configuration: every numeric option on the command line and every
//! configuration read back from a checkpoint goes through [`validate_config`]. Errors name the
//! option (and its field in the saved config) and the allowed range. Also: the memory a
//! configuration needs, checked before anything large is allocated, and the difference between
//! two configurations (for a resume with other options).
use anyhow::{bail, Result};
use dinovmf_core::model::{num_params, MAX_STEM_CONVS};

use super::config::{DataSpec, Method, TrainConfig};

/// Largest side of an image the model may be built for.
pub const MAX_IMG_SIZE: usize = 4096;
/// Largest width of any layer (dim, head hidden, bottleneck).
pub const MAX_WIDTH: usize = 1 << 16;
/// Most prototypes K.
pub const MAX_PROTOTYPES: usize = 1 << 20;
/// Most transformer blocks.
pub const MAX_DEPTH: usize = 256;
/// Largest batch.
pub const MAX_BATCH: usize = 1 << 16;
/// Most local crops.
pub const MAX_LOCAL_CROPS: usize = 64;
/// Most epochs.
pub const MAX_EPOCHS: u64 = 1_000_000;
/// The most memory one allocation plan may ask for (bytes): larger settings are refused with
/// the number before anything is allocated.
pub const MAX_ALLOC_BYTES: u64 = 64 << 30;

/// An option's name on the command line and its field in the saved config.
struct Opt {
    flag: &'static str,
    field: &'static str,
}

const fn opt(flag: &'static str, field: &'static str) -> Opt {
    Opt { flag, field }
}

impl Opt {
    fn err(&self, range: &str, got: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!(
            "{} (config field `{}`) must be {range}, got {got}",
            self.flag,
            self.field
        )
    }

    fn finite_in(&self, v: f64, lo: f64, hi: f64, lo_open: bool, hi_open: bool) -> Result<()> {
        let above = if lo_open { v > lo } else { v >= lo };
        let below = if hi_open { v < hi } else { v <= hi };
        if v.is_finite() && above && below {
            return Ok(());
        }
        let range = format!(
            "in {}{lo}, {hi}{}",
            if lo_open { "(" } else { "[" },
            if hi_open { ")" } else { "]" }
        );
        Err(self.err(&range, v))
    }

    fn positive(&self, v: f64) -> Result<()> {
        if v.is_finite() && v > 0.0 {
            return Ok(());
        }
        Err(self.err("finite and > 0", v))
    }

    fn non_negative(&self, v: f64) -> Result<()> {
        if v.is_finite() && v >= 0.0 {
            return Ok(());
        }
        Err(self.err("finite and >= 0", v))
    }

    fn count(&self, v: u64, lo: u64, hi: u64) -> Result<()> {
        if (lo..=hi).contains(&v) {
            return Ok(());
        }
        Err(self.err(&format!("in {lo}..={hi}"), v))
    }

    fn pair(&self, (a, b): (f64, f64), lo: f64, hi: f64, lo_open: bool) -> Result<()> {
        let above = if lo_open { a > lo } else { a >= lo };
        if a.is_finite() && b.is_finite() && above && a <= b && b <= hi {
            return Ok(());
        }
        let cmp = if lo_open { "<" } else { "<=" };
        Err(self.err(
            &format!("MIN,MAX with {lo} {cmp} MIN <= MAX <= {hi}"),
            format!("{a},{b}"),
        ))
    }
}

/// Checks every field of `cfg`; the first problem found is the error.
pub fn validate_config(cfg: &TrainConfig) -> Result<()> {
    let m = &cfg.model;
    let w = |x: usize| x as u64;
    opt("--img-size", "model.img_size").count(w(m.img_size), 1, w(MAX_IMG_SIZE))?;
    opt("--patch", "model.patch").count(w(m.patch), 1, w(m.img_size))?;
    if !m.img_size.is_multiple_of(m.patch) {
        bail!(
            "the image size {} (config field `model.img_size`) is not a multiple of the patch size {} (`model.patch`)",
            m.img_size,
            m.patch
        );
    }
    opt("--dim", "model.dim").count(w(m.dim), 1, w(MAX_WIDTH))?;
    opt("--depth", "model.depth").count(w(m.depth), 1, w(MAX_DEPTH))?;
    opt("--heads", "model.heads").count(w(m.heads), 1, w(m.dim))?;
    if !m.dim.is_multiple_of(m.heads) {
        bail!(
            "--dim {} is not divisible by --heads {} (config fields `model.dim`, `model.heads`)",
            m.dim,
            m.heads
        );
    }
    opt("--mlp-ratio", "model.mlp_ratio").count(w(m.mlp_ratio), 1, 64)?;
    opt("--stem-convs", "model.stem_convs").count(w(m.stem_convs), 0, w(MAX_STEM_CONVS))?;
    if m.stem_convs > 0 {
        if m.patch < 2 || !m.patch.is_power_of_two() {
            bail!(
                "--stem-convs {} needs a patch size that is a power of two (2, 4, 8, ...), not {} (config field `model.patch`): each stem stage halves the image; pass --stem-convs 0 for DINO's patch embedding",
                m.stem_convs,
                m.patch
            );
        }
        let stages = m.patch.trailing_zeros();
        if !m.dim.is_multiple_of(1 << (stages - 1)) {
            bail!(
                "--stem-convs with patch {} has {stages} stages of width dim / 2^k: --dim {} must be divisible by {} (or pass --stem-convs 0)",
                m.patch,
                m.dim,
                1usize << (stages - 1)
            );
        }
    }
    opt("--head-hidden", "model.head_hidden").count(w(m.head_hidden), 1, w(MAX_WIDTH))?;
    opt("--bottleneck", "model.bottleneck").count(w(m.bottleneck), 1, w(MAX_WIDTH))?;
    opt("--prototypes", "model.prototypes").count(w(m.prototypes), 2, w(MAX_PROTOTYPES))?;
    opt("--drop-path", "model.drop_path").finite_in(m.drop_path as f64, 0.0, 1.0, false, true)?;

    opt("--epochs", "epochs").count(cfg.epochs, 1, MAX_EPOCHS)?;
    opt("--batch-size", "batch_size").count(w(cfg.batch_size), 1, w(MAX_BATCH))?;
    opt("--lr", "lr").positive(cfg.lr)?;
    opt("--min-lr", "min_lr").non_negative(cfg.min_lr)?;
    opt("--warmup-epochs", "warmup_epochs").count(cfg.warmup_epochs, 0, MAX_EPOCHS)?;
    opt("--weight-decay", "weight_decay").non_negative(cfg.weight_decay)?;
    opt("--weight-decay-end", "weight_decay_end").non_negative(cfg.weight_decay_end)?;
    opt("--momentum-teacher", "momentum_teacher").finite_in(
        cfg.momentum_teacher,
        0.0,
        1.0,
        false,
        false,
    )?;
    opt("--teacher-temp", "teacher_temp").positive(cfg.teacher_temp)?;
    opt("--warmup-teacher-temp", "warmup_teacher_temp").positive(cfg.warmup_teacher_temp)?;
    opt("--warmup-teacher-temp-epochs", "warmup_teacher_temp_epochs").count(
        cfg.warmup_teacher_temp_epochs,
        0,
        MAX_EPOCHS,
    )?;
    opt("--student-temp", "student_temp").positive(cfg.student_temp)?;
    opt("--center-momentum", "center_momentum").finite_in(
        cfg.center_momentum,
        0.0,
        1.0,
        false,
        true,
    )?;
    opt("--clip-grad", "clip_grad").non_negative(cfg.clip_grad)?;
    opt("--freeze-last-layer-epochs", "freeze_last_layer_epochs").count(
        cfg.freeze_last_layer_epochs,
        0,
        MAX_EPOCHS,
    )?;
    opt("--n-local", "n_local").count(w(cfg.n_local), 0, w(MAX_LOCAL_CROPS))?;
    let f = |(a, b): (f32, f32)| (a as f64, b as f64);
    opt("--global-scale", "global_scale").pair(f(cfg.global_scale), 0.0, 1.0, true)?;
    opt("--local-scale", "local_scale").pair(f(cfg.local_scale), 0.0, 1.0, true)?;
    opt("--color-aug", "color_aug").finite_in(cfg.color_aug as f64, 0.0, 1.0, false, false)?;
    opt("--flip", "flip").finite_in(cfg.flip as f64, 0.0, 1.0, false, false)?;
    opt("--koleo-proto", "koleo_proto").non_negative(cfg.koleo_proto)?;
    opt("--koleo", "koleo").non_negative(cfg.koleo)?;
    opt("--sinkhorn-iters", "sinkhorn_iters").count(cfg.sinkhorn_iters as u64, 1, 1000)?;
    let local = crate::data::CropConfig::for_image_size(m.img_size, cfg.n_local).local_size;
    if !local.is_multiple_of(m.patch) {
        bail!(
            "the local crop size {local} (from the image size {}) is not a multiple of the patch size {}",
            m.img_size,
            m.patch
        );
    }
    if cfg.method == Method::Ibot {
        let ib = &cfg.ibot;
        opt("--mim-weight", "ibot.mim_weight").non_negative(ib.mim_weight)?;
        opt("--patch-teacher-temp", "ibot.patch_teacher_temp").positive(ib.patch_teacher_temp)?;
        opt(
            "--warmup-patch-teacher-temp",
            "ibot.warmup_patch_teacher_temp",
        )
        .positive(ib.warmup_patch_teacher_temp)?;
        opt(
            "--warmup-patch-teacher-temp-epochs",
            "ibot.warmup_patch_teacher_temp_epochs",
        )
        .count(ib.warmup_patch_teacher_temp_epochs, 0, MAX_EPOCHS)?;
        opt("--patch-center-momentum", "ibot.patch_center_momentum").finite_in(
            ib.patch_center_momentum,
            0.0,
            1.0,
            false,
            true,
        )?;
        opt("--mask-prob", "ibot.mask_prob").finite_in(ib.mask_prob, 0.0, 1.0, false, false)?;
        opt("--mask-ratio", "ibot.mask_ratio").pair(ib.mask_ratio, 0.0, 1.0, false)?;
        opt("--mask-aspect", "ibot.mask_aspect").pair(ib.mask_aspect, 0.0, 1e3, true)?;
    }
    validate_data(&cfg.data)?;
    check_alloc("the training state", training_bytes(cfg))
}

/// The data source's own fields.
pub fn validate_data(d: &DataSpec) -> Result<()> {
    match d {
        DataSpec::Builtin {
            train_per_class,
            test_per_class,
            ..
        } => {
            let o = opt("--data builtin", "data.train_per_class");
            o.count(w64(*train_per_class), 1, 1 << 20)?;
            opt("--data builtin", "data.test_per_class").count(w64(*test_per_class), 1, 1 << 20)
        }
        DataSpec::Folder { root, test_root } => {
            if root.trim().is_empty() {
                bail!("--data folder:PATH[,TEST_PATH]: the training folder PATH is empty");
            }
            if let Some(t) = test_root {
                if t.trim().is_empty() {
                    bail!(
                        "--data folder:{root},: the held-out folder after the comma is empty \
                         (write folder:{root} for no held-out split)"
                    );
                }
            }
            Ok(())
        }
        DataSpec::Cifar { root } => {
            if root.trim().is_empty() {
                bail!("--data cifar:PATH: the folder PATH is empty");
            }
            Ok(())
        }
    }
}

fn w64(x: usize) -> u64 {
    x as u64
}

/// Refuses an allocation plan of `bytes` above [`MAX_ALLOC_BYTES`], naming `what` and the size.
pub fn check_alloc(what: &str, bytes: u64) -> Result<()> {
    if bytes > MAX_ALLOC_BYTES {
        bail!(
            "{what} would need {bytes} bytes ({:.1} GiB), more than the limit of {} GiB: use a \
             smaller setting",
            bytes as f64 / (1u64 << 30) as f64,
            MAX_ALLOC_BYTES >> 30
        );
    }
    Ok(())
}

/// Bytes a run needs at least: four copies of the parameters (student, teacher, two Adam
/// moments) and the attention scores and token activations of one step's crops. Computed in
/// u64 (saturating) so that absurd settings give a number, not an overflow. Call only after the
/// sizes are in range (the parameter count multiplies them).
pub fn training_bytes(cfg: &TrainConfig) -> u64 {
    let m = &cfg.model;
    let params = num_params(&crate::config::model_config(cfg)) as u64;
    let tokens = |side: usize| {
        let g = (side / m.patch.max(1)) as u64;
        g * g + 1
    };
    let crops = super::crop_config(cfg);
    let b = cfg.batch_size as u64;
    let per_crop = |side: usize| {
        let t = tokens(side);
        let depth = m.depth as u64;
        // Attention probabilities and the MLP hidden activations of every block are kept for
        // the backward pass.
        depth.saturating_mul(
            (m.heads as u64 * t * t).saturating_add(t * (m.dim as u64) * (4 + m.mlp_ratio as u64)),
        )
    };
    let acts = b.saturating_mul(
        (2 * per_crop(crops.global_size))
            .saturating_add((cfg.n_local as u64).saturating_mul(per_crop(crops.local_size))),
    );
    let logits = b * (2 + cfg.n_local as u64) * m.prototypes as u64;
    params
        .saturating_mul(16)
        .saturating_add(acts.saturating_mul(4))
        .saturating_add(logits.saturating_mul(8))
}

/// The fields in which two configurations differ, as `field: saved -> now` lines (empty when
/// equal).
pub fn config_diff(saved: &TrainConfig, now: &TrainConfig) -> Vec<String> {
    let (a, b) = match (serde_json::to_value(saved), serde_json::to_value(now)) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return vec!["(configurations could not be compared)".into()],
    };
    let mut out = Vec::new();
    diff_values("", &a, &b, &mut out);
    out
}

fn diff_values(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => diff_values(&p, u, v, out),
                    (u, v) => out.push(format!("{p}: {} -> {}", show(u), show(v))),
                }
            }
        }
        _ if a != b => out.push(format!("{path}: {a} -> {b}")),
        _ => {}
    }
}

fn show(v: Option<&serde_json::Value>) -> String {
    v.map_or_else(|| "(absent)".into(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::LossKind;

    fn tiny() -> TrainConfig {
        TrainConfig::preset("tiny", LossKind::Vmf).unwrap()
    }

    fn err(c: &TrainConfig) -> String {
        format!("{:#}", validate_config(c).unwrap_err())
    }

    #[test]
    fn every_preset_is_valid() {
        for p in super::super::config::PRESETS {
            for l in [LossKind::Dino, LossKind::Vmf] {
                for m in [Method::Dino, Method::Ibot] {
                    let c = TrainConfig::preset_for(p, m, l).unwrap();
                    validate_config(&c).unwrap_or_else(|e| panic!("{p} {l:?} {m:?}: {e:#}"));
                }
            }
        }
    }

    /// The settings that trained and exited 0: each is refused, naming its option.
    #[test]
    fn invalid_options_name_the_option_and_range() {
        type Edit = Box<dyn Fn(&mut TrainConfig)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("--momentum-teacher", Box::new(|c| c.momentum_teacher = 2.0)),
            ("--lr", Box::new(|c| c.lr = -1.0)),
            ("--lr", Box::new(|c| c.lr = f64::NAN)),
            ("--min-lr", Box::new(|c| c.min_lr = f64::NAN)),
            ("--drop-path", Box::new(|c| c.model.drop_path = 2.0)),
            ("--clip-grad", Box::new(|c| c.clip_grad = f64::NAN)),
            ("--depth", Box::new(|c| c.model.depth = 0)),
            ("--dim", Box::new(|c| c.model.dim = 0)),
            ("--weight-decay", Box::new(|c| c.weight_decay = -0.1)),
            (
                "--weight-decay-end",
                Box::new(|c| c.weight_decay_end = f64::INFINITY),
            ),
            (
                "--warmup-teacher-temp",
                Box::new(|c| c.warmup_teacher_temp = 0.0),
            ),
            ("--color-aug", Box::new(|c| c.color_aug = -1.0)),
            ("--flip", Box::new(|c| c.flip = 1.5)),
            (
                "--prototypes",
                Box::new(|c| c.model.prototypes = 100_000_000),
            ),
            ("--bottleneck", Box::new(|c| c.model.bottleneck = 0)),
            ("--head-hidden", Box::new(|c| c.model.head_hidden = 0)),
            ("--student-temp", Box::new(|c| c.student_temp = -0.1)),
            ("--global-scale", Box::new(|c| c.global_scale = (0.9, 0.1))),
            ("--n-local", Box::new(|c| c.n_local = 1000)),
            ("--patch", Box::new(|c| c.model.patch = 0)),
            ("--stem-convs", Box::new(|c| c.model.stem_convs = 99)),
            ("--epochs", Box::new(|c| c.epochs = 0)),
        ];
        for (flag, edit) in cases {
            let mut c = tiny();
            edit(&mut c);
            let e = err(&c);
            assert!(e.contains(flag), "{flag}: {e}");
            assert!(
                e.contains("must be") || e.contains("multiple"),
                "{flag}: {e}"
            );
        }
    }

    /// The stem halves the image per stage: a patch that is not a power of two, or a width
    /// the stages' channels do not divide, is refused with the reason.
    #[test]
    fn a_stem_needs_a_power_of_two_patch_and_a_divisible_width() {
        let mut c = tiny();
        c.model.stem_convs = 1;
        assert!(validate_config(&c).is_ok(), "{:?}", validate_config(&c));
        c.model.img_size = 24;
        c.model.patch = 6;
        let e = err(&c);
        assert!(
            e.contains("--stem-convs") && e.contains("power of two"),
            "{e}"
        );
        let mut c = tiny();
        c.model.stem_convs = 1;
        c.model.patch = 8;
        c.model.img_size = 32;
        c.model.dim = 6;
        c.model.heads = 1;
        let e = err(&c);
        assert!(e.contains("--dim 6") && e.contains("divisible by 4"), "{e}");
    }

    #[test]
    fn too_large_a_model_names_the_bytes() {
        let mut c = tiny();
        c.model.prototypes = MAX_PROTOTYPES;
        c.model.bottleneck = MAX_WIDTH;
        let e = err(&c);
        assert!(e.contains("bytes") && e.contains("training state"), "{e}");
    }

    #[test]
    fn empty_test_folder_after_comma_is_named() {
        let mut c = tiny();
        c.data = DataSpec::Folder {
            root: "imgs".into(),
            test_root: Some(String::new()),
        };
        let e = err(&c);
        assert!(e.contains("folder:imgs,") && e.contains("empty"), "{e}");
    }

    /// A checkpoint whose stored config has `patch: 0` (or any invalid field) is an error that
    /// names the field, for every command that reads checkpoints (they all go through
    /// `load_checkpoint`), never a divide-by-zero panic.
    #[test]
    fn invalid_config_inside_a_checkpoint_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let cfg = tiny();
        let st = super::super::state::init_state(&cfg);
        super::super::state::save_checkpoint(&path, &cfg, &st, 3, None).unwrap();
        for (field, edit) in [
            ("model.patch", "\"patch\":4" as &str),
            ("model.heads", "\"heads\":2"),
            ("lr", "\"lr\":0.004"),
        ] {
            let mut ck = crate::checkpoint::load(&path).unwrap();
            let bad = ck.metadata["config"]
                .replace(edit, &format!("{}0", &edit[..edit.find(':').unwrap() + 1]));
            assert_ne!(bad, ck.metadata["config"], "{edit}");
            ck.metadata.insert("config".into(), bad);
            let p2 = dir.path().join("bad.safetensors");
            crate::checkpoint::save(&p2, &ck).unwrap();
            let e = format!(
                "{:#}",
                super::super::state::load_checkpoint(&p2).unwrap_err()
            );
            assert!(e.contains(field) && e.contains("invalid"), "{field}: {e}");
        }
    }

    #[test]
    fn diff_names_only_the_changed_fields() {
        let a = tiny();
        let mut b = a.clone();
        b.lr = 0.5;
        b.model.depth = 3;
        let d = config_diff(&a, &b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d.iter().any(|l| l.starts_with("lr:")), "{d:?}");
        assert!(
            d.iter().any(|l| l.starts_with("model.depth: 2 -> 3")),
            "{d:?}"
        );
        assert!(config_diff(&a, &a).is_empty());
    }
}
