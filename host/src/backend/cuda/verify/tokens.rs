//! Token kernels: patchify, the token assembly ([CLS] + patches + position embedding) and its
//! backward, and the bilinear resize of the position embedding with its backward, against
//! core. Small sizes only: their cost is per image, the same at every model size.
use anyhow::Result;

use dinovmf_core::ops;

use super::sample::f64s;
use super::tolerance::{self, EXACT};
use super::V;
use crate::backend::cuda::device::Device;
use crate::backend::cuda::launch::tokens::{
    patchify, pos_resize_backward, pos_resize_forward, tokens_backward_params,
    tokens_backward_patch, tokens_forward, ImageDims, ResizeDims,
};

pub(super) fn small<D: Device>(v: &mut V<'_, D>) {
    v.case("tokens", tokens);
}

fn tokens<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for (batch, c, hh, ww, p, d) in [
        (1, 1, 4, 4, 2, 5),
        (2, 3, 8, 12, 4, 33),
        (3, 3, 6, 6, 3, 40),
    ] {
        let img = v.rv(batch * c * hh * ww, -1.0, 1.0);
        let n = (hh / p) * (ww / p);
        let k = c * p * p;
        let di = v.up(&img)?;
        let patches = v.out(batch * n * k)?;
        let img_dims = ImageDims {
            n: batch,
            chans: c,
            h: hh,
            w: ww,
            patch: p,
        };
        patchify(v.gpu, patches, di, img_dims)?;
        let got = v.get(patches)?;
        let mut w = vec![0f32; batch * n * k];
        ops::patchify(&mut w, &img, batch, c, hh, ww, p);
        let size = format!("b{batch} c{c} {hh}x{ww} p{p} d{d}");
        v.check("patchify", size.clone(), &got, &f64s(&w), EXACT);

        let patch = v.rv(batch * n * d, -1.0, 1.0);
        let cls = v.rv(d, -1.0, 1.0);
        let pos = v.rv((n + 1) * d, -1.0, 1.0);
        let t = n + 1;
        let (dpt, dcl, dpo) = (v.up(&patch)?, v.up(&cls)?, v.up(&pos)?);
        let x = v.out(batch * t * d)?;
        tokens_forward(v.gpu, x, dpt, dcl, dpo, (batch, n, d))?;
        let got = v.get(x)?;
        let mut w = vec![0f32; batch * t * d];
        ops::tokens_forward(&mut w, &patch, &cls, &pos, batch, n, d);
        v.check("tokens_forward", size.clone(), &got, &f64s(&w), EXACT);

        let gx = v.rv(batch * t * d, -1.0, 1.0);
        let dgx = v.up(&gx)?;
        let dpatch = v.out(batch * n * d)?;
        let dcls0 = v.rv(d, -1.0, 1.0);
        let dpos0 = v.rv(t * d, -1.0, 1.0);
        let (dcls, dpos) = (v.up(&dcls0)?, v.up(&dpos0)?);
        tokens_backward_patch(v.gpu, dpatch, dgx, (batch, n, d))?;
        tokens_backward_params(v.gpu, dcls, dpos, dgx, (batch, n, d))?;
        let (mut wp, mut wc, mut wpos) = (vec![0f32; batch * n * d], dcls0.clone(), dpos0.clone());
        ops::tokens_backward(&mut wp, &mut wc, &mut wpos, &gx, batch, n, d);
        let got = v.get(dpatch)?;
        v.check(
            "tokens_backward_patch",
            size.clone(),
            &got,
            &f64s(&wp),
            EXACT,
        );
        let mut got = v.get(dcls)?;
        got.extend(v.get(dpos)?);
        let mut w = f64s(&wc);
        w.extend(f64s(&wpos));
        v.check(
            "tokens_backward_params",
            size,
            &got,
            &w,
            tolerance::TOKENS_PARAMS,
        );
    }
    for (sh, sw, gh, gw, d) in [
        (4, 4, 2, 2, 3),
        (2, 2, 4, 4, 5),
        (7, 5, 3, 6, 40),
        (3, 3, 3, 3, 2),
    ] {
        let src = v.rv(sh * sw * d, -1.0, 1.0);
        let ds = v.up(&src)?;
        let dst = v.out(gh * gw * d)?;
        let dims = ResizeDims {
            src_h: sh,
            src_w: sw,
            dst_h: gh,
            dst_w: gw,
            d,
        };
        pos_resize_forward(v.gpu, dst, ds, dims)?;
        let got = v.get(dst)?;
        let mut w = vec![0f64; gh * gw * d];
        ops::pos_resize_forward(&mut w, &f64s(&src), sh, sw, gh, gw, d);
        let size = format!("{sh}x{sw} -> {gh}x{gw} d{d}");
        v.check(
            "pos_resize_forward",
            size.clone(),
            &got,
            &w,
            tolerance::POS_RESIZE_FORWARD,
        );

        let g = v.rv(gh * gw * d, -1.0, 1.0);
        let dsrc0 = v.rv(sh * sw * d, -1.0, 1.0);
        let (dg, dsrc) = (v.up(&g)?, v.up(&dsrc0)?);
        pos_resize_backward(v.gpu, dsrc, dg, dims)?;
        let got = v.get(dsrc)?;
        let mut w = f64s(&dsrc0);
        ops::pos_resize_backward(&mut w, &f64s(&g), sh, sw, gh, gw, d);
        v.check(
            "pos_resize_backward",
            size,
            &got,
            &w,
            tolerance::POS_RESIZE_BACKWARD,
        );
    }
    Ok(())
}
