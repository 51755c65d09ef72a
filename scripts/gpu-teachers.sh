#!/usr/bin/env bash
# The teacher ensemble on a lent GPU, in one device call (docs/training.md, "On a lent GPU").
#
#   scripts/gpu-teachers.sh pack ../shared/data/fer2013.zip .gpu/fer2013-train.tar.xz   # here, once
#   scripts/gpu-teachers.sh train .gpu/fer2013-train.tar.xz OUT MINUTES [flags...]      # there
#
# pack: the zip's Training images as a tar.xz (~42 MB): with the repository (~24 MB) it fits the
#   64 MiB that travels to the device machine, where the whole zip does not. PublicTest stays
#   here: the members hold out 10% of Training to pick their best epoch (each its own 10%: the
#   seed draws it), and their PublicTest figures are measured here afterwards.
# train: unpacks DATA (a .tar.xz from pack; a zip or folder is used as it is), trains one compact
#   network per seed side by side within MINUTES (python -m training.fleet; data and augmentation
#   on the GPU), then copies each member's model.pt (as compact-s<seed>.pt; a member stopped at
#   the deadline: its best.pt, as compact-s<seed>-best.pt), fleet.json and the log into OUT, flat, as the device tool brings files back (8 files at most). SEEDS="11 12 ..."
#   sets the members (default five); extra flags go to training.fleet and on to training.train.
set -euo pipefail
usage() {
    echo "usage: $0 pack ZIP OUT.tar.xz | [SEEDS=\"11 12\"] $0 train DATA OUT MINUTES [flags...]" >&2
    exit 2
}
[ $# -ge 3 ] || usage
python=${PYTHON:-python3}
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp=$(mktemp -d)  # the unpacked images and the run folders, until they are copied out
trap 'rm -rf "$tmp"' EXIT

pack() {
    local zip=$1 out=$2
    "$python" -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("train/")])' "$zip" "$tmp"
    [ -d "$tmp/train" ] || { echo "$zip has no train/ folder" >&2; exit 1; }
    mkdir -p "$(dirname "$out")"
    tar -C "$tmp" -cf - train | xz -9 -T0 > "$out.part"
    mv "$out.part" "$out"
    echo "$out: $(du -h "$out" | cut -f1)"
}

train() {
    [ $# -ge 3 ] || usage
    local data=$1 out=$2 minutes=$3 work=$tmp
    shift 3
    if [[ $data == *.tar.xz ]]; then
        tar -C "$work" -xJf "$data"
        data=$work
    fi
    local members=()
    for seed in ${SEEDS:-11 12 13 14 15}; do members+=(--member "$repo/configs/compact.yaml:$seed"); done
    mkdir -p "$out"
    local status=0
    (cd "$repo" && PYTHONUNBUFFERED=1 "$python" -m training.fleet "${members[@]}" --data "$data" \
        --output "$work/fleet" --minutes "$minutes" "$@") 2>&1 | tee "$out/fleet.log" || status=$?
    local run seed
    for run in "$work"/fleet/*-compact-s*/; do
        seed=${run%/}
        seed=${seed##*-compact-s}
        if [ -f "$run/model.pt" ]; then
            cp "$run/model.pt" "$out/compact-s$seed.pt"
        elif [ -f "$run/best.pt" ]; then  # stopped at the deadline: its best epoch so far
            cp "$run/best.pt" "$out/compact-s$seed-best.pt"
        fi
    done
    cp "$work/fleet/fleet.json" "$out/" 2>/dev/null || true
    return "$status"
}

case $1 in
    pack) [ $# -eq 3 ] || usage; pack "$2" "$3" ;;
    train) shift; train "$@" ;;
    *) usage ;;
esac
