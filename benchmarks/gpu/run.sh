#!/usr/bin/env bash
# The GPU measurements on a lent GPU machine, in parts that each fit one device command:
#
#   bash benchmarks/gpu/run.sh checks     # CUDA fast-path test, timm test (about a minute)
#   bash benchmarks/gpu/run.sh speed      # step time ÷ compute floor, plain and fast path
#   bash benchmarks/gpu/run.sh table      # a shortened cifar10 suite, many runs at once
#   bash benchmarks/gpu/run.sh all        # the three in turn (default)
#
# checks: the CUDA fast-path test (device-resident data, fused SGD, channels_last, event
#   timing against the CPU loop), and the timm test (timm models as teacher and student
#   through their declared stages; the device's python has timm).
# speed: resnet32x4 -> resnet8x4 at batch 64 (benchmarks/gpu_speed.py), plain and with
#   channels_last + torch.compile: step time against the compute floor, and the wall time of
#   the 240-epoch schedule at that speed.
# table: when cifar10.npz is under FLOWDISTILL_DATA, `flowdistill bench` with several runs at
#   once (--workers), stopped after BENCH_LIMIT seconds; finished runs are kept and a second
#   `table` on the same machine goes on from them. Its records (JSON, Markdown, PNG, no
#   weights) come back as $OUT/<suite>-bench.tgz.
#
# The device sees the repository, not ../shared: cifar10.npz (141 MB) travels in parts.
# Here, `bash benchmarks/gpu/stage.sh` splits it under .stage/ (ignored by git) and prints
# the calls, each carrying one part and appending it under $HOME/data on the device;
# `table` checks the whole file against the staged sha256 before it trains.
#
# A session's device time (15 minutes) fits the checks and the speed part, or the table, not
# all three: start with the first two where no GPU number exists yet.
#
# Knobs (environment): OUT, STEPS (timed steps per method), DEVICE, SUITE, METHODS (speed),
# TABLE_METHODS (default all), BENCH_EPOCHS, BENCH_TEACHER_EPOCHS, BENCH_SEEDS, BENCH_BUDGET,
# BENCH_LIMIT, WORKERS, PYTHON. The machine's own torch is used: the package runs from src/
# without installing anything.
set -euo pipefail
PART=${1:-all}
case "$PART" in checks|speed|table|all) ;; *) echo "usage: $0 [checks|speed|table|all]" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-runs/gpu}
WORK=${WORK:-runs/gpu-work}
STEPS=${STEPS:-200}
DEVICE=${DEVICE:-cuda}
SUITE=${SUITE:-cifar10}
METHODS=${METHODS:-kd,flowdistill,diffkd,fmkt}
DATA=${FLOWDISTILL_DATA:-../shared/data}
LIMIT=${BENCH_LIMIT:-420}
mkdir -p "$OUT" "$WORK"
"$PY" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
failed=()
wants() { [ "$PART" = "$1" ] || [ "$PART" = all ]; }
check() {  # a pytest selection, its whole log under $OUT; a failure is reported, not fatal
  local name=$1; shift
  if "$PY" -m pytest -q -p no:cacheprovider -rs "$@" > "$OUT/check-$name.log" 2>&1; then
    tail -3 "$OUT/check-$name.log"
  else
    tail -30 "$OUT/check-$name.log"; failed+=("$name")
  fi
}
if wants checks; then
  [ "$DEVICE" = cuda ] && check cuda tests/test_fast_path.py -k cuda
  check timm tests/test_zoo.py -k timm
fi
if wants speed; then
  "$PY" benchmarks/gpu_speed.py --suite "$SUITE" --methods "$METHODS" --steps "$STEPS" \
    --device "$DEVICE" ${BATCH:+--batch-size "$BATCH"} --out "$OUT/speed-plain.json"
  "$PY" benchmarks/gpu_speed.py --suite "$SUITE" --methods "$METHODS" --steps "$STEPS" \
    --device "$DEVICE" ${BATCH:+--batch-size "$BATCH"} --channels-last --compile \
    --out "$OUT/speed-fast.json"
fi
if wants table; then
  if [ ! -f "$DATA/cifar10.npz" ]; then
    echo "cifar10.npz is not under FLOWDISTILL_DATA ($DATA): the table is left out"
    [ "$PART" = table ] && exit 1
    exit 0
  fi
  if [ -f .stage/cifar10.npz.sha256 ]; then  # staged in parts: whole only if the sum agrees
    want=$(cat .stage/cifar10.npz.sha256)
    got=$(sha256sum "$DATA/cifar10.npz" | cut -d' ' -f1)
    [ "$got" = "$want" ] || { echo "$DATA/cifar10.npz: sha256 $got, not the staged $want" >&2; exit 1; }
  fi
  rc=0
  timeout --signal INT --kill-after 30 "$LIMIT" \
    "$PY" -m flowdistill bench --suite "$SUITE" --methods "${TABLE_METHODS:-all}" \
      --epochs "${BENCH_EPOCHS:-15}" --teacher-epochs "${BENCH_TEACHER_EPOCHS:-30}" \
      --seeds "${BENCH_SEEDS:-5}" --workers "${WORKERS:-8}" ${BENCH_BUDGET:+--budget "$BENCH_BUDGET"} \
      --channels-last --no-progress --teacher-cache "$WORK/teachers" --out "$WORK/$SUITE" \
    || rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then  # stopped at BENCH_LIMIT: a second `table` goes on
    echo "the bench stopped after $LIMIT s: its finished runs are kept in $WORK/$SUITE"
    rc=0
  elif [ "$rc" != 0 ]; then
    echo "the bench failed (exit $rc): its finished runs are kept in $WORK/$SUITE"
  fi
  dirs=()
  for d in "$SUITE" teachers; do [ -d "$WORK/$d" ] && dirs+=("$d"); done
  (cd "$WORK" && find "${dirs[@]}" -type f \( -name '*.json' -o -name '*.md' -o -name '*.png' \
     -o -name '*.csv' \) -print0 | tar --null -czf - --files-from -) > "$OUT/$SUITE-bench.tgz"
  echo "records: $OUT/$SUITE-bench.tgz"
  [ "$rc" = 0 ] || failed+=("table")
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
