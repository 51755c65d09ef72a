#!/usr/bin/env bash
# Builds api.Dockerfile and train.Dockerfile on a machine without a Docker engine or access to
# Docker Hub, then runs the service image and checks that it answers /readyz and a /predict.
#
#   sudo scripts/build-images-locally.sh [--api-only]
#
# Debian/Ubuntu, as root, with the project's venv (`make install-dev`). podman and buildah build
# and run the images (buildah's chroot isolation, the runc runtime, the host's network); they are
# installed with apt if missing. The base images the Dockerfiles name are made here instead of
# pulled, and tagged with those names:
#
#   python:3.11.14-slim-bookworm    Debian bookworm (debootstrap) with its python3.11 in a venv
#                                   on PATH: `python` and `pip` where the Dockerfile expects them
#   pytorch/pytorch:<version>-...   that stand-in plus requirements/torch.txt from the wheel index
#                                   below (pip's CUDA wheels if that build has them; no system
#                                   CUDA, cuDNN or conda as in the real image)
#
# The service image has no PyTorch (it runs ONNX Runtime). The training image's stand-in base gets
# PyTorch from a wheel index served over HTTP on 127.0.0.1 (TORCH_INDEX_URL): the wheels of
# requirements/torch.txt that `pip download` finds with this machine's pip configuration.
# Everything else comes from PyPI (requirements/*.txt, hash-checked); the host's CA bundle is
# mounted into the builds for machines behind a TLS-inspecting proxy.
#
# State lives outside the work tree: the base root file system and the wheel index in
# $FER_IMAGES_CACHE (default /var/tmp/fer-images), the images in podman's storage
# (/var/lib/containers). A second run reuses both, and podman's layer cache. The service
# container is removed on exit; `podman rmi` the images (sizes printed at the end) to free space.
# Also read from the environment: FER_INDEX_PORT (the wheel index's port, default 47563),
# CA_BUNDLE, PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${FER_IMAGES_CACHE:-/var/tmp/fer-images}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PYTHON=${PYTHON:-.venv/bin/python} # the project's venv: pip download, and the astronaut photo (scikit-image)
API_IMAGE=localhost/fer-api:local
TRAIN_IMAGE=localhost/fer-train:local
ROOTFS_IMAGE=localhost/fer-bookworm-rootfs:local
CONTAINER=fer-api-local-$$

api_only=false
case "${1:-}" in
    "") ;;
    --api-only) api_only=true ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "unknown argument '$1' (usage: $0 [--api-only])" >&2
        exit 2
        ;;
esac

step() { printf '\n==> %s\n' "$*" >&2; }
note() { printf '    %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
now() { printf '%s' "${EPOCHREALTIME/,/.}"; }
since() { awk -v start="$1" -v end="$(now)" 'BEGIN { printf "%.1f", end - start }'; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# The image a Dockerfile's (first) FROM names, qualified as podman stores it.
base_of() {
    local name
    name=$(awk 'toupper($1) == "FROM" { print $2; exit }' "$1")
    case "$name" in
        */*/*) ;;
        */*) name=docker.io/$name ;;
        *) name=docker.io/library/$name ;;
    esac
    printf '%s' "$name"
}

[[ $EUID -eq 0 ]] || die "run as root (podman's chroot builds and runc need it): sudo $0"
[[ -f "$CA_BUNDLE" ]] || die "no CA bundle at $CA_BUNDLE (set CA_BUNDLE)"
[[ -x "$PYTHON" ]] || die "no Python at $PYTHON: run \`make install-dev\` first (or set PYTHON)"

cleanup() {
    if podman container exists "$CONTAINER" 2>/dev/null; then
        podman rm --force --time 10 "$CONTAINER" >/dev/null || true
    fi
    if [[ -n "${index_pid:-}" ]]; then
        kill "$index_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# ---------------------------------------------------------------------------- tools
step "tools: podman, buildah, runc, debootstrap, curl"
missing=()
for tool in podman buildah runc debootstrap curl; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    note "installing with apt: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
note "$(podman --version), $(buildah --version | cut -d' ' -f1-3), $(runc --version | head -1)"
mkdir -p "$CACHE"

# Every build: chroot isolation (no nested namespaces), the host's network (the wheel index on
# 127.0.0.1, PyPI), only local base images, and pip told to trust the host's CA bundle.
printf '[global]\ncert = %s\n' "$CA_BUNDLE" > "$CACHE/pip.conf"
build() {
    podman build --isolation chroot --network host --pull=never \
        --volume "$CA_BUNDLE:$CA_BUNDLE:ro" --volume "$CACHE/pip.conf:/etc/pip.conf:ro" "$@"
}
# A rebuilt image leaves the one it replaces untagged: removed, with the layers only it used.
image_id() { podman image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }
drop_replaced() {
    local old=$1 tag=$2
    if [[ -n "$old" && "$old" != "$(image_id "$tag")" ]]; then
        podman rmi "$old" >/dev/null 2>&1 || true
    fi
}
# Every container: runc, the host's network, and resource limits no higher than this shell's.
# Podman's defaults for root (a million open files, more processes than the host allows) need
# CAP_SYS_RESOURCE, which a container or a sandboxed VM may not grant: runc then fails with
# "error setting rlimit type 7 (or 6): operation not permitted".
run() {
    podman run --runtime runc --network host \
        --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096 "$@"
}

# ---------------------------------------------------------------------------- base images
step "base root file system: Debian bookworm with python3.11 ($ROOTFS_IMAGE)"
if podman image exists "$ROOTFS_IMAGE"; then
    note "cached"
else
    if [[ ! -s "$CACHE/bookworm.tar" ]]; then
        note "debootstrap into $CACHE/rootfs (about a minute)"
        rm -rf "$CACHE/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$CACHE/rootfs" http://deb.debian.org/debian >"$CACHE/debootstrap.log" \
            || die "debootstrap failed: see $CACHE/debootstrap.log"
        rm -rf "$CACHE"/rootfs/var/cache/apt/archives/*.deb "$CACHE"/rootfs/var/lib/apt/lists/*
        tar --numeric-owner -C "$CACHE/rootfs" -cf "$CACHE/bookworm.tar.part" .
        mv "$CACHE/bookworm.tar.part" "$CACHE/bookworm.tar"
        rm -rf "$CACHE/rootfs"
    fi
    podman import --quiet --change 'CMD ["/bin/bash"]' "$CACHE/bookworm.tar" "$ROOTFS_IMAGE" >/dev/null
    note "imported"
fi

python_base=$(base_of api.Dockerfile)
step "stand-in for $python_base"
if podman image exists "$python_base"; then
    note "cached"
else
    build --tag "$python_base" --file - . <<EOF
FROM $ROOTFS_IMAGE
LABEL org.opencontainers.image.description="Local stand-in for $python_base: Debian bookworm's python3.11 in a venv (scripts/build-images-locally.sh)"
RUN python3 -m venv /opt/python
ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
EOF
fi
versions=$(run --rm "$python_base" sh -c 'python --version; pip --version | cut -d" " -f1-2')
note "${versions//$'\n'/, }"

# ---------------------------------------------------------------------------- the images
step "build $API_IMAGE (api.Dockerfile)"
old=$(image_id "$API_IMAGE")
start=$(now)
build --file api.Dockerfile --tag "$API_IMAGE" .
api_build_s=$(since "$start")
drop_replaced "$old" "$API_IMAGE"
note "built in $api_build_s s"

if ! $api_only; then
    # ---------------------------------------------------------------------------- PyTorch wheel index
    step "PyTorch wheel index from requirements/torch.txt ($CACHE/torch-index)"
    stamp=$(sha256sum requirements/torch.txt | cut -d' ' -f1)
    index=$CACHE/torch-index
    if [[ "$(cat "$index/stamp" 2>/dev/null)" == "$stamp" ]]; then
        note "cached"
    else
        rm -rf "$index"
        mkdir -p "$index/files"
        note "pip download (this machine's pip configuration decides which build: CPU or CUDA)"
        "$PYTHON" -m pip download -qq --only-binary=:all: --dest "$index/files" -r requirements/torch.txt
        for wheel in "$index"/files/*.whl; do
            file=${wheel##*/}
            project=$(printf '%s' "${file%%-*}" | tr 'A-Z_.' 'a-z--')
            mkdir -p "$index/simple/$project"
            printf '<a href="../../files/%s">%s</a><br>\n' "$file" "$file" >>"$index/simple/$project/index.html"
        done
        printf '%s\n' "$stamp" >"$index/stamp"
    fi
    note "$(find "$index/files" -name 'torch*.whl' -printf '%f ')"
    # A fixed port: TORCH_INDEX_URL is a build argument, and a new value would rebuild the PyTorch layer.
    index_port=${FER_INDEX_PORT:-47563}
    if curl -s -o /dev/null "http://127.0.0.1:$index_port/"; then
        die "port $index_port is taken: set FER_INDEX_PORT to a free one"
    fi
    python3 -m http.server "$index_port" --bind 127.0.0.1 --directory "$index" >"$CACHE/index.log" 2>&1 &
    index_pid=$!
    torch_index=http://127.0.0.1:$index_port/simple
    for _ in $(seq 50); do
        if curl -fsS -o /dev/null "$torch_index/torch/" 2>/dev/null; then break; fi
        sleep 0.1
    done
    note "serving $torch_index"

    torch_base=$(base_of train.Dockerfile)
    step "stand-in for $torch_base"
    if podman image exists "$torch_base"; then
        note "cached"
    else
        build --tag "$torch_base" --build-arg "TORCH_INDEX_URL=$torch_index" \
            --volume "$PWD/requirements/torch.txt:/tmp/torch.txt:ro" --file - . <<EOF
FROM $python_base
LABEL org.opencontainers.image.description="Local stand-in for $torch_base: Python and requirements/torch.txt (scripts/build-images-locally.sh)"
ARG TORCH_INDEX_URL
RUN pip install --no-cache-dir --index-url "\$TORCH_INDEX_URL" -r /tmp/torch.txt
EOF
    fi
    step "build $TRAIN_IMAGE (train.Dockerfile)"
    old=$(image_id "$TRAIN_IMAGE")
    start=$(now)
    build --file train.Dockerfile --tag "$TRAIN_IMAGE" .
    train_build_s=$(since "$start")
    drop_replaced "$old" "$TRAIN_IMAGE"
    note "built in $train_build_s s"
    usage=$(run --rm "$TRAIN_IMAGE" --help)
    note "python -m training.train --help: ${usage%%$'\n'*}"
fi

# ---------------------------------------------------------------------------- run the service
port=$(free_port)
step "run $API_IMAGE (runc, host network, PORT=$port)"
if run --rm --entrypoint python "$API_IMAGE" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)'; then
    die "PyTorch is installed in $API_IMAGE: the service image must run on ONNX Runtime alone"
fi
note "no PyTorch in the image: $(run --rm --entrypoint python "$API_IMAGE" -c 'import onnxruntime as o; print("onnxruntime", o.__version__)')"
start=$(now)
run --detach --name "$CONTAINER" --env "PORT=$port" "$API_IMAGE" >/dev/null
url=http://127.0.0.1:$port
until curl -fsS -o /dev/null "$url/readyz" 2>/dev/null; do
    if [[ "$(podman inspect --format '{{.State.Running}}' "$CONTAINER")" != true ]]; then
        podman logs "$CONTAINER" >&2 || true
        die "the container stopped before /readyz answered"
    fi
    (($(awk -v s="$(since "$start")" 'BEGIN { print (s > 300) }'))) && die "/readyz not ready after 300 s"
    sleep 0.2
done
ready_s=$(since "$start")
note "/readyz ready $ready_s s after podman run"

step "smoke test (deploy/smoke_test.py, as Cloud Build runs it after a deploy)"
python3 deploy/smoke_test.py "$url" --timeout 60

step "POST /predict: scikit-image's astronaut (a real photo, face detection on)"
photo=$CACHE/astronaut.png
"$PYTHON" -c 'import sys; from PIL import Image; from skimage import data; Image.fromarray(data.astronaut()).save(sys.argv[1])' "$photo"
curl -fsS -F "file=@$photo;type=image/png" "$url/predict" >"$CACHE/predict.json"
python3 - "$CACHE/predict.json" <<'EOF'
import json
import sys

result = json.load(open(sys.argv[1]))
faces = result["faces"]
assert len(faces) >= 1, f"no face found: {result}"
print(json.dumps(result, indent=2))
EOF

step "images"
podman images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' \
    | grep -E "^(${API_IMAGE}|${TRAIN_IMAGE}|${python_base}|${torch_base:-none}|${ROOTFS_IMAGE})  " >&2 || true
printf '\napi build: %s s; train build: %s s; start to /readyz: %s s\n' "$api_build_s" "${train_build_s:-skipped}" "$ready_s" >&2
