//! `dinovmf math`: print the vMF normaliser, A_p and the logits for given inputs, so users can
//! check the numbers the trainer uses against their own.
use anyhow::{bail, Result};
use clap::Args;

use dinovmf_core::vmf::{self, reference, BesselApprox};

#[derive(Args, Debug, Clone)]
pub struct MathArgs {
    /// Dimension p of the sphere (the head's bottleneck).
    #[arg(long, default_value_t = 256)]
    pub p: usize,
    /// Precisions kappa to tabulate (log C_p, D_p, A_p).
    #[arg(long, num_args = 1.., default_values_t = vec![0.1, 1.0, 10.0, 100.0, 1000.0])]
    pub kappa: Vec<f64>,
    /// Also print logits of a unit feature against prototypes of norm g at cosine `--cos`.
    #[arg(long, num_args = 1..)]
    pub g: Vec<f64>,
    /// Cosine mu.y between the feature and each prototype (one per --g, or one for all).
    #[arg(long, num_args = 1..)]
    pub cos: Vec<f64>,
    /// Temperature tau of the branch (kappa = g / tau).
    #[arg(long, default_value_t = 0.1)]
    pub tau: f64,
}

pub fn run(a: &MathArgs) -> Result<()> {
    if a.p < 3 {
        bail!(
            "p must be at least 3 (the vMF normaliser needs nu = p/2 - 1 > 0), got {}",
            a.p
        );
    }
    if let Some(k) = a.kappa.iter().find(|k| !(k.is_finite() && **k > 0.0)) {
        bail!("kappa must be positive and finite, got {k}");
    }
    let p = a.p;
    println!(
        "p = {p}, nu = p/2 - 1 = {}, c_p = {:.12}",
        p as f64 / 2.0 - 1.0,
        reference::log_norm_const(p)
    );
    println!(
        "{:>12} {:>22} {:>18} {:>16} {:>16} {:>14} {:>14}",
        "kappa",
        "log C_p (f64 ref)",
        "D_p (f64 ref)",
        "D_p f32 uniform",
        "D_p f32 largenu",
        "A_p (f64 ref)",
        "A_p f32"
    );
    for &k in &a.kappa {
        let kf = k as f32;
        println!(
            "{:>12.6e} {:>22.12} {:>18.10e} {:>16.8e} {:>16.8e} {:>14.10} {:>14.8}",
            k,
            reference::log_cp(p, k),
            reference::log_norm_shifted(p, k),
            vmf::log_norm_shifted(p, kf, BesselApprox::Uniform),
            vmf::log_norm_shifted(p, kf, BesselApprox::LargeNu),
            reference::mean_resultant(p, k),
            vmf::mean_resultant(p, kf, BesselApprox::Uniform),
        );
    }
    if !a.g.is_empty() {
        if a.cos.is_empty() || (a.cos.len() != 1 && a.cos.len() != a.g.len()) {
            bail!("--cos needs one value, or one per --g value");
        }
        if a.tau.is_nan() || a.tau <= 0.0 {
            bail!("--tau must be positive");
        }
        println!("\nlogits of a unit feature y, tau = {} (softmax-invariant constant c_p left out of vMF):", a.tau);
        println!(
            "{:>10} {:>10} {:>12} {:>16} {:>16}",
            "g", "mu.y", "kappa", "DINO g mu.y/tau", "vMF k mu.y + D_p"
        );
        for (i, &g) in a.g.iter().enumerate() {
            let c = if a.cos.len() == 1 { a.cos[0] } else { a.cos[i] };
            if !(-1.0..=1.0).contains(&c) {
                bail!("--cos values are cosines, in [-1, 1]; got {c}");
            }
            let kappa = g / a.tau;
            println!(
                "{:>10.4} {:>10.4} {:>12.4} {:>16.6} {:>16.6}",
                g,
                c,
                kappa,
                kappa * c,
                kappa * c + reference::log_norm_shifted(p, kappa)
            );
        }
    }
    Ok(())
}
