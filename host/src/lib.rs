//! `dinovmf`: the host library behind the `dinovmf` command-line program.
pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod eval;
pub mod flops;
pub mod interop;
pub mod output;
pub mod plot;
pub mod quality;
pub mod quant;
pub mod report;
pub mod train;
