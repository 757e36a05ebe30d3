#!/usr/bin/env python3
"""Training throughput of the official DINO step (facebookresearch/dino, fetched into
third_party/dino/ by scripts/fetch-dino.sh, never committed) next to a `dinovmf train` run on the
same model, crops, batch and precision, from one invocation: prints both images/s and the ratio.

    python3 scripts/side_by_side.py --device cpu --preset small32 --steps 3 --dinovmf target/release/dinovmf
    python3 side_by_side.py --device cuda --preset vit-s16 --steps 8 --dinovmf ./dinovmf   # GPU machine

The DINO side builds the official modules (vision_transformer.vit_small / vit_base, DINOHead,
utils.MultiCropWrapper, utils.get_params_groups, utils.clip_gradients and main_dino.DINOLoss) and
runs their training step: teacher on the 2 global crops, student on all crops, DINO loss,
backward, gradient clipping, AdamW, teacher EMA. Inputs are random crops of the right sizes (the
throughput of the step, not of a data loader). Precision: f32 on both sides (`--amp` runs DINO
with autocast fp16 instead; dinovmf's CUDA step is f32). Not run by CI.

Like for like: both sides measure the training step alone, after the same `--warmup` steps. The
DINO side times each step (synchronised on a GPU); the dinovmf side reads each step's time of
`train_step` from its metrics.jsonl (the per-step images/s there is an exponential average,
`ips_n = 0.9 ips_(n-1) + 0.1 batch/dt_n`, which this script inverts exactly), so data loading and
augmentation, which dinovmf does in its worker threads and DINO here not at all, count on
neither side. On a CPU both use `--threads` compute threads (torch.set_num_threads; dinovmf's
compute pool is rayon's, RAYON_NUM_THREADS). dinovmf's end-to-end figure (`summary.json`, every
step and the data pipeline included) is printed beside it for information.
"""
import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time

# Model presets: (dinovmf preset or None, dims). "tiny-vit" is a small ViT for a quick CPU check.
PRESETS = {
    "vit-s16": dict(arch="vit_small", img=224, local=96, patch=16, dim=384, depth=12, heads=6,
                    k=65536, hidden=2048, bottleneck=256, dinovmf="vit-s16"),
    "vit-b16": dict(arch="vit_base", img=224, local=96, patch=16, dim=768, depth=12, heads=12,
                    k=65536, hidden=2048, bottleneck=256, dinovmf="vit-b16"),
    # dinovmf's small32 model (32 px, patch 4, 4 blocks of width 96): a quick check on a CPU.
    "small32": dict(arch=None, img=32, local=16, patch=4, dim=96, depth=4, heads=3,
                    k=1024, hidden=512, bottleneck=128, dinovmf="small32"),
}


def load_dino(dino_dir):
    """The official modules; DINOLoss is taken from main_dino.py by its class source alone, so
    torchvision (imported at main_dino.py's top for its data pipeline) is not needed."""
    sys.path.insert(0, dino_dir)
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import numpy as np
    import torch.distributed as dist
    import vision_transformer as vits
    import utils

    src = open(os.path.join(dino_dir, "main_dino.py")).read()
    tree = ast.parse(src)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DINOLoss")
    ns = dict(torch=torch, nn=nn, F=F, np=np, dist=dist)
    exec(compile(ast.Module(body=[cls], type_ignores=[]), "main_dino.py", "exec"), ns)
    return vits, utils, ns["DINOLoss"]


def dino_images_per_s(p, args):
    import torch
    import torch.distributed as dist

    vits, utils, DINOLoss = load_dino(args.dino)
    dev = torch.device(args.device)
    if not dist.is_initialized():
        # DINOLoss.update_center all-reduces: one process group of one.
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{args.port}", rank=0, world_size=1)
    torch.manual_seed(0)

    def backbone(drop):
        if p["arch"]:
            return vits.__dict__[p["arch"]](patch_size=p["patch"], drop_path_rate=drop)
        return vits.VisionTransformer(img_size=[p["img"]], patch_size=p["patch"], embed_dim=p["dim"], depth=p["depth"],
                                      num_heads=p["heads"], mlp_ratio=4, qkv_bias=True,
                                      drop_path_rate=drop)

    def head(norm_last):
        return vits.DINOHead(p["dim"], p["k"], use_bn=False, norm_last_layer=norm_last,
                             hidden_dim=p["hidden"], bottleneck_dim=p["bottleneck"])

    student = utils.MultiCropWrapper(backbone(0.1), head(True)).to(dev)
    teacher = utils.MultiCropWrapper(backbone(0.0), head(True)).to(dev)
    teacher.load_state_dict(student.state_dict())
    for q in teacher.parameters():
        q.requires_grad = False
    n_crops = 2 + args.n_local
    loss_fn = DINOLoss(p["k"], n_crops, 0.04, 0.04, 1, 1000).to(dev)
    opt = torch.optim.AdamW(utils.get_params_groups(student), lr=5e-4 * args.batch / 256)
    scaler = torch.amp.GradScaler("cuda") if args.amp else None
    g = torch.Generator(device="cpu").manual_seed(1)
    crops = [torch.randn(args.batch, 3, p["img"], p["img"], generator=g) for _ in range(2)]
    crops += [torch.randn(args.batch, 3, p["local"], p["local"], generator=g)
              for _ in range(args.n_local)]
    crops = [c.to(dev) for c in crops]

    def step():
        with torch.autocast(dev.type, enabled=args.amp):
            t_out = teacher(crops[:2])
            s_out = student(crops)
            loss = loss_fn(s_out, t_out, 0)
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            utils.clip_gradients(student, 3.0)
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            utils.clip_gradients(student, 3.0)
            scaler.step(opt)
            scaler.update()
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(0.996).add_(ps.detach(), alpha=0.004)
        return loss

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    print("official DINO step times (s):", " ".join(f"{x:.3f}" for x in times), flush=True)
    return args.batch * args.steps / sum(times), float(loss.detach())


def step_times(metrics_path, batch):
    """Each step's `train_step` time from dinovmf's metrics.jsonl: its `images_per_sec` is
    `ips_1 = batch/dt_1`, then `ips_n = 0.9 ips_(n-1) + 0.1 batch/dt_n`."""
    ips = [json.loads(line)["images_per_sec"] for line in open(metrics_path) if line.strip()]
    rates = [ips[0]] + [(b - 0.9 * a) / 0.1 for a, b in zip(ips, ips[1:])]
    return [batch / r for r in rates]


def dinovmf_images_per_s(p, args):
    out = tempfile.mkdtemp(prefix="side-by-side-")
    cmd = [args.dinovmf, "train", "--device", args.device, "--preset", p["dinovmf"],
           "--loss", "dino", "--batch-size", str(args.batch), "--n-local", str(args.n_local),
           "--max-steps", str(args.warmup + args.steps), "--no-eval", "--no-figures", "-q",
           "--workers", str(args.workers), "--out", out]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    print("dinovmf:", f"RAYON_NUM_THREADS={args.threads}", " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t
    summary = json.load(open(os.path.join(out, "summary.json")))
    times = step_times(os.path.join(out, "metrics.jsonl"), args.batch)[args.warmup:]
    print("dinovmf step times (s):", " ".join(f"{x:.3f}" for x in times), flush=True)
    loss = summary["losses"][-1] if summary["losses"] else None
    return args.batch * len(times) / sum(times), loss, summary["images_per_sec"], wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="vit-s16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--amp", action="store_true", help="DINO with fp16 autocast (not like-for-like)")
    ap.add_argument("--dino", default=os.path.join(os.path.dirname(__file__), "..", "third_party", "dino"))
    ap.add_argument("--dinovmf", default=None, help="the dinovmf binary (omit: DINO side only)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="dinovmf's data-loading workers")
    ap.add_argument("--threads", type=int, default=None,
                    help="compute threads on both sides (torch.set_num_threads, RAYON_NUM_THREADS); "
                         "default: the core count, or 1 on a CPU already loaded past its cores")
    ap.add_argument("--port", type=int, default=29517)
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.dino, "main_dino.py")):
        sys.exit(f"side_by_side: {args.dino}/main_dino.py not found: run scripts/fetch-dino.sh")
    p = PRESETS[args.preset]
    cores = os.cpu_count() or 1
    if args.threads is None:
        # Measured on a 2-core machine at load 8.5: the DINO step ran at 3.3 images/s with 2
        # torch threads and 38.6 with 1 (dinovmf: 65 and 56). On a loaded CPU one thread each
        # is the comparison that measures the step rather than the scheduler.
        busy = args.device == "cpu" and os.getloadavg()[0] > cores
        args.threads = 1 if busy else cores
    import torch
    torch.set_num_threads(args.threads)
    print(f"side-by-side: {args.preset} | batch {args.batch} | 2x{p['img']}px + {args.n_local}x"
          f"{p['local']}px | K {p['k']} | {args.device} | torch {torch.__version__} | "
          f"{'amp fp16' if args.amp else 'f32'} | {torch.get_num_threads()} torch threads | "
          f"{args.warmup} warm-up + {args.steps} timed steps each", flush=True)
    if args.device == "cpu":
        # A shared CPU skews the comparison: PyTorch's OpenMP regions wait at a barrier for every
        # thread of each op, so a preempted thread stalls each of its ~2,000 ops a step.
        print(f"load average {os.getloadavg()[0]:.1f} on {cores} cores", flush=True)
    d_ips, d_loss = dino_images_per_s(p, args)
    print(f"official DINO : {d_ips:10.2f} images/s  (loss {d_loss:.4f}, {args.steps} steps)", flush=True)
    if args.dinovmf:
        v_ips, v_loss, v_e2e, wall = dinovmf_images_per_s(p, args)
        print(f"dinovmf       : {v_ips:10.2f} images/s  (loss {v_loss}; end to end with data "
              f"{v_e2e:.2f} images/s, {wall:.1f} s wall incl. start-up)")
        print(f"ratio dinovmf / DINO: {v_ips / d_ips:.3f}")


if __name__ == "__main__":
    main()
