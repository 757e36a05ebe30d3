//! The CPU backend: all cores through rayon, matrix products through one GEMM crate.
pub mod gemm;
