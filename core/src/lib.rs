//! `dinovmf-core`: the single source of truth for the mathematics of DINO and DINO-vMF.
//!
//! `#![no_std]`, no allocation on any hot path: every function takes slices plus explicit
//! dimensions. See `shared/spec/method.md` for the formulas this crate implements.
#![no_std]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod centering;
pub mod collapse;
pub mod koleo;
pub mod logits;
pub mod loss;
pub mod masking;
pub mod mim_loss;
pub mod model;
pub mod ops;
pub mod optim;
pub mod prototypes;
pub mod quant;
pub mod real;
#[cfg(feature = "alloc")]
pub mod reference_model;
pub mod schedule;
pub mod sinkhorn;
pub mod vmf;

pub use real::Real;
