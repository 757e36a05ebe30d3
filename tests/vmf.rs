//! Tests of the vMF normaliser (`dinovmf_core::vmf`): the f64 reference against closed forms,
//! tabulated high-precision values and itself (three methods where they overlap); the f32 / f16 fast
//! path against the reference, with the tolerances stated in each assertion.
// The mpmath tables keep the 20 digits they were printed with.
#![allow(clippy::excessive_precision)]
use dinovmf_core::vmf::{self, reference, BesselApprox, VmfNorm};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const LN_2: f64 = std::f64::consts::LN_2;

/// kappa log-spaced over [lo, hi], `per_decade` points per decade.
fn log_grid(lo: f64, hi: f64, per_decade: usize) -> Vec<f64> {
    let n = ((hi / lo).log10() * per_decade as f64).round() as usize;
    (0..=n)
        .map(|i| lo * 10f64.powf(i as f64 / per_decade as f64))
        .collect()
}

const P_GRID: [usize; 22] = [
    1, 2, 3, 5, 8, 9, 16, 17, 31, 32, 33, 63, 64, 65, 128, 255, 256, 512, 768, 1023, 1024, 4096,
];

// ln I_nu(x) from mpmath 1.3.0 (`mp.log(mp.besseli(nu, x))` at 80 digits, agreeing with 50 digits
// to 1e-30); independent of this crate.
const MPMATH_LOG_I: [(f64, f64, f64); 26] = [
    (0.5, 1e-06, -7.1335466316266978404),
    (0.5, 0.3, -0.8128224993880243258),
    (0.5, 75.0, 71.922317410027172038),
    (1.5, 2.5, 0.62769004500538016282),
    (2.0, 1000000.0, 999992.17330431281225),
    (3.0, 12.0, 9.4597669226008634473),
    (7.5, 0.01, -49.286644565235257339),
    (7.5, 61.0, 57.563384928165933901),
    (14.0, 150.0, 145.92153559045320874),
    (31.0, 0.001, -313.72019979130736319),
    (31.0, 31.0, 13.709270677469416418),
    (31.0, 4000.0, 3994.8139284826492679),
    (63.0, 7.0, -121.89412386825575656),
    (127.0, 10.0, -286.95966840529008013),
    (127.0, 127.0, 64.156472533865364152),
    (127.0, 1000.0, 987.56959181512957981),
    (127.0, 100000.0, 99993.243954591926775),
    (200.5, 55.0, -197.66957482703329017),
    (255.0, 300.0, 193.15991827054572755),
    (400.0, 1e-06, -7803.963793392929172),
    (400.0, 59.0, -644.58020941955138442),
    (400.0, 400.0, 209.04806922130623188),
    (400.0, 25000.0, 24990.81775518181258),
    (400.0, 1000000.0, 999992.09330627387988),
    (0.0, 100.0, 96.779732689942583717),
    (0.25, 500.0, 495.97394510547215037),
];

// (p, kappa, D_p, A_p) from mpmath 1.3.0 (`-log(hyp0f1(p/2, kappa^2/4))`,
// `besseli(p/2, kappa)/besseli(p/2-1, kappa)` at 90 digits, agreeing with 60 digits).
const MPMATH_D_A: [(usize, f64, f64, f64); 14] = [
    (8, 0.5, -0.015600670341334207839, 0.062305698884170291822),
    (8, 40.0, -29.930460441034080522, 0.91530129900114782929),
    (16, 3.0, -0.27701261045742995892, 0.18195007234721004497),
    (33, 100.0, -64.2162691767605743, 0.8520477752515224972),
    (
        64,
        0.001,
        -7.8124999990752252308e-9,
        0.000015624999996300899948,
    ),
    (64, 64.0, -24.23414777886027668, 0.62043043654834949262),
    (256, 10.0, -0.19516493887717579719, 0.039003534458180919678),
    (256, 100.0, -18.28620346408506479, 0.3445393251582564896),
    (256, 1000.0, -689.86781153880923199, 0.88054006559127872958),
    (256, 2500.0, -2077.8726338218609964, 0.95028998373490899979),
    (768, 50000.0, -48012.695139018014075, 0.99235933790639901238),
    (
        1024,
        100000.0,
        -97142.934434964945284,
        0.99489805608282997936,
    ),
    (3, 7.0, -4.3609418388556765617, 0.85714452020167823116),
    (2, 5.0, -3.3046817758225334338, 0.89338313704408522159),
];

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1.0)
}

// ---------------------------------------------------------------------------------------------
// The f64 reference
// ---------------------------------------------------------------------------------------------

#[test]
fn debye_polynomials_match_abramowitz_stegun_9_3_9_to_1e_15() {
    let exact: [fn(f64) -> f64; 3] = [
        |t| (3.0 * t - 5.0 * t.powi(3)) / 24.0,
        |t| (81.0 * t * t - 462.0 * t.powi(4) + 385.0 * t.powi(6)) / 1152.0,
        |t| {
            (30375.0 * t.powi(3) - 369603.0 * t.powi(5) + 765765.0 * t.powi(7)
                - 425425.0 * t.powi(9))
                / 414720.0
        },
    ];
    for (k, f) in exact.iter().enumerate() {
        for i in 0..=20 {
            let t = i as f64 / 20.0 + 0.013;
            let (a, b) = (reference::debye_u(k + 1, t), f(t));
            assert!(
                (a - b).abs() <= 1e-15 * (1.0 + b.abs()),
                "u{} ({t}) {a} vs {b}",
                k + 1
            );
        }
    }
    // u_k(1) are the Stirling-series coefficients of 1/Gamma: sum u_k(1)/nu^k = exp(-R(nu)).
    let nu = 40.0f64;
    let s: f64 = (0..=reference::DEBYE_TERMS)
        .map(|k| reference::debye_u(k, 1.0) / nu.powi(k as i32))
        .sum();
    let r = reference::stirling_remainder(nu);
    assert!(
        (s.ln() + r).abs() < 1e-15,
        "ln S(1) + R(nu) = {}",
        s.ln() + r
    );
}

#[test]
fn reference_log_bessel_i_matches_mpmath_to_1e_13() {
    for &(nu, x, want) in MPMATH_LOG_I.iter() {
        let got = reference::log_bessel_i(nu, x);
        assert!(
            rel(got, want) < 1e-13,
            "ln I_{nu}({x}) = {got}, mpmath {want} (tol 1e-13 rel)"
        );
    }
    // Published values (A&S table 9.8 / DLMF): I_0(1), I_1(1), I_0(10), I_1(10).
    for &(nu, x, v) in &[
        (0.0, 1.0, 1.2660658777520082),
        (1.0, 1.0, 0.5651591039924851),
        (0.0, 10.0, 2815.716628466254),
        (1.0, 10.0, 2670.988303701255),
    ] {
        let got = reference::log_bessel_i(nu, x);
        assert!(
            (got - f64::ln(v)).abs() < 1e-14,
            "ln I_{nu}({x}) = {got} vs {} (tol 1e-14)",
            v.ln()
        );
    }
}

/// ln sinh x, stable for all x > 0.
fn ln_sinh(x: f64) -> f64 {
    if x < 1.0 {
        x.ln() + ln_sinhc_series(x)
    } else {
        x - LN_2 + (-(-2.0 * x).exp()).ln_1p()
    }
}

/// ln(sinh x / x) from its positive series (x < 2).
fn ln_sinhc_series(x: f64) -> f64 {
    let (mut term, mut sum, mut n) = (1.0f64, 0.0f64, 1.0f64);
    loop {
        term *= x * x / ((2.0 * n) * (2.0 * n + 1.0));
        sum += term;
        if term < 1e-18 * sum {
            break;
        }
        n += 1.0;
    }
    sum.ln_1p()
}

/// ln(cosh x - sinh x / x), stable for all x > 0 (the I_{3/2} numerator).
fn ln_i32_numerator(x: f64) -> f64 {
    if x < 2.0 {
        // sum_{n>=1} x^{2n} 2n / (2n+1)!, all terms positive.
        let (mut pw, mut fact, mut sum, mut n) = (1.0f64, 1.0f64, 0.0f64, 1.0f64);
        loop {
            pw *= x * x;
            fact *= (2.0 * n) * (2.0 * n + 1.0);
            let term = pw * 2.0 * n / fact;
            sum += term;
            if term < 1e-18 * sum {
                break;
            }
            n += 1.0;
        }
        sum.ln()
    } else {
        // e^x/2 (1 - 1/x) + e^-x/2 (1 + 1/x)
        x - LN_2 + ((1.0 - 1.0 / x) + (-2.0 * x).exp() * (1.0 + 1.0 / x)).ln()
    }
}

#[test]
fn reference_log_bessel_i_matches_half_integer_closed_forms_to_1e_13() {
    let c = |x: f64| 0.5 * (2.0 / (std::f64::consts::PI * x)).ln();
    for x in log_grid(1e-6, 1e6, 12) {
        let i12 = c(x) + ln_sinh(x);
        let i32 = c(x) + ln_i32_numerator(x);
        let g12 = reference::log_bessel_i(0.5, x);
        let g32 = reference::log_bessel_i(1.5, x);
        assert!(
            rel(g12, i12) < 1e-13,
            "ln I_1/2({x}) {g12} vs {i12} (tol 1e-13 rel)"
        );
        assert!(
            rel(g32, i32) < 1e-13,
            "ln I_3/2({x}) {g32} vs {i32} (tol 1e-13 rel)"
        );
    }
}

#[test]
fn reference_methods_agree_where_they_overlap_to_1e_12() {
    // Series vs Debye (Debye is claimed for sqrt(nu^2 + x^2) >= 50).
    for &nu in &[0.5, 2.0, 10.0, 30.0, 100.0, 255.0, 400.0] {
        for x in log_grid(1.0, 800.0, 15) {
            if (nu * nu + x * x).sqrt() < 50.0 {
                continue;
            }
            let (a, b) = (
                reference::log_bessel_i_series(nu, x),
                reference::log_bessel_i_debye(nu, x),
            );
            assert!(
                rel(a, b) < 1e-12,
                "nu {nu} x {x}: series {a} debye {b} (tol 1e-12 rel)"
            );
        }
    }
    // Hankel vs Debye (small nu, large x) and Hankel vs series.
    for &nu in &[0.5, 1.0, 2.5] {
        for x in log_grid(100.0, 1e6, 6) {
            let (a, b) = (
                reference::log_bessel_i_hankel(nu, x),
                reference::log_bessel_i_debye(nu, x),
            );
            assert!(
                rel(a, b) < 1e-12,
                "nu {nu} x {x}: hankel {a} debye {b} (tol 1e-12 rel)"
            );
        }
    }
    for &nu in &[0.0, 0.25, 0.5, 1.0] {
        for x in log_grid(40.0, 700.0, 15) {
            let (a, b) = (
                reference::log_bessel_i_hankel(nu, x),
                reference::log_bessel_i_series(nu, x),
            );
            assert!(
                rel(a, b) < 1e-12,
                "nu {nu} x {x}: hankel {a} series {b} (tol 1e-12 rel)"
            );
        }
    }
}

#[test]
fn reference_d_and_a_match_mpmath_and_spec_values() {
    for &(p, k, d, a) in MPMATH_D_A.iter() {
        let (gd, ga) = (
            reference::log_norm_shifted(p, k),
            reference::mean_resultant(p, k),
        );
        assert!(
            (gd - d).abs() <= 1e-12 * d.abs().max(1e-3),
            "D_{p}({k}) {gd} vs {d} (tol 1e-12 rel)"
        );
        assert!(
            (ga - a).abs() <= 1e-12 * a,
            "A_{p}({k}) {ga} vs {a} (tol 1e-12 rel)"
        );
    }
    // The spec's values, p = 256, to the digits it gives.
    for &(k, a, half_unit) in &[
        (10.0, 0.039, 5e-4),
        (100.0, 0.34, 5e-3),
        (1000.0, 0.88, 5e-3),
    ] {
        let got = reference::mean_resultant(256, k);
        assert!(
            (got - a).abs() <= half_unit,
            "A_256({k}) = {got}, spec {a} (tol: half its last digit)"
        );
    }
}

#[test]
fn reference_d_and_a_match_closed_forms_p1_p3_to_1e_13() {
    for k in log_grid(1e-4, 1e5, 20) {
        // p = 1: 0F1(; 1/2; k^2/4) = cosh k, A = tanh k.
        let ln_cosh = if k < 1.0 {
            (2.0 * (0.5 * k).sinh().powi(2)).ln_1p()
        } else {
            k - LN_2 + (-2.0 * k).exp().ln_1p()
        };
        let d1 = reference::log_norm_shifted(1, k);
        assert!(
            (d1 + ln_cosh).abs() <= 1e-13 * ln_cosh.max(1.0),
            "D_1({k}) {d1} vs {} (tol 1e-13)",
            -ln_cosh
        );
        let a1 = reference::mean_resultant(1, k);
        assert!(
            (a1 - k.tanh()).abs() <= 1e-13 * k.tanh(),
            "A_1({k}) {a1} (tol 1e-13 rel)"
        );
        // p = 3: 0F1(; 3/2; k^2/4) = sinh k / k, A = coth k - 1/k.
        let ln_sinhc = if k < 1.0 {
            ln_sinhc_series(k)
        } else {
            ln_sinh(k) - k.ln()
        };
        let d3 = reference::log_norm_shifted(3, k);
        assert!(
            (d3 + ln_sinhc).abs() <= 1e-13 * ln_sinhc.max(1.0),
            "D_3({k}) {d3} vs {} (tol 1e-13)",
            -ln_sinhc
        );
        let a3_want = if k < 2.0 {
            (ln_i32_numerator(k) - ln_sinh(k)).exp()
        } else {
            1.0 / k.tanh() - 1.0 / k
        };
        let a3 = reference::mean_resultant(3, k);
        assert!(
            (a3 - a3_want).abs() <= 1e-13 * a3_want,
            "A_3({k}) {a3} vs {a3_want} (tol 1e-13 rel)"
        );
    }
}

#[test]
fn reference_a_is_minus_dd_dkappa_by_central_differences_to_1e_7() {
    for &p in P_GRID.iter() {
        for k in log_grid(1e-3, 1e5, 5) {
            let h = 1e-4 * k;
            let fd = -(reference::log_norm_shifted(p, k + h)
                - reference::log_norm_shifted(p, k - h))
                / (2.0 * h);
            let a = reference::mean_resultant(p, k);
            assert!(
                (fd - a).abs() <= 1e-7 * a + 1e-12,
                "p {p} k {k}: -dD/dk {fd} vs A {a} (tol 1e-7 rel)"
            );
        }
    }
}

#[test]
fn reference_d_and_a_agree_with_textbook_log_i_forms() {
    // D = -(ln I_nu - nu ln(k/2) + lnGamma(nu+1)) and A = exp(ln I_{nu+1} - ln I_nu): these go through
    // log_bessel_i (and lgamma), the shifted forms through the Stirling remainder.
    for &p in &[3usize, 8, 16, 33, 64, 256, 512, 801] {
        let nu = p as f64 * 0.5 - 1.0;
        for k in log_grid(1e-3, 1e5, 7) {
            let li = reference::log_bessel_i(nu, k);
            let lg = reference::ln_gamma(nu + 1.0);
            let lead = nu * (0.5 * k).ln();
            let d_txt = -(li - lead + lg);
            let d = reference::log_norm_shifted(p, k);
            let scale = 1.0 + li.abs() + lead.abs() + lg;
            assert!(
                (d - d_txt).abs() <= 1e-13 * scale,
                "p {p} k {k}: D {d} vs textbook {d_txt} (tol 1e-13 x {scale})"
            );
            let a_txt = (reference::log_bessel_i(nu + 1.0, k) - li).exp();
            let a = reference::mean_resultant(p, k);
            assert!(
                (a - a_txt).abs() <= 2e-13 * (1.0 + li.abs()) * a,
                "p {p} k {k}: A {a} vs {a_txt}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fast path
// ---------------------------------------------------------------------------------------------

/// Max |err D| / max(1, |D|), max |err A| / A, and max |err D| where |D| <= 100 (there f32
/// rounding of D stays below 4e-5, so the absolute error shows the approximation itself).
fn fast_errors(p: usize, approx: BesselApprox, grid: &[f64]) -> (f64, f64, f64) {
    let ev = VmfNorm::new(p, approx);
    let (mut ed, mut ea, mut ed_abs) = (0.0f64, 0.0f64, 0.0f64);
    for &k in grid {
        let kf = k as f32;
        let kk = kf as f64; // compare at the f32 kappa actually used
        let (d, a) = ev.eval(kf);
        let (rd, ra) = (
            reference::log_norm_shifted(p, kk),
            reference::mean_resultant(p, kk),
        );
        assert!(d.is_finite() && a.is_finite(), "p {p} k {k}: D {d}, A {a}");
        ed = ed.max((d as f64 - rd).abs() / rd.abs().max(1.0));
        if rd.abs() <= 100.0 {
            ed_abs = ed_abs.max((d as f64 - rd).abs());
        }
        ea = ea.max((a as f64 - ra).abs() / ra);
    }
    (ed, ea, ed_abs)
}

#[test]
fn fast_uniform_meets_2e_6_for_d_and_1e_5_for_a_on_the_grid() {
    let grid = log_grid(1e-4, 1e5, 40);
    println!("   p   max|dD|/max(1,|D|)   max|dA|/A   (Uniform, f32 vs f64 reference)");
    for &p in P_GRID.iter() {
        let (ed, ea, _) = fast_errors(p, BesselApprox::Uniform, &grid);
        println!("{p:5}   {ed:10.2e}          {ea:10.2e}");
        // Spec targets (stated for p >= 64): 2e-6 max(1,|D|) and 1e-5 relative for A. The order shift
        // keeps small p as accurate, and what is reached is 1e-6 for both everywhere: hold that.
        assert!(
            ed <= 1e-6,
            "p {p}: D error {ed:e} > 1e-6 max(1,|D|) (spec target 2e-6)"
        );
        assert!(
            ea <= 1e-6,
            "p {p}: A error {ea:e} > 1e-6 relative (spec target 1e-5)"
        );
    }
}

#[test]
fn fast_uniform_on_random_p_and_kappa_meets_2e_6_and_1e_5() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_f76f);
    for _ in 0..3000 {
        let p = rng.gen_range(1..3000usize);
        let k = 10f64.powf(rng.gen_range(-5.0..5.5)) as f32;
        let (d, a) = vmf::log_norm_and_mean(p, k, BesselApprox::Uniform);
        let (rd, ra) = (
            reference::log_norm_shifted(p, k as f64),
            reference::mean_resultant(p, k as f64),
        );
        assert!(
            rel(d as f64, rd) <= 2e-6,
            "p {p} k {k}: D {d} vs {rd} (tol 2e-6 max(1,|D|))"
        );
        assert!(
            (a as f64 - ra).abs() <= 1e-5 * ra,
            "p {p} k {k}: A {a} vs {ra} (tol 1e-5 rel)"
        );
    }
}

#[test]
fn fast_large_nu_is_the_leading_term_with_error_about_1_over_12nu() {
    let grid = log_grid(1e-4, 1e5, 40);
    println!("   p   LargeNu: max|dD| (|D|<=100)  max|dD|/max(1,|D|)  max|dA|/A   (1/(12 nu))");
    for &p in &[8usize, 16, 32, 64, 128, 256, 512, 1024] {
        let (ed, ea, ed_abs) = fast_errors(p, BesselApprox::LargeNu, &grid);
        let nu = p as f64 * 0.5 - 1.0;
        println!(
            "{p:5}   {ed_abs:10.2e}  {ed:10.2e}  {ea:10.2e}  ({:.2e})",
            1.0 / (12.0 * nu)
        );
        // It is the leading term: visibly worse than Uniform, and bounded by the dropped
        // max_t |u1(t) - u1(1)| / nu = 0.1206 / nu, plus the u2 term and f32 rounding of |D| <= 100.
        assert!(
            ed_abs <= 0.121 / nu + 0.05 / (nu * nu) + 4e-5,
            "p {p}: LargeNu |dD| {ed_abs:e}"
        );
        assert!(
            ed_abs >= 0.5 / (12.0 * nu),
            "p {p}: LargeNu |dD| {ed_abs:e} suspiciously small"
        );
        // A_LN / A = 1 - 1/nu^2 + O(kappa^2) at small kappa.
        assert!(
            ea <= 1.5 / (nu * nu),
            "p {p}: LargeNu A error {ea:e} > 1.5/nu^2"
        );
    }
    let (_, _, e256) = fast_errors(256, BesselApprox::LargeNu, &grid);
    assert!(
        e256 > 4e-4 && e256 < 1e-3,
        "p 256 LargeNu |dD| {e256:e} (spec: ~7e-4)"
    );
}

#[test]
fn fast_a_is_minus_dd_dkappa_in_f32_to_1e_3() {
    for &approx in &[BesselApprox::Uniform, BesselApprox::LargeNu] {
        for &p in &[3usize, 8, 33, 64, 256, 1024] {
            for k in log_grid(1e-2, 1e4, 4) {
                let k = k as f32;
                let h = 1e-2 * k;
                let fd = -(vmf::log_norm_shifted(p, k + h, approx) as f64
                    - vmf::log_norm_shifted(p, k - h, approx) as f64)
                    / (2.0 * ((k + h) as f64 - k as f64));
                let a = vmf::mean_resultant(p, k, approx) as f64;
                assert!(
                    (fd - a).abs() <= 1e-3 * a,
                    "{approx:?} p {p} k {k}: FD {fd} vs A {a} (tol 1e-3 rel)"
                );
            }
        }
    }
}

#[test]
fn fast_small_kappa_is_relative_accurate_and_d0_is_zero() {
    for &p in P_GRID.iter() {
        for &approx in &[BesselApprox::Uniform, BesselApprox::LargeNu] {
            let (d0, a0) = vmf::log_norm_and_mean(p, 0.0, approx);
            assert!(
                d0 == 0.0 && a0 == 0.0,
                "p {p} {approx:?}: D(0) {d0} A(0) {a0}"
            );
        }
        for &k in &[1e-30f32, 1e-20, 1e-12, 1e-6] {
            let a = vmf::mean_resultant(p, k, BesselApprox::Uniform) as f64;
            let want = k as f64 / p as f64; // A_p ~ kappa/p
            assert!(
                (a - want).abs() <= 1e-6 * want,
                "p {p} k {k}: A {a} vs k/p {want} (tol 1e-6 rel)"
            );
            let d = vmf::log_norm_shifted(p, k, BesselApprox::Uniform) as f64;
            let dw = -(k as f64).powi(2) / (2.0 * p as f64);
            assert!(
                (d - dw).abs() <= 1e-6 * dw.abs() + 1e-37,
                "p {p} k {k}: D {d} vs -k^2/2p {dw}"
            );
        }
    }
}

#[test]
fn fast_edge_cases_inf_nan_negative_huge_and_p0() {
    for &p in P_GRID.iter() {
        for &approx in &[BesselApprox::Uniform, BesselApprox::LargeNu] {
            let (d, a) = vmf::log_norm_and_mean(p, f32::INFINITY, approx);
            assert!(
                d == f32::NEG_INFINITY && a == 1.0,
                "p {p}: D(inf) {d}, A(inf) {a}"
            );
            let (d, a) = vmf::log_norm_and_mean(p, f32::NAN, approx);
            assert!(d.is_nan() && a.is_nan(), "p {p}: NaN in, {d} {a} out");
            let (dp, ap) = vmf::log_norm_and_mean(p, 3.7, approx);
            let (dn, an) = vmf::log_norm_and_mean(p, -3.7, approx);
            assert!(
                dp == dn && ap == -an,
                "p {p}: D even / A odd: {dp} {dn} {ap} {an}"
            );
            let mut prev = (1.0f32, -1.0f32);
            for &k in &[1e10f32, 1e20, 1e30, 1e37, 3e38] {
                let (d, a) = vmf::log_norm_and_mean(p, k, approx);
                assert!(
                    !d.is_nan() && d < prev.0 && d >= -k * (1.0 + 1e-6),
                    "p {p} k {k}: D {d} (>= -k)"
                );
                assert!(
                    a > 0.0 && a <= 1.0 && a >= prev.1 - 4e-7,
                    "p {p} k {k}: A {a}"
                );
                prev = (d, a);
            }
        }
    }
    assert!(vmf::log_norm_shifted(0, 1.0, BesselApprox::Uniform).is_nan());
    assert!(vmf::mean_resultant(0, 1.0, BesselApprox::Uniform).is_nan());
    assert!(reference::log_norm_shifted(0, 1.0).is_nan());
}

#[test]
fn fast_d_decreases_and_a_increases_in_kappa() {
    for &p in P_GRID.iter() {
        let ev = VmfNorm::new(p, BesselApprox::Uniform);
        let mut prev = ev.eval(1e-3);
        for k in log_grid(1e-3, 1e5, 40).into_iter().skip(1) {
            let cur = ev.eval(k as f32);
            // monotone up to the stated accuracy of A (4e-7 near A = 1 for p = 1, 2)
            let ulp = 4e-7;
            assert!(
                cur.0 <= prev.0 && cur.1 >= prev.1 - ulp && cur.1 <= 1.0,
                "p {p} k {k}: {prev:?} -> {cur:?}"
            );
            prev = cur;
        }
    }
}

#[test]
fn slices_equal_scalars_bitwise() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let ks: Vec<f32> = (0..513)
        .map(|_| 10f32.powf(rng.gen_range(-4.0..5.0)))
        .collect();
    let ks16: Vec<f16> = ks.iter().map(|&k| f16::from_f32(k.min(6e4))).collect();
    for &p in &[2usize, 8, 64, 256] {
        for &approx in &[BesselApprox::Uniform, BesselApprox::LargeNu] {
            let (mut d, mut a, mut d2, mut a2) = (
                vec![0f32; 513],
                vec![0f32; 513],
                vec![0f32; 513],
                vec![0f32; 513],
            );
            vmf::log_norm_shifted_slice(p, &ks, &mut d, approx);
            vmf::mean_resultant_slice(p, &ks, &mut a, approx);
            vmf::log_norm_and_mean_slice(p, &ks, &mut d2, &mut a2, approx);
            let (mut d16, mut a16) = (vec![f16::ZERO; 513], vec![f16::ZERO; 513]);
            vmf::log_norm_shifted_f16_slice(p, &ks16, &mut d16, approx);
            vmf::mean_resultant_f16_slice(p, &ks16, &mut a16, approx);
            for i in 0..513 {
                let (sd, sa) = vmf::log_norm_and_mean(p, ks[i], approx);
                assert_eq!(d[i].to_bits(), sd.to_bits());
                assert_eq!(d2[i].to_bits(), sd.to_bits());
                assert_eq!(a[i].to_bits(), sa.to_bits());
                assert_eq!(a2[i].to_bits(), sa.to_bits());
                assert_eq!(
                    d16[i].to_bits(),
                    vmf::log_norm_shifted_f16(p, ks16[i], approx).to_bits()
                );
                assert_eq!(
                    a16[i].to_bits(),
                    vmf::mean_resultant_f16(p, ks16[i], approx).to_bits()
                );
            }
        }
    }
}

#[test]
fn f16_matches_f32_to_half_an_f16_ulp_and_never_overflows() {
    // Every f16 kappa from 2^-14 up to the largest finite (65504): the only error is the final
    // rounding, |f16 - f32| <= 2^-11 |f32| + 2^-25 (half an ulp, subnormals included).
    let lo = f16::from_f32(6.1035156e-5).to_bits();
    let hi = f16::MAX.to_bits();
    for &p in &[3usize, 8, 64, 256, 1024] {
        for &approx in &[BesselApprox::Uniform, BesselApprox::LargeNu] {
            for bits in (lo..=hi).step_by(3) {
                let k = f16::from_bits(bits);
                let (d32, a32) = vmf::log_norm_and_mean(p, k.to_f32(), approx);
                let d16 = vmf::log_norm_shifted_f16(p, k, approx).to_f32();
                let a16 = vmf::mean_resultant_f16(p, k, approx).to_f32();
                assert!(
                    d16.is_finite() && a16.is_finite(),
                    "p {p} k {k}: f16 D {d16} A {a16}"
                );
                let tol = |x: f32| x.abs() * 2f32.powi(-11) + 2f32.powi(-25);
                assert!(
                    (d16 - d32).abs() <= tol(d32),
                    "p {p} k {k}: D f16 {d16} f32 {d32}"
                );
                assert!(
                    (a16 - a32).abs() <= tol(a32),
                    "p {p} k {k}: A f16 {a16} f32 {a32}"
                );
            }
            let k = f16::from_f32(2500.0); // 100 / 0.04
            assert!(vmf::log_norm_shifted_f16(p, k, approx).is_finite());
            assert_eq!(
                vmf::log_norm_shifted_f16(p, f16::INFINITY, approx),
                f16::NEG_INFINITY
            );
            assert_eq!(vmf::mean_resultant_f16(p, f16::INFINITY, approx), f16::ONE);
            assert!(vmf::log_norm_shifted_f16(p, f16::NAN, approx).is_nan());
        }
    }
}

#[test]
fn log_cp_is_c_p_plus_d_and_matches_the_textbook_form() {
    for &p in &[2usize, 3, 16, 64, 256, 1024] {
        // c_p against its definition via Gamma at small p: c_3 = -ln(4 pi) + ... computed directly.
        let nu = p as f64 * 0.5 - 1.0;
        for k in log_grid(1e-2, 1e5, 5) {
            let k = k as f32;
            let got = vmf::log_cp(p, k, BesselApprox::Uniform);
            let txt = reference::log_cp(p, k as f64);
            let d = reference::log_norm_shifted(p, k as f64);
            // textbook form is only good to ~1e-15 of its largest term
            let tol = 2e-6 * d.abs().max(1.0) + 1e-13 * (txt.abs() + (nu * (k as f64).ln()).abs());
            assert!(
                (got - txt).abs() <= tol,
                "p {p} k {k}: log C_p {got} vs textbook {txt} (tol {tol:e})"
            );
        }
    }
    // p = 3: C_3(k) = k / (4 pi sinh k), so c_3 = -ln(4 pi) + lim(ln(k / sinh k)) = -ln(4 pi).
    let c3 = vmf::log_norm_const(3);
    assert!(
        (c3 + (4.0 * std::f64::consts::PI).ln()).abs() < 1e-14,
        "c_3 = {c3}"
    );
}

#[test]
fn fast_log_bessel_i_matches_reference() {
    for &nu in &[0.0f32, 0.5, 1.0, 3.0, 14.5, 31.0, 127.0, 400.0] {
        for x in log_grid(1e-4, 1e5, 10) {
            let x = x as f32;
            let want = reference::log_bessel_i(nu as f64, x as f64);
            let got = vmf::log_bessel_i(nu, x, BesselApprox::Uniform) as f64;
            // conditioning: nu ln(x/2) and lnGamma(nu+1) are each rounded in f32
            let scale = 1.0
                + want.abs()
                + (nu as f64 * (0.5 * x as f64).ln()).abs()
                + reference::ln_gamma(nu as f64 + 1.0).abs();
            assert!(
                (got - want).abs() <= 5e-7 * scale,
                "nu {nu} x {x}: {got} vs {want} (tol 5e-7 x {scale})"
            );
            if nu >= 3.0 {
                let ln = vmf::log_bessel_i(nu, x, BesselApprox::LargeNu) as f64;
                let tol =
                    5e-7 * scale + 1.0 / (12.0 * nu as f64) + 1.0 / (8.0 * (nu as f64).powi(2));
                assert!(
                    (ln - want).abs() <= tol,
                    "LargeNu nu {nu} x {x}: {ln} vs {want} (tol {tol:e})"
                );
            }
        }
    }
}
