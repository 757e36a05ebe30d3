//! Deterministic, non-trivial weights keyed by tensor name, computed bit-identically here and in
//! `scripts/pytorch_fixture.py` (integer hashing, then one f64 multiply rounded to f32), so the
//! PyTorch fixture needs to store only outputs, not megabytes of weights.
//!
//! Value `i` of tensor `name`: `x = splitmix64(fnv1a64(name) + i)`, `u = (x >> 40) / 2^23 - 1` in
//! [-1, 1), then by name: LayerNorm weights `1 + 0.2 u`, biases `0.1 u`, `cls_token` /
//! `pos_embed` / `masked_embed` `0.5 u`, `weight_g` `1 + 0.5 u`, every other weight
//! `u sqrt(3 / fan_in)` (fan_in = numel / shape[0]; unit-variance outputs for unit inputs).

/// FNV-1a, 64 bit, of the name's bytes.
pub fn fnv1a64(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64's output function of `z` (after adding the golden-ratio increment).
pub fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The `i`-th uniform of `seed` in [-1, 1) (24 bits, exact in f32 and f64).
pub fn uniform(seed: u64, i: u64) -> f64 {
    (splitmix64(seed.wrapping_add(i)) >> 40) as f64 / 8_388_608.0 - 1.0
}

fn is_layernorm_weight(name: &str) -> bool {
    ["norm1.weight", "norm2.weight"]
        .iter()
        .any(|s| name.ends_with(s))
        || name == "norm.weight"
        || name.ends_with(".norm.weight")
}

/// The tensor `name` of `shape` (see the module docs for the rule).
pub fn tensor(name: &str, shape: &[usize]) -> Vec<f32> {
    let numel: usize = shape.iter().product();
    let seed = fnv1a64(name);
    let fan_in = if shape.is_empty() || shape[0] == 0 {
        1
    } else {
        (numel / shape[0]).max(1)
    };
    let weight_scale = (3.0 / fan_in as f64).sqrt();
    (0..numel as u64)
        .map(|i| {
            let u = uniform(seed, i);
            let v = if is_layernorm_weight(name) {
                1.0 + 0.2 * u
            } else if name.ends_with(".bias") {
                0.1 * u
            } else if name.ends_with("cls_token")
                || name.ends_with("pos_embed")
                || name.ends_with("masked_embed")
            {
                0.5 * u
            } else if name.ends_with("weight_g") {
                1.0 + 0.5 * u
            } else {
                weight_scale * u
            };
            v as f32
        })
        .collect()
}

/// A batch of `b` images `[B, 3, S, S]`: `1.5 u` of the name `images`.
pub fn images(b: usize, size: usize) -> Vec<f32> {
    tensor_scaled("images", b * 3 * size * size, 1.5)
}

fn tensor_scaled(name: &str, n: usize, scale: f64) -> Vec<f32> {
    let seed = fnv1a64(name);
    (0..n as u64)
        .map(|i| (scale * uniform(seed, i)) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_matches_its_definition() {
        // FNV-1a test vector and SplitMix64's first output from 0 (published values).
        assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        let w = tensor("blocks.0.mlp.fc1.weight", &[8, 4]);
        assert!(w.iter().all(|x| x.abs() <= (3.0f32 / 4.0).sqrt()));
        assert!(w.iter().any(|&x| x != w[0]));
        let g = tensor("norm.weight", &[16]);
        assert!(g.iter().all(|x| (0.8..=1.2).contains(x)));
        let b = tensor("blocks.1.attn.qkv.bias", &[16]);
        assert!(b.iter().all(|x| x.abs() <= 0.1) && b.iter().any(|&x| x != 0.0));
    }
}
