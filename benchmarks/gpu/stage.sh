#!/usr/bin/env bash
# Splits cifar10.npz (FLOWDISTILL_DATA, default ../shared/data) into parts of PART_MB MiB
# (default 50: a part and the repository's files, about 10 MB, must travel in 64 MiB) under
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
split -b "${PART_MB:-50}M" "$SRC" .stage/cifar10.npz.part-
sha256sum "$SRC" | cut -d' ' -f1 > .stage/cifar10.npz.sha256
parts=(.stage/cifar10.npz.part-*)
echo "${#parts[@]} parts, sha256 $(cat .stage/cifar10.npz.sha256); one device call each, one right after another:"
last=$((${#parts[@]} - 1))
have='"$(stat -c%s $HOME/data/cifar10.npz 2>/dev/null || echo 0)"'  # (on the device)
size=0  # what $HOME/data/cifar10.npz must hold before a part is added: a call on a fresh
for i in "${!parts[@]}"; do  # machine (the last one given back) stops instead of appending
  p=${parts[$i]}
  case $i in
    "$last") then_run='FLOWDISTILL_DATA=$HOME/data bash benchmarks/gpu/run.sh table' ;;
    0) then_run='bash benchmarks/gpu/run.sh checks' ;;
    1) then_run='bash benchmarks/gpu/run.sh speed' ;;
    *) then_run='ls -l $HOME/data' ;;
  esac
  echo "  carry [$p, .stage/cifar10.npz.sha256]:"
  if [ "$i" = 0 ]; then  # the first part starts the file afresh
    echo "    mkdir -p \$HOME/data && cat $p > \$HOME/data/cifar10.npz && $then_run"
  else echo "    mkdir -p \$HOME/data; if [ $have = $size ]; then cat $p >> \$HOME/data/cifar10.npz && $then_run;" \
    "else echo 'the staged file lacks the parts before $p: stage again from the first'; exit 1; fi"
  fi
  size=$((size + $(stat -c%s "$p")))
done
