#!/usr/bin/env bash
# Fill ./wheels/ (git-ignored) with what the GPU path needs on the lent GPU machine, which has Python 3.12,
# torch, nvcc and ninja but NO internet: the diso sdist (built there by bench/gpu_check.sh), nvdiffrast
# (diffrp-nvdiffrast, compiled on first use) and the pure-Python / cp312 wheels our GPU code imports.
# Never downloads torch (the machine has its own). Run here, where PyPI is reachable; the carry limit of the
# device tool is 64 MiB, so the script stops if the folder grows past 60 MB.
#   bash bench/gpu_wheels.sh [DEST=wheels]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-wheels}"
mkdir -p "$DEST"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
PIP=("$PY" -m pip download --no-deps --disable-pip-version-check -q -d "$DEST")
BIN=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64
     --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --only-binary=:all:)

# CUDA ops: sources, built on the GPU machine.
# --no-build-isolation: pip prepares sdist metadata by running setup.py, which imports torch (present here).
"${PIP[@]}" --no-build-isolation --no-binary=:all: "diso==0.1.4"
"${PIP[@]}" "${BIN[@]}" "diffrp-nvdiffrast==0.3.3.1" || "${PIP[@]}" --no-build-isolation --no-binary=:all: "diffrp-nvdiffrast==0.3.3.1"

# Wheels our GPU code imports that the GPU image lacks (it already has numpy, scipy, scikit-image, pyyaml,
# tqdm, safetensors, pillow, imageio, tensorboard, pyarrow: carrying a second version of those breaks the
# install there, see the device README).
for pkg in "webdataset==1.0.2" "braceexpand==0.1.7" "lpips==0.1.4" "trimesh==$("$PY" -c 'import trimesh; print(trimesh.__version__)')"; do
  "${PIP[@]}" "${BIN[@]}" "$pkg" || "${PIP[@]}" --python-version 3.12 --only-binary=:all: "$pkg"
done
"${PIP[@]}" "${BIN[@]}" "xatlas==0.0.11"

total=$(du -sm "$DEST" | cut -f1)
ls -la "$DEST"
echo "gpu_wheels: $total MB in $DEST"
if [ "$total" -gt 60 ]; then
  echo "gpu_wheels: more than 60 MB — over the carry budget; drop the largest optional wheels (scipy first)" >&2
  exit 1
fi
