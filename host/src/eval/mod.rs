//! Evaluation of learned features.
pub mod knn;
