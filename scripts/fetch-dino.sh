#!/usr/bin/env bash
# Puts the official DINO code (facebookresearch/dino: vision_transformer.py and the utils.py it
# imports, main_dino.py with DINOLoss for scripts/side_by_side.py, its LICENSE) into
# third_party/dino/, and iBOT's (bytedance/ibot: models/
# vision_transformer.py, models/head.py, utils.py) into third_party/ibot/ when a clone of it is
# there. third_party/ is git-ignored: their code is never committed here.
# scripts/pytorch_fixture.py imports it from there.
#
#   DINO_GIT=/path/to/dino/.git IBOT_GIT=/path/to/ibot/.git scripts/fetch-dino.sh
#
# (clones or bare mirrors). Without them the bare mirrors the sessions' fetch tool leaves are used.
set -euo pipefail
cd "$(dirname "$0")/.."
DINO_GIT=${DINO_GIT:-/work/.mirror/facebookresearch+dino/repo}
REV=${DINO_REV:-HEAD}
if ! git --git-dir="$DINO_GIT" rev-parse --verify -q "$REV^{commit}" >/dev/null; then
    echo "no DINO git repository at $DINO_GIT (set DINO_GIT to a clone of facebookresearch/dino)" >&2
    exit 1
fi
mkdir -p third_party/dino
for f in main_dino.py vision_transformer.py utils.py LICENSE; do
    git --git-dir="$DINO_GIT" show "$REV:$f" > "third_party/dino/$f"
done
git --git-dir="$DINO_GIT" rev-parse "$REV^{commit}" > third_party/dino/COMMIT
echo "third_party/dino/: DINO $(cat third_party/dino/COMMIT)"

IBOT_GIT=${IBOT_GIT:-/work/.mirror/bytedance+ibot/repo}
if git --git-dir="$IBOT_GIT" rev-parse --verify -q "HEAD^{commit}" >/dev/null; then
    mkdir -p third_party/ibot
    for f in models/vision_transformer.py models/head.py utils.py; do
        git --git-dir="$IBOT_GIT" show "HEAD:$f" > "third_party/ibot/$(basename "$f")"
    done
    git --git-dir="$IBOT_GIT" rev-parse "HEAD^{commit}" > third_party/ibot/COMMIT
    echo "third_party/ibot/: iBOT $(cat third_party/ibot/COMMIT)"
else
    echo "no iBOT repository at $IBOT_GIT: skipped (only --ibot-check needs it)"
fi
