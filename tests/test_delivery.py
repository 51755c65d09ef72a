"""Delivery as code: the Dockerfiles, cloudbuild.yaml, deploy/ and the GitHub workflows.

No image is built and nothing reaches Google Cloud here. What is checked: the linters (hadolint,
actionlint, shellcheck: their binaries come with the dev extra), what the images do (locked
dependencies before the source, a non-root user), that the locks are fresh, that the files agree
with each other (substitutions, image tags, the Vertex job's arguments and the service's model
prefix), the set-up script's least privilege and idempotence, the service image's entry point and
smoke test run for real, and, where the Google Cloud CLI is installed, every gcloud command line
parsed by gcloud itself (without credentials). The files' wording is not pinned.
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
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from PIL import Image

from tests.conftest import refused_port
from tests.utils.gcloud import real_gcloud, usage_errors
from tests.utils.service import SETTINGS_ENV, clean_service_env, serve_process, write_model
from training.config import resolve_config
from training.train import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ("api.Dockerfile", "train.Dockerfile")
SETUP = ROOT / "deploy" / "setup-gcp.sh"
DEPLOY_GUIDE = ROOT / "docs" / "deploy.md"

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


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_installs_locked_dependencies_before_the_source_and_runs_non_root(name: str) -> None:
    steps = dockerfile_instructions(name)
    installs = [i for i, (kind, arg) in enumerate(steps) if kind == "RUN" and "pip install" in arg]
    copies = [i for i, (kind, _) in enumerate(steps) if kind == "COPY"]
    source = [i for i in copies if not steps[i][1].startswith("requirements/")]
    # Layer caching: a change to the source rebuilds no dependency layer.
    assert installs and source and max(installs) < min(source), "dependencies must be installed before the source is copied"
    for i in installs:  # from the locks only, hashed
        run = steps[i][1]
        assert "-r requirements/" in run and "--require-hashes" in run, run
    users = [i for i, (kind, _) in enumerate(steps) if kind == "USER"]
    assert users and max(users) > max(copies), "the process runs as the last USER, after every COPY"
    assert steps[max(users)][1].split(":")[0] not in ("0", "root")
    # Exec form: the signal Cloud Run sends (SIGTERM) reaches Python, not a shell.
    (entrypoint,) = [arg for kind, arg in steps if kind == "ENTRYPOINT"]
    assert json.loads(entrypoint)[:2] == ["python", "-m"]


def test_api_image_has_no_pytorch() -> None:
    """The service runs ONNX Runtime: neither its Dockerfile nor its lock brings PyTorch."""
    assert not any("torch" in arg for _, arg in dockerfile_instructions("api.Dockerfile"))
    assert not re.search(r"^(torch|torchvision|onnx)==", (ROOT / "requirements" / "api.txt").read_text(), re.MULTILINE)


def test_train_image_has_the_pinned_pytorch() -> None:
    base = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-\S+", dockerfile_instructions("train.Dockerfile")[0][1])
    assert base and base.group(1) == torch_pins()["torch"], "the base image's PyTorch is requirements/torch.txt's"


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
    env.update(INFERENCE_THREADS="1", MAX_CONCURRENT_INFERENCES="1", **extra)
    return env


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """``python -m app.serve`` (the service image's ENTRYPOINT) on $PORT with a tiny model, ready."""
    clean_service_env(monkeypatch)
    model = write_model(tmp_path / "model.onnx", run_id="smoke-run")
    log = tmp_path / "serve.log"
    with serve_process(log, MODEL_URI=str(model), MAX_CONCURRENT_INFERENCES="1") as (url, proc):
        yield url, proc, log


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
    with refused_port() as port, pytest.raises(smoke.SmokeError, match=r"GET /readyz: not ready after 0 s"):
        smoke.smoke(f"http://127.0.0.1:{port}", timeout=0.1)
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


def test_cloudbuild_tests_before_it_pushes_or_deploys(cloudbuild: dict[str, Any]) -> None:
    steps = cloudbuild["steps"]
    assert not any("waitFor" in step for step in steps), "each step waits for all before it"
    assert steps[0]["id"] == "test"
    # CI=true turns the browser test's skip (no Chromium) into a failure: it runs here too.
    assert "CI=true" in steps[0].get("env", [])


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


def test_cloudbuild_deploys_the_image_it_built_and_pushed(cloudbuild: dict[str, Any]) -> None:
    steps = {step["id"]: step for step in cloudbuild["steps"]}
    (built,) = [arg.removeprefix("--tag=") for arg in steps["build-api"]["args"] if arg.startswith("--tag=")]
    assert "${COMMIT_SHA}" in built
    assert steps["push-api"]["args"] == ["push", built]
    assert f"--image={built}" in steps["deploy"]["args"]
    assert built in cloudbuild["images"]


# ---------------------------------------------------------------------------- deploy/setup-gcp.sh


def bare_path(tmp_path: Path) -> str:
    """A PATH with python3 only: no gcloud, no coreutils."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    python = bin_dir / "python3"
    if not python.exists():
        python.symlink_to(os.path.realpath(sys.executable))
    return str(bin_dir)


def run_setup(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The set-up script with :func:`bare_path` (and a ``gcloud`` put there, if any); its temporary
    files (the rendered monitoring files) in ``tmp_path/tmp``."""
    bash = shutil.which("bash") or "/bin/bash"
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {"PATH": bare_path(tmp_path), "TMPDIR": str(tmp), **(env or {})}
    return subprocess.run([bash, str(SETUP), *args], env=env, capture_output=True, text=True, timeout=120)


SETUP_ARGS = ("--project", "demo-proj", "--github-owner", "acme", "--github-repo", "fer", "--alert-email", "ops@example.com")


def printed_commands(output: str, mark: str = "+") -> list[list[str]]:
    return [shlex.split(line[2:]) for line in output.splitlines() if line.startswith(f"{mark} ")]


def find(commands: list[list[str]], *words: str) -> list[list[str]]:
    return [cmd for cmd in commands if all(word in cmd for word in words)]


def test_setup_dry_run_grants_least_privilege_and_creates_every_policy(tmp_path: Path) -> None:
    result = run_setup(tmp_path, *SETUP_ARGS, "--dry-run")
    assert result.returncode == 0, result.stderr
    commands = printed_commands(result.stdout)
    assert commands and all(cmd[0] == "gcloud" for cmd in commands)

    def granted(member: str, role: str) -> list[list[str]]:
        return find(commands, f"--member=serviceAccount:{member}@demo-proj.iam.gserviceaccount.com", f"--role={role}")

    assert not [cmd for cmd in commands if any(arg in cmd for arg in ("--role=roles/owner", "--role=roles/editor"))]
    assert granted("fer-runtime", "roles/storage.objectViewer")
    assert not granted("fer-runtime", "roles/storage.objectAdmin"), "the service only reads the bucket"

    (trigger,) = find(commands, "builds", "triggers", "create", "github")
    substitutions = next(arg for arg in trigger if arg.startswith("--substitutions=")).split("=", 1)[1]
    passed = dict(pair.split("=", 1) for pair in substitutions.split(","))
    declared = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())["substitutions"]
    assert set(passed) <= set(declared), "Cloud Build refuses a substitution its file does not declare"

    policies = sorted(p.name for p in (ROOT / "monitoring").glob("alert-*.json"))
    created = find(commands, "alpha", "monitoring", "policies", "create")
    files = [arg.split("=", 1)[1] for cmd in created for arg in cmd if arg.startswith("--policy-from-file=")]
    assert sorted(Path(file).name for file in files) == policies


def test_setup_without_gcloud_fails_with_a_clear_message(tmp_path: Path) -> None:
    result = run_setup(tmp_path, *SETUP_ARGS)
    assert result.returncode == 1
    assert "gcloud not found on PATH" in result.stderr and "--dry-run" in result.stderr
    assert result.stdout == ""


def test_setup_refuses_missing_or_unknown_arguments(tmp_path: Path) -> None:
    result = run_setup(tmp_path, "--dry-run", "--github-owner", "a", "--github-repo", "b")
    assert result.returncode == 1 and "no project: pass --project" in result.stderr
    result = run_setup(tmp_path, "--project", "p", "--dry-run")
    assert result.returncode == 1 and "--github-owner" in result.stderr
    result = run_setup(tmp_path, *SETUP_ARGS, "--dry-run", "--colour")
    assert result.returncode == 1 and "unknown argument '--colour'" in result.stderr


FAKE_GCLOUD = """#!/bin/bash
# Records each call, and each file it is given (the flag's name, then the file); answers as if
# every resource exists (FAKE_EXISTS=1) or none does.
printf '%s\\n' "$*" >> "$FAKE_LOG"
for arg; do
    case "$arg" in --*-from-file=*) printf '%s\\n%s\\n\\n' "${arg%%=*}" "$(<"${arg#*=}")" >> "$FAKE_LOG.files" ;; esac
done
if [[ "$FAKE_EXISTS" == 1 ]]; then
    case "$*" in *" list "*) echo "projects/demo-proj/things/1" ;; esac
    exit 0
fi
case "$*" in *" describe "*) exit 1 ;; esac
case "$*" in *"channels create"*) echo "projects/demo-proj/notificationChannels/42" ;; esac
exit 0
"""


def setup_with_fake_gcloud(tmp_path: Path, *args: str, exists: bool = False) -> tuple[str, list[str], dict[str, list[Any]]]:
    """Runs the set-up against FAKE_GCLOUD: its stderr, the gcloud calls, and the files it was given
    by flag (``--policy-from-file``: the alert policies, ``--config-from-file``: the dashboard)."""
    bin_dir = Path(bare_path(tmp_path))
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    log = tmp_path / "calls.log"
    result = run_setup(tmp_path, *args, env={"FAKE_LOG": str(log), "FAKE_EXISTS": str(int(exists))})
    assert result.returncode == 0, result.stderr
    files: dict[str, list[Any]] = {"--policy-from-file": [], "--config-from-file": []}
    recorded = tmp_path / "calls.log.files"
    for entry in recorded.read_text().split("\n\n") if recorded.exists() else []:
        if entry.strip():
            flag, text = entry.split("\n", 1)
            files[flag].append(json.loads(text))
    return result.stderr, log.read_text().splitlines(), files


@pytest.mark.parametrize("exists", [False, True], ids=["new-project", "second-run"])
def test_setup_creates_only_what_is_missing(tmp_path: Path, exists: bool) -> None:
    stderr, calls, files = setup_with_fake_gcloud(tmp_path, *SETUP_ARGS, exists=exists)
    policies = files["--policy-from-file"]
    creates = [call for call in calls if re.search(r"\bcreate\b", call) and "--help" not in call]
    if exists:
        assert creates == [], "a second run creates nothing"
        assert "alert policy 'fer-api: 5xx responses above 1% of requests' exists" in stderr
    else:
        assert len(policies) == len(list((ROOT / "monitoring").glob("alert-*.json")))
        assert all(p["notificationChannels"] == ["projects/demo-proj/notificationChannels/42"] for p in policies)
        assert len([c for c in creates if "service-accounts create" in c]) == 3
    # Bindings and the API list are applied every time (both are idempotent in gcloud itself).
    assert any(call.startswith("services enable") for call in calls)
    assert len([call for call in calls if "add-iam-policy-binding" in call]) == 9
    assert not list((tmp_path / "tmp").iterdir())  # the rendered copies removed


def test_setup_alerts_watch_the_service_it_deploys(tmp_path: Path) -> None:
    args = ("--project", "demo-proj", "--github-owner", "acme", "--github-repo", "fer", "--service", "fer-staging")
    _, calls, files = setup_with_fake_gcloud(tmp_path, *args)
    policies, (dashboard,) = files["--policy-from-file"], files["--config-from-file"]
    assert policies and all(p["notificationChannels"] == [] for p in policies)  # no --alert-email: no one
    assert all(p["displayName"].startswith("fer-staging: ") for p in policies)
    assert all("fer-staging" in json.dumps(doc) and "fer-api" not in json.dumps(doc) for doc in [*policies, dashboard])
    assert not [call for call in calls if "channels create" in call]


def test_setup_refuses_names_the_monitoring_files_cannot_take(tmp_path: Path) -> None:
    result = run_setup(tmp_path, *SETUP_ARGS, "--service", 'fer"api', "--dry-run")
    assert result.returncode == 1 and "unexpected characters" in result.stderr
    assert result.stdout == ""  # before any command


def test_shellcheck_passes_on_the_scripts() -> None:
    scripts = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "scripts").glob("*.sh"))
    assert {"scripts/build-images-locally.sh", "scripts/lock.sh"} <= set(scripts)
    checked = ["deploy/setup-gcp.sh", "monitoring/apply.sh", ".ci/run", *scripts]
    result = subprocess.run([tool("shellcheck"), *checked], cwd=ROOT, capture_output=True, text=True, timeout=120)
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


def test_deploy_guide_fills_in_every_placeholder_of_the_vertex_job() -> None:
    placeholders = set(re.findall(r"\$\{([A-Z_]+)\}", (ROOT / "deploy" / "vertex-train.yaml").read_text()))
    listed = re.search(r"envsubst '([^']+)' < deploy/vertex-train\.yaml", DEPLOY_GUIDE.read_text())
    assert listed, f"{DEPLOY_GUIDE.name}: the envsubst line that fills in deploy/vertex-train.yaml"
    assert {name.lstrip("$") for name in listed.group(1).split()} == placeholders


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


def test_audit_workflow_audits_every_lock() -> None:
    runs = [str(step.get("run", "")) for step in workflow("audit.yml")["jobs"]["pip-audit"]["steps"]]
    audited = {path for run in runs if run.startswith("pip-audit ") for path in re.findall(r"-r (requirements/\S+\.txt)", run)}
    assert audited == {str(path.relative_to(ROOT)) for path in (ROOT / "requirements").glob("*.txt")}


# ---------------------------------------------------------------------------- gcloud's own parser


def gcloud_commands(tmp_path: Path) -> list[list[str]]:
    """Every gcloud command line of the delivery: the set-up script's, cloudbuild.yaml's deploy
    and smoke steps (substitutions filled in) and the deploy guide's Vertex AI submission."""
    result = run_setup(tmp_path, *SETUP_ARGS, "--dry-run")
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
    submit = re.search(r"gcloud ai custom-jobs create [^\n`]*", DEPLOY_GUIDE.read_text())
    assert submit
    values = {"PROJECT_ID": "demo-proj", "REGION": "europe-west1", "IMAGE_TAG": "0" * 40}
    line = re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: values[m.group(1)], submit.group(0))
    commands.append(shlex.split(line))
    return commands


@pytest.mark.slow
@pytest.mark.skipif(real_gcloud() is None, reason="needs the Google Cloud CLI (Debian: google-cloud-cli)")
def test_gcloud_accepts_every_command_line(tmp_path: Path) -> None:
    """Every gcloud command line of the delivery parses in the installed gcloud (tests/utils/gcloud.py)."""
    gcloud = real_gcloud()
    assert gcloud is not None
    commands = gcloud_commands(tmp_path)
    assert len(commands) >= 30
    assert usage_errors(gcloud, [cmd[1:] for cmd in commands]) == []


def test_build_parser_requires_data() -> None:
    """The parser the Vertex job's arguments were checked with is the one main() uses."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--config", "configs/compact.yaml"])
    assert exit_info.value.code == 2
