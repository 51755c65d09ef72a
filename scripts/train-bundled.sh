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
teacher=$(newest_run base)/model.pt
gen=0
for tta in flip flip tencrop; do  # each generation's teacher: the previous one on these views
    gen=$((gen + 1))
    train --config "$configs/compact_selfdistill.yaml" --init-from "$teacher" --teacher "$teacher" \
        --teacher-tta "$tta" --seed $((3 + gen)) --run-name "sd$gen" --promote if-better "$@"
    teacher=$(newest_run "sd$gen")/model.pt
done
