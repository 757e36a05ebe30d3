#!/usr/bin/env bash
# Puts the official DINO model code (facebookresearch/dino: vision_transformer.py and the
# utils.py it imports) into third_party/dino/, which is git-ignored: their code is never
# committed here. scripts/pytorch_fixture.py imports it from there.
#
#   DINO_GIT=/path/to/dino/.git scripts/fetch-dino.sh     # a clone (or bare mirror) of it
#
# Without DINO_GIT the bare mirror the sessions' fetch tool leaves is used.
set -euo pipefail
cd "$(dirname "$0")/.."
DINO_GIT=${DINO_GIT:-/work/.mirror/facebookresearch+dino/repo}
REV=${DINO_REV:-HEAD}
if ! git --git-dir="$DINO_GIT" rev-parse --verify -q "$REV^{commit}" >/dev/null; then
    echo "no DINO git repository at $DINO_GIT (set DINO_GIT to a clone of facebookresearch/dino)" >&2
    exit 1
fi
mkdir -p third_party/dino
for f in vision_transformer.py utils.py; do
    git --git-dir="$DINO_GIT" show "$REV:$f" > "third_party/dino/$f"
done
git --git-dir="$DINO_GIT" rev-parse "$REV^{commit}" > third_party/dino/COMMIT
echo "third_party/dino/: DINO $(cat third_party/dino/COMMIT)"
