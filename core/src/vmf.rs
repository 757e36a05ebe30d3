//! PLACEHOLDER (being written): von Mises-Fisher normaliser.
//! The signatures below are the agreed API; bodies are temporary leading-order forms.

/// Which approximation of log I_nu the f32 hot path uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BesselApprox {
    /// Uniform (Debye) expansion with the u1, u2 corrections: f32 rounding for p >= 64.
    #[default]
    Uniform,
    /// Leading term only: the paper's "large-nu approximation".
    LargeNu,
}

/// Shifted log-normaliser D_p(kappa) = -log 0F1(; p/2; kappa^2/4) = log C_p(kappa) - c_p.
pub fn log_norm_shifted(p: usize, kappa: f32, approx: BesselApprox) -> f32 {
    let _ = approx;
    let nu = p as f32 * 0.5 - 1.0;
    let z = kappa / nu;
    let s = libm::sqrtf(1.0 + z * z);
    -(nu * (s - 1.0 - libm::logf((1.0 + s) * 0.5)) - 0.5 * libm::logf(s))
}

/// A_p(kappa) = I_{p/2}(kappa) / I_{p/2-1}(kappa) = -d D_p / d kappa.
pub fn mean_resultant(p: usize, kappa: f32, approx: BesselApprox) -> f32 {
    let _ = approx;
    let nu = p as f32 * 0.5 - 1.0;
    let z = kappa / nu;
    let s = libm::sqrtf(1.0 + z * z);
    z / (1.0 + s)
}

pub mod reference {
    //! f64 references (tests, CLI checks; never on a hot path).

    /// D_p(kappa) in f64.
    pub fn log_norm_shifted(p: usize, kappa: f64) -> f64 {
        let nu = p as f64 * 0.5 - 1.0;
        let z = kappa / nu;
        let s = libm::sqrt(1.0 + z * z);
        -(nu * (s - 1.0 - libm::log((1.0 + s) * 0.5)) - 0.5 * libm::log(s))
    }

    /// A_p(kappa) in f64.
    pub fn mean_resultant(p: usize, kappa: f64) -> f64 {
        let nu = p as f64 * 0.5 - 1.0;
        let z = kappa / nu;
        z / (1.0 + libm::sqrt(1.0 + z * z))
    }
}
