//! What the evaluations read besides the final [CLS]: the [CLS] token after each of the last
//! blocks (DINO's linear-probe features) and the last block's [CLS]-query attention (the maps
//! DINO draws). Both come from the training forward run with every block's activations kept:
//! `stream[i + 1]` is block `i`'s output (the last block's holds the [CLS] rows only) and the
//! last block's `att` its [CLS]-query probabilities.
use anyhow::{ensure, Result};

use super::rows;
use super::vit::{self, Group};
use super::{CpuBackend, Net};

/// Images per forward here: every block's activations are kept, so smaller than `embed`'s.
const PROBE_CHUNK: usize = 16;

impl CpuBackend {
    fn probe_check(&self, images: &[f32], n: usize, size: usize) -> Result<usize> {
        let v = &self.cx.cfg.vit;
        ensure!(
            v.accepts(size),
            "image size {size} is not a positive multiple of the patch size {}",
            v.patch
        );
        let img_len = v.in_chans * size * size;
        ensure!(
            images.len() == n * img_len,
            "images hold {} values, expected {n} x {img_len}",
            images.len()
        );
        Ok(img_len)
    }

    /// Runs the saved forward over `images` in chunks; `visit(group, first_image, m)` reads each
    /// chunk's activations.
    fn probe_forward(
        &mut self,
        net: Net,
        images: &[f32],
        n: usize,
        size: usize,
        mut visit: impl FnMut(&Group, usize, usize),
    ) -> Result<()> {
        let img_len = self.probe_check(images, n, size)?;
        let cx = self.cx;
        let mut g = Group::new(&cx, PROBE_CHUNK.min(n.max(1)), size, true);
        let params = match net {
            Net::Student => &self.student,
            Net::Teacher => &self.teacher,
        };
        for (c, imgs) in images.chunks(PROBE_CHUNK * img_len).enumerate() {
            let m = imgs.len() / img_len;
            vit::forward(&cx, params, &mut g, imgs, m, None, true);
            visit(&g, c * PROBE_CHUNK, m);
        }
        Ok(())
    }

    /// `[n, blocks * dim]`: the [CLS] token after each of the last `blocks` blocks (oldest
    /// first), each through the final LayerNorm, as DINO's linear probe concatenates them.
    pub fn block_features(
        &mut self,
        net: Net,
        images: &[f32],
        n: usize,
        size: usize,
        blocks: usize,
    ) -> Result<Vec<f32>> {
        let depth = self.cx.cfg.vit.depth;
        ensure!(
            (1..=depth).contains(&blocks),
            "asked for the [CLS] of the last {blocks} blocks; the model has {depth}"
        );
        let d = self.cx.d;
        let lay = self.cx.lay;
        let eps = self.cx.eps;
        let (nw, nb) = {
            let p = match net {
                Net::Student => &self.student,
                Net::Teacher => &self.teacher,
            };
            (
                p[lay.norm_w..lay.norm_w + d].to_vec(),
                p[lay.norm_b..lay.norm_b + d].to_vec(),
            )
        };
        let w = blocks * d;
        let mut out = vec![0.0f32; n * w];
        let mut cls = vec![0.0f32; PROBE_CHUNK * d];
        let mut normed = vec![0.0f32; PROBE_CHUNK * d];
        let (mut mean, mut rstd) = (vec![0.0f32; PROBE_CHUNK], vec![0.0f32; PROBE_CHUNK]);
        self.probe_forward(net, images, n, size, |g, first, m| {
            for (slot, blk) in (depth - blocks..depth).enumerate() {
                let s = &g.stream[blk + 1];
                for b in 0..m {
                    // The last block's output holds [CLS] rows only; the others every token.
                    let at = if blk + 1 == depth { b * d } else { b * g.t * d };
                    cls[b * d..(b + 1) * d].copy_from_slice(&s[at..at + d]);
                }
                rows::layernorm_fwd(
                    &mut normed,
                    &mut mean,
                    &mut rstd,
                    &cls[..m * d],
                    &nw,
                    &nb,
                    m,
                    d,
                    eps,
                );
                for b in 0..m {
                    let o = (first + b) * w + slot * d;
                    out[o..o + d].copy_from_slice(&normed[b * d..(b + 1) * d]);
                }
            }
        })?;
        Ok(out)
    }

    /// `[n, heads, tokens]`: the last block's attention probabilities of the [CLS] query (token
    /// 0 is [CLS] itself, then the patches in row-major order); each row sums to 1.
    pub fn cls_attention(
        &mut self,
        net: Net,
        images: &[f32],
        n: usize,
        size: usize,
    ) -> Result<Vec<f32>> {
        let heads = self.cx.heads;
        let depth = self.cx.cfg.vit.depth;
        let t = size / self.cx.cfg.vit.patch;
        let t = t * t + 1;
        let mut out = vec![0.0f32; n * heads * t];
        self.probe_forward(net, images, n, size, |g, first, m| {
            let att = &g.blocks[depth - 1].att;
            out[first * heads * t..(first + m) * heads * t].copy_from_slice(&att[..m * heads * t]);
        })?;
        Ok(out)
    }
}
