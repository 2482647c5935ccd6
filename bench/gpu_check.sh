#!/usr/bin/env bash
# One script for a GPU machine (about 5 minutes on an H100): install the project, run the test
# suite on the GPU with the compiled Triton kernels (no interpreter), the kernel benchmark, and
# the training-step benchmark at batch 128 against the three-pass step, and one minute of the
# headline reproduction command at the paper's configuration. Results go to $OUT (default
# bench/gpu_out): tests.log, kernels.jsonl, train_throughput.jsonl, reproduce/, env.txt.
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
  timeout 300 python3 bench/reproduce.py shapes --budget 0.05 --frame-size 16 --set conv_width=4 \
    --set hidden_dim=8 --variants C-DSVAE --judge-epochs 1 --repeat 1 --out "$OUT/reproduce" \
    --no-progress > "$OUT/reproduce.log" 2>&1 || status=1
else
  timeout 240 python3 -m pytest -q -x tests/test_kernels.py tests/test_objective.py tests/test_model.py \
    >"$OUT/tests.log" 2>&1 || status=1
  tail -n 3 "$OUT/tests.log"
  timeout 240 python3 bench/kernels.py | tee "$OUT/kernels.jsonl" || status=1
  timeout 180 python3 bench/train_throughput.py --batch 128 --steps 5 --warmup 3 --rounds 2 \
    | tee "$OUT/train_throughput.jsonl" || status=1
  # The headline reproduction's command at the paper's configuration (64x64 Sprites), cut to one
  # minute of training and one variant: it must run on CUDA; its steps per minute size the real run.
  if [ -d ../shared/data/lpc-sprites ]; then
    timeout 60 python3 -m cdsvae prepare sprites --source ../shared/data/lpc-sprites --out "$OUT/sprites" \
      > "$OUT/reproduce.log" 2>&1 \
    && timeout 240 python3 bench/reproduce.py sprites --data-dir "$OUT/sprites" --budget 1 \
      --variants C-DSVAE --judge-epochs 1 --repeat 1 --out "$OUT/reproduce" --no-progress \
      >> "$OUT/reproduce.log" 2>&1 || status=1
    grep "steps reached" "$OUT/reproduce/report.md"
    rm -rf "$OUT/sprites"
  fi
fi
echo "gpu_check finished with status $status; results in $OUT"
exit $status
