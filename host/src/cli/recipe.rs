//! The recipe options shared by `dinovmf train` and `dinovmf bench quality`: everything that
//! overrides a preset's method, model, schedule or augmentation. One struct, so that a recipe
//! change measured across the quality suite is spelled exactly as it is given to `train`.
use anyhow::{bail, Result};
use clap::{Args, Parser, ValueEnum};

use crate::backend::Precision;
use crate::train::{CenteringKind, LossKind, Method, TrainConfig};

use super::train::{parse_pair, parse_range};

#[derive(Args, Debug, Clone)]
pub struct RecipeArgs {
    /// dino: self-distillation of the [CLS] token; ibot: plus masked image modelling (the
    /// student's global crops are block-masked and must predict the teacher's patch
    /// distributions at the masked positions). Combine with --loss: ibot + vmf is iBOT-vMF.
    #[arg(long, value_enum, default_value = "dino")]
    pub method: Method,
    /// iBOT: weight of the patch loss in L = L_cls + w L_mim.
    #[arg(long)]
    pub mim_weight: Option<f64>,
    /// iBOT: patch teacher temperature after warm-up (small presets: 0.02; iBOT: 0.07).
    #[arg(long)]
    pub patch_teacher_temp: Option<f64>,
    /// iBOT: patch teacher temperature at step 0 (warms up linearly to --patch-teacher-temp).
    #[arg(long)]
    pub warmup_patch_teacher_temp: Option<f64>,
    #[arg(long)]
    pub warmup_patch_teacher_temp_epochs: Option<u64>,
    /// iBOT: momentum of the patch center (its own, next to the [CLS] one).
    #[arg(long)]
    pub patch_center_momentum: Option<f64>,
    /// iBOT: give patch tokens their own prototype layer instead of sharing [CLS]'s.
    #[arg(long)]
    pub separate_patch_head: bool,
    /// iBOT: probability that a student global crop is masked at all (iBOT: 0.5).
    #[arg(long)]
    pub mask_prob: Option<f64>,
    /// iBOT: masked fraction of a masked crop, uniform in `MIN,MAX` (iBOT: 0.1,0.5).
    #[arg(long, value_parser = parse_pair)]
    pub mask_ratio: Option<(f64, f64)>,
    /// iBOT: aspect ratio range of the mask blocks, log-uniform in `MIN,MAX` (0.3,3.33).
    #[arg(long, value_parser = parse_pair)]
    pub mask_aspect: Option<(f64, f64)>,
    /// Teacher centering. sinkhorn (the small presets' default): balance the batch's teacher
    /// assignments with Sinkhorn-Knopp (SwAV / DINOv2); logit / probability: DINO's and
    /// DINO-vMF's running centers (the 224 px presets' defaults, by loss).
    #[arg(long, value_enum)]
    pub centering: Option<CenteringKind>,
    /// KoLeo weight on the student's L2-normalised [CLS] backbone features of each global view,
    /// -(1/B) sum_i ln(d_i + 1e-8), d_i the distance to the nearest other image (small presets:
    /// 0.1 as DINOv2; 224 px presets: 0 = off).
    #[arg(long)]
    pub koleo: Option<f64>,
    /// Arithmetic of the matrix products. f32 (default): the reference. bf16: bf16 operands
    /// with f32 sums; on the CPU the linear layers' forward and input-gradient products (AMX or
    /// AVX512-BF16 where the CPU has them), on CUDA every GEMM of the step on tensor cores;
    /// master weights, optimiser, prototype logits, softmax and loss stay f32 on both.
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// Rounds of Sinkhorn-Knopp balancing with --centering sinkhorn (default 3).
    #[arg(long)]
    pub sinkhorn_iters: Option<u32>,
    /// Fix the prototype norms g = 1 (default: on for dino, off for vmf).
    #[arg(long)]
    pub norm_last_layer: Option<bool>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Base learning rate for batch 256 (scaled by batch/256).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub warmup_epochs: Option<u64>,
    /// Dimension p of the sphere the prototypes live on (the head's bottleneck).
    #[arg(long)]
    pub bottleneck: Option<usize>,
    /// Width of the head's hidden layers.
    #[arg(long)]
    pub head_hidden: Option<usize>,
    /// ViT width, depth and heads (override the preset's).
    #[arg(long)]
    pub dim: Option<usize>,
    #[arg(long)]
    pub depth: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    /// Side of the square input the crops are resized to (global crops; local crops follow it).
    #[arg(long)]
    pub img_size: Option<usize>,
    /// Side of a ViT patch in pixels (must divide the image and local crop sizes).
    #[arg(long)]
    pub patch: Option<usize>,
    /// Convolutional stem in place of the patch embedding (a change of method: docs/quality.md,
    /// sixth round): N 3 x 3 convolutions (GELU after each) per stride-2 stage, log2(patch)
    /// stages, widths dim/4, dim/2, dim for patch 8; then a 1 x 1 convolution to the tokens.
    /// 0: DINO's patch embedding. Default: the preset's (small32: 1; tiny and the 224 px
    /// presets: 0). CPU backend only for now (CUDA: pass 0).
    #[arg(long, value_name = "N")]
    pub stem_convs: Option<usize>,
    /// Number of prototypes K.
    #[arg(long)]
    pub prototypes: Option<usize>,
    /// Final teacher temperature (after warm-up).
    #[arg(long)]
    pub teacher_temp: Option<f64>,
    /// Teacher temperature at step 0 (warms up linearly to --teacher-temp).
    #[arg(long)]
    pub warmup_teacher_temp: Option<f64>,
    #[arg(long)]
    pub warmup_teacher_temp_epochs: Option<u64>,
    #[arg(long)]
    pub student_temp: Option<f64>,
    /// Teacher EMA momentum at step 0 (cosine to 1).
    #[arg(long)]
    pub momentum_teacher: Option<f64>,
    #[arg(long)]
    pub center_momentum: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub weight_decay_end: Option<f64>,
    /// Per-tensor gradient-norm clip (0 = off).
    #[arg(long)]
    pub clip_grad: Option<f64>,
    /// Epochs during which the prototype layer gets no update (DINO: 1).
    #[arg(long)]
    pub freeze_last_layer_epochs: Option<u64>,
    /// Learning rate at the end of the cosine schedule.
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Area range of the global crops, as `MIN,MAX` fractions of the image (DINO: 0.4,1).
    #[arg(long, value_parser = parse_range)]
    pub global_scale: Option<(f32, f32)>,
    /// Area range of the local crops, as `MIN,MAX` fractions of the image (DINO: 0.05,0.4).
    #[arg(long, value_parser = parse_range)]
    pub local_scale: Option<(f32, f32)>,
    /// Scale of the colour augmentations' probabilities (1 = DINO's jitter 0.8 and grayscale
    /// 0.2; 0 = none).
    #[arg(long)]
    pub color_aug: Option<f32>,
    /// Probability of a horizontal flip of each crop (DINO: 0.5). Use 0 when a mirrored image
    /// means something else (digits, text).
    #[arg(long)]
    pub flip: Option<f32>,
    /// Number of local crops.
    #[arg(long)]
    pub n_local: Option<usize>,
    #[arg(long)]
    pub drop_path: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// KoLeo-proto regulariser weight: pushes each student prototype away from its nearest
    /// neighbour, -(1/K) sum_k ln min_j ||mu_k - mu_j|| (0 = off; CPU backend).
    #[arg(long)]
    pub koleo_proto: Option<f64>,
}

/// A command line of recipe options alone.
#[derive(Parser)]
#[command(name = "recipe", no_binary_name = true)]
struct RecipeLine {
    #[command(flatten)]
    recipe: RecipeArgs,
}

impl RecipeArgs {
    /// Parses recipe options as `dinovmf train` spells them (`["--n-local", "8"]`), for a
    /// library caller of the quality suite; an unknown option or a bad value is an error.
    pub fn from_args<S: AsRef<str>>(args: &[S]) -> Result<Self> {
        Ok(RecipeLine::try_parse_from(args.iter().map(AsRef::as_ref))?.recipe)
    }
}

impl Default for RecipeArgs {
    /// No override: the preset's recipe (the values clap gives an empty command line).
    fn default() -> Self {
        RecipeLine::parse_from(std::iter::empty::<&str>()).recipe
    }
}

/// How an override is spelled back on a command line.
trait ArgText {
    fn arg_text(&self) -> String;
}

macro_rules! plain_arg_text {
    ($($t:ty),*) => {$(
        impl ArgText for $t {
            fn arg_text(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
plain_arg_text!(f64, f32, usize, u64, u32, bool);

impl<T: ArgText> ArgText for (T, T) {
    fn arg_text(&self) -> String {
        format!("{},{}", self.0.arg_text(), self.1.arg_text())
    }
}

fn enum_text<E: ValueEnum>(v: &E) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_string())
}

macro_rules! enum_arg_text {
    ($($t:ty),*) => {$(
        impl ArgText for $t {
            fn arg_text(&self) -> String {
                enum_text(self)
            }
        }
    )*};
}
enum_arg_text!(CenteringKind, Precision);

/// Applies each given option to the config (`field => config.path`) and lists it, spelled as
/// on the command line, in `given`: one list, so the two cannot disagree.
macro_rules! overrides {
    ($self:ident, $c:ident, $given:ident; $($f:ident => $($path:ident).+),* $(,)?) => {$(
        if let Some(v) = $self.$f {
            $c.$($path).+ = v;
            $given.push(format!("--{} {}", stringify!($f).replace('_', "-"), v.arg_text()));
        }
    )*};
}

impl RecipeArgs {
    /// The preset's config for this method and loss with every given override applied, and the
    /// overrides as command-line text (empty: the preset as it ships). Not yet validated: the
    /// caller sets the data and the run length first.
    pub fn apply(&self, preset: &str, loss: LossKind) -> Result<(TrainConfig, Vec<String>)> {
        let mut c = TrainConfig::preset_for(preset, self.method, loss)?;
        let mut given = Vec::new();
        if self.method != Method::default() {
            given.push(format!("--method {}", enum_text(&self.method)));
        }
        overrides!(self, c, given;
            centering => centering, norm_last_layer => norm_last_layer, koleo => koleo,
            precision => precision, sinkhorn_iters => sinkhorn_iters, koleo_proto => koleo_proto,
            batch_size => batch_size, lr => lr, warmup_epochs => warmup_epochs,
            prototypes => model.prototypes, bottleneck => model.bottleneck,
            head_hidden => model.head_hidden, dim => model.dim, depth => model.depth,
            heads => model.heads, img_size => model.img_size, patch => model.patch,
            stem_convs => model.stem_convs,
            teacher_temp => teacher_temp, warmup_teacher_temp => warmup_teacher_temp,
            warmup_teacher_temp_epochs => warmup_teacher_temp_epochs,
            student_temp => student_temp, momentum_teacher => momentum_teacher,
            center_momentum => center_momentum, weight_decay => weight_decay,
            weight_decay_end => weight_decay_end, clip_grad => clip_grad,
            freeze_last_layer_epochs => freeze_last_layer_epochs, min_lr => min_lr,
            global_scale => global_scale, local_scale => local_scale, n_local => n_local,
            color_aug => color_aug, flip => flip, drop_path => model.drop_path, seed => seed);
        // The iBOT group: any of it given means iBOT options, which DINO refuses.
        let before_ibot = given.len();
        overrides!(self, c, given;
            mim_weight => ibot.mim_weight, patch_teacher_temp => ibot.patch_teacher_temp,
            warmup_patch_teacher_temp => ibot.warmup_patch_teacher_temp,
            warmup_patch_teacher_temp_epochs => ibot.warmup_patch_teacher_temp_epochs,
            patch_center_momentum => ibot.patch_center_momentum, mask_prob => ibot.mask_prob,
            mask_ratio => ibot.mask_ratio, mask_aspect => ibot.mask_aspect);
        if self.separate_patch_head {
            c.ibot.separate_patch_head = true;
            given.push("--separate-patch-head".into());
        }
        if c.method == Method::Dino && given.len() > before_ibot {
            bail!("the iBOT options (--mim-weight, --patch-*, --warmup-patch-*, --mask-*, --separate-patch-head) need --method ibot");
        }
        // A final temperature given alone, with no warm-up, is the temperature throughout.
        if self.patch_teacher_temp.is_some()
            && self.warmup_patch_teacher_temp.is_none()
            && c.ibot.warmup_patch_teacher_temp_epochs == 0
        {
            c.ibot.warmup_patch_teacher_temp = c.ibot.patch_teacher_temp;
        }
        if self.teacher_temp.is_some()
            && self.warmup_teacher_temp.is_none()
            && c.warmup_teacher_temp_epochs == 0
        {
            c.warmup_teacher_temp = c.teacher_temp;
        }
        Ok((c, given))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> RecipeArgs {
        RecipeArgs::from_args(args).unwrap()
    }

    #[test]
    fn a_bad_option_or_value_is_an_error() {
        assert!(RecipeArgs::from_args(&["--n-locals", "8"]).is_err());
        assert!(RecipeArgs::from_args(&["--flip", "half"]).is_err());
        assert!(RecipeArgs::from_args(&["--global-scale", "0.5"]).is_err());
    }

    #[test]
    fn no_override_is_the_preset_and_says_nothing() {
        let (c, given) = RecipeArgs::default()
            .apply("small32", LossKind::Vmf)
            .unwrap();
        assert_eq!(c, TrainConfig::preset("small32", LossKind::Vmf).unwrap());
        assert!(given.is_empty(), "{given:?}");
    }

    #[test]
    fn overrides_land_in_the_config_and_are_spelled_back() {
        let r = parse(&[
            "--n-local",
            "8",
            "--flip",
            "0",
            "--global-scale",
            "0.5,1",
            "--centering",
            "probability",
            "--prototypes",
            "256",
            "--teacher-temp",
            "0.03",
        ]);
        let (c, given) = r.apply("small32", LossKind::Vmf).unwrap();
        assert_eq!(c.n_local, 8);
        assert_eq!(c.flip, 0.0);
        assert_eq!(c.global_scale, (0.5, 1.0));
        assert_eq!(c.centering, CenteringKind::Probability);
        assert_eq!(c.model.prototypes, 256);
        // A final temperature alone, with no warm-up, holds from step 0.
        assert_eq!((c.teacher_temp, c.warmup_teacher_temp), (0.03, 0.03));
        assert_eq!(
            given,
            [
                "--centering probability",
                "--prototypes 256",
                "--teacher-temp 0.03",
                "--global-scale 0.5,1",
                "--n-local 8",
                "--flip 0",
            ]
        );
        // What is spelled back parses to the same config.
        let argv: Vec<String> = given
            .iter()
            .flat_map(|g| g.split(' ').map(String::from))
            .collect();
        let again = parse(&argv.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(again.apply("small32", LossKind::Vmf).unwrap().0, c);
    }

    #[test]
    fn ibot_options_need_ibot() {
        for opt in [
            &["--mask-aspect", "0.5,2"][..],
            &["--patch-center-momentum", "0.8"],
            &["--separate-patch-head"],
        ] {
            let e = parse(opt)
                .apply("tiny", LossKind::Vmf)
                .unwrap_err()
                .to_string();
            assert!(e.contains("need --method ibot"), "{opt:?}: {e}");
        }
        let mut with_ibot = vec!["--method", "ibot", "--mask-aspect", "0.5,2"];
        let (c, given) = parse(&with_ibot).apply("tiny", LossKind::Vmf).unwrap();
        assert_eq!((c.method, c.ibot.mask_aspect), (Method::Ibot, (0.5, 2.0)));
        assert_eq!(given, ["--method ibot", "--mask-aspect 0.5,2"]);
        with_ibot.truncate(2);
        assert!(parse(&with_ibot).apply("tiny", LossKind::Vmf).is_ok());
    }
}
