//! Evaluation of learned features.
pub mod data_pass;
pub mod knn;
pub mod linear;
pub mod prototypes;
pub mod signals;
