#!/usr/bin/env bash
# Build the wheelhouse .whl/ (git-ignored) that scripts/gpu_check.sh installs on the GPU machine, which has its own
# Python 3.12 with torch (and numpy) but no network and no project venv.
#
#   scripts/gpu_wheels.sh            # then: run scripts/gpu_check.sh there, carrying .whl
#
# cp312 / pure-Python wheels only (--only-binary=:all:), without dependency resolution (--no-deps) so that torch,
# numpy and CUDA libraries (present there, gigabytes here) are never downloaded; the list names what the benchmarks
# import beyond torch/numpy. Versions follow requirements.txt. smac / ConfigSpace are tried as well (the search
# benchmarks): a package without a cp312 wheel is reported and skipped, and gpu_check.sh runs without it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.whl
mkdir -p "$DEST"
need=(segment-anything==1.0 monai==1.6.1 nibabel==5.4.2 PyYAML==6.0.3 pydicom==2.4.5 packaging importlib-resources
      typing-extensions)
optional=(ConfigSpace==1.2.2 smac==2.4.1 pyparsing more-itertools scipy scikit-learn threadpoolctl joblib)
dl() {
  "$PY" -m pip download --quiet --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --only-binary=:all: --no-deps -d "$DEST" "$1"
}
for p in "${need[@]}"; do dl "$p"; done
for p in "${optional[@]}"; do dl "$p" || echo "gpu_wheels: no cp312 wheel for $p (skipped)" >&2; done
du -sh "$DEST"
ls "$DEST"
