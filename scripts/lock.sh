#!/usr/bin/env bash
# Writes the dependency locks (`make lock`) from pyproject.toml and requirements/torch.txt:
#
#   requirements/api.txt    the service image (api.Dockerfile): the dependencies and the `gcp` extra
#   requirements/train.txt  the training image (train.Dockerfile): with the `train` and `tracking` extras
#   requirements/dev.txt    `make install-dev`, hence `make test`, CI and Cloud Build: with the `dev` extra
#
# Every package at an exact version with the sha256 of each file PyPI has for it (installed with
# pip's --require-hashes), all three from one resolution, so a package has the same version in the
# images as in the tests. Resolved for CPython 3.11 on x86_64 Linux (the images and CI), whoever
# runs it. Versions already locked are kept unless pyproject.toml asks for others; --upgrade moves
# everything to the newest allowed. PyTorch is left out: see requirements/torch.txt.
#
#   scripts/lock.sh [--upgrade]        needs uv (UV=path, default .venv/bin/uv; `make lock` installs it)
set -euo pipefail
cd "$(dirname "$0")/.."

uv=${UV:-.venv/bin/uv}
upgrade=()
case "${1:-}" in
    "") ;;
    --upgrade) upgrade=(--upgrade) ;;
    *)
        echo "usage: $0 [--upgrade]" >&2
        exit 2
        ;;
esac
if [[ ! -x "$uv" ]]; then
    echo "uv not found at $uv: run \`make lock\`, which installs it, or set UV" >&2
    exit 1
fi

compile() {
    "$uv" pip compile pyproject.toml --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
        --constraints requirements/torch.txt --custom-compile-command "make lock" "$@"
}

# 1. Every extra the locks cover, resolved together (preferring what is locked now); its pins
#    constrain the three locks below, so they agree.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
all=$tmp/all.txt
if [[ -f requirements/dev.txt ]]; then cp requirements/dev.txt "$all"; else : > "$all"; fi
compile "${upgrade[@]}" --extra dev --extra gcp --no-header --no-annotate -o "$all"

# 2. Left out: torch and torchvision (requirements/torch.txt), and the CUDA wheels that PyPI's
#    torch pins to exact versions itself (nvidia-*, cuda-*, triton): the service image must stay
#    CPU-only and the training image has them from its base. Their other dependencies stay in.
skip=(--no-emit-package torch --no-emit-package torchvision)
while read -r name; do
    skip+=(--no-emit-package "$name")
done < <(sed -nE 's/^((nvidia|cuda)-[a-z0-9-]+|triton)==.*/\1/p' "$all")

# Constraints given through UV_CONSTRAINT rather than --constraints: uv leaves them out of the
# "# via" notes, which would otherwise name a temporary file.
lock() {
    local out=$1
    shift
    UV_CONSTRAINT=$all compile --generate-hashes "${skip[@]}" "$@" -o "$out"
    echo "wrote $out: $(grep -cE '^[a-z0-9]' "$out") packages" >&2
}
lock requirements/api.txt --extra gcp
lock requirements/train.txt --extra train --extra tracking
lock requirements/dev.txt --extra dev
