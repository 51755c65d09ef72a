#!/usr/bin/env bash
# The bundled model's recipe, end to end, in one command (models/MODEL_CARD.md):
#   scripts/train-bundled.sh ../shared/data/fer2013.zip runs/ [extra training flags...]
# 1. base: the compact network from scratch (configs/compact_80.yaml, 80 epochs): the bundled
#    model, promoted through the gate (docs/promotion.md);
# 2. snap: warm restarts from it with a moving average, a snapshot per cycle
#    (configs/compact_snapshots.yaml): ensemble members, never promoted (from the bundled model
#    they gained 4 PublicTest faces of 3,589 in fp32 and lost 5 in int8, what the service runs);
# 3. the ensemble of the base and the snapshots (flip TTA): python -m training.teach writes its
#    and its members' PublicTest figures (ensemble.json) and stored predictions (ensemble.npz,
#    a teacher for `training.train --teacher`; configs/compact_distill_ensemble.yaml).
# Extra flags go to every training run (the tests pass tiny ones). Each stage keeps its config's
# seed; on data without a PublicTest split the seed also draws the validation hold-out, which all
# stages must share: set SEED=N to run every stage (and the ensemble) with seed N. About 5 hours
# on 2 CPU cores with bf16 (models/MODEL_CARD.md); minutes on a GPU. OUT must be a local folder.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: [SEED=N] $0 DATA OUT [training flags...]" >&2
    exit 2
fi
data=$1
out=$2
shift 2
python=${PYTHON:-python}
configs="$(cd "$(dirname "$0")/.." && pwd)/configs"
seed=()
if [ -n "${SEED:-}" ]; then seed=(--seed "$SEED"); fi

# The newest run folder named NAME (run ids are <UTC time>-<name>-s<seed>, so they sort by time).
newest_run() {
    local runs=("$out"/*-"$1"-s*/)
    [ -d "${runs[-1]}" ] || { echo "no $1 run in $out" >&2; exit 1; }
    echo "${runs[-1]%/}"
}

train() {
    "$python" -m training.train --data "$data" --output "$out" "$@" "${seed[@]}"
}

train --config "$configs/compact_80.yaml" --run-name base "$@"
base=$(newest_run base)
train --config "$configs/compact_snapshots.yaml" --init-from "$base/model.pt" --run-name snap --promote never "$@"
snap=$(newest_run snap)
shopt -s nullglob
mapfile -t snapshots < <(printf '%s\n' "$snap"/snapshot-e*.pt | sort -V)
if [ ${#snapshots[@]} -eq 0 ] || [ ! -f "${snapshots[0]}" ]; then
    echo "no snapshots in $snap" >&2
    exit 1
fi

members=(--checkpoint "$base/model.pt")
for s in "${snapshots[@]}"; do members+=(--checkpoint "$s"); done
"$python" -m training.teach "${members[@]}" --data "$data" --output "$out/ensemble/ensemble.npz" "${seed[@]}"
