//! Inputs and sampled positions: random values that are never zero, and the indices a
//! production-shape case reads back (the first and the last rows, tiles and blocks of a grid).
use rand::Rng;
use rand_chacha::ChaCha8Rng;

pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// `n` values uniform in `[lo, hi)`, nudged away from exact zero (inputs are never zeros).
pub fn nonzero_uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let x = rng.gen_range(lo..hi);
            if x == 0.0 {
                0.125
            } else {
                x
            }
        })
        .collect()
}

/// Rows (or columns) sampled from `0..n`: the first and the last few.
pub fn ends(n: usize, each: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..each.min(n)).collect();
    v.extend((n.saturating_sub(each)..n).filter(|i| *i >= each.min(n)));
    v
}

/// The indices `0..n` covered by the first and the last block of `per` items each: the
/// first tile and the last (partial) one.
pub fn first_last(n: usize, per: usize) -> Vec<usize> {
    let last = n.div_ceil(per).saturating_sub(1) * per;
    let mut v: Vec<usize> = (0..per.min(n)).collect();
    v.extend((last.max(per.min(n))..n).collect::<Vec<_>>());
    v
}

/// Contiguous `(start, len)` runs of the sorted indices `ix`.
pub fn runs(ix: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &i in ix {
        match out.last_mut() {
            Some((s, l)) if *s + *l == i => *l += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}
