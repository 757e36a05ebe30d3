//! Backends run the training step; the trainer never sees which one it has.
pub mod cpu;
