#!/usr/bin/env bash
# One GPU, no network, under 8 minutes: every CUDA code path tested, then measured, in one Markdown summary.
#
#   bash benchmarks/gpu_check.sh                 # on a machine with one GPU: tests, then benchmarks
#   bash benchmarks/gpu_check.sh --quick         # correctness only (< 5 min): the gpu tests, one step benchmark,
#                                                #   the flagship end to end with the device loader
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   # CPU-sized smoke run (what the test suite runs)
#
# Steps (each timed; the seconds are printed as each ends and in the summary): which packages are
# missing; `pytest -m gpu` on the modules that hold CUDA tests (tests/test_gpu.py and the `cuda`
# cases of the device loader, array cache, frozen network and loss tests; skipped with the reason
# where there is no CUDA, and without pytest installed); a synthetic Tiny-ImageNet-layout folder
# (12,800 random 64 px JPEGs, 200 classes); the step benchmark at 32 px (batch 128) and 64 px
# (batch 256, channels-last); the flagship recipe (recipes/tinyimagenet_nasty.yaml) end to end as
# teacher and nasty with each loader (device, torch, ffcv where installed and the augmentation
# allows), at batch 128 and 256; the same under DeepSpeed ZeRO-2 and with model.compile; the
# quickstart. Each step's output is in $GPU_CHECK_OUT/<step>.log; the summary is printed and
# written to $GPU_CHECK_OUT/summary.md. Runs with tracking.enabled=false (and benchmarks with
# --no-mlflow) when MLflow is missing.
# Environment: PYTHON (default python3), GPU_CHECK_OUT (default a new /tmp folder), GPU_CHECK_TINY.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
TINY=${GPU_CHECK_TINY:-0}
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NT_DIST_CACHE="$OUT/array-cache"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$OUT/mlflow.db}
SUMMARY="$OUT/summary.md"
STATUS="$OUT/status.md"
: > "$STATUS"
: > "$OUT/details.md"
started=$(date +%s)

# ---------------------------------------------------------------- 1. packages
"$PY" - > "$OUT/packages.txt" <<'EOF'
import importlib.util
required = ["torch", "torchvision", "timm", "accelerate", "pydantic", "yaml", "safetensors", "sklearn", "PIL",
            "numpy", "tqdm"]
optional = {"mlflow": "tracking (runs use tracking.enabled=false)", "deepspeed": "the ZeRO-2 step",
            "hjson": "the ZeRO-2 step (DeepSpeed needs it)", "ffcv": "the ffcv loader rows"}
missing = [m for m in required if importlib.util.find_spec(m) is None]
print("required_missing=" + ",".join(missing))
print("optional_missing=" + ",".join(m for m in optional if importlib.util.find_spec(m) is None))
for m in optional:
    if importlib.util.find_spec(m) is None:
        print(f"note=without {m}: no {optional[m]}")
EOF
required_missing=$(sed -n 's/^required_missing=//p' "$OUT/packages.txt")
optional_missing=$(sed -n 's/^optional_missing=//p' "$OUT/packages.txt")
if [ -n "$required_missing" ]; then
  echo "gpu_check: missing required Python packages: ${required_missing//,/, } (pip install them, or bring wheels built on a machine with a network: see ../shared/PLATFORM.md)" >&2
  exit 2
fi
TRACK=()
BENCH=()
case ",$optional_missing," in *,mlflow,*) TRACK=(--set tracking.enabled=false); BENCH=(--no-mlflow) ;; esac
DEEPSPEED=1
case ",$optional_missing," in *,deepspeed,*|*,hjson,*) DEEPSPEED=0 ;; esac

if [ "$TINY" = 1 ]; then
  SIZE=16; IMAGES=200; CLASSES=5; EPOCHS=2
  STEP32=(--model cifar_cnn --batch 8 --rounds 1 --steps 1)
  STEP64=(--model cifar_cnn --batch 8 --rounds 1 --steps 1 --image-size 16 --channels-last)
  E2E=(--quick --images "$IMAGES" --classes "$CLASSES" --size "$SIZE" --epochs "$EPOCHS" --workers 1)
  B1=8; B2=16; PREC=no; DSPREC=bf16
  QUICKSTART=(--set run.epochs=1 --set data.train_subset=128)
else
  SIZE=64; IMAGES=12800; CLASSES=200; EPOCHS=3
  STEP32=(--model cifar_resnet18 --batch 128 --precision bf16)
  STEP64=(--model cifar_resnet18 --batch 256 --precision bf16 --image-size 64 --channels-last)
  E2E=(--images "$IMAGES" --classes "$CLASSES" --size "$SIZE" --epochs "$EPOCHS")
  B1=128; B2=256; PREC=bf16; DSPREC=bf16
  QUICKSTART=()
fi
DATA="$OUT/tiny-imagenet-200"

# step NAME DESCRIPTION COMMAND...: run, time, keep the log, put its table and last line in the summary
step() {
  local name=$1 what=$2; shift 2
  local t0=$(date +%s)
  echo "gpu_check: $name: $what" >&2
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$? t=$(( $(date +%s) - t0 ))
  echo "gpu_check: $name: exit $rc after $t s" >&2
  local result=ok
  [ $rc -ne 0 ] && result="FAILED (exit $rc; see $name.log)"
  echo "| $name | $what | $result | $t |" >> "$STATUS"
  {
    echo "### $name: $what"
    echo
    grep -E '^(\||#|end-to-end|nasty/normal|nasty teacher|skipped|results|SKIPPED|FAILED|ERROR|[0-9]+ (passed|skipped|failed))' \
      "$OUT/$name.log" | grep -v '^| *$' | tail -40
    [ $rc -ne 0 ] && { echo; echo '```'; tail -5 "$OUT/$name.log"; echo '```'; }
    echo
  } >> "$OUT/details.md"
}

skip() { echo "| $1 | $2 | skipped: $3 | 0 |" >> "$STATUS"; }

GPU_TESTS=(tests/test_gpu.py tests/test_device_loader.py tests/test_array_cache.py tests/test_frozen.py tests/test_losses.py)
if "$PY" -c "import pytest" 2>/dev/null; then
  step pytest_gpu "pytest -m gpu: every CUDA code path on tiny sizes" \
    "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --basetemp "$OUT/pytest" "${GPU_TESTS[@]}"
else
  skip pytest_gpu "pytest -m gpu" "pytest is not installed (pip install pytest, or carry its wheel)"
fi

step data "synthetic Tiny-ImageNet layout, $IMAGES images, $CLASSES classes, $SIZE px" \
  "$PY" -c "from pathlib import Path; import sys; sys.path.insert(0, 'benchmarks'); from e2e_throughput import write_synthetic; write_synthetic(Path('$DATA'), $IMAGES, $CLASSES, $SIZE); print('written: $DATA')"
if [ $QUICK = 1 ]; then
  step step64 "step benchmark, 64 px, channels-last" "$PY" benchmarks/train_throughput.py "${STEP64[@]}" "${BENCH[@]}"
  step e2e_b$B1 "flagship end to end, teacher + nasty, device loader, batch $B1" \
    "$PY" benchmarks/e2e_throughput.py "${E2E[@]}" --root "$DATA" --batch $B1 --precision $PREC --loaders device "${BENCH[@]}"
  for s in step32 e2e_b$B2 zero2 compile quickstart tracking; do skip "$s" "-" "--quick"; done
else
step step32 "step benchmark, 32 px" "$PY" benchmarks/train_throughput.py "${STEP32[@]}" "${BENCH[@]}"
step step64 "step benchmark, 64 px, channels-last" "$PY" benchmarks/train_throughput.py "${STEP64[@]}" "${BENCH[@]}"
step e2e_b$B1 "flagship end to end, teacher + nasty, each loader, batch $B1" \
  "$PY" benchmarks/e2e_throughput.py "${E2E[@]}" --root "$DATA" --batch $B1 --precision $PREC "${BENCH[@]}" --json "$OUT/e2e_b$B1.json"
step e2e_b$B2 "flagship end to end, teacher, device loader, batch $B2" \
  "$PY" benchmarks/e2e_throughput.py "${E2E[@]}" --root "$DATA" --batch $B2 --precision $PREC --loaders device --roles teacher "${BENCH[@]}"
if [ $DEEPSPEED = 1 ]; then
  step zero2 "flagship under DeepSpeed ZeRO-2 (cluster/deepspeed_zero2.yaml, 1 process), device loader" \
    "$PY" benchmarks/e2e_throughput.py "${E2E[@]}" --root "$DATA" --batch $B1 --precision $DSPREC --loaders device --launcher cluster/deepspeed_zero2.yaml --label zero2 "${BENCH[@]}"
else
  skip zero2 "DeepSpeed ZeRO-2" "deepspeed or hjson not installed"
fi
step compile "flagship with model.compile=true, device loader" \
  "$PY" benchmarks/e2e_throughput.py "${E2E[@]}" --root "$DATA" --batch $B1 --precision $PREC --loaders device --set model.compile=true --label compile "${BENCH[@]}"
step quickstart "nt-dist quickstart (digits, five runs)" \
  "$PY" -m nt_dist.cli quickstart --out "$OUT/quickstart" --fresh "${TRACK[@]}" "${QUICKSTART[@]}"
step tracking "peak_memory_mb per epoch and MLflow's system metrics (GPU: system/gpu_0_*) of the quickstart's teacher" \
  "$PY" benchmarks/tracking_check.py "$OUT/quickstart/seed0/teacher/cifar-cnn-normal"
fi

device=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU (CPU)')")
versions=$("$PY" -c "import torch, timm, accelerate; print(f'torch {torch.__version__}, timm {timm.__version__}, accelerate {accelerate.__version__}')")
{
  echo "# gpu_check $(date -u +%Y-%m-%d): $device"
  echo
  echo "$versions; missing optional packages: ${optional_missing:-none}; $(( $(date +%s) - started )) s in all; logs in $OUT"
  echo
  echo "| step | what | result | seconds |"
  echo "|---|---|---|---:|"
  cat "$STATUS"
  echo
  cat "$OUT/details.md"
} > "$SUMMARY"
cat "$SUMMARY"
grep -q FAILED "$STATUS" && exit 1
exit 0
