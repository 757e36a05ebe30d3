//! Prototype diagnostics and KoLeo-proto on constructed cases, against f64 and finite differences.
use dinovmf_core::logits::weight_norm_forward;
use dinovmf_core::prototypes::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random_rows(rng: &mut ChaCha8Rng, k: usize, p: usize) -> Vec<f64> {
    (0..k * p).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

fn normalise(v: &[f64], k: usize, p: usize) -> (Vec<f64>, Vec<f64>) {
    let mut mu = vec![0.0; k * p];
    let mut r = vec![0.0; k];
    let mut n = vec![0.0; k];
    weight_norm_forward(&mut mu, &mut r, &mut n, v, None, k, p);
    (mu, n)
}

#[test]
fn half_duplicates_count_half() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (k, p) = (16, 8);
    let half = random_rows(&mut rng, k / 2, p);
    let mut v = half.clone();
    v.extend_from_slice(&half);
    let (mu, _) = normalise(&v, k, p);
    assert_eq!(unique_prototypes(&mu, k, p, UNIQUE_EPS), k / 2);
    let mu32: Vec<f32> = mu.iter().map(|&x| x as f32).collect();
    assert_eq!(unique_prototypes(&mu32, k, p, UNIQUE_EPS), k / 2);
    // All distinct random directions: every one counts.
    let (mu, _) = normalise(&random_rows(&mut rng, k, p), k, p);
    assert_eq!(unique_prototypes(&mu, k, p, UNIQUE_EPS), k);
}

#[test]
fn unique_threshold_is_an_angle() {
    // Two unit vectors in the plane at angle theta: one direction below eps, two above.
    for (theta, want) in [(0.02, 1), (0.03, 2), (0.0249, 1), (0.0251, 2)] {
        let mu = [1.0f64, 0.0, libm::cos(theta), libm::sin(theta)];
        assert_eq!(
            unique_prototypes(&mu, 2, 2, UNIQUE_EPS),
            want,
            "theta {theta}"
        );
    }
    assert!((chord_of_angle(core::f64::consts::PI) - 2.0).abs() < 1e-15);
}

#[test]
fn quartiles_match_numpy_linear() {
    let mut x = [4.0f64, 1.0, 3.0, 2.0];
    let q = quartiles(&mut x).unwrap();
    assert_eq!(q, [1.0, 1.75, 2.5, 3.25, 4.0]);
    let mut y: Vec<f32> = (0..9).rev().map(|i| i as f32).collect();
    assert_eq!(quartiles(&mut y).unwrap(), [0.0, 2.0, 4.0, 6.0, 8.0]);
    assert!(quartiles::<f32>(&mut []).is_none());
    assert!(quartiles(&mut [1.0f32, f32::NAN]).is_none());
    let mut k = [0.0f32; 3];
    kappas(Some(&[0.5f32, -1.0, 2.0]), 0.04, &mut k);
    for (a, b) in k.iter().zip([12.5f32, 25.0, 50.0]) {
        assert!((a - b).abs() < 1e-4 * b, "{a} vs {b}");
    }
    kappas::<f32>(None, 0.1, &mut k);
    assert!(k.iter().all(|&x| (x - 10.0).abs() < 1e-5));
}

#[test]
fn utilisation_counts_and_entropy() {
    let u = utilisation(&[5, 0, 5, 0]);
    assert_eq!((u.used, u.total), (2, 10));
    assert!((u.entropy - 2f64.ln()).abs() < 1e-12);
    let u = utilisation(&[7; 64]);
    assert_eq!(u.used, 64);
    assert!((u.entropy - 64f64.ln()).abs() < 1e-12);
    let u = utilisation(&[0, 9, 0]);
    assert_eq!((u.used, u.entropy), (1, 0.0));
    assert_eq!(utilisation(&[0, 0]).used, 0);
    assert_eq!(argmax(&[1.0f32, 3.0, 3.0, -1.0]), 1);
}

#[test]
fn nearest_neighbours_constructed() {
    // Points on a circle at angles 0, 0.1, 1, 3: the first two pair up, 1 -> 0.1, 3 -> 1.
    let a = [0.0f64, 0.1, 1.0, 3.0];
    let mu: Vec<f64> = a
        .iter()
        .flat_map(|&t| [libm::cos(t), libm::sin(t)])
        .collect();
    let mut nn = [0usize; 4];
    nearest_neighbours(&mu, 4, 2, &mut nn);
    assert_eq!(nn, [1, 0, 1, 2]);
}

fn koleo_of_v(v: &[f64], nn: &[usize], k: usize, p: usize) -> f64 {
    let (mu, _) = normalise(v, k, p);
    koleo_proto(&mu, nn, k, p, None)
}

#[test]
fn koleo_matches_direct_formula_and_f32() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (k, p) = (12, 5);
    let (mu, _) = normalise(&random_rows(&mut rng, k, p), k, p);
    let mut nn = vec![0; k];
    nearest_neighbours(&mu, k, p, &mut nn);
    // Direct: -(1/K) sum ln min_j ||mu_i - mu_j||.
    let mut want = 0.0;
    for i in 0..k {
        let mut m = f64::INFINITY;
        for j in (0..k).filter(|&j| j != i) {
            let d: f64 = (0..p)
                .map(|q| (mu[i * p + q] - mu[j * p + q]).powi(2))
                .sum();
            m = m.min(d.sqrt());
        }
        want -= (m + KOLEO_EPS).ln();
    }
    want /= k as f64;
    let got = koleo_proto(&mu, &nn, k, p, None);
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    let mu32: Vec<f32> = mu.iter().map(|&x| x as f32).collect();
    let mut nn32 = vec![0; k];
    nearest_neighbours(&mu32, k, p, &mut nn32);
    assert_eq!(nn, nn32);
    let g32 = koleo_proto(&mu32, &nn32, k, p, None) as f64;
    assert!(
        (g32 - want).abs() < 1e-5 * want.abs().max(1.0),
        "{g32} vs {want}"
    );
}

#[test]
fn koleo_gradient_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (k, p) = (10, 6);
    // Unnormalised weights with varied norms, so the 1/||v|| factor is exercised.
    let mut v = random_rows(&mut rng, k, p);
    for (i, x) in v.iter_mut().enumerate() {
        *x *= 0.5 + (i / p) as f64 * 0.3;
    }
    let (mu, vn) = normalise(&v, k, p);
    let mut nn = vec![0; k];
    nearest_neighbours(&mu, k, p, &mut nn);
    let weight = 0.7;
    let mut dv = vec![0.25; k * p]; // accumulates on top of what is there
    let mut dmu = vec![f64::NAN; k * p];
    koleo_proto(
        &mu,
        &nn,
        k,
        p,
        Some(KoleoGrad {
            vnorm: &vn,
            dv: &mut dv,
            dmu: &mut dmu,
            weight,
        }),
    );
    let h = 1e-6;
    for i in 0..k * p {
        let mut a = v.clone();
        a[i] += h;
        let mut b = v.clone();
        b[i] -= h;
        let fd = weight * (koleo_of_v(&a, &nn, k, p) - koleo_of_v(&b, &nn, k, p)) / (2.0 * h);
        let got = dv[i] - 0.25;
        assert!(
            (got - fd).abs() < 1e-6 * (1.0 + fd.abs()),
            "dv[{i}] = {got}, finite difference {fd}"
        );
    }
    // Descent on the loss spreads the prototypes: the loss falls.
    let l0 = koleo_of_v(&v, &nn, k, p);
    let g: Vec<f64> = dv.iter().map(|x| (x - 0.25) / weight).collect();
    let v1: Vec<f64> = v.iter().zip(&g).map(|(a, b)| a - 1e-3 * b).collect();
    assert!(koleo_of_v(&v1, &nn, k, p) < l0);
}
