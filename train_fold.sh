#!/usr/bin/env bash
# Train folds of an experiment, then score it. Run from the project root.
#
#   bash train_fold.sh FOLDS [CONFIG.yaml] [key=value ...]
#
#   FOLDS   0 | 0..4 | 0,2,3 | full | 0..4,full
#   CONFIG  default configs/glyphs_arcface.yaml (the embedded data set, generated on first use)
#
# Examples:
#   bash train_fold.sh 0
#   bash train_fold.sh 0..4 configs/omniglot_arcface.yaml train.epochs=20
#   bash train_fold.sh 1 configs/omniglot_arcface.yaml train.resume=true
#   bash train_fold.sh full configs/omniglot_arcface.yaml
#
# `full` is the full-data fit: one model on every fold's rows (never the test split), no validation, the last
# epoch kept, written to models/<exp>/full.pt (+ full.json); train.full_epochs sets its epochs (0: the folds'
# count, see the README). It runs after the folds of the spec; it has no OOF, so it is not scored.
#
# Each fold runs in its own process: a crash in one fold loses nothing of the others, and
# `train.resume=true` continues an interrupted fold from its last finished epoch (finished folds
# are skipped). Several train_fold.sh may run at once on different folds (one per GPU): file locks
# make them share the data set, the fold file and the scores; the same fold twice is refused.
#
# Several GPUs / nodes (DistributedDataParallel through torchrun; train.batch_size is the GLOBAL batch):
#   NPROC_PER_NODE=2 bash train_fold.sh 0
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 MASTER_PORT=29500 NPROC_PER_NODE=8 bash train_fold.sh 0..4
#   (the same on host1 with NODE_RANK=1). Scoring runs once, on one process, after the folds.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
  exit $(( $# < 1 ? 2 : 0 ))
fi
spec=$1; shift
config=configs/glyphs_arcface.yaml
if [[ $# -gt 0 && $1 == *.y*ml ]]; then config=$1; shift; fi
PY=${PYTHON:-python}

folds=()
full=false  # the full-data fit, trained after the folds (with train.keep=best its epochs come from them)
IFS=',' read -ra parts <<< "$spec"
for part in "${parts[@]}"; do
  if [[ $part =~ ^([0-9]+)\.\.([0-9]+)$ ]]; then
    for ((k = BASH_REMATCH[1]; k <= BASH_REMATCH[2]; k++)); do folds+=("$k"); done
  elif [[ $part =~ ^[0-9]+$ ]]; then
    folds+=("$part")
  elif [[ $part == full ]]; then
    full=true
  else
    echo "train_fold.sh: bad fold spec '$spec' (use K, A..B, A,B,C or full, e.g. 0..4,full)" >&2; exit 2
  fi
done
n_folds=${#folds[@]}  # the folds scored at the end (the full fit has no OOF)
if $full; then folds+=(full); fi

# torchrun when NPROC_PER_NODE or NNODES asks for it; one plain process otherwise
launch=("$PY")
if [[ -n ${NPROC_PER_NODE:-} || -n ${NNODES:-} ]]; then
  launch=("$PY" -m torch.distributed.run --nproc_per_node "${NPROC_PER_NODE:-1}")
  if [[ ${NNODES:-1} -gt 1 ]]; then
    : "${MASTER_ADDR:?set MASTER_ADDR (the host of NODE_RANK=0) for NNODES>1}"
    launch+=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK (0..NNODES-1) for NNODES>1}"
             --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
  elif [[ -n ${MASTER_PORT:-} ]]; then
    launch+=(--nnodes 1 --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT")
  else
    launch+=(--standalone)  # one node: a free port of its own
  fi
fi

# whole-run progress: after each fold, how long it took and about how long the rest will (the mean of the folds
# trained so far; skipped ones, already finished, do not count)
report=$(mktemp "${TMPDIR:-/tmp}/arcfold-run.XXXXXX")
trap 'rm -f "$report"' EXIT
export ARCFOLD_RUN_REPORT=$report
hms() { printf '%dm %02ds' $(($1 / 60)) $(($1 % 60)); }
n_runs=${#folds[@]} i=0 trained_s=0 n_trained=0
for fold in "${folds[@]}"; do
  i=$((i + 1))
  "${launch[@]}" -m arcfold train --config "$config" --fold "$fold" "$@"
  read -r _ status took < <(tail -n 1 "$report") || { status=trained; took=0; }
  if [[ $status == trained ]]; then trained_s=$((trained_s + took)); n_trained=$((n_trained + 1)); fi
  left=$((n_runs - i))
  if ((left > 0 && n_trained > 0)); then
    eta="$left left, about $(hms $((trained_s / n_trained * left)))"
  else
    eta="$left left"
  fi
  echo "train_fold.sh: fold $fold $status in $(hms "$took") ($i of $n_runs); $eta" >&2
done
if ((n_folds > 0)); then
  "$PY" -m arcfold score --config "$config" "$@"
else
  echo "train_fold.sh: only the full fit was trained: it has no OOF, nothing to score" >&2
fi
