#!/usr/bin/env bash
# The GPU check (about 10 minutes on one device): run it once on a machine with a CUDA GPU and
# commit what it writes to benchmarks/gpu/<device>.md.
#   (a) the smoke pipeline on the device, its tables compared with the CPU run's
#   (b) 20 steps of every paper-size training stage in fp32 and bf16: steps/s, peak memory and
#       the paper profile's hours at those rates (+ the cost of deterministic algorithms)
#   (c) a 2-GPU data-parallel step through torchrun, when two devices are visible
#
#   benchmarks/gpu_check.sh             # on a GPU box, from the repository root
#   benchmarks/gpu_check.sh --dry-run   # on a CPU: every part's code path, nothing measured
#                                       # (CI runs this; the report goes to a scratch folder)
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY="--dry-run" ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: benchmarks/gpu_check.sh [--dry-run] [--out REPORT.md]" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [ -n "$DRY" ]; then
  DEVICE_NAME=dry-run
  NGPU=2   # two gloo processes stand in for two GPUs
else
  NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
  [ "$NGPU" -ge 1 ] || { echo "gpu_check: torch sees no CUDA device (use --dry-run on a CPU)" >&2; exit 1; }
  DEVICE_NAME="$("$PY" -c 'import re, torch; print(re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(0)).strip("_"))')"
fi
[ -n "$OUT" ] || OUT="$([ -n "$DRY" ] && echo "$WORK/report.md" || echo "benchmarks/gpu/$DEVICE_NAME.md")"

# (a) the smoke pipeline: the CPU run (reused when up to date) and the same profile on the device
echo "== (a) smoke pipeline on the CPU and on the device"
./run_all.sh --profile smoke --device cpu > "$WORK/smoke_cpu.log" 2>&1 || { tail -30 "$WORK/smoke_cpu.log"; exit 1; }
if [ -n "$DRY" ]; then
  GPU_FIGURES=figures/smoke   # no device: the CPU run compared with itself
else
  printf 'base: %s/params/smoke.yaml\nrun_name: smoke_gpu_check\ndevice: cuda\n' "$PWD" > "$WORK/smoke_gpu.yaml"
  ./run_all.sh --profile "$WORK/smoke_gpu.yaml" --device cuda > "$WORK/smoke_gpu.log" 2>&1 || { tail -30 "$WORK/smoke_gpu.log"; exit 1; }
  GPU_FIGURES=figures/smoke_gpu_check
fi
"$PY" benchmarks/gpu_check.py compare figures/smoke "$GPU_FIGURES" --out "$WORK/compare.json"

# (b) paper-size training steps, fp32 and bf16
echo "== (b) paper-size training steps"
"$PY" benchmarks/gpu_check.py steps $DRY --out "$WORK/steps.json"

# (c) two processes through torchrun
if [ "$NGPU" -ge 2 ]; then
  echo "== (c) data-parallel step on 2 processes"
  OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc-per-node=2 \
    benchmarks/gpu_check.py ddp $DRY --out "$WORK/ddp.json"
fi

"$PY" benchmarks/gpu_check.py report "$WORK/compare.json" "$WORK/steps.json" "$WORK/ddp.json" --out "$OUT"
echo "gpu_check: report written to $OUT"
