#!/usr/bin/env python3
"""Training throughput of the official DINO step (facebookresearch/dino, fetched into
third_party/dino/ by scripts/fetch-dino.sh, never committed) next to `dinovmf train` on the same
model, crops, batch, threads and data, interleaved, from one invocation: prints both images/s
and the ratios, with and without data loading, for PyTorch fp32 and bf16 autocast.

    # the issue 16 comparison (2 CPU cores, K = 4096, batch 64, 2 x 32 px + 4 x 16 px), ~8 min:
    .venv-torch/bin/python scripts/side_by_side.py --dinovmf target/release/dinovmf \\
        --data /path/to/png-folder --prototypes 4096 --n-local 4 --batch 64
    # a GPU machine: --device cuda --preset vit-s16 (dinovmf's CUDA step is f32)

What each side runs
- DINO: the official modules (vision_transformer.VisionTransformer / vit_small / vit_base,
  DINOHead, utils.MultiCropWrapper, utils.get_params_groups, utils.clip_gradients,
  main_dino.DINOLoss) and main_dino's training step: teacher on the 2 global crops, student on
  all crops, DINO loss, backward, gradient clipping, AdamW, teacher EMA. Data: main_dino's
  DataAugmentationDINO (its crop sizes set to the preset's) on a torchvision ImageFolder, through
  a torch DataLoader; every `--workers-list` value is tried and the best is used (0 = in the
  main process). `--bf16` also runs the step under `torch.autocast(device, torch.bfloat16)`
  (CPU) / fp16 (CUDA), the official code's mixed precision.
- dinovmf: `dinovmf train --loss dino` (and `--loss vmf` with `--vmf`) on the same folder.
  Without data: each step's `train_step` time from metrics.jsonl (its per-step images/s is an
  exponential average, `ips_n = 0.9 ips_(n-1) + 0.1 batch/dt_n`, inverted exactly here). With
  data: the wall time of a short and a long run, differenced, so start-up, decoding the folder,
  the first step and the final checkpoint cancel: `batch (n_long - n_short) / (t_long - t_short)`.
- DINO without data: the same step on fixed random crops. With data: the steps after the
  warm-up, timed end to end including `next(loader)`.

Both sides use `--threads` compute threads (torch.set_num_threads; RAYON_NUM_THREADS), and the
measurements alternate (DINO, dinovmf, DINO, ...) for `--rounds` rounds, so a change of the
machine's load hits both; the medians over rounds are reported, with the load average. Not run
by CI; needs torch, torchvision and Pillow (e.g. in .venv-torch).
"""
import argparse
import warnings
import ast
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PRESETS = {
    "vit-s16": dict(arch="vit_small", img=224, local=96, patch=16, dim=384, depth=12, heads=6,
                    k=65536, hidden=2048, bottleneck=256, dinovmf="vit-s16"),
    "vit-b16": dict(arch="vit_base", img=224, local=96, patch=16, dim=768, depth=12, heads=12,
                    k=65536, hidden=2048, bottleneck=256, dinovmf="vit-b16"),
    # issue 16's model: dinovmf's small32 backbone at patch 4 (its default is now patch 8),
    # 4 blocks of width 96, 3 heads; without the small presets' KoLeo and convolutional stem,
    # which DINO lacks.
    "small32": dict(arch=None, img=32, local=16, patch=4, dim=96, depth=4, heads=3,
                    k=1024, hidden=512, bottleneck=128, dinovmf="small32",
                    dinovmf_args=["--patch", "4", "--koleo", "0", "--stem-convs", "0"]),
}


def load_dino(dino_dir):
    """The official modules; DINOLoss and DataAugmentationDINO are taken from main_dino.py by
    their class sources alone (its top-level imports pull in its whole training script)."""
    sys.path.insert(0, dino_dir)
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
    from PIL import Image
    from torchvision import transforms

    import utils
    import vision_transformer as vits

    tree = ast.parse(open(os.path.join(dino_dir, "main_dino.py")).read())
    wanted = {"DINOLoss", "DataAugmentationDINO"}
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in wanted]
    ns = dict(torch=torch, nn=nn, F=F, np=np, dist=dist, transforms=transforms, Image=Image,
              utils=utils)
    exec(compile(ast.Module(body=classes, type_ignores=[]), "main_dino.py", "exec"), ns)
    return vits, utils, ns["DINOLoss"], ns["DataAugmentationDINO"]


class Dino:
    """The official DINO model, loss and optimiser, built once; `run` times steps."""

    def __init__(self, p, args):
        import torch
        import torch.distributed as dist

        self.p, self.args = p, args
        self.vits, self.utils, DINOLoss, self.Aug = load_dino(args.dino)
        self.dev = torch.device(args.device)
        if not dist.is_initialized():
            # DINOLoss.update_center all-reduces: one process group of one.
            backend = "nccl" if self.dev.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{args.port}",
                                    rank=0, world_size=1)
        torch.manual_seed(0)
        self.student = self.utils.MultiCropWrapper(self.backbone(0.1), self.head()).to(self.dev)
        self.teacher = self.utils.MultiCropWrapper(self.backbone(0.0), self.head()).to(self.dev)
        self.teacher.load_state_dict(self.student.state_dict())
        for q in self.teacher.parameters():
            q.requires_grad = False
        self.loss_fn = DINOLoss(p["k"], 2 + args.n_local, 0.04, 0.04, 1, 1000).to(self.dev)
        params = self.utils.get_params_groups(self.student)
        self.opt = torch.optim.AdamW(params, lr=5e-4 * args.batch / 256)
        g = torch.Generator(device="cpu").manual_seed(1)
        crops = [torch.randn(args.batch, 3, p["img"], p["img"], generator=g) for _ in range(2)]
        crops += [torch.randn(args.batch, 3, p["local"], p["local"], generator=g)
                  for _ in range(args.n_local)]
        self.random_crops = [c.to(self.dev) for c in crops]

    def backbone(self, drop):
        p = self.p
        if p["arch"]:
            return self.vits.__dict__[p["arch"]](patch_size=p["patch"], drop_path_rate=drop)
        return self.vits.VisionTransformer(img_size=[p["img"]], patch_size=p["patch"],
                                           embed_dim=p["dim"], depth=p["depth"],
                                           num_heads=p["heads"], mlp_ratio=4, qkv_bias=True,
                                           drop_path_rate=drop)

    def head(self):
        p = self.p
        return self.vits.DINOHead(p["dim"], p["k"], use_bn=False, norm_last_layer=True,
                                  hidden_dim=p["hidden"], bottleneck_dim=p["bottleneck"])

    def loader(self, workers):
        import torch
        from torchvision import datasets

        aug = self.Aug((0.4, 1.0), (0.05, 0.4), self.args.n_local)
        # main_dino's crops are 224 / 96 px: the preset's sizes instead, nothing else changed.
        for t, size in ((aug.global_transfo1, self.p["img"]), (aug.global_transfo2, self.p["img"]),
                        (aug.local_transfo, self.p["local"])):
            t.transforms[0].size = (size, size)
        ds = datasets.ImageFolder(self.args.data, transform=aug)
        return torch.utils.data.DataLoader(ds, batch_size=self.args.batch, shuffle=True,
                                           num_workers=workers, drop_last=True,
                                           pin_memory=self.dev.type == "cuda")

    def step(self, crops, amp):
        import torch

        dtype = torch.bfloat16 if self.dev.type == "cpu" else torch.float16
        with torch.autocast(self.dev.type, dtype=dtype, enabled=amp):
            t_out = self.teacher(crops[:2])
            s_out = self.student(crops)
            loss = self.loss_fn(s_out, t_out, 0)
        self.opt.zero_grad()
        loss.backward()
        self.utils.clip_gradients(self.student, 3.0)
        self.opt.step()
        with torch.no_grad():
            for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
                pt.mul_(0.996).add_(ps.detach(), alpha=0.004)
        return loss

    def sync(self):
        import torch

        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def run(self, amp, workers=None):
        """Images/s over `--steps` steps after `--warmup`: on the fixed random crops when
        `workers` is None, else from a DataLoader with that many workers (loading included)."""
        args = self.args
        n = args.warmup + args.steps
        if workers is None:
            batches = iter([self.random_crops] * n)
        else:
            loader = self.loader(workers)
            batches = iter(loader)
        t0 = None
        for i in range(n):
            if i == args.warmup:
                self.sync()
                t0 = time.perf_counter()
            crops, _ = next(batches) if workers is not None else (next(batches), None)
            crops = [c.to(self.dev, non_blocking=True) for c in crops]
            self.step(crops, amp)
        self.sync()
        dt = time.perf_counter() - t0
        del batches
        return args.batch * args.steps / dt


def step_times(metrics_path, batch):
    """Each step's `train_step` time from dinovmf's metrics.jsonl: its `images_per_sec` is
    `ips_1 = batch/dt_1`, then `ips_n = 0.9 ips_(n-1) + 0.1 batch/dt_n`."""
    ips = [json.loads(line)["images_per_sec"] for line in open(metrics_path) if line.strip()]
    rates = [ips[0]] + [(b - 0.9 * a) / 0.1 for a, b in zip(ips, ips[1:])]
    return [batch / r for r in rates]


# DINO's centering for each loss (the official step centers logits; DINO-vMF's paper centers
# probabilities); the small presets' default Sinkhorn-Knopp would add work DINO does not do.
CENTERING = {"dino": "logit", "vmf": "probability"}


def dinovmf_run(p, args, loss, steps, extra=()):
    """One `dinovmf train` run of `steps` steps: (wall seconds, per-step train_step times)."""
    out = tempfile.mkdtemp(prefix="side-by-side-")
    cmd = [args.dinovmf, "train", "--device", args.device, "--preset", p["dinovmf"],
           "--loss", loss, "--prototypes", str(p["k"]),
           "--batch-size", str(args.batch), "--n-local", str(args.n_local),
           "--data", f"folder:{args.data}" if args.data else "builtin", "--max-steps", str(steps), "--no-eval",
           "--no-figures", "-q", "--diag-every", "0", "--checkpoint-minutes", "0",
           "--workers", str(args.dinovmf_workers), "--out", out,
           "--centering", CENTERING[loss]] + p.get("dinovmf_args", []) + list(extra) + args.dinovmf_arg
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        sys.exit(f"side_by_side: {' '.join(cmd)} failed:\n{done.stderr}")
    times = step_times(os.path.join(out, "metrics.jsonl"), args.batch)
    subprocess.run(["rm", "-rf", out], check=False)
    return wall, times


def dinovmf_measure(p, args, loss, extra=()):
    """(images/s of the step alone, images/s with data loading) from a short and a long run."""
    short, long = args.warmup + 2, args.warmup + 2 + args.dinovmf_steps
    w2, times = dinovmf_run(p, args, loss, long, extra)
    step_only = args.batch * (len(times) - args.warmup) / sum(times[args.warmup:])
    if args.data is None:
        return step_only, None
    w1, _ = dinovmf_run(p, args, loss, short, extra)
    return step_only, args.batch * (long - short) / (w2 - w1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small32")
    ap.add_argument("--data", default=None,
                    help="image folder (<class>/<image>) for both sides; without it only the "
                         "step is compared (dinovmf trains on its built-in set)")
    ap.add_argument("--prototypes", type=int, default=None, help="K (default: the preset's)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n-local", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="DINO's timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dinovmf-steps", type=int, default=30,
                    help="steps the long dinovmf run has more than the short one")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (medians reported)")
    ap.add_argument("--workers-list", default="0,1,2",
                    help="DataLoader num_workers values tried; the best is used")
    ap.add_argument("--dinovmf-workers", "--workers", type=int, default=1,
                    help="dinovmf's --workers (data threads)")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false",
                    help="skip the autocast runs of DINO")
    ap.add_argument("--vmf", action="store_true", help="also dinovmf --loss vmf (DINO-vMF)")
    ap.add_argument("--dinovmf-bf16", action="store_true",
                    help="also dinovmf --loss dino --precision bf16 (CPU)")
    ap.add_argument("--dinovmf-arg", action="append", default=[],
                    help="extra argument for `dinovmf train` (repeatable)")
    ap.add_argument("--dino", default=os.path.join(os.path.dirname(__file__), "..", "third_party", "dino"))
    ap.add_argument("--dinovmf", required=True, help="the dinovmf binary")
    ap.add_argument("--threads", type=int, default=None,
                    help="compute threads on both sides; default: the core count, or 1 on a CPU "
                         "already loaded past its cores")
    ap.add_argument("--port", type=int, default=29517)
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.dino, "main_dino.py")):
        sys.exit(f"side_by_side: {args.dino}/main_dino.py not found: run scripts/fetch-dino.sh")
    if args.data is not None and not os.path.isdir(args.data):
        sys.exit(f"side_by_side: --data {args.data} is not a folder")
    cores = os.cpu_count() or 1
    if args.threads is None:
        # On a CPU shared with other jobs PyTorch's OpenMP regions wait at a barrier for every
        # thread of each op (~2,000 ops a step), so one preempted thread stalls them all: with
        # 2 threads at load 11 on 2 cores the DINO step ran at 4 images/s. One thread each then
        # measures the step rather than the scheduler.
        busy = args.device == "cpu" and os.getloadavg()[0] > cores
        args.threads = 1 if busy else cores
    p = dict(PRESETS[args.preset])
    if args.prototypes:
        p["k"] = args.prototypes
    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)  # DINOHead's weight_norm
    torch.set_num_threads(args.threads)
    amp_name = "bf16" if args.device == "cpu" else "fp16"
    print(f"side-by-side: {args.preset} | K {p['k']} | batch {args.batch} | 2x{p['img']}px + "
          f"{args.n_local}x{p['local']}px | {args.device} | torch {torch.__version__} | "
          f"{args.threads} threads | data {args.data} | {args.rounds} rounds", flush=True)
    t_start = time.perf_counter()
    dino = Dino(p, args)
    workers = [int(w) for w in args.workers_list.split(",")]
    # PyTorch's best num_workers, from one pass over the candidates.
    best_w = None
    if args.data:
        args_steps = args.steps
        args.steps = max(4, args.steps // 2)
        trial = {w: dino.run(False, w) for w in workers}
        args.steps = args_steps
        best_w = max(trial, key=trial.get)
        print("DINO fp32 with data, num_workers -> images/s:",
              ", ".join(f"{w}: {v:.1f}" for w, v in trial.items()), f"(best {best_w})", flush=True)

    rows = {}

    def add(name, value):
        rows.setdefault(name, []).append(value)
        print(f"  {name:<34} {value:8.1f} images/s   (load {os.getloadavg()[0]:.1f})", flush=True)

    # (row name, loss, extra dinovmf options)
    ours = [("dino", "dino", [])] + ([("vmf", "vmf", [])] if args.vmf else []) + \
        ([("dino bf16", "dino", ["--precision", "bf16"])] if args.dinovmf_bf16 else [])
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        add("DINO fp32, step only", dino.run(False))
        s, d = dinovmf_measure(p, args, "dino")
        add("dinovmf dino, step only", s)
        if args.data:
            add(f"DINO fp32, data ({best_w} workers)", dino.run(False, best_w))
            add("dinovmf dino, data", d)
        if args.bf16:
            add(f"DINO {amp_name}, step only", dino.run(True))
            if args.data:
                add(f"DINO {amp_name}, data ({best_w} workers)", dino.run(True, best_w))
        for name, loss, extra in ours[1:]:
            s, d = dinovmf_measure(p, args, loss, extra)
            add(f"dinovmf {name}, step only", s)
            if args.data:
                add(f"dinovmf {name}, data", d)

    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\nmedians over {args.rounds} rounds ({time.perf_counter() - t_start:.0f} s in all, "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):")
    for k, v in med.items():
        print(f"  {k:<34} {v:8.1f} images/s")
    print("ratios (dinovmf / DINO, same kind of measurement):")
    for name, _, _ in ours:
        kinds = [("step only", "step only")] + ([("data", f"data ({best_w} workers)")] if args.data else [])
        for kind, key in kinds:
            v = med[f"dinovmf {name}, {kind}"]
            line = f"  dinovmf {name:<9} {kind:<10} / DINO fp32: {v / med[f'DINO fp32, {key}']:.2f}"
            if args.bf16:
                line += f"   / DINO {amp_name}: {v / med[f'DINO {amp_name}, {key}']:.2f}"
            print(line)


if __name__ == "__main__":
    main()
