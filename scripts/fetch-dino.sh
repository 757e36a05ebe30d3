#!/usr/bin/env bash
# Exports the official DINO code (facebookresearch/dino) that scripts/side_by_side.py runs into
# third_party/dino/ (git-ignored, never committed; issue 19's PyTorch import/export uses the same
# folder). This machine has no direct network access to GitHub: the repository is brought as a
# bare git directory by the session's `fetch` tool (`fetch github:facebookresearch/dino`, which
# leaves it under /work/.mirror/facebookresearch+dino/repo), and this script exports the files
# from it:
#
#   scripts/fetch-dino.sh [GIT_DIR]     default GIT_DIR: /work/.mirror/facebookresearch+dino/repo
#
# Only what the training step needs is exported: main_dino.py (DINOLoss), vision_transformer.py,
# utils.py, and the LICENSE (Apache-2.0). The commit exported is written to third_party/dino/COMMIT.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
git_dir=${1:-/work/.mirror/facebookresearch+dino/repo}
dest="$top/third_party/dino"
if ! git --git-dir="$git_dir" rev-parse --verify -q HEAD >/dev/null; then
    echo "fetch-dino: no git repository at $git_dir (bring it with the fetch tool: github:facebookresearch/dino)" >&2
    exit 1
fi
mkdir -p "$dest"
for f in main_dino.py vision_transformer.py utils.py LICENSE; do
    git --git-dir="$git_dir" show "HEAD:$f" > "$dest/$f"
done
git --git-dir="$git_dir" rev-parse HEAD > "$dest/COMMIT"
echo "fetch-dino: $(cat "$dest/COMMIT") -> $dest"
