#!/usr/bin/env python3
"""Writes tests/fixtures/pytorch_<shape>.safetensors: outputs of the official DINO ViT and
DINOHead (PyTorch) that tests/pytorch_interop.rs compares with our forward pass. Run by hand where
PyTorch is installed; CI only reads the committed fixtures.

Two directions, each for the tiny and small32 presets' shapes:
  ours   - weights under OUR names (`backbone.*`, `head.*`), mapped the way `dinovmf export
           --format timm` maps them, loaded with strict=True into DINO's VisionTransformer,
           DINOHead and timm's VisionTransformer;
  theirs - weights under the official modules' own state_dict() keys (as a DINO / timm file has
           them), which the Rust test feeds through `dinovmf import`'s key map.
Weights and the input batch come from a name-keyed integer hash that host/src/interop/
synthetic_weights.rs computes bit-identically, so the fixture stores only outputs (a few hundred
KB): the [CLS] features, the last block's attention, DINOHead's logits and our vMF logits
kappa mu.y + log C_p(kappa) computed with scipy's exact Bessel function (scipy.special.ive).

With --dinovmf PATH (a built `dinovmf` binary) it also runs the real CLI both ways on these
weights: `dinovmf import` of the DINO state dict, `dinovmf export --format timm` of the result,
and strict=True loads of the exported files into DINO's and timm's models (bit-exact check);
with --ibot-check instead the same for iBOT's official VisionTransformer(masked_im_modeling=True)
and iBOTHead (shared_head True and False), through `import --method ibot`.

Setup (tried on Debian bookworm, Python 3.11, torch 2.15 from PyPI; the CPU is enough):
    python3 -m venv .venv-torch
    .venv-torch/bin/pip install torch timm numpy scipy safetensors   # ~3 GB with CUDA wheels
    # (`pip install --no-deps torch` alone does not import: torch preloads the nvidia-* libs)
    scripts/fetch-dino.sh            # official DINO (and iBOT) code into git-ignored third_party/
    cargo build -p dinovmf
    .venv-torch/bin/python scripts/pytorch_fixture.py --dinovmf target/debug/dinovmf
    .venv-torch/bin/python scripts/pytorch_fixture.py --dinovmf target/debug/dinovmf --ibot-check
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from functools import partial

import numpy as np
import scipy
import scipy.special
import torch
import torch.nn as nn
from safetensors.numpy import save_file
from safetensors.torch import load_file, save_file as save_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The official code (see fetch-dino.sh): DINO's, or with --ibot-check iBOT's (both name their
# modules vision_transformer / utils, so one process imports one of them).
OFFICIAL = "ibot" if "--ibot-check" in sys.argv else "dino"
sys.path.insert(0, os.path.join(ROOT, "third_party", OFFICIAL))
if OFFICIAL == "dino":
    import vision_transformer as dino_vit  # noqa: E402
else:
    import vision_transformer as ibot_vit  # noqa: E402
    import head as ibot_head  # noqa: E402
import timm  # noqa: E402
import timm.models.vision_transformer as timm_vit  # noqa: E402

# The presets' shapes (host/src/train/config.rs).
SHAPES = {
    "tiny": dict(img_size=16, patch=4, dim=16, depth=2, heads=2, mlp_ratio=2,
                 hidden=32, bottleneck=16, prototypes=64),
    "small32": dict(img_size=32, patch=4, dim=96, depth=4, heads=3, mlp_ratio=4,
                    hidden=512, bottleneck=128, prototypes=1024),
}
BATCH = 2
TAU = 0.1  # temperature of the vMF logits in the fixture: kappa_k = |g_k| / TAU

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def fnv1a64(name):
    h = 0xCBF29CE484222325
    for b in name.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def uniform(seed, n):
    """Same as synthetic_weights::uniform(seed, 0..n)."""
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64(seed)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float64) / 8388608.0 - 1.0


def is_layernorm_weight(name):
    return (name.endswith("norm1.weight") or name.endswith("norm2.weight")
            or name == "norm.weight" or name.endswith(".norm.weight"))


def synthetic(name, shape):
    """Same as synthetic_weights::tensor(name, shape)."""
    numel = int(np.prod(shape)) if len(shape) else 1
    u = uniform(fnv1a64(name), numel)
    fan_in = max(numel // shape[0], 1) if len(shape) and shape[0] else 1
    if is_layernorm_weight(name):
        v = 1.0 + 0.2 * u
    elif name.endswith(".bias"):
        v = 0.1 * u
    elif name.endswith("cls_token") or name.endswith("pos_embed") or name.endswith("masked_embed"):
        v = 0.5 * u
    elif name.endswith("weight_g"):
        v = 1.0 + 0.5 * u
    else:
        v = math.sqrt(3.0 / fan_in) * u
    return v.astype(np.float32).reshape(shape)


def build(s):
    vit = dino_vit.VisionTransformer(
        img_size=[s["img_size"]], patch_size=s["patch"], embed_dim=s["dim"], depth=s["depth"],
        num_heads=s["heads"], mlp_ratio=s["mlp_ratio"], qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6))
    head = dino_vit.DINOHead(s["dim"], s["prototypes"], nlayers=3, hidden_dim=s["hidden"],
                             bottleneck_dim=s["bottleneck"], norm_last_layer=False)
    tvit = timm_vit.VisionTransformer(
        img_size=s["img_size"], patch_size=s["patch"], in_chans=3, num_classes=0,
        global_pool="token", embed_dim=s["dim"], depth=s["depth"], num_heads=s["heads"],
        mlp_ratio=s["mlp_ratio"], qkv_bias=True)
    return vit.eval(), head.eval(), tvit.eval()


def weights(module, prefix):
    """Synthetic weights for every key of `module`, each keyed `prefix + key` for the hash."""
    return {k: torch.from_numpy(synthetic(prefix + k, tuple(v.shape)))
            for k, v in module.state_dict().items()}


def log_cp(p, kappa):
    """log C_p(kappa) = nu ln kappa - (p/2) ln(2 pi) - ln I_nu(kappa), I_nu = ive * e^kappa."""
    nu = p / 2.0 - 1.0
    return nu * np.log(kappa) - p / 2.0 * np.log(2 * np.pi) - (np.log(scipy.special.ive(nu, kappa)) + kappa)


def run(s, vit, head, tvit, x):
    with torch.no_grad():
        cls = vit(x)
        attn = vit.get_last_selfattention(x)
        logits = head(cls)
        timm_cls = tvit(x)
        y = nn.functional.normalize(head.mlp(cls), dim=-1, p=2).double().numpy()
    g = head.last_layer.weight_g.detach().double().numpy()[:, 0]
    v = head.last_layer.weight_v.detach().double().numpy()
    mu = v / np.linalg.norm(v, axis=1, keepdims=True)
    kappa = np.abs(g) / TAU
    vmf = (g / TAU)[None, :] * (y @ mu.T) + log_cp(s["bottleneck"], kappa)[None, :]
    out = {"cls": cls.numpy(), "attn": attn.numpy(), "dino_logits": logits.numpy(),
           "vmf_logits": vmf.astype(np.float32)}
    timm_diff = float((timm_cls - cls).abs().max())
    return out, timm_diff


def cli_roundtrip(dinovmf, preset, vit, head, tvit, sd_vit, sd_head):
    """dinovmf import of DINO's teacher dict, export --format timm, strict loads back."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "dino_teacher.safetensors")
        merged = {"backbone." + k: v for k, v in sd_vit.items()}
        merged.update({"head." + k: v for k, v in sd_head.items()})
        save_torch(merged, src)
        run_dir = os.path.join(d, "run")
        subprocess.run([dinovmf, "import", src, "--preset", preset, "-o", run_dir], check=True)
        bb = os.path.join(d, "backbone.safetensors")
        subprocess.run([dinovmf, "export", os.path.join(run_dir, "checkpoint.safetensors"),
                        "--format", "timm", "-o", bb], check=True)
        got_vit = load_file(bb)
        got_head = load_file(os.path.join(d, "backbone-head.safetensors"))
        vit.load_state_dict(got_vit, strict=True)
        tvit.load_state_dict(got_vit, strict=True)
        head.load_state_dict(got_head, strict=True)
        for want, got in ((sd_vit, got_vit), (sd_head, got_head)):
            assert want.keys() == got.keys()
            for k in want:
                assert torch.equal(want[k], got[k]), k
    return "bit-exact"


def ibot_check(dinovmf):
    """iBOT's teacher (ViT with masked_embed, iBOTHead shared or not) through import and export."""
    s = SHAPES["tiny"]
    vit = ibot_vit.VisionTransformer(
        img_size=[s["img_size"]], patch_size=s["patch"], embed_dim=s["dim"], depth=s["depth"],
        num_heads=s["heads"], mlp_ratio=s["mlp_ratio"], qkv_bias=True, masked_im_modeling=True)
    for shared in (True, False):
        head = ibot_head.iBOTHead(s["dim"], s["prototypes"], patch_out_dim=s["prototypes"], nlayers=3,
                                  hidden_dim=s["hidden"], bottleneck_dim=s["bottleneck"],
                                  norm_last_layer=False, shared_head=shared)
        sd_vit, sd_head = weights(vit, ""), weights(head, "")
        if shared:  # one module under two names: the same tensor twice
            for w in ("weight_g", "weight_v"):
                sd_head["last_layer2." + w] = sd_head["last_layer." + w]
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "ibot_teacher.safetensors")
            merged = {"backbone." + k: v for k, v in sd_vit.items()}
            merged.update({"head." + k: v.clone() for k, v in sd_head.items()})
            save_torch(merged, src)
            extra = [] if shared else ["--separate-patch-head"]
            run_dir = os.path.join(d, "run")
            subprocess.run([dinovmf, "import", src, "--preset", "tiny", "--method", "ibot",
                            "-o", run_dir] + extra, check=True)
            bb = os.path.join(d, "backbone.safetensors")
            subprocess.run([dinovmf, "export", os.path.join(run_dir, "checkpoint.safetensors"),
                            "--format", "timm", "--ibot-mask-token", "-o", bb], check=True)
            got_vit = load_file(bb)
            got_head = load_file(os.path.join(d, "backbone-head.safetensors"))
            vit.load_state_dict(got_vit, strict=True)
            if shared:  # our shared head has one prototype layer: iBOT's second name is the same
                for w in ("weight_g", "weight_v"):
                    got_head["last_layer2." + w] = got_head["last_layer." + w]
            head.load_state_dict(got_head, strict=True)
            for want, got in ((sd_vit, got_vit), (sd_head, got_head)):
                assert want.keys() == got.keys(), (want.keys() ^ got.keys())
                for k in want:
                    assert torch.equal(want[k], got[k]), k
        print(f"iBOT (shared_head={shared}): import + export --format timm --ibot-mask-token: bit-exact, strict=True")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dinovmf", help="a built dinovmf binary: also check the real CLI round trip")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures"))
    ap.add_argument("--ibot-check", action="store_true",
                    help="instead: iBOT's official modules (third_party/ibot) through the CLI (needs --dinovmf)")
    a = ap.parse_args()
    if a.ibot_check:
        return ibot_check(a.dinovmf)
    torch.set_num_threads(1)  # deterministic reductions
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(ROOT, "third_party", "dino", "COMMIT")) as f:
        dino_commit = f.read().strip()
    for name, s in SHAPES.items():
        vit, head, tvit = build(s)
        x = torch.from_numpy(
            (1.5 * uniform(fnv1a64("images"), BATCH * 3 * s["img_size"] ** 2))
            .astype(np.float32).reshape(BATCH, 3, s["img_size"], s["img_size"]))
        tensors, meta = {}, {}
        for direction, (pv, ph) in {"ours": ("backbone.", "head."), "theirs": ("", "")}.items():
            sd_vit, sd_head = weights(vit, pv), weights(head, ph)
            vit.load_state_dict(sd_vit, strict=True)
            tvit.load_state_dict(sd_vit, strict=True)
            head.load_state_dict(sd_head, strict=True)
            out, timm_diff = run(s, vit, head, tvit, x)
            for k, v in out.items():
                tensors[f"{direction}.{k}"] = np.ascontiguousarray(v)
            meta[f"{direction}.timm_vs_dino_cls_max_abs"] = repr(timm_diff)
            if a.dinovmf and direction == "theirs":
                meta["cli_roundtrip"] = cli_roundtrip(a.dinovmf, name, vit, head, tvit, sd_vit, sd_head)
            print(f"{name} {direction}: timm vs DINO [CLS] max abs {timm_diff:.3g}")
        meta.update({
            "shape": json.dumps(s), "batch": str(BATCH), "tau": repr(TAU),
            "backbone_keys": json.dumps([[k, list(v.shape)] for k, v in vit.state_dict().items()]),
            "head_keys": json.dumps([[k, list(v.shape)] for k, v in head.state_dict().items()]),
            "timm_keys": json.dumps([[k, list(v.shape)] for k, v in tvit.state_dict().items()]),
            "dino_commit": dino_commit, "torch": torch.__version__, "timm": timm.__version__,
            "scipy": scipy.__version__,
            "timm_model": (f"timm.models.vision_transformer.VisionTransformer(img_size={s['img_size']}, "
                           f"patch_size={s['patch']}, embed_dim={s['dim']}, depth={s['depth']}, "
                           f"num_heads={s['heads']}, mlp_ratio={s['mlp_ratio']}, qkv_bias=True, "
                           f"num_classes=0, global_pool='token')"),
        })
        path = os.path.join(a.out, f"pytorch_{name}.safetensors")
        save_file(tensors, path, metadata=meta)
        print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
