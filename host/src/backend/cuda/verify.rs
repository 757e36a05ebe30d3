//! Every kernel of `dinovmf.ptx` against `dinovmf-core` (or an f64 restatement of the kernel's
//! documented formula where core has no per-kernel function): random inputs (never zeros),
//! outputs poisoned (NaN) first. This is the one table of kernel checks, [`GROUPS`]: one entry
//! per kernel group, each a file of this folder holding the group's inputs, launches (through
//! the typed launchers the training step calls, `launch/` and `ops.rs`) and references at two
//! scales, with the tolerances of `tolerance.rs` shared by both:
//! - small sizes, every element checked: one element, below, at and above each block and tile,
//!   ragged; [`run_all`], run on a GPU by `dinovmf verify-kernels` and on the simulator by
//!   `cargo test -p dinovmf --features gpu-sim` (`host/tests/gpu_sim.rs`);
//! - the production shapes of `shapes.rs` (ViT-S/16 and ViT-B/16, batch 64, 2 x 224 + 8 x 96
//!   pixel crops, K = 65536), sampled entries in the first and the last blocks of each grid;
//!   [`run_large`], run by `dinovmf verify-kernels --large` on a GPU (every block runs) and on
//!   the simulator's corner blocks by `host/tests/gpu_sim_large.rs`.
use anyhow::{anyhow, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::device::{Device, Gpu};

mod attention_tc;
mod context;
mod elementwise;
mod gemm;
mod gemm_tc;
mod head;
mod ibot;
mod loss;
mod optim;
mod reduce;
mod report;
mod rows;
mod sample;
mod shapes;
mod sinkhorn;
mod tokens;
pub mod tolerance;

pub use context::V;
pub use report::{compare, print_rows, Row};
pub use shapes::{LargeShape, VIT_B16, VIT_S16};
pub use tolerance::Tol;

/// One kernel group: its cases at small sizes and, where it has them, at a production shape.
struct Group<D: Device> {
    name: &'static str,
    small: fn(&mut V<'_, D>),
    large: Option<fn(&mut V<'_, D>, &LargeShape)>,
}

/// The table. A group without a production-shape case runs at every size it has in `small`
/// (its kernels' cost does not depend on the model, or the step does not launch them at
/// scale); `uncovered` requires every kernel of the manifest in the small run.
fn groups<D: Device>() -> Vec<Group<D>> {
    vec![
        Group {
            name: "gemm f32",
            small: gemm::small,
            large: Some(gemm::large),
        },
        Group {
            name: "gemm tensor cores bf16",
            small: gemm_tc::small,
            large: None,
        },
        Group {
            name: "attention tensor cores bf16",
            small: attention_tc::small,
            large: None,
        },
        Group {
            name: "elementwise",
            small: elementwise::small,
            large: Some(elementwise::large),
        },
        Group {
            name: "tokens",
            small: tokens::small,
            large: None,
        },
        Group {
            name: "rows (layernorm, softmax, l2norm)",
            small: rows::small,
            large: Some(rows::large),
        },
        Group {
            name: "head (logit terms, logits, teacher, cross-entropy)",
            small: head::small,
            large: Some(head::large),
        },
        Group {
            name: "cls loss chain",
            small: loss::small,
            large: None,
        },
        Group {
            name: "ibot",
            small: ibot::small,
            large: Some(ibot::large),
        },
        Group {
            name: "sinkhorn",
            small: sinkhorn::small,
            large: None,
        },
        Group {
            name: "optimiser",
            small: optim::small,
            large: None,
        },
        Group {
            name: "reductions",
            small: reduce::small,
            large: None,
        },
    ]
}

fn start<D: Device>(gpu: &mut Gpu<D>, seed: u64) -> V<'_, D> {
    V {
        gpu,
        rng: ChaCha8Rng::seed_from_u64(seed),
        rows: Vec::new(),
    }
}

/// Every group at its small sizes on `gpu`.
pub fn run_all<D: Device>(gpu: &mut Gpu<D>, seed: u64) -> Vec<Row> {
    let mut v = start(gpu, seed);
    for g in groups::<D>() {
        let before = v.rows.len();
        (g.small)(&mut v);
        for r in &mut v.rows[before..] {
            if r.size == "-" {
                r.kernel = format!("{}: {}", g.name, r.kernel);
            }
        }
    }
    v.rows
}

/// Every group that has one at the production shape `s`; each row's size names the shape.
pub fn run_large<D: Device>(gpu: &mut Gpu<D>, s: &LargeShape, seed: u64) -> Vec<Row> {
    let mut v = start(gpu, seed);
    for g in groups::<D>() {
        if let Some(large) = g.large {
            large(&mut v, s);
        }
    }
    for r in &mut v.rows {
        r.size = if r.size == "-" {
            s.name.to_string()
        } else {
            format!("{} {}", s.name, r.size)
        };
    }
    v.rows
}

/// Kernels of the manifest no row covers (must be empty).
pub fn uncovered(rows: &[Row]) -> Vec<&'static str> {
    dinovmf_ptx::manifest::all()
        .map(|k| k.name)
        .filter(|n| !rows.iter().any(|r| r.kernel == *n))
        .collect()
}

/// Fails when any row failed or a kernel was not covered.
pub fn verdict(rows: &[Row]) -> Result<()> {
    let bad = rows.iter().filter(|r| !r.ok).count();
    let missing = uncovered(rows);
    if bad > 0 || !missing.is_empty() {
        return Err(anyhow!(
            "{bad} of {} kernel checks failed{}",
            rows.len(),
            if missing.is_empty() {
                String::new()
            } else {
                format!("; not covered: {}", missing.join(", "))
            }
        ));
    }
    Ok(())
}
