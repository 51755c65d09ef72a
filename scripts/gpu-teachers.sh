#!/usr/bin/env bash
# The teacher ensemble on a lent GPU, in one device call (docs/training.md, "On a lent GPU").
#
#   scripts/gpu-teachers.sh pack ../shared/data/fer2013.zip .gpu/fer2013-train.tar.xz   # here, once
#   scripts/gpu-teachers.sh train .gpu/fer2013-train.tar.xz OUT MINUTES [flags...]      # there
#
# pack: the zip's Training images as a tar.xz (~42 MB): with the repository's files (~23 MB) it
#   fits the 64 MiB that travels to the device machine, where the whole zip does not; it fails if
#   the two together do not. PublicTest stays here: each member holds out a tenth of Training to
#   pick its best epoch (its seed draws which), and PublicTest figures are measured here afterwards.
# train: unpacks DATA (a .tar.xz from pack; a zip or folder is used as it is), trains one compact
#   network per seed side by side within MINUTES (python -m training.fleet; data and augmentation
#   on the GPU), and copies into OUT, flat, as the device tool brings files back (8 files at most):
#   each member's model.pt as compact-s<seed>.pt (a member that did not finish: its best.pt so
#   far, as compact-s<seed>-best.pt; fleet.json says why), fleet.json and fleet.log (the fleet's
#   output, with the end of any failed member's log), also when stopped by a signal.
#   SEEDS="11 12 ..." sets the members (five by default, six at most); extra flags go to
#   training.fleet and on to training.train.
set -euo pipefail
usage() {
    echo "usage: $0 pack ZIP OUT.tar.xz | [SEEDS=\"11 12\"] $0 train DATA OUT MINUTES [flags...]" >&2
    exit 2
}
[ $# -ge 3 ] || usage
python=${PYTHON:-python3}
repo="$(cd "$(dirname "$0")/.." && pwd)"
TRANSFER_LIMIT=$((64 * 1024 * 1024))  # bytes that travel to the device machine
tmp=$(mktemp -d)  # the unpacked images and the run folders
out=
fleet=
trap 'collect; rm -rf "$tmp"' EXIT
# A signal stops the fleet (which stops its members) before the EXIT trap brings back what there is.
trap 'stop_fleet 143' TERM
trap 'stop_fleet 130' INT

stop_fleet() {
    if [ -n "$fleet" ]; then
        kill -TERM "$fleet" 2>/dev/null || true
        wait "$fleet" || true
    fi
    exit "$1"
}

pack() {
    local zip=$1 pack=$2 tracked
    [ -f "$zip" ] || { echo "$zip: no such file" >&2; exit 1; }
    # Entries under train/, or under a wrapper folder's train/ (the loader takes both).
    "$python" - "$zip" "$tmp" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if "train" in n.split("/")[:2]]
    if not names:
        sys.exit(f"{sys.argv[1]} has no train/ folder")
    z.extractall(sys.argv[2], names)
EOF
    mkdir -p "$(dirname "$pack")"
    # Reproducible: the same zip gives the same bytes (names sorted, no owners or times).
    tar -C "$tmp" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - . | xz -9 -T1 > "$pack.part"
    mv "$pack.part" "$pack"
    tracked=$(repository_bytes)
    local total=$((tracked + $(wc -c < "$pack")))
    echo "$pack: $(wc -c < "$pack") bytes; with the repository's $tracked: $total of $TRANSFER_LIMIT"
    if [ "$total" -gt "$TRANSFER_LIMIT" ]; then
        echo "too large to travel to the device machine" >&2
        exit 1
    fi
}

# What travels with the pack: the checkout's files that git does not ignore.
repository_bytes() {
    "$python" - "$repo" <<'EOF'
import os, subprocess, sys
listed = subprocess.run(["git", "-C", sys.argv[1], "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True)
if listed.returncode:
    sys.exit(f"cannot list the files that travel with git: {listed.stderr.decode().strip()}")
paths = [os.path.join(sys.argv[1], p) for p in listed.stdout.decode().split("\0") if p]
print(sum(os.path.getsize(p) for p in paths if os.path.isfile(p)))
EOF
}

train() {
    [ $# -ge 3 ] || usage
    local data minutes=$3 seeds
    data=$(realpath "$1")
    out=$(realpath -m "$2")
    shift 3
    read -r -a seeds <<< "${SEEDS:-11 12 13 14 15}"
    if [ ${#seeds[@]} -gt 6 ]; then
        echo "at most 6 seeds: 8 files come back from the device machine" >&2
        exit 2
    fi
    if [[ $data == *.tar.xz ]]; then
        mkdir "$tmp/data"
        tar -C "$tmp/data" -xJf "$data"
        data=$tmp/data
    fi
    local members=() seed
    for seed in "${seeds[@]}"; do members+=(--member "$repo/configs/compact.yaml:$seed"); done
    mkdir -p "$out"
    cd "$repo"
    # In the background, so that a signal's trap runs at once rather than when the fleet ends.
    PYTHONUNBUFFERED=1 "$python" -m training.fleet "${members[@]}" --data "$data" --output "$tmp/fleet" \
        --minutes "$minutes" "$@" > "$out/fleet.log" 2>&1 &
    fleet=$!
    tail -f -n +1 --pid="$fleet" "$out/fleet.log" &  # its progress, here too
    local tailer=$! status=0
    wait "$fleet" || status=$?  # the builtin wait, unlike a foreground command, lets a trap run at once
    wait "$tailer" || true
    return "$status"
}

# Copy what the fleet made into OUT (on any exit: a member's best epoch is worth bringing back).
collect() {
    [ -n "$out" ] && [ -d "$tmp/fleet" ] || return 0
    local run seed
    for run in "$tmp"/fleet/*-compact-s*/; do
        [ -d "$run" ] || continue
        seed=${run%/}
        seed=${seed##*-compact-s}
        if [ -f "$run/model.pt" ] && [ -f "$run/metrics.json" ]; then  # metrics.json: the run finished
            cp "$run/model.pt" "$out/compact-s$seed.pt" || echo "could not copy $run/model.pt" >&2
        elif [ -f "$run/best.pt" ]; then
            cp "$run/best.pt" "$out/compact-s$seed-best.pt" || echo "could not copy $run/best.pt" >&2
        fi
    done
    if [ -f "$tmp/fleet/fleet.json" ]; then cp "$tmp/fleet/fleet.json" "$out/" || true; fi
}

case $1 in
    pack) [ $# -eq 3 ] || usage; pack "$2" "$3" ;;
    train) shift; train "$@" ;;
    *) usage ;;
esac
