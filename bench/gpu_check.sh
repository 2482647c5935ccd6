#!/usr/bin/env bash
# One script for a GPU machine (about 5 minutes on an H100): install the project, run the test
# suite on the GPU with the compiled Triton kernels (no interpreter), the kernel benchmark, and
# the training-step benchmark at batch 128 against the three-pass step. Results go to
# $OUT (default bench/gpu_out): tests.log, kernels.jsonl, train_throughput.jsonl, env.txt.
#
#   bash bench/gpu_check.sh            # on the GPU machine
#   bash bench/gpu_check.sh --dry-run  # anywhere: the same steps at toy sizes, tests skipped
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
DRY=${1:-}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

# The GPU image has torch, triton, typer, pillow and pytest; install only the project itself.
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { echo "install failed, see $OUT/install.log"; exit 1; }
python3 - >"$OUT/env.txt" <<'PY'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PY
cat "$OUT/env.txt"
status=0
if [ "$DRY" = "--dry-run" ]; then
  timeout 300 python3 bench/kernels.py --dry-run | tee "$OUT/kernels.jsonl" || status=1
  timeout 300 python3 bench/train_throughput.py --batch 2 --steps 1 --warmup 1 --rounds 1 \
    | tee "$OUT/train_throughput.jsonl" || status=1
else
  timeout 240 python3 -m pytest -q -x tests/test_kernels.py tests/test_objective.py tests/test_model.py \
    >"$OUT/tests.log" 2>&1 || status=1
  tail -n 3 "$OUT/tests.log"
  timeout 240 python3 bench/kernels.py | tee "$OUT/kernels.jsonl" || status=1
  timeout 180 python3 bench/train_throughput.py --batch 128 --steps 5 --warmup 3 --rounds 2 \
    | tee "$OUT/train_throughput.jsonl" || status=1
fi
echo "gpu_check finished with status $status; results in $OUT"
exit $status
