//! Umbrella crate of the dinovmf workspace: it owns the integration tests (`tests/`) and the
//! criterion benchmarks (`benches/`), and re-exports the crates they exercise.
pub use dinovmf as host;
pub use dinovmf_core as core_math;
