//! The trainer (being written).
pub mod config;
