//! Launchers of `ptx/src/kernels/attention_tc.rs` and `attention_tc_backward.rs`: the fused
//! tensor-core attention (bf16 `qkv`, f32 outputs and softmax statistics).
use anyhow::{ensure, Result};
use dinovmf_ptx::kernels::attention_tc::ATT_MAX_HD;

use crate::backend::cuda::device::{u32_of as u, Arg, Buf, Device, Gpu};

/// One fused attention call: `b` images of `t` tokens, width `d` split into `heads` heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttShape {
    pub b: usize,
    pub t: usize,
    pub d: usize,
    pub heads: usize,
}

impl AttShape {
    /// The shapes the tensor-core fragments cover: `heads` dividing `d` into heads of a
    /// multiple of 16 columns, at most 64; anything else is refused with an error (the kernels
    /// would leave their outputs untouched).
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.heads > 0 && self.d.is_multiple_of(self.heads),
            "fused attention: width {} does not split into {} heads",
            self.d,
            self.heads
        );
        let hd = self.d / self.heads;
        ensure!(
            hd > 0 && hd.is_multiple_of(16) && hd <= ATT_MAX_HD,
            "fused attention: head size {hd} (width {} / {} heads) is not a multiple of 16 up \
             to {ATT_MAX_HD}, which the tensor-core kernels need",
            self.d,
            self.heads
        );
        Ok(())
    }
    fn sizes(&self) -> [Arg; 4] {
        [u(self.b), u(self.t), u(self.d), u(self.heads)]
    }
}

/// `out[b, t, d]` and the row log-sum-exp `lse[b, heads, t]` from bf16 `qkv[b, t, 3 d]`.
pub fn attention_tc_forward_bf16<D: Device>(
    gpu: &mut Gpu<D>,
    out: Buf<f32>,
    lse: Buf<f32>,
    qkv: Buf<u16>,
    s: AttShape,
) -> Result<()> {
    s.check()?;
    let mut args = vec![out.into(), lse.into(), qkv.into()];
    args.extend(s.sizes());
    gpu.launch("attention_tc_forward_bf16", &args)
}

/// The buffers of one fused attention backward.
#[derive(Clone, Copy, Debug)]
pub struct AttBackwardBufs {
    /// Written in full (every element of `[b, t, 3 d]`).
    pub dqkv: Buf<f32>,
    pub qkv: Buf<u16>,
    /// The forward's `out` and `lse`.
    pub out: Buf<f32>,
    pub lse: Buf<f32>,
    pub dout: Buf<f32>,
    /// Scratch of `b heads t` elements (the softmax backward's row term).
    pub delta: Buf<f32>,
}

/// `dqkv` from `dout` and the forward's `out`, `lse`: `attention_tc_delta`, then
/// `attention_tc_backward_kv_bf16` (`k`, `v` columns) and `attention_tc_backward_q_bf16` (`q`).
pub fn attention_tc_backward_bf16<D: Device>(
    gpu: &mut Gpu<D>,
    x: AttBackwardBufs,
    s: AttShape,
) -> Result<()> {
    s.check()?;
    let mut args = vec![x.delta.into(), x.out.into(), x.dout.into()];
    args.extend(s.sizes());
    gpu.launch("attention_tc_delta", &args)?;
    for name in [
        "attention_tc_backward_kv_bf16",
        "attention_tc_backward_q_bf16",
    ] {
        let mut args = vec![
            x.dqkv.into(),
            x.qkv.into(),
            x.dout.into(),
            x.lse.into(),
            x.delta.into(),
        ];
        args.extend(s.sizes());
        gpu.launch(name, &args)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::device::Device;
    use crate::backend::cuda::sim::SimDevice;
    use dinovmf_ptx::manifest;

    #[test]
    fn head_sizes_the_fragments_do_not_cover_are_refused() {
        let ok = AttShape {
            b: 1,
            t: 5,
            d: 64,
            heads: 2,
        };
        ok.check().unwrap();
        for (d, heads) in [(64, 0), (60, 2), (48, 2), (256, 2)] {
            let e = AttShape { d, heads, ..ok }.check().unwrap_err().to_string();
            assert!(e.contains("fused attention"), "{e}");
        }
    }

    /// The backward kernels ask for 56 KB of dynamic shared memory: a launch that skips
    /// raising the function's limit fails on the simulated device as on the driver, and the
    /// launcher (through `Gpu::launch_with`) raises it.
    #[test]
    fn dynamic_shared_memory_above_48k_needs_the_attribute() {
        let k = manifest::kernel("attention_tc_backward_kv_bf16").unwrap();
        assert!(k.dynamic_smem_bytes() > manifest::DEFAULT_MAX_DYNAMIC_SMEM);
        let s = AttShape {
            b: 1,
            t: 3,
            d: 32,
            heads: 2,
        };
        let mut gpu = Gpu::new(SimDevice::new());
        let n = s.b * s.t;
        let qkv = gpu.alloc_from(&vec![0x3f80u16; n * 3 * s.d]).unwrap();
        let dout = gpu.alloc_from(&vec![0.5f32; n * s.d]).unwrap();
        let (out, lse) = (
            gpu.alloc::<f32>(n * s.d).unwrap(),
            gpu.alloc(2 * n).unwrap(),
        );
        let (dqkv, delta) = (
            gpu.alloc::<f32>(n * 3 * s.d).unwrap(),
            gpu.alloc(2 * n).unwrap(),
        );
        // Straight to the device, skipping the limit: refused, naming the attribute.
        let words: Vec<u64> = [dqkv.addr, qkv.addr, dout.addr, lse.addr, delta.addr]
            .into_iter()
            .chain([1, 3, 32, 2])
            .collect();
        let e = gpu
            .dev
            .launch(k, [1, 2, 1], &words)
            .unwrap_err()
            .to_string();
        assert!(e.contains("MAX_DYNAMIC_SHARED_SIZE_BYTES"), "{e}");
        attention_tc_forward_bf16(&mut gpu, out, lse, qkv, s).unwrap();
        let x = AttBackwardBufs {
            dqkv,
            qkv,
            out,
            lse,
            dout,
            delta,
        };
        attention_tc_backward_bf16(&mut gpu, x, s).unwrap();
        // qkv all ones: uniform attention, out = v = 1, dV = P^T dout = 0.5 per key (P = 1/3
        // rounded to bf16: within 2^-9 relative), dQ = dK = 0 (dP is the same for every key).
        let got = gpu.to_vec(dqkv).unwrap();
        for tok in 0..n {
            for c in 0..s.d {
                let (dq, dv) = (got[tok * 3 * s.d + c], got[tok * 3 * s.d + 2 * s.d + c]);
                assert!((dv - 0.5).abs() <= 0.5 / 512.0, "dv[{tok}, {c}] = {dv}");
                assert!(dq.abs() <= 1e-6, "dq[{tok}, {c}] = {dq}");
            }
        }
    }
}
