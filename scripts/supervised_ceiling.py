#!/usr/bin/env python3
"""A supervised ceiling for the quality suite (docs/quality.md, issue 13): trains the same ViT
as dinovmf's small32 preset (32 px, patch 8, width 96, depth 4, 3 heads, MLP ratio 4; the
official DINO VisionTransformer from third_party/dino/, see scripts/fetch-dino.sh) with the
labels, cross-entropy on a linear layer over its [CLS], and prints the held-out top-1 accuracy
as it goes. If the supervised network cannot separate a set's classes either, a
self-supervised recipe on that backbone cannot be expected to; if it can, the gap is the
recipe's.

    .venv-torch/bin/python scripts/supervised_ceiling.py --data runs/quality-data/clutter64 \\
        --epochs 30
    # a small CNN instead of the ViT (is the set learnable at this size at all?):
    ... --arch cnn

The data folder holds train/ and test/ with one sub-folder per class (what `dinovmf bench
quality` writes into its --cache folder). Augmentation: random-resized crops (scale
--min-scale..1) to --img px and horizontal flips; the test images resized to --img px. AdamW,
cosine learning rate with one warm-up epoch, batch 64, --threads CPU threads. Not run by CI;
needs torch, torchvision and Pillow (e.g. in .venv-torch).
"""
import argparse
import math
import os
import sys
import time


def build_vit(dino_dir, img, patch, classes, conv_stem=False, mean_pool=False):
    import torch.nn as nn
    sys.path.insert(0, dino_dir)
    import vision_transformer as vits

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = vits.VisionTransformer(
                img_size=[img], patch_size=patch, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4,
                qkv_bias=True, drop_path_rate=0.1)
            if conv_stem:
                if patch & (patch - 1):
                    raise SystemExit(f"--arch vit-conv needs a power-of-two patch, not {patch}")
                # Instead of one patch x patch linear projection: log2(patch) 3 x 3 convolutions
                # of stride 2 (batch norm, ReLU), then a 1 x 1 convolution to the width, so the
                # token grid (and everything after it) is the same as the patch embedding's.
                layers, c = [], 3
                for i in range(patch.bit_length() - 1):
                    o = 96 >> (patch.bit_length() - 2 - i)
                    layers += [nn.Conv2d(c, o, 3, stride=2, padding=1, bias=False),
                               nn.BatchNorm2d(o), nn.ReLU()]
                    c = o
                layers.append(nn.Conv2d(c, 96, 1))
                self.backbone.patch_embed.proj = nn.Sequential(*layers)
            self.fc = nn.Linear(96, classes)

        def forward(self, x):
            if not mean_pool:
                return self.fc(self.backbone(x))
            b = self.backbone
            x = b.prepare_tokens(x)
            for blk in b.blocks:
                x = blk(x)
            return self.fc(b.norm(x)[:, 1:].mean(1))

    return Net()


def build_cnn(classes):
    import torch.nn as nn

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.MaxPool2d(2))

    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder with train/ and test/ class folders")
    ap.add_argument("--arch", choices=["vit", "vit-conv", "cnn"], default="vit",
                    help="vit: the small32 ViT; vit-conv: the same with a convolutional stem "
                    "in place of the patch embedding; cnn: a small CNN")
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--pool", choices=["cls", "mean"], default="cls",
                    help="ViT readout: its [CLS] token, or the mean of its patch tokens")
    ap.add_argument("--patch", type=int, default=8, help="ViT patch size")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-scale", type=float, default=0.4)
    ap.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dino-dir", default=os.path.join(os.path.dirname(__file__), "..",
                                                       "third_party", "dino"))
    a = ap.parse_args()

    import torch
    import torch.nn as nn
    from torchvision import datasets, transforms

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(a.img, scale=(a.min_scale, 1.0)),
        transforms.RandomHorizontalFlip(0.0 if a.no_flip else 0.5), transforms.ToTensor(), norm])
    test_tf = transforms.Compose([transforms.Resize((a.img, a.img)), transforms.ToTensor(), norm])
    rgb = lambda p: datasets.folder.default_loader(p)  # noqa: E731 (greyscale PNGs to RGB)
    train = datasets.ImageFolder(os.path.join(a.data, "train"), train_tf, loader=rgb)
    test = datasets.ImageFolder(os.path.join(a.data, "test"), test_tf, loader=rgb)
    classes = len(train.classes)
    tl = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, drop_last=True)
    vl = torch.utils.data.DataLoader(test, batch_size=256)
    net = (build_cnn(classes) if a.arch == "cnn"
           else build_vit(a.dino_dir, a.img, a.patch, classes, conv_stem=a.arch == "vit-conv",
                                  mean_pool=a.pool == "mean"))
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=0.05)
    steps = a.epochs * len(tl)
    warm = len(tl)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm
        else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    loss_fn = nn.CrossEntropyLoss()

    def accuracy():
        net.eval()
        right = 0
        with torch.no_grad():
            for x, y in vl:
                right += (net(x).argmax(1) == y).sum().item()
        net.train()
        return 100.0 * right / len(test)

    print(f"{a.data}: {len(train)} train / {len(test)} test images, {classes} classes, "
          f"{a.arch} at {a.img} px{f' patch {a.patch}' if a.arch != 'cnn' else ''}, {a.epochs} epochs ({steps} steps); chance "
          f"{100.0 / classes:.1f} %", flush=True)
    t0 = time.time()
    for e in range(1, a.epochs + 1):
        total = 0.0
        for x, y in tl:
            loss = loss_fn(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        if e % a.eval_every == 0 or e == a.epochs:
            print(f"epoch {e}: train loss {total / len(tl):.3f}, test top-1 {accuracy():.1f} % "
                  f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
