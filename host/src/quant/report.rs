//! How far a quantized export is from the f32 teacher it came from, on a dataset's held-out
//! split: top-1 prototype agreement, feature cosine, and k-NN accuracy of both.
use anyhow::{anyhow, Context, Result};
use dinovmf_core::ops::{gelu_forward, l2norm_forward, linear_forward, L2NORM_EPS};
use dinovmf_core::quant::infer::{forward, NoObserver};
use dinovmf_core::quant::Model;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use super::image::{normalized_chw, to_model_input};
use super::{ScratchBuf, Teacher};
use crate::backend::{self, Device, Net};
use crate::config::backend_config;
use crate::data::Dataset;
use crate::eval::knn::{knn_accuracy, KnnScore, KNN_KS, KNN_TEMPERATURE};
use crate::train::Datasets;

/// Outputs of one network on a set of images.
pub struct Outputs {
    /// L2-normalised `[CLS]` features `[n, D]`.
    pub features: Vec<f32>,
    /// Prototype logits `[n, K]` (empty when not asked for).
    pub logits: Vec<f32>,
}

/// The comparison of a quantized export against the f32 teacher.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub n_test: usize,
    /// Fraction of held-out images whose top-1 prototype is the f32 model's.
    pub top1_agreement: f64,
    /// Fraction whose f32 top-1 prototype is among the quantized model's top 5.
    pub top1_in_top5: f64,
    /// Mean and minimum cosine between quantized and f32 features.
    pub cos_mean: f64,
    pub cos_min: f64,
    /// Mean total-variation distance between the two posteriors.
    pub prob_tv: f64,
    pub knn_f32: Vec<KnnScore>,
    pub knn_quant: Vec<KnnScore>,
}

/// Every image of a dataset at the model size (RGB u8) with its label.
pub fn dataset_inputs(ds: &dyn Dataset, size: usize) -> Result<(Vec<Vec<u8>>, Vec<u32>)> {
    let imgs: Vec<Vec<u8>> = (0..ds.len())
        .into_par_iter()
        .map(|i| {
            ds.load(i)
                .with_context(|| format!("loading image {i} of {}", ds.describe()))
                .map(|img| to_model_input(&img, size))
        })
        .collect::<Result<_>>()?;
    let labels = (0..ds.len()).map(|i| ds.label(i) as u32).collect();
    Ok((imgs, labels))
}

/// The f32 teacher: features through the CPU backend (what `dinovmf eval knn` uses), the head
/// and prototype layer through core's f32 ops.
pub fn f32_outputs(t: &Teacher, images: &[Vec<u8>], logits: bool) -> Result<Outputs> {
    let size = t.model.vit.img_size;
    let d = t.model.vit.dim;
    let mut backend = backend::open(&backend_config(&t.cfg), Device::Cpu)?;
    backend.set_state(&t.state)?;
    let mut feats = Vec::with_capacity(images.len() * d);
    let mut chw = Vec::new();
    for chunk in images.chunks(256) {
        chw.clear();
        chw.resize(chunk.len() * 3 * size * size, 0.0);
        for (img, out) in chunk.iter().zip(chw.chunks_exact_mut(3 * size * size)) {
            normalized_chw(
                img,
                size,
                crate::data::IMAGENET_MEAN,
                crate::data::IMAGENET_STD,
                out,
            );
        }
        feats.extend(backend.embed(Net::Teacher, &chw, chunk.len(), size)?);
    }
    let n = images.len();
    let mut out_logits = Vec::new();
    if logits {
        let h = &t.model.head;
        let mut x = feats.clone();
        let mut din = d;
        for l in 0..h.n_layers {
            let (di, dout) = h.layer_dims(d, l);
            debug_assert_eq!(di, din);
            let w = t.param(&format!("head.mlp.{}.weight", 2 * l))?;
            let b = t.param(&format!("head.mlp.{}.bias", 2 * l))?;
            let mut y = vec![0.0f32; n * dout];
            linear_forward(&mut y, &x, w, Some(b), n, di, dout);
            if l + 1 < h.n_layers {
                let mut g = vec![0.0f32; y.len()];
                gelu_forward(&mut g, &y);
                y = g;
            }
            x = y;
            din = dout;
        }
        let p = h.bottleneck;
        let mut yn = vec![0.0f32; n * p];
        let mut norms = vec![0.0f32; n];
        l2norm_forward(&mut yn, &mut norms, &x, n, p, L2NORM_EPS as f32);
        let (mu, scale, bias) = t.prototype_layer()?;
        let k = h.out_dim;
        let mut dots = vec![0.0f32; n * k];
        linear_forward(&mut dots, &yn, &mu, None, n, p, k);
        out_logits = dots;
        for row in out_logits.chunks_exact_mut(k) {
            for ((l, s), b) in row.iter_mut().zip(&scale).zip(&bias) {
                *l = *s * *l + *b;
            }
        }
    }
    let mut norms = vec![0.0f32; n];
    let mut fe = vec![0.0f32; feats.len()];
    l2norm_forward(&mut fe, &mut norms, &feats, n, d, L2NORM_EPS as f32);
    Ok(Outputs {
        features: fe,
        logits: out_logits,
    })
}

/// The same outputs through core's quantized inference on a model file (`bar` advances by one per
/// image).
pub fn quant_outputs(
    model: &Model<'_>,
    images: &[Vec<u8>],
    logits: bool,
    bar: &ProgressBar,
) -> Result<Outputs> {
    let cfg = *model.config();
    let rows: Vec<(Vec<f32>, Vec<f32>)> = images
        .par_iter()
        .map_init(
            || ScratchBuf::new(&cfg),
            |sb, img| {
                let f = forward(model, img, sb.scratch(), &mut NoObserver)
                    .map_err(|e| anyhow!("quantized forward: {e}"))?;
                bar.inc(1);
                let l = if logits {
                    f.logits.to_vec()
                } else {
                    Vec::new()
                };
                Ok((f.feature.to_vec(), l))
            },
        )
        .collect::<Result<_>>()?;
    let mut out = Outputs {
        features: Vec::new(),
        logits: Vec::new(),
    };
    for (f, l) in rows {
        out.features.extend(f);
        out.logits.extend(l);
    }
    Ok(out)
}

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

fn softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// Compares `model_bytes` (any dtype) with the f32 teacher on `data`'s held-out split (k-NN
/// memory: the training split); with `progress`, a progress bar on stderr.
pub fn compare(
    t: &Teacher,
    model_bytes: &[u8],
    data: &Datasets,
    progress: bool,
) -> Result<Comparison> {
    let model = Model::parse(model_bytes).map_err(|e| anyhow!("model: {e}"))?;
    let size = t.model.vit.img_size;
    let test = data
        .test
        .as_ref()
        .ok_or_else(|| anyhow!("the comparison needs a held-out split"))?;
    let (te_img, te_lab) = dataset_inputs(test.as_ref(), size)?;
    let (tr_img, tr_lab) = dataset_inputs(data.train.as_ref(), size)?;
    let bar = if progress {
        ProgressBar::with_draw_target(
            Some((te_img.len() + tr_img.len()) as u64),
            ProgressDrawTarget::stderr_with_hz(4),
        )
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}<{eta_precise}] {bar:30} {pos}/{len} images (quantized model)",
        )
        .expect("static template"),
    );
    let f_te = f32_outputs(t, &te_img, true)?;
    let q_te = quant_outputs(&model, &te_img, true, &bar)?;
    let f_tr = f32_outputs(t, &tr_img, false)?;
    let q_tr = quant_outputs(&model, &tr_img, false, &bar)?;
    bar.finish_and_clear();
    let (d, k, n) = (t.model.vit.dim, t.model.head.out_dim, te_img.len());
    let (mut agree, mut in5, mut cos_sum, mut cos_min, mut tv) = (0usize, 0usize, 0.0, 1.0f64, 0.0);
    for i in 0..n {
        let fl = &f_te.logits[i * k..(i + 1) * k];
        let ql = &q_te.logits[i * k..(i + 1) * k];
        let top = argmax(fl);
        if argmax(ql) == top {
            agree += 1;
        }
        let above = ql.iter().filter(|&&v| v > ql[top]).count();
        if above < 5 {
            in5 += 1;
        }
        let c: f64 = f_te.features[i * d..(i + 1) * d]
            .iter()
            .zip(&q_te.features[i * d..(i + 1) * d])
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        cos_sum += c;
        cos_min = cos_min.min(c);
        let (pf, pq) = (softmax(fl), softmax(ql));
        tv += 0.5 * pf.iter().zip(&pq).map(|(a, b)| (a - b).abs()).sum::<f64>();
    }
    let classes = data.train.num_classes().max(test.num_classes());
    let knn = |tr: &Outputs, te: &Outputs| {
        knn_accuracy(
            &tr.features,
            &tr_lab,
            &te.features,
            &te_lab,
            d,
            classes,
            &KNN_KS,
            KNN_TEMPERATURE,
        )
    };
    let nf = n.max(1) as f64;
    Ok(Comparison {
        n_test: n,
        top1_agreement: agree as f64 / nf,
        top1_in_top5: in5 as f64 / nf,
        cos_mean: cos_sum / nf,
        cos_min,
        prob_tv: tv / nf,
        knn_f32: knn(&f_tr, &f_te)?,
        knn_quant: knn(&q_tr, &q_te)?,
    })
}
