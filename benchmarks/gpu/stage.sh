#!/usr/bin/env bash
# Splits cifar10.npz (FLOWDISTILL_DATA, default ../shared/data) into parts of PART_MB MiB
# (default 40: a part and the repository's files must travel in 64 MiB) under
# .stage/ (ignored by git through .git/info/exclude), for a GPU machine that sees the
# repository but not the data beside it, and prints the device calls that carry them.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=${FLOWDISTILL_DATA:-../shared/data}/cifar10.npz
[ -f "$SRC" ] || { echo "no $SRC to stage" >&2; exit 1; }
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.stage/' "$exclude" 2>/dev/null || echo '/.stage/' >> "$exclude"
rm -rf .stage && mkdir .stage
split -b "${PART_MB:-40}M" "$SRC" .stage/cifar10.npz.part-
sha256sum "$SRC" | cut -d' ' -f1 > .stage/cifar10.npz.sha256
parts=(.stage/cifar10.npz.part-*)
echo "${#parts[@]} parts, sha256 $(cat .stage/cifar10.npz.sha256); one device call each, one right after another:"
last=$((${#parts[@]} - 1))
for i in "${!parts[@]}"; do
  p=${parts[$i]}
  op='>>'; [ "$i" = 0 ] && op='>'
  case $i in
    0) then_run='bash benchmarks/gpu/run.sh checks' ;;
    "$last") then_run='FLOWDISTILL_DATA=$HOME/data bash benchmarks/gpu/run.sh table' ;;
    1) then_run='bash benchmarks/gpu/run.sh speed' ;;
    *) then_run='ls -l $HOME/data' ;;
  esac
  echo "  carry [$p, .stage/cifar10.npz.sha256]: mkdir -p \$HOME/data && cat $p $op \$HOME/data/cifar10.npz && $then_run"
done
