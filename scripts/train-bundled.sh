#!/usr/bin/env bash
# The bundled model's recipe, end to end, in one command (models/MODEL_CARD.md):
#   scripts/train-bundled.sh ../shared/data/fer2013.zip runs/ [extra training flags...]
# 1. base: the compact network from scratch (configs/compact_80.yaml, 80 epochs);
# 2. sd1, sd2, sd3: self-distillation with TTA (configs/compact_selfdistill.yaml, 15 epochs
#    each): each generation starts from the previous one's model.pt and learns its predictions
#    averaged over views of each face: flip for sd1 and sd2 (+0.7 point on PublicTest for the
#    first, 3 faces for the second), ten crops for sd3 (+1.4).
# Every run goes through the promotion gate (docs/promotion.md): the served model is the best of
# them by validation accuracy, normally the last.
# Extra flags go to every training run (the tests pass tiny ones). Each stage has its own seed (1, 4,
# 5, 6); on data without a PublicTest split the seed also draws the validation hold-out, which all
# stages must share: set SEED=N to run every stage with seed N. About 4 to 5.5 hours on 2 CPU cores
# with bf16 (models/MODEL_CARD.md); minutes on a GPU. OUT must be a local folder.
# Run again with the same arguments, it picks up where it stopped: a stage whose run folder holds
# model.pt and metrics.json is done and skipped, one with only last.pt continues (--resume).
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

# The newest run folder named NAME (run ids are <UTC time>-<name>-s<seed>, so they sort by time),
# or nothing when there is none.
newest_run() {
    local runs=("$out"/*-"$1"-s*/)
    if [ -d "${runs[-1]}" ]; then echo "${runs[-1]%/}"; fi
}

# stage NAME TRAINING_FLAGS...: skip it if done, continue it if started, else train it.
stage() {
    local name=$1 run
    shift
    run=$(newest_run "$name")
    if [ -n "$run" ] && [ -f "$run/model.pt" ] && [ -f "$run/metrics.json" ]; then
        echo "$name: done in $run, skipped" >&2
    elif [ -n "$run" ] && [ -f "$run/last.pt" ]; then
        echo "$name: continuing $run" >&2
        "$python" -m training.train --resume "$run" --data "$data"
    else
        "$python" -m training.train --data "$data" --output "$out" --run-name "$name" "$@" "${seed[@]}"
    fi
    run=$(newest_run "$name")
    [ -n "$run" ] || { echo "no $name run in $out" >&2; exit 1; }
    teacher=$run/model.pt  # the next stage's teacher and starting point
}

stage base --config "$configs/compact_80.yaml" "$@"
gen=0
for tta in flip flip tencrop; do  # each generation's teacher: the previous one on these views
    gen=$((gen + 1))
    stage "sd$gen" --config "$configs/compact_selfdistill.yaml" --init-from "$teacher" --teacher "$teacher" \
        --teacher-tta "$tta" --seed $((3 + gen)) --promote if-better "$@"
done
