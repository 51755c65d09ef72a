"""Delivery as code: the Dockerfiles, cloudbuild.yaml, deploy/ and the GitHub workflows.

No image is built and nothing reaches Google Cloud here. What can be checked without them is:
the linters (hadolint, actionlint, shellcheck: their binaries come with the dev extra), the
structure of every file (step order, substitutions, tags, probes, roles), the set-up script run
with ``--dry-run`` and against a fake ``gcloud``, the service image's entry point and smoke test
run for real against ``python -m app.serve``, the Vertex AI job's arguments parsed by the
training parser, and, where the Google Cloud CLI is installed, every gcloud command line parsed
by gcloud itself (offline, without credentials).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from PIL import Image

from tests.conftest import free_port
from tests.utils.service import SETTINGS_ENV, write_model
from training.config import resolve_config
from training.train import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ("api.Dockerfile", "train.Dockerfile")
SETUP = ROOT / "deploy" / "setup-gcp.sh"

# Cloud Build's built-in substitutions (https://cloud.google.com/build/docs/configuring-builds/substitute-variable-values).
CLOUD_BUILD_BUILTINS = {
    "PROJECT_ID",
    "PROJECT_NUMBER",
    "LOCATION",
    "BUILD_ID",
    "COMMIT_SHA",
    "SHORT_SHA",
    "REVISION_ID",
    "BRANCH_NAME",
    "TAG_NAME",
    "REPO_NAME",
    "REPO_FULL_NAME",
    "TRIGGER_NAME",
    "TRIGGER_BUILD_CONFIG_PATH",
    "SERVICE_ACCOUNT_EMAIL",
    "SERVICE_ACCOUNT",
}
# $NAME or ${NAME}, not preceded by another $ ($$ is Cloud Build's escape for a literal $).
SUBSTITUTION = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def tool(name: str) -> str:
    """A linter shipped by a dev-extra wheel: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: install the dev extra (pip install -e '.[dev]')", pytrace=False)
    return found


def tools_path() -> str:
    """PATH with this interpreter's bin folder first (actionlint runs shellcheck from there)."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def load_module(relative: str) -> ModuleType:
    """A deploy/ script imported from its file (deploy/ is not a package)."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def dockerfile_instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = (ROOT / name).read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), " ".join(rest.split())))
    return out


# ---------------------------------------------------------------------------- Dockerfiles


def test_hadolint_passes_on_both_dockerfiles() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--config", ".hadolint.yaml", "--failure-threshold", "warning", *DOCKERFILES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout  # not even an info


def test_hadolint_config_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint is not vacuous: an unpinned pip install and a foreign registry are caught."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM gcr.io/someone/python:3.11\nRUN pip install fastapi\nCMD uvicorn app.main:app\n")
    result = subprocess.run(
        [tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(bad)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    for rule in ("DL3026", "DL3013", "DL3042", "DL3025"):
        assert rule in result.stdout, result.stdout


def test_api_image_has_no_torch_runs_non_root_and_installs_dependencies_before_the_source() -> None:
    steps = dockerfile_instructions("api.Dockerfile")
    base = steps[0]
    assert base[0] == "FROM" and re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", base[1]), base
    runs = [arg for kind, arg in steps if kind == "RUN"]
    # Everything from the lock, which has no PyTorch (the service runs ONNX Runtime).
    locked = "pip install --no-cache-dir --require-hashes -r requirements/api.txt"
    assert any(locked in run and "pip check" in run for run in runs)
    assert not any("torch" in arg for _, arg in steps)
    assert not re.search(r"^torch", (ROOT / "requirements" / "api.txt").read_text(), re.MULTILINE)
    # The project itself is never installed (it runs from /srv), with or without extras.
    assert not any(re.search(r"pip install[^&]* \.(\[|\s|$)", run) for run in runs)

    kinds = [kind for kind, _ in steps]
    copies = [arg for kind, arg in steps if kind == "COPY"]
    source_copy = next(i for i, (kind, arg) in enumerate(steps) if kind == "COPY" and not arg.startswith("requirements/"))
    last_pip = max(i for i, (kind, arg) in enumerate(steps) if kind == "RUN" and "pip install" in arg)
    assert last_pip < source_copy, "dependencies must be installed before the source is copied"
    assert {"fercore ./fercore", "app ./app"} <= set(copies)
    assert "models/fer-compact.int8.onnx" in next(c for c in copies if c.startswith("models/")), "the bundled model"

    user = [arg for kind, arg in steps if kind == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert kinds.index("USER") > source_copy
    entrypoint = [arg for kind, arg in steps if kind == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1]) == ["python", "-m", "app.serve"]
    assert any(kind == "ENV" and "PORT=8080" in arg for kind, arg in steps)


def test_train_image_is_cuda_pytorch_with_train_extras() -> None:
    steps = dockerfile_instructions("train.Dockerfile")
    assert steps[0][0] == "FROM"
    base = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda\d+\.\d+-cudnn\d+-runtime", steps[0][1])
    assert base, steps[0]
    assert base.group(1) == torch_pins()["torch"], "the base image's PyTorch is requirements/torch.txt's"
    runs = [arg for kind, arg in steps if kind == "RUN"]
    assert any("pip install --no-cache-dir --require-hashes -r requirements/train.txt" in run for run in runs)
    kinds = [kind for kind, _ in steps]
    last_pip = max(i for i, (kind, arg) in enumerate(steps) if kind == "RUN" and "pip install" in arg)
    assert last_pip < next(i for i, (kind, arg) in enumerate(steps) if arg == "training ./training")
    assert [arg for kind, arg in steps if kind == "USER"][-1].split(":")[0] not in ("0", "root")
    assert json.loads([arg for kind, arg in steps if kind == "ENTRYPOINT"][-1]) == ["python", "-m", "training.train"]
    assert "COPY" in kinds


def test_dockerignore_admits_exactly_what_the_dockerfiles_copy() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "deny everything first, then admit what the images need"
    admitted = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = set()
    for name in DOCKERFILES:
        for kind, arg in dockerfile_instructions(name):
            if kind == "COPY":
                copied.update(arg.split()[:-1])

    def admits(rule: str, path: str) -> bool:
        return path == rule or path.startswith(rule + "/")

    assert all(any(admits(rule, path) for rule in admitted) for path in copied), (copied, admitted)
    assert all(any(admits(rule, path) for path in copied) for rule in admitted), (copied, admitted)
    for path in copied:
        assert (ROOT / path).exists(), path
    for never in (".git", ".venv", "runs", "data", "tests", ".mypy_cache", "bench"):
        assert never not in admitted


def test_requirements_come_from_pyproject() -> None:
    reqs = load_module("deploy/requirements.py")
    pyproject = reqs.tomllib.loads((ROOT / "pyproject.toml").read_text())
    api = reqs.requirements(pyproject, ["gcp"])
    names = [re.split(r"[\[<>=!~ ;]", req, maxsplit=1)[0].lower() for req in api]
    assert "onnxruntime" in names and not {"torch", "torchvision", "onnx"} & set(names)
    assert "opentelemetry-exporter-gcp-trace" in names
    assert not {"tqdm", "matplotlib", "wandb", "pytest"} & set(names)

    dev = reqs.requirements(pyproject, ["dev"])
    assert not any(req.startswith("fer2013-mlops") for req in dev), "the self-reference is expanded"
    assert {"tqdm>=4.66", "wandb>=0.17", "pytest>=8.2"} <= set(dev)
    assert len(dev) == len(set(dev))
    with pytest.raises(SystemExit, match="unknown extra 'nope'"):
        reqs.requirements(pyproject, ["nope"])

    out = subprocess.run(
        [sys.executable, "deploy/requirements.py", "pyproject.toml", "--extras", "train,tracking"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    assert out == reqs.requirements(pyproject, ["train", "tracking"])


# ---------------------------------------------------------------------------- dependency locks

# requirements/<lock>.txt: the extras it covers (`make lock`, scripts/lock.sh).
LOCKS = {"api": ["gcp"], "train": ["train", "tracking"], "dev": ["dev"]}
# Left out of every lock: requirements/torch.txt, and the CUDA wheels PyPI's torch pins itself.
PYTORCH_STACK = re.compile(r"(torch|torchvision|triton|nvidia-.+|cuda-.+)")
# Where the locks are used: the images' and CI's Python on x86_64 Linux.
LOCK_MARKERS = {"python_version": "3.11", "python_full_version": "3.11.14", "sys_platform": "linux", "platform_system": "Linux"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def torch_pins() -> dict[str, str]:
    """requirements/torch.txt as {name: version}."""
    pins = {}
    for line in (ROOT / "requirements" / "torch.txt").read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name, _, version = requirement.partition("==")
            pins[canonical(name)] = version
    return pins


def read_lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """requirements/<name>.txt as {package: (version, sha256 hashes)}."""
    entries = {}
    # One block per package: "name==version \\n --hash=sha256:... \\n # via ...".
    for block in re.split(r"\n(?=[A-Za-z0-9])", (ROOT / "requirements" / f"{name}.txt").read_text()):
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block)
        if match:
            entries[canonical(match.group(1))] = (match.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return entries


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_pins_every_dependency_pyproject_declares(lock: str) -> None:
    """A dependency added to pyproject.toml, or a bound changed, without `make lock` fails here."""
    from packaging.requirements import Requirement

    reqs = load_module("deploy/requirements.py")
    pyproject = reqs.tomllib.loads((ROOT / "pyproject.toml").read_text())
    locked = {name: version for name, (version, _) in read_lock(lock).items()} | torch_pins()
    stale = []
    for line in reqs.requirements(pyproject, LOCKS[lock]):
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(LOCK_MARKERS):
            continue
        version = locked.get(canonical(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            stale.append(f"{line!r} (locked: {version})")
    assert not stale, f"requirements/{lock}.txt is stale, run `make lock`: {', '.join(stale)}"


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_is_hashed_written_by_make_lock_and_leaves_out_pytorch(lock: str) -> None:
    text = (ROOT / "requirements" / f"{lock}.txt").read_text()
    assert text.startswith("# This file was autogenerated by uv via the following command:\n#    make lock\n")
    entries = read_lock(lock)
    assert len(entries) > 20
    assert not [name for name, (_, hashes) in entries.items() if not hashes], "--require-hashes needs a hash on every package"
    assert not [name for name in entries if PYTORCH_STACK.fullmatch(name)], "PyTorch comes from requirements/torch.txt"


def test_locks_agree_and_torch_is_pinned_once() -> None:
    versions: dict[str, set[str]] = {}
    for lock in LOCKS:
        for name, (version, _) in read_lock(lock).items():
            versions.setdefault(name, set()).add(version)
    assert not {name: found for name, found in versions.items() if len(found) > 1}, "one resolution for all the locks"
    pins = torch_pins()
    assert set(pins) == {"torch", "torchvision"} and all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in pins.values())
    delivery = [ROOT / name for name in (*DOCKERFILES, "cloudbuild.yaml", "Makefile", ".github/workflows/ci.yml")]
    assert not [path.name for path in delivery if re.search(r"torch(vision)?==", path.read_text())], "pinned only in torch.txt"


def test_installs_use_the_locks() -> None:
    recipe = (ROOT / "Makefile").read_text()
    assert "$(BIN)/pip install --require-hashes -r requirements/$(1).txt" in recipe
    assert "$(BIN)/pip install -r requirements/torch.txt" in recipe and "$(BIN)/pip check" in recipe
    assert "$(call install-locked,dev)" in recipe and "$(call install-locked,api)" in recipe
    assert re.search(r"^lock: .*\n(\t.*\n)*\t.*scripts/lock\.sh", recipe, re.MULTILINE)
    cloudbuild = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    test_step = " ".join(next(step for step in cloudbuild["steps"] if step["id"] == "test")["args"])
    assert "--index-url ${_TORCH_INDEX_URL} -r requirements/torch.txt" in test_step and "make test" in test_step


FAKE_UV = """#!/bin/bash
# Records each call (UV_CONSTRAINT|arguments); writes a resolution with the PyTorch stack to -o.
printf '%s|%s\\n' "${UV_CONSTRAINT:-}" "$*" >> "$FAKE_LOG"
while [[ $# -gt 0 ]]; do [[ "$1" == -o ]] && out=$2; shift; done
printf 'numpy==2.4.6\\ntorch==2.14.1\\nnvidia-cublas==13.1.1.3\\ncuda-bindings==13.5.0\\ntriton==3.8.0\\n' > "$out"
"""


def test_lock_script_resolves_once_and_leaves_out_the_pytorch_stack(tmp_path: Path) -> None:
    for relative in ("scripts/lock.sh", "pyproject.toml", "requirements/torch.txt"):
        (tmp_path / relative).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / relative, tmp_path / relative)
    uv = tmp_path / "uv"
    uv.write_text(FAKE_UV)
    uv.chmod(0o755)
    log = tmp_path / "calls.log"
    bash = shutil.which("bash") or "/bin/bash"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "UV": str(uv), "FAKE_LOG": str(log)}
        return subprocess.run([bash, "scripts/lock.sh", *args], cwd=tmp_path, env=env, capture_output=True, text=True)

    result = run()
    assert result.returncode == 0, result.stderr
    (first_constraint, first), *locks = [line.split("|", 1) for line in log.read_text().splitlines()]
    assert "--extra dev --extra gcp" in first and "--generate-hashes" not in first and not first_constraint
    assert "--upgrade" not in first
    for (constraint, call), (lock, extras) in zip(locks, LOCKS.items(), strict=True):
        args = call.split()
        assert args[:3] == ["pip", "compile", "pyproject.toml"] and args[args.index("-o") + 1] == f"requirements/{lock}.txt"
        assert {"--generate-hashes", "--python-version", "3.11", "requirements/torch.txt"} <= set(args)
        assert [args[i + 1] for i, arg in enumerate(args) if arg == "--extra"] == extras
        skipped = {args[i + 1] for i, arg in enumerate(args) if arg == "--no-emit-package"}
        assert skipped == {"torch", "torchvision", "nvidia-cublas", "cuda-bindings", "triton"}
        assert constraint.endswith("/all.txt"), "every lock is constrained by the one resolution"
        assert f"wrote requirements/{lock}.txt" in result.stderr

    log.unlink()
    assert run("--upgrade").returncode == 0
    assert "--upgrade" in log.read_text().splitlines()[0]
    refused = run("--newest")
    assert refused.returncode == 2 and "usage" in refused.stderr


# ---------------------------------------------------------------------------- entry point and smoke test


def service_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV and not k.startswith("OTEL_") and k != "PORT"}
    env.update(TORCH_THREADS="1", MAX_CONCURRENT_INFERENCES="1", **extra)
    return env


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """``python -m app.serve`` (the service image's ENTRYPOINT) on $PORT with a tiny model."""
    model = write_model(tmp_path / "model.pt", run_id="smoke-run")
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.serve"],
            cwd=ROOT,
            env=service_env(PORT=str(port), MODEL_URI=str(model)),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            yield f"http://127.0.0.1:{port}", proc, log
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_serve_listens_on_port_and_the_smoke_test_passes(served: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    url, proc, log = served
    result = subprocess.run(
        [sys.executable, "deploy/smoke_test.py", url, "--timeout", "120"], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr + log.read_text()
    assert "POST /predict?detect=false: 200" in result.stdout
    assert "smoke-run" in result.stdout  # /model reports the MODEL_URI checkpoint, not the bundled one
    # Cloud Run stops an instance with SIGTERM: the app shuts down cleanly (uvicorn then
    # re-raises the signal, so the exit status is -SIGTERM, or 0 with older uvicorn).
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM), log.read_text()
    assert "Application shutdown complete" in log.read_text()


def test_serve_refuses_a_bad_port_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.serve"], cwd=ROOT, env=service_env(PORT="http"), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "PORT='http'" in result.stderr and "Traceback" not in result.stderr


def test_serve_passes_port_and_proxy_settings_to_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process twin of the test above (so app.serve counts towards coverage)."""
    from app import serve

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(serve.uvicorn, "run", lambda app, **kwargs: calls.append({"app": app, **kwargs}))
    monkeypatch.setenv("PORT", "9123")
    assert serve.main() == 0
    (call,) = calls
    assert call["app"] == "app.main:serve_app" and call["factory"] is True
    assert call["port"] == 9123 and call["host"] == "0.0.0.0"
    assert call["proxy_headers"] is True and call["forwarded_allow_ips"] == "*"
    monkeypatch.setenv("PORT", "70000")
    assert serve.main() == 2 and len(calls) == 1


def test_smoke_test_fails_clearly_when_nothing_answers() -> None:
    smoke = load_module("deploy/smoke_test.py")
    with pytest.raises(smoke.SmokeError, match=r"GET /readyz: not ready after 0 s"):
        smoke.smoke(f"http://127.0.0.1:{free_port()}", timeout=0.1)
    image = Image.open(io.BytesIO(smoke.png_gray()))
    assert image.size == (48, 48) and image.mode == "L"
    with pytest.raises(smoke.SmokeError, match="expected one face"):
        smoke.check_prediction({"faces": []})


# ---------------------------------------------------------------------------- cloudbuild.yaml


@pytest.fixture(scope="module")
def cloudbuild() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())


def used_substitutions(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(used_substitutions(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(used_substitutions(v) for v in node)) if node else set()
    if isinstance(node, str):
        return {a or b for a, b in SUBSTITUTION.findall(node)}
    return set()


def step_text(step: dict[str, Any]) -> str:
    return " ".join(str(a) for a in [step.get("entrypoint", ""), *step.get("args", [])])


def test_cloudbuild_steps_run_test_build_push_deploy_smoke_in_order(cloudbuild: dict[str, Any]) -> None:
    steps = cloudbuild["steps"]
    ids = [step["id"] for step in steps]
    assert ids == ["test", "build-api", "build-train", "push-api", "push-train", "deploy", "smoke"]
    assert not any("waitFor" in step for step in steps), "each step waits for all before it"
    assert "make test" in step_text(steps[0])
    assert steps[1]["args"][0] == "build" and "--file=api.Dockerfile" in steps[1]["args"]
    assert steps[2]["args"][0] == "build" and "--file=train.Dockerfile" in steps[2]["args"]
    assert [step["args"][0] for step in steps[3:5]] == ["push", "push"]
    assert steps[5]["args"][:2] == ["run", "deploy"]
    assert "deploy/smoke_test.py" in step_text(steps[6]) and "gcloud run services describe" in step_text(steps[6])


def test_cloudbuild_substitutions_are_all_declared(cloudbuild: dict[str, Any]) -> None:
    declared = set(cloudbuild["substitutions"])
    assert all(name.startswith("_") for name in declared), "user substitutions start with _"
    used = used_substitutions({k: v for k, v in cloudbuild.items()})
    user = {name for name in used if name.startswith("_")}
    assert user <= declared, f"used but not declared: {sorted(user - declared)}"
    assert declared <= user, f"declared but unused (Cloud Build refuses them): {sorted(declared - user)}"
    others = used - user
    assert others <= CLOUD_BUILD_BUILTINS, f"not substitutions: {sorted(others - CLOUD_BUILD_BUILTINS)} (write $$ in shell)"
    for name, value in cloudbuild["substitutions"].items():
        assert isinstance(value, str), f"{name}: substitution values are strings (quote numbers)"
        assert not re.search(r"secret|token|password|key", name, re.IGNORECASE), name


def test_cloudbuild_images_are_tagged_with_the_commit(cloudbuild: dict[str, Any]) -> None:
    steps = {step["id"]: step for step in cloudbuild["steps"]}
    image = "${_REGION}-docker.pkg.dev/${PROJECT_ID}/${_REPOSITORY}/%s:${COMMIT_SHA}"
    api, train = image % "api", image % "train"
    assert f"--tag={api}" in steps["build-api"]["args"]
    assert f"--tag={train}" in steps["build-train"]["args"]
    assert steps["push-api"]["args"] == ["push", api]
    assert steps["push-train"]["args"] == ["push", train]
    assert f"--image={api}" in steps["deploy"]["args"]
    assert cloudbuild["images"] == [api, train]


def test_cloudbuild_deploys_with_the_service_settings(cloudbuild: dict[str, Any]) -> None:
    deploy = {step["id"]: step for step in cloudbuild["steps"]}["deploy"]
    flags = dict(arg.split("=", 1) for arg in deploy["args"][3:] if "=" in arg)
    for flag in ("--region", "--cpu", "--memory", "--concurrency", "--min-instances", "--max-instances", "--service-account"):
        assert flag in flags, flag
    assert "httpGet.path=/readyz" in flags["--startup-probe"]
    assert "httpGet.path=/healthz" in flags["--liveness-probe"]
    env = dict(pair.split("=", 1) for pair in flags["--update-env-vars"].split(","))
    assert env["MODEL_URI"] == "gs://${_BUCKET}/models"
    assert env["OTEL_TRACES_EXPORTER"] == "gcp_trace"
    assert cloudbuild["options"]["logging"] == "CLOUD_LOGGING_ONLY"  # needed with a user-managed build account


# ---------------------------------------------------------------------------- deploy/setup-gcp.sh


def bare_path(tmp_path: Path) -> str:
    """A PATH with python3 only: no gcloud, no coreutils."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    python = bin_dir / "python3"
    if not python.exists():
        python.symlink_to(os.path.realpath(sys.executable))
    return str(bin_dir)


def run_setup(*args: str, path: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash") or "/bin/bash"
    return subprocess.run(
        [bash, str(SETUP), *args], env={"PATH": path, **(env or {})}, capture_output=True, text=True, timeout=120
    )


SETUP_ARGS = ("--project", "demo-proj", "--github-owner", "acme", "--github-repo", "fer", "--alert-email", "ops@example.com")


def printed_commands(output: str, mark: str = "+") -> list[list[str]]:
    return [shlex.split(line[2:]) for line in output.splitlines() if line.startswith(f"{mark} ")]


def find(commands: list[list[str]], *words: str) -> list[list[str]]:
    return [cmd for cmd in commands if all(word in cmd for word in words)]


def test_setup_dry_run_prints_every_command_without_gcloud(tmp_path: Path) -> None:
    result = run_setup(*SETUP_ARGS, "--dry-run", path=bare_path(tmp_path))
    assert result.returncode == 0, result.stderr
    commands = printed_commands(result.stdout)
    assert commands and all(cmd[0] == "gcloud" for cmd in commands)
    assert all("--project=demo-proj" in cmd or cmd[1:3] == ["projects", "add-iam-policy-binding"] for cmd in commands)

    (enable,) = find(commands, "services", "enable")
    for api in ("run", "artifactregistry", "cloudbuild", "storage", "monitoring", "logging", "cloudtrace", "aiplatform"):
        assert f"{api}.googleapis.com" in enable

    assert find(commands, "artifacts", "repositories", "create", "fer", "--repository-format=docker")
    assert find(commands, "storage", "buckets", "create", "gs://demo-proj-fer")
    created = {cmd[4] for cmd in find(commands, "iam", "service-accounts", "create")}
    assert created == {"fer-runtime", "fer-build", "fer-train"}

    def granted(member: str, role: str) -> list[list[str]]:
        return find(commands, f"--member=serviceAccount:{member}@demo-proj.iam.gserviceaccount.com", f"--role={role}")

    bucket_viewer = granted("fer-runtime", "roles/storage.objectViewer")
    assert bucket_viewer and bucket_viewer[0][1:4] == ["storage", "buckets", "add-iam-policy-binding"]
    for role in ("roles/logging.logWriter", "roles/cloudtrace.agent", "roles/monitoring.metricWriter"):
        assert granted("fer-runtime", role), role
    train_admin = granted("fer-train", "roles/storage.objectAdmin")
    assert train_admin and "gs://demo-proj-fer" in train_admin[0], "training may write the bucket only"
    assert granted("fer-build", "roles/artifactregistry.writer")[0][1:3] == ["artifacts", "repositories"]
    assert granted("fer-build", "roles/run.admin")
    assert granted("fer-build", "roles/iam.serviceAccountUser")[0][4] == "fer-runtime@demo-proj.iam.gserviceaccount.com"
    # Least privilege: nobody gets a primitive role, and the runtime cannot write the bucket.
    assert not [cmd for cmd in commands if any(arg in cmd for arg in ("--role=roles/owner", "--role=roles/editor"))]
    assert not granted("fer-runtime", "roles/storage.objectAdmin")

    (trigger,) = find(commands, "builds", "triggers", "create", "github")
    assert {"--repo-owner=acme", "--repo-name=fer", "--branch-pattern=^main$", "--build-config=cloudbuild.yaml"} <= set(trigger)
    assert "--service-account=projects/demo-proj/serviceAccounts/fer-build@demo-proj.iam.gserviceaccount.com" in trigger
    substitutions = next(arg for arg in trigger if arg.startswith("--substitutions=")).split("=", 1)[1]
    passed = dict(pair.split("=", 1) for pair in substitutions.split(","))
    declared = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())["substitutions"]
    assert set(passed) <= set(declared) and passed["_BUCKET"] == "demo-proj-fer"

    policies = sorted(p.name for p in (ROOT / "monitoring").glob("alert-*.json"))
    created_policies = find(commands, "alpha", "monitoring", "policies", "create")
    files = [arg.split("=", 1)[1] for cmd in created_policies for arg in cmd if arg.startswith("--policy-from-file=")]
    assert sorted(Path(file).name for file in files) == policies
    assert all("--notification-channels=projects/demo-proj/notificationChannels/CHANNEL_ID" in cmd for cmd in created_policies)
    assert find(commands, "beta", "monitoring", "channels", "create", "--channel-labels=email_address=ops@example.com")

    # Every create is preceded by a check of existence (idempotence), printed on stderr.
    checks = printed_commands(result.stderr, "?")
    assert find(checks, "artifacts", "repositories", "describe") and find(checks, "storage", "buckets", "describe")
    assert len(find(checks, "iam", "service-accounts", "describe")) == 3
    assert find(checks, "builds", "triggers", "describe", "fer-main")
    assert len(find(checks, "alpha", "monitoring", "policies", "list")) == len(policies)


def test_setup_without_gcloud_fails_with_a_clear_message(tmp_path: Path) -> None:
    result = run_setup(*SETUP_ARGS, path=bare_path(tmp_path))
    assert result.returncode == 1
    assert "gcloud not found on PATH" in result.stderr and "--dry-run" in result.stderr
    assert result.stdout == ""


def test_setup_refuses_missing_or_unknown_arguments(tmp_path: Path) -> None:
    result = run_setup("--dry-run", "--github-owner", "a", "--github-repo", "b", path=bare_path(tmp_path))
    assert result.returncode == 1 and "no project: pass --project" in result.stderr
    result = run_setup("--project", "p", "--dry-run", path=bare_path(tmp_path))
    assert result.returncode == 1 and "--github-owner" in result.stderr
    result = run_setup(*SETUP_ARGS, "--dry-run", "--colour", path=bare_path(tmp_path))
    assert result.returncode == 1 and "unknown argument '--colour'" in result.stderr


FAKE_GCLOUD = """#!/bin/bash
# Records each call; answers as if every resource exists (FAKE_EXISTS=1) or none does.
printf '%s\\n' "$*" >> "$FAKE_LOG"
if [[ "$FAKE_EXISTS" == 1 ]]; then
    case "$*" in *" list "*) echo "projects/demo-proj/things/1" ;; esac
    exit 0
fi
case "$*" in *" describe "*) exit 1 ;; esac
case "$*" in *"channels create"*) echo "projects/demo-proj/notificationChannels/42" ;; esac
exit 0
"""


@pytest.mark.parametrize("exists", [False, True], ids=["new-project", "second-run"])
def test_setup_creates_only_what_is_missing(tmp_path: Path, exists: bool) -> None:
    bin_dir = Path(bare_path(tmp_path))
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    log = tmp_path / "calls.log"
    result = run_setup(*SETUP_ARGS, path=str(bin_dir), env={"FAKE_LOG": str(log), "FAKE_EXISTS": str(int(exists))})
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    creates = [call for call in calls if re.search(r"\bcreate\b", call) and "--help" not in call]
    if exists:
        assert creates == [], "a second run creates nothing"
        assert "alert policy 'fer-api: 5xx responses above 1% of requests' exists" in result.stderr
    else:
        policies = len(list((ROOT / "monitoring").glob("alert-*.json")))
        assert len([c for c in creates if "policies create" in c]) == policies
        assert all("notificationChannels/42" in c for c in creates if "policies create" in c)
        assert len([c for c in creates if "service-accounts create" in c]) == 3
    # Bindings and the API list are applied every time (both are idempotent in gcloud itself).
    assert any(call.startswith("services enable") for call in calls)
    assert len([call for call in calls if "add-iam-policy-binding" in call]) == 9


def test_shellcheck_passes_on_the_scripts() -> None:
    scripts = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "scripts").glob("*.sh"))
    assert {"scripts/build-images-locally.sh", "scripts/lock.sh"} <= set(scripts)
    result = subprocess.run(
        [tool("shellcheck"), "deploy/setup-gcp.sh", ".ci/run", *scripts], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_images_locally_explains_itself_and_refuses_unknown_arguments() -> None:
    script = str(ROOT / "scripts" / "build-images-locally.sh")
    bash = shutil.which("bash") or "/bin/bash"
    usage = subprocess.run([bash, script, "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--api-only" in usage.stdout and "set -euo" not in usage.stdout
    refused = subprocess.run([bash, script, "--push"], capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown argument '--push'" in refused.stderr


# ---------------------------------------------------------------------------- Vertex AI training


@pytest.fixture(scope="module")
def vertex() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "deploy" / "vertex-train.yaml").read_text())


def test_vertex_job_runs_the_train_image_on_a_gpu(vertex: dict[str, Any]) -> None:
    (pool,) = vertex["workerPoolSpecs"]
    machine = pool["machineSpec"]
    assert machine["machineType"].startswith(("g2-", "a2-", "a3-", "n1-"))
    assert machine["acceleratorType"].startswith("NVIDIA_") and machine["acceleratorCount"] >= 1
    assert pool["replicaCount"] == 1
    assert pool["containerSpec"]["imageUri"] == "${REGION}-docker.pkg.dev/${PROJECT_ID}/${REPOSITORY}/train:${IMAGE_TAG}"
    assert vertex["serviceAccount"] == "fer-train@${PROJECT_ID}.iam.gserviceaccount.com"


def test_vertex_job_arguments_are_accepted_by_the_training_parser(vertex: dict[str, Any]) -> None:
    argv = vertex["workerPoolSpecs"][0]["containerSpec"]["args"]
    args = build_parser().parse_args(argv)
    assert args.data.startswith("gs://") and args.output.startswith("gs://")
    assert (ROOT / args.config).is_file()
    cfg = resolve_config(str(ROOT / args.config), args)  # the YAML's keys and the overrides are valid
    cfg.validate()
    # The service follows the same prefix the job publishes to.
    deploy = {s["id"]: s for s in yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())["steps"]}["deploy"]
    model_uri = re.search(r"MODEL_URI=([^,]+)", " ".join(deploy["args"]))
    assert model_uri and args.output == model_uri.group(1).replace("${_BUCKET}", "${BUCKET}")


def test_readme_fills_in_every_placeholder_of_the_vertex_job() -> None:
    placeholders = set(re.findall(r"\$\{([A-Z_]+)\}", (ROOT / "deploy" / "vertex-train.yaml").read_text()))
    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"envsubst '([^']+)' < deploy/vertex-train\.yaml", readme)
    assert listed, "README: the envsubst line that fills in deploy/vertex-train.yaml"
    assert {name.lstrip("$") for name in listed.group(1).split()} == placeholders
    assert re.search(r"gcloud ai custom-jobs create --project=\S+ --region=\S+ --display-name=\S+ --config=", readme)


# ---------------------------------------------------------------------------- GitHub workflows


def test_actionlint_passes_on_the_workflows() -> None:
    result = subprocess.run(
        [tool("actionlint"), "-no-color"],
        cwd=ROOT,
        env={**os.environ, "PATH": tools_path()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_fails_a_broken_workflow(tmp_path: Path) -> None:
    workflow = tmp_path / "broken.yml"
    workflow.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - uses: docker/build-push-action@v7\n        with:\n          pushh: false\n"
        "      - run: echo ${{ github.event.pull_request.title }}\n"
    )
    result = subprocess.run([tool("actionlint"), "-no-color", str(workflow)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "pushh" in result.stdout


def workflow(name: str) -> dict[Any, Any]:
    return yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())


def test_ci_runs_make_test_and_uploads_coverage() -> None:
    steps = workflow("ci.yml")["jobs"]["test"]["steps"]
    assert any(step.get("run") == "make test" for step in steps)
    upload = next(step for step in steps if str(step.get("uses", "")).startswith("actions/upload-artifact@"))
    assert upload["with"]["path"] == "coverage.xml"
    recipe = (ROOT / "Makefile").read_text()
    assert "--cov-report=xml" in recipe and "--cov-fail-under=" in recipe


def test_lint_and_image_workflows() -> None:
    lint = json.dumps(workflow("lint.yml"))
    for command in ("hadolint --config .hadolint.yaml api.Dockerfile train.Dockerfile", "actionlint", "shellcheck deploy/*.sh"):
        assert command in lint
    images = workflow("images.yml")
    assert "pull_request" in images[True]  # PyYAML reads the key `on` as True
    job = images["jobs"]["build"]
    assert job["strategy"]["matrix"]["image"] == ["api", "train"]
    build = next(step for step in job["steps"] if str(step.get("uses", "")).startswith("docker/build-push-action@"))
    assert build["with"]["push"] is False and build["with"]["file"] == "${{ matrix.image }}.Dockerfile"
    assert "requirements/**" in images[True]["pull_request"]["paths"], "a new lock rebuilds the images"
    smoke = next(step for step in job["steps"] if "deploy/smoke_test.py" in str(step.get("run", "")))
    assert smoke["if"] == "matrix.image == 'api'" and build["with"]["load"] == "${{ matrix.image == 'api' }}"


def test_audit_workflow_runs_pip_audit_on_every_lock() -> None:
    audit = workflow("audit.yml")
    assert {"pull_request", "push", "schedule"} <= set(audit[True])
    runs = [str(step.get("run", "")) for step in audit["jobs"]["pip-audit"]["steps"]]
    audits = [run for run in runs if run.startswith("pip-audit ")]
    assert audits and all("--strict" in run and "--disable-pip" in run for run in audits)
    audited = {path for run in audits for path in re.findall(r"-r (requirements/\S+\.txt)", run)}
    assert audited == {f"requirements/{name}.txt" for name in (*LOCKS, "torch")}
    assert any("pip-audit==" in run for run in runs), "a pinned pip-audit"


# ---------------------------------------------------------------------------- gcloud's own parser


def gcloud_commands(tmp_path: Path) -> list[list[str]]:
    """Every gcloud command line of the delivery: the set-up script's, cloudbuild.yaml's deploy
    and smoke steps (substitutions filled in) and the README's Vertex AI submission."""
    result = run_setup(*SETUP_ARGS, "--dry-run", path=bare_path(tmp_path))
    commands = printed_commands(result.stdout) + printed_commands(result.stderr, "?")
    cloudbuild = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    values = {"PROJECT_ID": "demo-proj", "COMMIT_SHA": "0" * 40, **cloudbuild["substitutions"], "_BUCKET": "demo-proj-fer"}

    def fill(text: str) -> str:
        return SUBSTITUTION.sub(lambda m: values[m.group(1) or m.group(2)], text)

    deploy = {s["id"]: s for s in cloudbuild["steps"]}["deploy"]
    commands.append(["gcloud", *(fill(arg) for arg in deploy["args"]), "--project=demo-proj"])
    smoke = {s["id"]: s for s in cloudbuild["steps"]}["smoke"]
    describe = re.search(r"gcloud run services describe .*?--format='[^']*'", fill(" ".join(smoke["args"])))
    assert describe
    commands.append([*shlex.split(describe.group(0)), "--project=demo-proj"])
    readme = (ROOT / "README.md").read_text()
    submit = re.search(r"gcloud ai custom-jobs create [^\n`]*", readme)
    assert submit
    values = {"PROJECT_ID": "demo-proj", "REGION": "europe-west1", "IMAGE_TAG": "0" * 40}
    line = re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: values[m.group(1)], submit.group(0))
    commands.append(shlex.split(line))
    return commands


@pytest.mark.slow
def test_gcloud_accepts_every_command_line(tmp_path: Path) -> None:
    """Offline and without credentials gcloud still parses a command's flags, and stops at
    "no active account" only once they are valid; a typo in a flag or command stops earlier."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        pytest.skip("the Google Cloud CLI (gcloud) is not installed")
    config = tmp_path / "gcloud-config"
    config.mkdir()
    env = {
        **os.environ,
        "CLOUDSDK_CONFIG": str(config),
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
        "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
    }
    commands = gcloud_commands(tmp_path)
    has_alpha = subprocess.run([gcloud, "alpha", "--help"], env=env, capture_output=True, timeout=60).returncode == 0
    if not has_alpha:
        commands = [cmd for cmd in commands if cmd[1] not in ("alpha", "beta")]

    def attempt(cmd: list[str]) -> tuple[list[str], int, str]:
        started = time.monotonic()
        proc = subprocess.run([gcloud, *cmd[1:]], env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert time.monotonic() - started < 120
        return cmd, proc.returncode, proc.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(attempt, commands))
    assert len(results) >= 30
    for cmd, code, stderr in results:
        assert code != 2 and "active account" in stderr, f"{shlex.join(cmd)}\n-> exit {code}: {stderr[-600:]}"


def test_build_parser_requires_data() -> None:
    """The parser the Vertex job's arguments were checked with is the one main() uses."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--config", "configs/compact.yaml"])
    assert exit_info.value.code == 2
