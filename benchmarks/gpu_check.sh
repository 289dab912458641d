#!/usr/bin/env bash
# Every CUDA check and GPU figure in one run, sized for a short lease of one GPU (~6-8 minutes).
#
#   bash benchmarks/gpu_check.sh OUT_DIR          # from the repository root, on the GPU machine
#   SMALL=1 bash benchmarks/gpu_check.sh OUT_DIR  # a tiny dry run of the same steps (CPU is fine)
#
# Needs python3 with torch (CUDA), torchvision, numpy, Pillow, tqdm, onnx and pytest. No DALI wheel is
# assumed (--data-backend torch; the benchmark modes exclude the data wait from the timing).
# pycocotools is installed from .gpu_wheels/ when missing (machines without network), made with
#   pip download --only-binary=:all: --no-deps --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .gpu_wheels pycocotools
# Writes OUT_DIR/summary.txt (every figure, one JSON line per run) and one log per step; exits
# non-zero when any step failed.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
FAILED=0
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "${SMALL:-0}" = 1 ]; then
  TRAIN=16 VAL=4 BS=4 BIG=8 WARM=1 ITERS=3 EPOCHS=1 WORKERS=1 SIZE=320x240 BACKBONE=resnet18
else
  TRAIN=512 VAL=64 BS=64 BIG=128 WARM=10 ITERS=50 EPOCHS=2 WORKERS=12 SIZE=640x480 BACKBONE=resnet50
fi

$PY -c "import pycocotools" 2>/dev/null ||
  $PY -m pip install -q --no-index --find-links .gpu_wheels pycocotools >"$OUT/pip.log" 2>&1 ||
  note "pycocotools missing and not installable: evaluation will fail"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and \
torch.cuda.get_device_name(0))"
  nproc
} 2>&1 | tee "$OUT/env.txt" | sed 's/^/env: /' | tee -a "$SUMMARY"

DATA="$WORK/coco"
$PY -m training.synthetic "$DATA" --train "$TRAIN" --val "$VAL" --size "$SIZE" >"$OUT/data.log" 2>&1 ||
  { note "synthetic data failed"; exit 1; }

# step NAME TIMEOUT ARGS...: one torchrun job; its last JSON line (benchmarks) goes to the summary
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" $PY -m torch.distributed.run --standalone --nproc_per_node=1 \
    training/train.py --data "$DATA" --data-backend torch --num-workers "$WORKERS" \
    --backbone "$BACKBONE" --backbone-weights none "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
  local result
  result=$(grep '^{' "$OUT/$name.log" | tail -1)
  note "$name: exit $rc in $((SECONDS - t0)) s ${result}"
}

BENCH=(--benchmark-warmup "$WARM" --benchmark-iterations "$ITERS")
step bench_train_amp_bs$BS 240 --mode benchmark-training --batch-size "$BS" --amp "${BENCH[@]}"
step bench_train_fp32_bs$BS 240 --mode benchmark-training --batch-size "$BS" --no-amp "${BENCH[@]}"
step bench_train_amp_bs$BIG 240 --mode benchmark-training --batch-size "$BIG" --amp "${BENCH[@]}"
step bench_train_amp_bs${BS}_channels_first 240 --mode benchmark-training --batch-size "$BS" \
  --amp --data-layout channels_first "${BENCH[@]}"
step bench_infer_amp_bs$BS 180 --mode benchmark-inference --batch-size "$BS" \
  --eval-batch-size "$BS" --amp "${BENCH[@]}"
# a real AMP run: warmup, GradScaler, checkpoint, COCO evaluation on the GPU, img/s in the log
step train_amp 300 --epochs "$EPOCHS" --batch-size "$BS" --amp --warmup 4 \
  --evaluation $((EPOCHS - 1)) --save "$WORK/run" --log-interval 1
$PY - "$WORK/run/metrics.jsonl" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
steps = [r for r in rows if r["event"] == "step"]
evals = [r for r in rows if r["event"] == "eval"]
rates = sorted(r.get("images_per_s", 0) for r in steps[len(steps) // 2:])
print("train_amp: steps", len(steps), "first/last loss", steps[0]["loss"], steps[-1]["loss"],
      "median img/s (second half, step time only)", rates[len(rates) // 2] if rates else None,
      "eval", {k: evals[-1][k] for k in ("AP", "AP50")} if evals else None,
      "end", {k: v for k, v in rows[-1].items() if k in ("event", "iteration", "skipped_steps")})
EOF

t0=$SECONDS
timeout 180 $PY -m training.export --output "$WORK/repo" --random-init >"$OUT/export.log" 2>&1
rc=$?
[ "$rc" = 0 ] || FAILED=$((FAILED + 1))
note "export (GPU machine): exit $rc in $((SECONDS - t0)) s"

t0=$SECONDS
timeout 300 $PY -m pytest -q -p no:cacheprovider -m gpu tests/training/test_gpu.py \
  >"$OUT/pytest_gpu.log" 2>&1
rc=$?
[ "$rc" = 0 ] || FAILED=$((FAILED + 1))
note "pytest -m gpu: exit $rc in $((SECONDS - t0)) s: $(tail -1 "$OUT/pytest_gpu.log")"
note "failed steps: $FAILED"
exit "$FAILED"
