#!/usr/bin/env bash
# Train folds of an experiment, then score it. Run from the project root.
#
#   bash train_fold.sh FOLDS [CONFIG.yaml] [key=value ...]
#
#   FOLDS   0 | 0..4 | 0,2,3
#   CONFIG  default configs/glyphs_arcface.yaml (the embedded data set, generated on first use)
#
# Examples:
#   bash train_fold.sh 0
#   bash train_fold.sh 0..4 configs/omniglot_arcface.yaml train.epochs=20
#   bash train_fold.sh 1 configs/omniglot_arcface.yaml train.resume=true
#
# Each fold runs in its own process: a crash in one fold loses nothing of the others, and
# `train.resume=true` continues an interrupted fold from its last finished epoch (finished folds
# are skipped). Several train_fold.sh may run at once on different folds (one per GPU): file locks
# make them share the data set, the fold file and the scores; the same fold twice is refused.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit $(( $# < 1 ? 2 : 0 ))
fi
spec=$1; shift
config=configs/glyphs_arcface.yaml
if [[ $# -gt 0 && $1 == *.y*ml ]]; then config=$1; shift; fi
PY=${PYTHON:-python}

folds=()
IFS=',' read -ra parts <<< "$spec"
for part in "${parts[@]}"; do
  if [[ $part =~ ^([0-9]+)\.\.([0-9]+)$ ]]; then
    for ((k = BASH_REMATCH[1]; k <= BASH_REMATCH[2]; k++)); do folds+=("$k"); done
  elif [[ $part =~ ^[0-9]+$ ]]; then
    folds+=("$part")
  else
    echo "train_fold.sh: bad fold spec '$spec' (use K, A..B or A,B,C)" >&2; exit 2
  fi
done

for fold in "${folds[@]}"; do
  "$PY" -m arcfold train --config "$config" --fold "$fold" "$@"
done
"$PY" -m arcfold score --config "$config" "$@"
