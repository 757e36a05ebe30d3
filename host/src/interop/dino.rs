//! Key maps between our flat layout and PyTorch state dicts of timm's / official DINO's /
//! iBOT's `VisionTransformer` and DINO's `DINOHead`.
//!
//! Our name `backbone.X` is the ViT's key `X` and `head.Y` the head's key `Y`, same shapes. On
//! import the layout of a file is recognised by where its `cls_token` sits:
//! - `cls_token`: a bare backbone (timm with `num_classes=0`, DINO's published
//!   `*_pretrain.pth`, iBOT's `state_dict` of the teacher backbone);
//! - `P.backbone.cls_token` or `backbone.cls_token`: DINO's / iBOT's `MultiCropWrapper` (the
//!   `teacher` / `student` entries of their full checkpoints), head under `P.head.`;
//! - `module.cls_token` and any other prefix: a wrapped backbone (DDP's `module.`).
use std::collections::BTreeSet;

use anyhow::{bail, Result};
use dinovmf_core::model::{for_each_param, ModelConfig, ParamKind};

use super::state_dict::StateDict;
use crate::checkpoint::Tensor;

/// What [`import_state_dict`] made of a state dict.
#[derive(Clone, Debug)]
pub struct Imported {
    /// Parameters in our flat layout; the tensors the file did not have (see `notes`) keep
    /// the values of the `init` buffer passed in.
    pub params: Vec<f32>,
    /// The layout recognised, in words.
    pub layout: String,
    /// Whether the head (MLP and prototypes) came from the file.
    pub head_imported: bool,
    /// Things worth telling the user (tensors initialised fresh or left out).
    pub notes: Vec<String>,
}

/// The backbone's key prefix in the file (see the module docs).
fn backbone_prefix(sd: &StateDict) -> Result<String> {
    let prefixes: Vec<&str> = sd
        .tensors
        .keys()
        .filter_map(|k| k.strip_suffix("cls_token"))
        .filter(|p| p.is_empty() || p.ends_with('.'))
        .collect();
    match prefixes.as_slice() {
        [p] => Ok(p.to_string()),
        [] => {
            let some: Vec<&str> = sd.tensors.keys().take(4).map(|s| s.as_str()).collect();
            bail!(
                "unknown layout: no 'cls_token' tensor, so this is not a timm / DINO / iBOT \
                 Vision Transformer state dict (its first keys: {})",
                if some.is_empty() {
                    "none, the file is empty".to_string()
                } else {
                    some.join(", ")
                }
            )
        }
        many => bail!(
            "the file holds {} Vision Transformers (cls_token under the prefixes {}); save one \
             of them (e.g. the teacher) on its own",
            many.len(),
            many.iter()
                .map(|p| format!("'{p}'"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn describe(prefix: &str) -> String {
    if prefix.is_empty() {
        "a bare ViT backbone (timm / DINO / iBOT)".into()
    } else if let Some(outer) = prefix.strip_suffix("backbone.") {
        format!("a DINO / iBOT MultiCropWrapper ('{prefix}*', head under '{outer}head.*')")
    } else {
        format!("a ViT backbone under the prefix '{prefix}'")
    }
}

/// Whether `a` exists and holds the same shape and values as `b`.
fn same_data(a: Option<&Tensor>, b: &Tensor) -> bool {
    a.is_some_and(|a| a.shape == b.shape && a.data == b.data)
}

/// Maps a foreign state dict onto our layout for `cfg`, starting from `init` (a freshly
/// initialised buffer: a backbone-only file keeps its head, a model without iBOT's mask token in
/// the file keeps its `masked_embed`).
///
/// Every key of the file must be used, every backbone tensor must be there, the head must be
/// there whole or not at all, and every shape must be PyTorch's shape of our model; anything
/// else is an error that names the key.
pub fn import_state_dict(sd: &StateDict, cfg: &ModelConfig, init: &[f32]) -> Result<Imported> {
    let bb = backbone_prefix(sd)?;
    let head_prefix = bb.strip_suffix("backbone.").map(|p| format!("{p}head."));
    let mut params = init.to_vec();
    let mut used = BTreeSet::new();
    let mut missing_backbone = Vec::new();
    let mut head_found = Vec::new();
    let mut head_missing = Vec::new();
    let mut notes = Vec::new();
    let mut shape_err = None;
    for_each_param(cfg, |p| {
        let ours = p.name.as_str();
        let key = if let Some(rest) = ours.strip_prefix("backbone.") {
            format!("{bb}{rest}")
        } else if let (Some(hp), Some(rest)) = (&head_prefix, ours.strip_prefix("head.")) {
            format!("{hp}{rest}")
        } else {
            // A bare backbone file has no head.
            head_missing.push(ours.to_string());
            return;
        };
        let is_head = ours.starts_with("head.");
        match sd.tensors.get(&key) {
            Some(t) => {
                used.insert(key.clone());
                if t.shape != p.shape() {
                    shape_err.get_or_insert(format!(
                        "tensor '{key}' has shape {:?}, the model needs {:?} (our '{ours}')",
                        t.shape,
                        p.shape()
                    ));
                    return;
                }
                params[p.range()].copy_from_slice(&t.data);
                if is_head {
                    head_found.push(key);
                }
            }
            None if p.kind == ParamKind::MaskToken => notes.push(format!(
                "'{key}' is not in the file: iBOT's mask token starts at its initial value (zeros)"
            )),
            None if is_head => head_missing.push(key),
            None => missing_backbone.push(key),
        }
    });
    if let Some(e) = shape_err {
        bail!("{e}; the run's options (--preset, --dim, --depth, --heads, --prototypes, ...) must describe the model of the file");
    }
    if let Some(k) = missing_backbone.first() {
        bail!(
            "missing key '{k}' ({} backbone tensor(s) missing in all{}); the file does not hold a \
             whole ViT of this shape",
            missing_backbone.len(),
            if missing_backbone.len() > 1 {
                format!(", also '{}'", missing_backbone[1..].join("', '"))
            } else {
                String::new()
            }
        );
    }
    let head_imported = !head_found.is_empty();
    if head_imported {
        if let Some(k) = head_missing.first() {
            bail!(
                "missing key '{k}': the file has part of a DINO head ('{}' and {} more) but not \
                 all of it",
                head_found[0],
                head_found.len() - 1
            );
        }
    } else {
        notes.push(
            "the file has no head: the DINO head (MLP and prototypes) starts at its seeded \
             initialisation"
                .into(),
        );
    }
    let mut unknown = Vec::new();
    for k in sd.tensors.keys() {
        if used.contains(k) {
            continue;
        }
        if k == &format!("{bb}masked_embed") {
            notes.push(format!(
                "left out '{k}' (iBOT's mask token; this run is not --method ibot)"
            ));
            continue;
        }
        if let Some(hp) = &head_prefix {
            if let Some(rest) = k.strip_prefix(&format!("{hp}last_layer2.")) {
                let cls = sd.tensors.get(&format!("{hp}last_layer.{rest}"));
                notes.push(if same_data(cls, &sd.tensors[k]) {
                    format!(
                        "'{k}' is the same tensor as '{hp}last_layer.{rest}' (iBOT's shared head)"
                    )
                } else {
                    format!(
                        "left out '{k}' (iBOT's patch prototypes; --method ibot \
                         --separate-patch-head keeps them)"
                    )
                });
                continue;
            }
        }
        unknown.push(k.as_str());
    }
    if let Some(k) = unknown.first() {
        let hint = if k.ends_with("head.weight") || k.ends_with("head.bias") {
            " (a classifier: save the backbone with num_classes=0)"
        } else if k.contains("gamma_") || k.contains(".ls1.") || k.contains(".ls2.") {
            " (layer scale, which our ViT does not have)"
        } else if k.contains("fc_norm") || k.contains("reg_token") {
            " (a timm option our ViT does not have: use global_pool='token', no register tokens)"
        } else {
            ""
        };
        bail!(
            "unknown key '{k}'{hint}: not part of a DINO ViT of this shape ({} unknown key(s) in all)",
            unknown.len()
        );
    }
    Ok(Imported {
        params,
        layout: describe(&bb),
        head_imported,
        notes,
    })
}

/// Our weights as PyTorch state dicts: the backbone (loads with `strict=True` into DINO's
/// `VisionTransformer` and timm's `VisionTransformer(num_classes=0)`) and the head (into
/// `DINOHead`; iBOT's `last_layer2` included when the model has it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TimmExport {
    pub backbone: StateDict,
    pub head: StateDict,
}

/// What [`export_timm`] writes beyond the tensors timm's and DINO's modules define.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimmExportOptions {
    /// Keep iBOT's `masked_embed` in the backbone (a training-only tensor: timm's and DINO's
    /// `VisionTransformer` have no such key, iBOT's with `masked_im_modeling=True` needs it).
    pub mask_token: bool,
}

impl TimmExportOptions {
    /// Exactly timm's / DINO's keys: loads with `strict=True` into both.
    pub const fn timm() -> Self {
        Self { mask_token: false }
    }
    /// Also iBOT's mask token, for iBOT's `VisionTransformer(masked_im_modeling=True)`.
    pub const fn ibot() -> Self {
        Self { mask_token: true }
    }
}

/// The backbone and head of `params` (our layout for `cfg`) under PyTorch's keys. The head
/// holds `last_layer2` (iBOT's `iBOTHead(shared_head=False)`) when the model has a separate
/// patch head.
pub fn export_timm(
    cfg: &ModelConfig,
    params: &[f32],
    opts: TimmExportOptions,
) -> Result<TimmExport> {
    if params.len() < dinovmf_core::model::num_params(cfg) {
        bail!(
            "{} parameters for a model of {}",
            params.len(),
            dinovmf_core::model::num_params(cfg)
        );
    }
    let mut out = TimmExport::default();
    for_each_param(cfg, |p| {
        let data = params[p.range()].to_vec();
        if p.kind == ParamKind::MaskToken && !opts.mask_token {
            return;
        }
        if let Some(k) = p.name.strip_prefix("backbone.") {
            out.backbone.insert(k, p.shape(), data);
        } else if let Some(k) = p.name.strip_prefix("head.") {
            out.head.insert(k, p.shape(), data);
        }
    });
    let v = &cfg.vit;
    let h = &cfg.head;
    for (k, val) in [
        ("format", "pytorch-vit-state-dict".to_string()),
        ("img_size", v.img_size.to_string()),
        ("patch_size", v.patch.to_string()),
        ("in_chans", v.in_chans.to_string()),
        ("embed_dim", v.dim.to_string()),
        ("depth", v.depth.to_string()),
        ("num_heads", v.heads.to_string()),
        ("mlp_ratio", v.mlp_ratio.to_string()),
        ("qkv_bias", v.qkv_bias.to_string()),
        ("layer_norm_eps", v.ln_eps.to_string()),
    ] {
        out.backbone.metadata.insert(k.into(), val);
    }
    for (k, val) in [
        ("format", "pytorch-dino-head-state-dict".to_string()),
        ("in_dim", v.dim.to_string()),
        ("out_dim", h.out_dim.to_string()),
        ("hidden_dim", h.hidden.to_string()),
        ("bottleneck_dim", h.bottleneck.to_string()),
        ("nlayers", h.n_layers.to_string()),
        ("norm_last_layer", h.norm_last_layer.to_string()),
    ] {
        out.head.metadata.insert(k.into(), val);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dinovmf_core::model::num_params;

    fn cfg() -> ModelConfig {
        ModelConfig::tiny_test()
    }

    fn numbered(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32 * 0.25 - 3.0).collect()
    }

    /// Our weights exported, then one edit, imported under `prefix` (backbone and head).
    fn exported(prefix: &str, with_head: bool) -> StateDict {
        let c = cfg();
        let e = export_timm(&c, &numbered(num_params(&c)), TimmExportOptions::timm()).unwrap();
        let mut sd = StateDict::default();
        for (k, t) in &e.backbone.tensors {
            let bp = if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}backbone.")
            };
            sd.insert(&format!("{bp}{k}"), &t.shape, t.data.clone());
        }
        if with_head {
            for (k, t) in &e.head.tensors {
                sd.insert(&format!("{prefix}head.{k}"), &t.shape, t.data.clone());
            }
        }
        sd
    }

    #[test]
    fn export_then_import_is_the_identity_in_every_layout() {
        let c = cfg();
        let n = num_params(&c);
        let init = vec![7.0f32; n];
        let want = numbered(n);
        for prefix in ["teacher.", "module."] {
            let imp = import_state_dict(&exported(prefix, true), &c, &init).unwrap();
            assert_eq!(imp.params, want, "{prefix}");
            assert!(imp.head_imported);
        }
        // A bare backbone (timm): the head keeps `init`.
        let imp = import_state_dict(&exported("", false), &c, &init).unwrap();
        let head = dinovmf_core::model::Layout::new(&c).head_start;
        assert_eq!(imp.params[..head], want[..head]);
        assert!(imp.params[head..].iter().all(|&x| x == 7.0));
        assert!(!imp.head_imported && imp.notes.iter().any(|s| s.contains("no head")));
    }

    fn err(sd: &StateDict) -> String {
        let c = cfg();
        format!(
            "{:#}",
            import_state_dict(sd, &c, &vec![0.0; num_params(&c)]).unwrap_err()
        )
    }

    #[test]
    fn wrong_shape_missing_key_and_unknown_layout_are_errors_naming_the_key() {
        let mut sd = exported("", false);
        let t = sd.tensors.get_mut("blocks.1.attn.qkv.weight").unwrap();
        t.shape = vec![t.shape[1], t.shape[0]];
        let e = err(&sd);
        assert!(
            e.contains("'blocks.1.attn.qkv.weight'") && e.contains("[8, 24]"),
            "{e}"
        );

        let mut sd = exported("", false);
        sd.tensors.remove("blocks.0.mlp.fc2.bias");
        let e = err(&sd);
        assert!(e.contains("missing key 'blocks.0.mlp.fc2.bias'"), "{e}");

        let mut sd = exported("teacher.", true);
        sd.tensors.remove("teacher.head.mlp.2.weight");
        let e = err(&sd);
        assert!(e.contains("missing key 'teacher.head.mlp.2.weight'"), "{e}");

        let mut sd = exported("", false);
        sd.insert("head.weight", &[10, 8], vec![0.0; 80]);
        let e = err(&sd);
        assert!(
            e.contains("unknown key 'head.weight'") && e.contains("classifier"),
            "{e}"
        );

        let mut sd = StateDict::default();
        sd.insert("conv1.weight", &[4, 3, 3, 3], vec![0.0; 108]);
        let e = err(&sd);
        assert!(
            e.contains("unknown layout") && e.contains("conv1.weight"),
            "{e}"
        );

        let mut sd = exported("teacher.", true);
        for (k, t) in exported("student.", true).tensors {
            sd.tensors.insert(k, t);
        }
        let e = err(&sd);
        assert!(
            e.contains("'student.backbone.'") && e.contains("'teacher.backbone.'"),
            "{e}"
        );
    }

    #[test]
    fn ibot_patch_prototypes_shared_separate_or_left_out() {
        let c = cfg();
        let n = num_params(&c);
        let mut sd = exported("teacher.", true);
        for w in ["weight_g", "weight_v"] {
            let t = sd.tensors[&format!("teacher.head.last_layer.{w}")].clone();
            sd.insert(&format!("teacher.head.last_layer2.{w}"), &t.shape, t.data);
        }
        let imp = import_state_dict(&sd, &c, &vec![0.0; n]).unwrap();
        assert!(
            imp.notes.iter().any(|s| s.contains("shared head")),
            "{:?}",
            imp.notes
        );
        sd.tensors
            .get_mut("teacher.head.last_layer2.weight_v")
            .unwrap()
            .data[0] += 1.0;
        let imp = import_state_dict(&sd, &c, &vec![0.0; n]).unwrap();
        assert!(imp
            .notes
            .iter()
            .any(|s| s.contains("left out 'teacher.head.last_layer2.weight_v'")));
        let ci = c.with_ibot(dinovmf_core::model::IbotParts {
            mask_token: false,
            separate_patch_head: true,
        });
        let imp = import_state_dict(&sd, &ci, &vec![0.0; num_params(&ci)]).unwrap();
        let lay = dinovmf_core::model::Layout::new(&ci);
        let want = &sd.tensors["teacher.head.last_layer2.weight_v"].data;
        assert_eq!(
            &imp.params[lay.patch_v..lay.patch_v + want.len()],
            &want[..]
        );
    }

    #[test]
    fn mask_token_is_exported_only_on_request() {
        let ci = cfg().with_ibot(dinovmf_core::model::IbotParts {
            mask_token: true,
            separate_patch_head: true,
        });
        let p = numbered(num_params(&ci));
        let plain = export_timm(&ci, &p, TimmExportOptions::timm()).unwrap();
        let ibot = export_timm(&ci, &p, TimmExportOptions::ibot()).unwrap();
        assert!(!plain.backbone.tensors.contains_key("masked_embed"));
        let at = dinovmf_core::model::Layout::new(&ci).mask_token.unwrap();
        assert_eq!(ibot.backbone.tensors["masked_embed"].data, p[at..at + 8]);
        assert_eq!(
            ibot.backbone.tensors.len(),
            plain.backbone.tensors.len() + 1
        );
        assert!(plain.head.tensors.contains_key("last_layer2.weight_v"));
    }

    #[test]
    fn ibot_mask_token_is_used_or_left_out_with_a_note() {
        let c = cfg();
        let mut sd = exported("", false);
        sd.insert("masked_embed", &[1, 8], vec![0.5; 8]);
        let imp = import_state_dict(&sd, &c, &vec![0.0; num_params(&c)]).unwrap();
        assert!(imp
            .notes
            .iter()
            .any(|s| s.contains("left out 'masked_embed'")));
        let ci = c.with_ibot(dinovmf_core::model::IbotParts {
            mask_token: true,
            separate_patch_head: false,
        });
        let imp = import_state_dict(&sd, &ci, &vec![0.0; num_params(&ci)]).unwrap();
        let at = dinovmf_core::model::Layout::new(&ci).mask_token.unwrap();
        assert_eq!(imp.params[at..at + 8], [0.5; 8]);
    }
}
