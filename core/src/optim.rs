//! Optimiser arithmetic as per-slice functions: AdamW (PyTorch semantics), the EMA teacher
//! update and DINO's per-tensor gradient clipping, plus layout-wide drivers over the flat
//! buffer of [`crate::model`].
use crate::model::{for_each_param, ModelConfig};
use crate::Real;

/// AdamW constants; the learning rate and weight decay come per step from the schedules.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamW {
    /// `torch.optim.AdamW`'s defaults, which DINO uses.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// One AdamW step over a slice, as `torch.optim.AdamW` (non-amsgrad, non-fused):
/// `p *= 1 - lr wd` (decoupled decay), `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
/// `p -= (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
/// `step` is this tensor's 1-based step count (PyTorch counts per parameter). Scalar
/// coefficients are formed in f64, like PyTorch's Python floats.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step<T: Real>(
    p: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
    hp: &AdamW,
    lr: f64,
    weight_decay: f64,
    step: u64,
) {
    debug_assert!(step >= 1);
    debug_assert!(g.len() >= p.len() && m.len() >= p.len() && v.len() >= p.len());
    let t = step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - libm::pow(hp.beta1, t as f64);
    let bc2_sqrt = libm::sqrt(1.0 - libm::pow(hp.beta2, t as f64));
    let decay = T::from_f64(1.0 - lr * weight_decay);
    let step_size = T::from_f64(lr / bc1);
    let (b1, b2) = (T::from_f64(hp.beta1), T::from_f64(hp.beta2));
    let (c1, c2) = (T::from_f64(1.0 - hp.beta1), T::from_f64(1.0 - hp.beta2));
    let bc2s = T::from_f64(bc2_sqrt);
    let eps = T::from_f64(hp.eps);
    for i in 0..p.len() {
        let gi = g[i];
        let mut pi = p[i] * decay;
        let mi = b1 * m[i] + c1 * gi;
        let vi = b2 * v[i] + c2 * gi * gi;
        pi -= step_size * mi / (vi.sqrt() / bc2s + eps);
        m[i] = mi;
        v[i] = vi;
        p[i] = pi;
    }
}

/// Teacher EMA, `t = m t + (1 - m) s`, elementwise.
pub fn ema_update<T: Real>(teacher: &mut [T], student: &[T], momentum: f64) {
    debug_assert!(student.len() >= teacher.len());
    let m = T::from_f64(momentum);
    let c = T::from_f64(1.0 - momentum);
    for (t, &s) in teacher.iter_mut().zip(student) {
        *t = m * *t + c * s;
    }
}

/// L2 norm of a slice, accumulated in f64.
pub fn l2_norm<T: Real>(x: &[T]) -> f64 {
    let mut s = 0.0f64;
    for &v in x {
        let v = v.to_f64();
        s += v * v;
    }
    libm::sqrt(s)
}

/// DINO's `clip_gradients` for one parameter tensor: `coef = clip / (||g|| + 1e-6)`, and
/// `g *= coef` when `coef < 1`. Returns `||g||` before clipping.
pub fn clip_grad_tensor<T: Real>(g: &mut [T], clip: f64) -> f64 {
    let norm = l2_norm(g);
    let coef = clip / (norm + 1e-6);
    if coef < 1.0 {
        let c = T::from_f64(coef);
        for x in g.iter_mut() {
            *x *= c;
        }
    }
    norm
}

/// [`clip_grad_tensor`] on every trainable tensor of the layout (the frozen `weight_g` has no
/// gradient in DINO and is skipped). Returns the global norm `sqrt(Σ ||g_i||^2)` before
/// clipping, for logging.
pub fn clip_gradients<T: Real>(cfg: &ModelConfig, grads: &mut [T], clip: f64) -> f64 {
    let mut sq = 0.0;
    for_each_param(cfg, |p| {
        if p.trainable {
            let n = clip_grad_tensor(&mut grads[p.range()], clip);
            sq += n * n;
        }
    });
    libm::sqrt(sq)
}

/// AdamW over the whole flat buffer with DINO's two parameter groups: `weight_decay` on the
/// tensors whose spec says `decay`, none on the others. Untrainable tensors are skipped. The
/// last layer is skipped while frozen (`last_layer_step = None`, DINO drops its gradient so
/// PyTorch leaves it and its moments alone); afterwards it runs with its own 1-based step
/// count, which lags `step` by the frozen steps, exactly like PyTorch's per-parameter `step`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_model<T: Real>(
    cfg: &ModelConfig,
    params: &mut [T],
    grads: &[T],
    m: &mut [T],
    v: &mut [T],
    hp: &AdamW,
    lr: f64,
    weight_decay: f64,
    step: u64,
    last_layer_step: Option<u64>,
) {
    for_each_param(cfg, |p| {
        if !p.trainable {
            return;
        }
        let t = if p.last_layer {
            match last_layer_step {
                Some(t) => t,
                None => return,
            }
        } else {
            step
        };
        let wd = if p.decay { weight_decay } else { 0.0 };
        let r = p.range();
        adamw_step(
            &mut params[r.clone()],
            &grads[r.clone()],
            &mut m[r.clone()],
            &mut v[r],
            hp,
            lr,
            wd,
            t,
        );
    });
}
