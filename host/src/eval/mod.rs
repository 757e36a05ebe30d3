//! Evaluation of learned features.
pub mod knn;
pub mod linear;
pub mod prototypes;
pub mod data_pass;
