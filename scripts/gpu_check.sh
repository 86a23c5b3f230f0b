#!/usr/bin/env bash
# GPU check in one command, within 8 minutes: ViT-B interactive latency with pre-encoding (fp32 and bf16 encoder)
# and the bf16-vs-fp32 Dice difference, on a machine with Python 3.12 + torch (CUDA) but no network and no venv.
#
#   scripts/gpu_wheels.sh                       # here, once: the wheelhouse .whl/ (git-ignored)
#   scripts/gpu_check.sh                        # there, from the repository root, with .whl/ carried along
#
# Installs what is missing from .whl/ (--no-index --no-deps) into a temporary folder, never into the system Python.
# Writes the full outputs to ${OUT:-/tmp}/gpu_*.md / .log and prints one line of figures at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp}
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
[ -d .whl ] || { echo "gpu_check: no .whl/ wheelhouse (run scripts/gpu_wheels.sh and carry .whl)" >&2; exit 2; }
"$PY" - <<'PYEOF' || exit 2
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
sys.exit(0 if torch.cuda.is_available() else 1)
PYEOF
# only what the Python there lacks: its torch / numpy stay as they are
missing=()
for spec in segment_anything:segment-anything monai:monai nibabel:nibabel yaml:PyYAML pydicom:pydicom \
            packaging:packaging importlib_resources:importlib-resources typing_extensions:typing-extensions \
            scipy:scipy; do
  mod=${spec%%:*}; pkg=${spec#*:}
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  "$PY" -m pip install --quiet --no-index --no-deps --find-links .whl --target "$SITE" "${missing[@]}" \
    || { echo "gpu_check: installing ${missing[*]} from .whl failed" >&2; exit 2; }
fi
export PYTHONPATH="$SITE:$PWD/lib${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
timeout 200 "$PY" scripts/bench_infer.py --device cuda --vit-b-firsts 4 --vit-b-preencode 32 \
  --out "$OUT/gpu_bench_infer_fp32.md" > "$OUT/gpu_fp32.log" 2>&1; rc1=$?
timeout 150 "$PY" scripts/bench_infer.py --device cuda --bf16 --vit-b-firsts 4 --vit-b-preencode 32 \
  --out "$OUT/gpu_bench_infer_bf16.md" > "$OUT/gpu_bf16.log" 2>&1; rc2=$?
timeout 90 "$PY" scripts/bench_bf16.py --device cuda --slices 8 --vit-b-slices 8 > "$OUT/gpu_dice.log" 2>&1; rc3=$?
for f in gpu_fp32 gpu_bf16 gpu_dice; do echo "== $f"; tail -n 4 "$OUT/$f.log"; done
fp32=$(tail -n 1 "$OUT/gpu_fp32.log"); bf16=$(tail -n 1 "$OUT/gpu_bf16.log"); dice=$(tail -n 1 "$OUT/gpu_dice.log")
echo "gpu_check rc=$rc1/$rc2/$rc3 wall_s=$(( $(date +%s) - t0 )) | fp32: $fp32 | bf16: $bf16 | $dice"
[ $rc1 -eq 0 ] && [ $rc2 -eq 0 ] && [ $rc3 -eq 0 ]
