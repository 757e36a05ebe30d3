//! The fused tensor-core attention (`attention_tc_forward_bf16`, and the backward's
//! `attention_tc_delta`, `attention_tc_backward_{kv,q}_bf16`) against core's
//! `attention_forward` / `attention_backward` in f64 on the same bf16 `qkv`, with a `dout` of
//! bf16 values, at token counts that cross the 64-row tiles (17, 70) and head sizes 32 and 64;
//! every output poisoned first. The backward's rows: `delta` (against f64 sums on the
//! kernel's own `out`), dq (`_q`), dk and dv (`_kv`).
//!
//! Tolerances (as `ptx/tests/attention_tc.rs` derives them): `out` within 2^-8 + 1e-5 (P is
//! rounded to bf16 before `P V`), `lse` within 2^-8, each of dq, dk, dv within 2^-7 of its
//! largest reference value (P and dS rounded to bf16; measured about 2^-9 on the simulator).
use anyhow::Result;
use dinovmf_core::ops;
use dinovmf_ptx::elem::Bf16;

use super::tolerance::{self, EXACT};
use super::V;
use crate::backend::cuda::device::Device;
use crate::backend::cuda::launch::attention_tc::{
    attention_tc_backward_bf16, attention_tc_forward_bf16, AttBackwardBufs, AttShape,
};

fn bf16_values(x: &[f32]) -> (Vec<u16>, Vec<f64>) {
    x.iter()
        .map(|&v| {
            let b = Bf16::from_f32(v);
            (b.0, b.to_f32() as f64)
        })
        .unzip()
}

pub(super) fn small<D: Device>(v: &mut V<'_, D>) {
    v.case("attention tensor cores bf16", attention_tc);
}

fn attention_tc<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for (b, t, d, heads) in [(2, 17, 64, 2), (1, 70, 128, 2)] {
        let s = AttShape { b, t, d, heads };
        let size = format!("B{b} T{t} D{d} H{heads}");
        // qkv rounded to bf16 on the device (`to_bf16`, as the bf16 matrix products do),
        // bit for bit as the host rounds it.
        let x = v.rv(b * t * 3 * d, -1.0, 1.0);
        let (qkv, q64) = bf16_values(&x);
        let x_dev = v.up(&x)?;
        let qkv_dev = v.gpu.bf16_copy(0, x_dev)?;
        let got: Vec<f32> = v.get(qkv_dev)?.iter().map(|&h| Bf16(h).to_f32()).collect();
        v.check("to_bf16", format!("{} values", x.len()), &got, &q64, EXACT);
        let host_bits_match = v.get(qkv_dev)? == qkv;
        anyhow::ensure!(
            host_bits_match,
            "to_bf16: device bits differ from the host's"
        );
        let (_, dout64) = bf16_values(&v.rv(b * t * d, -1.0, 1.0));
        let dout: Vec<f32> = dout64.iter().map(|&x| x as f32).collect();
        let (out, lse) = (v.out(b * t * d)?, v.out(b * heads * t)?);
        attention_tc_forward_bf16(v.gpu, out, lse, qkv_dev, s)?;
        let mut want = vec![0f64; b * t * d];
        let mut att = vec![0f64; b * heads * t * t];
        ops::attention_forward(&mut want, &mut att, &q64, None, b, t, d, heads);
        let got = v.get(out)?;
        v.check(
            "attention_tc_forward_bf16",
            size.clone(),
            &got,
            &want,
            tolerance::BF16_ATTENTION_OUT,
        );
        // lse[b, h, i] = ln Σ_j exp(s_ij) of the scaled scores, rebuilt from q and k (core's
        // forward keeps only the normalised probabilities).
        let hd = d / heads;
        let mut want_lse = vec![0f64; b * heads * t];
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..t {
                    let sc: Vec<f64> = (0..t)
                        .map(|j| {
                            let dot: f64 = (0..hd)
                                .map(|c| {
                                    q64[(bi * t + i) * 3 * d + h * hd + c]
                                        * q64[(bi * t + j) * 3 * d + d + h * hd + c]
                                })
                                .sum();
                            dot / (hd as f64).sqrt()
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    want_lse[(bi * heads + h) * t + i] =
                        mx + sc.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
                }
            }
        }
        let got = v.get(lse)?;
        v.check(
            "attention_tc_forward_bf16 lse",
            size.clone(),
            &got,
            &want_lse,
            tolerance::BF16_ATTENTION_LSE,
        );
        let x = AttBackwardBufs {
            dqkv: v.out(b * t * 3 * d)?,
            qkv: qkv_dev,
            out,
            lse,
            dout: v.up(&dout)?,
            delta: v.out(b * heads * t)?,
        };
        attention_tc_backward_bf16(v.gpu, x, s)?;
        let mut want = vec![0f64; b * t * 3 * d];
        ops::attention_backward(&mut want, &dout64, &q64, &att, b, t, d, heads);
        // delta = Σ_c dout out over each head's columns, on the kernel's own `out` (f32 sums
        // of hd products: 1e-5).
        let o = v.get(out)?;
        let want_delta: Vec<f64> = (0..b * heads * t)
            .map(|r| {
                let (z, i) = (r / t, r % t);
                let (bi, h) = (z / heads, z % heads);
                let off = (bi * t + i) * d + h * hd;
                (0..hd).map(|c| dout64[off + c] * o[off + c] as f64).sum()
            })
            .collect();
        let got = v.get(x.delta)?;
        v.check(
            "attention_tc_delta",
            size.clone(),
            &got,
            &want_delta,
            tolerance::ATTENTION_DELTA,
        );
        let got = v.get(x.dqkv)?;
        for (part, name) in ["dq", "dk", "dv"].iter().enumerate() {
            let idx: Vec<usize> = (0..want.len())
                .filter(|i| (i % (3 * d)) / d == part)
                .collect();
            let g: Vec<f32> = idx.iter().map(|&i| got[i]).collect();
            let w: Vec<f64> = idx.iter().map(|&i| want[i]).collect();
            let kernel = if part == 0 {
                "attention_tc_backward_q_bf16"
            } else {
                "attention_tc_backward_kv_bf16"
            };
            v.check(
                kernel,
                format!("{size} {name}"),
                &g,
                &w,
                tolerance::bf16_attention_grad(&w),
            );
        }
    }
    Ok(())
}
