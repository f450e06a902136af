#!/usr/bin/env bash
# What the device machine lacks, as wheels in .whl/ (git-ignored), for the device tool's `run` with
# carry=[".whl"]: dpfl-bench itself (built here), opacus and randomgen for its Python 3.12 (manylinux). The
# machine already has torch, timm, peft, transformers, scipy, pandas, pyarrow, typer, rich and tensorboard
# (the device tool's KINDS.md). Prints the command to run there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
"$PYTHON" -m pip wheel -q --no-deps -w .whl .
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl opacus==1.6.0 randomgen==2.5.1
size=$(du -sm .whl | cut -f1)
echo "wheels in .whl/: ${size} MiB (the working tree and what is carried travel within 64 MiB)"
echo "on the device (carry .whl): python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 benchmarks/gpu/check.py"
