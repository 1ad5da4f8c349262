#!/usr/bin/env bash
# make gpu-check: the one prepared script for a lent GPU machine (no internet there; Python 3.12 + torch).
#   1. installs what is missing from the carried wheels in ./wheels (bench/gpu_wheels.sh fills it here),
#   2. builds diso (DiffMC) from its sdist and nvdiffrast on first use,
#   3. runs the CUDA tests (CUDA ops vs their PyTorch twins), then the GPU benchmarks,
#   4. writes everything as one JSON file: $OUT/gpu_check.json (plus the logs beside it).
# On a machine without CUDA it says so and exits 0 without doing anything else.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-work/gpu-check}"
mkdir -p "$OUTDIR"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONUNBUFFERED=1

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu-check: no CUDA GPU present on this machine; nothing was run."
  echo "gpu-check: run it on a GPU machine (README, 'GPU check'); the CPU twins are covered by 'make test'."
  exit 0
fi

SITE=/tmp/gtr-site
if ls wheels/*.whl >/dev/null 2>&1; then
  echo "gpu-check: installing carried wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" wheels/*.whl \
    || { echo "gpu-check: wheel install failed"; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# Offline LPIPS trunks carried as .gpucache/lpips/*.safetensors (fp16 copies to fit the carry limit).
[ -d .gpucache/lpips ] && export GTR_CACHE="$PWD/.gpucache"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}"
# nvdiffrast's JIT build needs the CUDA headers of the toolkit wheel when there is no system include dir.
NVINC=$("$PY" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "include"))' 2>/dev/null || true)
[ -n "$NVINC" ] && [ -d "$NVINC" ] && export CPATH="$NVINC${CPATH:+:$CPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"

if ! "$PY" -c 'import diso' 2>/dev/null && ls wheels/diso-*.tar.gz >/dev/null 2>&1; then
  echo "gpu-check: building diso from its sdist (FORCE_CUDA=1)"
  ( time FORCE_CUDA=1 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" \
      wheels/diso-*.tar.gz ) > "$OUTDIR/diso_build.log" 2>&1 || echo "gpu-check: diso build FAILED (see diso_build.log)"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

exec "$PY" -m bench.gpu_check --out "$OUTDIR" "$@"
