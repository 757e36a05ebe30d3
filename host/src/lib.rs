//! `dinovmf`: the host library behind the `dinovmf` command-line program.
pub mod cli;
pub mod data;
