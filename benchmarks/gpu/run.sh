#!/usr/bin/env bash
# The GPU measurements, in one command on a lent GPU machine (at most 10 minutes):
#
#   bash benchmarks/gpu/run.sh            # results under $OUT (default runs/gpu)
#
# 1. the CUDA fast-path test (device-resident data, fused SGD, channels_last, event timing
#    against the CPU loop), and the timm test (timm models as teacher and student through
#    their declared stages; the machine's python has timm);
# 2. step time against the compute floor for resnet32x4 -> resnet8x4 at batch 64, plain and
#    with channels_last + torch.compile (benchmarks/gpu_speed.py), which also gives the
#    wall time of the 240-epoch schedule at that speed;
# 3. when CIFAR-10 is staged (FLOWDISTILL_DATA holding cifar10.npz, see the shared data
#    README), a shortened cifar10 suite with several runs at once (bench --workers).
#
# Knobs (environment): OUT, STEPS (timed steps per method), DEVICE, SUITE, METHODS,
# BENCH_EPOCHS, BENCH_TEACHER_EPOCHS, BENCH_SEEDS, WORKERS, PYTHON. The machine's own torch is used:
# the package runs from src/ without installing anything.
set -euo pipefail
PY=${PYTHON:-python}
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-runs/gpu}
STEPS=${STEPS:-200}
DEVICE=${DEVICE:-cuda}
SUITE=${SUITE:-cifar10}
METHODS=${METHODS:-kd,flowdistill,diffkd,fmkt}
mkdir -p "$OUT"
"$PY" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
if [ "$DEVICE" = cuda ]; then
  "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_path.py -k cuda 2>&1 | tail -3
fi
"$PY" -m pytest -q -p no:cacheprovider tests/test_zoo.py -k timm -rs 2>&1 | tail -3
"$PY" benchmarks/gpu_speed.py --suite "$SUITE" --methods "$METHODS" --steps "$STEPS" \
  --device "$DEVICE" ${BATCH:+--batch-size "$BATCH"} --out "$OUT/speed-plain.json"
"$PY" benchmarks/gpu_speed.py --suite "$SUITE" --methods "$METHODS" --steps "$STEPS" \
  --device "$DEVICE" ${BATCH:+--batch-size "$BATCH"} --channels-last --compile \
  --out "$OUT/speed-fast.json"
if [ -f "${FLOWDISTILL_DATA:-../shared/data}/cifar10.npz" ]; then
  "$PY" -m flowdistill bench --suite "$SUITE" --methods "student,$METHODS" \
    --epochs "${BENCH_EPOCHS:-15}" --teacher-epochs "${BENCH_TEACHER_EPOCHS:-30}" \
    --seeds "${BENCH_SEEDS:-5}" --workers "${WORKERS:-8}" --channels-last --no-progress \
    --teacher-cache "$OUT/teachers" --out "$OUT/$SUITE"
else
  echo "cifar10.npz not staged under FLOWDISTILL_DATA: the suite is left out"
fi
