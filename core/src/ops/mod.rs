//! The ViT and head ops as plain `*_forward` / `*_backward` pairs over flat row-major slices.
//!
//! These loops are the ground truth that the fast CPU backend and the GPU kernels are checked
//! against, so they favour being obviously right over being fast. Every function is generic over
//! [`Real`](crate::Real) so that the same code runs in f32 (what the kernels compute) and in f64
//! (finite-difference checks, error budgets). Nothing here allocates.
//!
//! Gradient conventions, uniform across the module:
//! - gradients with respect to an op's *input activations* (`dx`, `dqkv`, ...) OVERWRITE the
//!   output slice: the caller adds them into a residual stream itself where needed;
//! - gradients with respect to *parameters* (`dw`, `db`, `dgamma`, `dcls`, `dpos`, `dv`, `dg`)
//!   ACCUMULATE (`+=`), so that a parameter used several times (several crops, several heads)
//!   collects every use. Zero them once per step.
//!
//! Slice lengths are checked with `debug_assert!` only; dims are the caller's contract.
pub mod attention;
pub mod conv_stem;
pub mod dot;
pub mod drop_path;
pub mod gelu;
pub mod l2norm;
pub mod layernorm;
pub mod linear;
pub mod patch_embed;
pub mod residual;
pub mod softmax;
pub mod tokens;

pub use attention::{attention_backward, attention_forward};
pub use conv_stem::{chw_to_hwc, col2im3x3, conv3x3_out_side, im2col3x3};
pub use dot::{axpy, dot};
pub use drop_path::{
    drop_path_backward, drop_path_forward, drop_path_mask_from_uniform, drop_path_rates,
};
pub use gelu::{gelu, gelu_backward, gelu_forward, gelu_grad};
pub use l2norm::{
    l2norm_backward, l2norm_forward, l2norm_row_backward, l2norm_row_inplace, L2NORM_EPS,
};
pub use layernorm::{layernorm_backward, layernorm_forward};
pub use linear::{linear_backward, linear_forward};
pub use patch_embed::{patch_embed_backward, patch_embed_forward, patchify};
pub use residual::{residual_backward, residual_forward};
pub use softmax::{log_sum_exp, softmax_backward, softmax_forward, softmax_in_place, softmax_row};
pub use tokens::{
    mask_tokens_backward, mask_tokens_forward, pos_embed_for_grid_backward,
    pos_embed_for_grid_forward, pos_resize_backward, pos_resize_forward, tokens_backward,
    tokens_forward,
};
