#!/usr/bin/env bash
# The best model this pipeline trains (models/MODEL_CARD.md), in one command:
#   scripts/train-best.sh ../shared/data/fer2013.zip runs-best/ [extra training flags...]
# Two lineages of the bundled model's recipe (scripts/train-bundled.sh), trained apart: OUT/a with
# its own seeds (the bundled model's), OUT/b with SEED=2; then their ensemble, each lineage's served
# run (the gate's pick: the best by validation accuracy) with flip test-time augmentation, evaluated
# into OUT/ensemble-flip.json (and its confusion matrix, .png). Measured: 0.7166 on PublicTest
# (0.7069 and 0.7005 alone, 0.7097 and 0.7102 with flip each). About 4.5 CPU-hours per lineage on
# a quiet machine with bf16 (two cores: 4.4 for the second); minutes on a GPU. Run it again with the
# same arguments to pick up where it stopped (each lineage resumes as train-bundled.sh does).
# Distilled into one compact network (--teacher A/model.pt,B/model.pt --teacher-tta flip --init-from
# A/model.pt): models/MODEL_CARD.md has what that gave.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 DATA OUT [training flags...]" >&2
    exit 2
fi
data=$1
out=$2
shift 2
here="$(cd "$(dirname "$0")" && pwd)"
python=${PYTHON:-python}

SEED='' bash "$here/train-bundled.sh" "$data" "$out/a" "$@"
SEED=2 bash "$here/train-bundled.sh" "$data" "$out/b" "$@"
"$python" -m training.evaluate --checkpoint "$out/a" --checkpoint "$out/b" --data "$data" --tta flip \
    --output-json "$out/ensemble-flip.json"
