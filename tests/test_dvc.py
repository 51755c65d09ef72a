"""Data versioning with DVC: the project's dvc.yaml, .dvc/config and data/fer2013.zip.dvc.

The DVC tests run the real ``dvc`` CLI in a throw-away git repository holding a copy of the
project's DVC files and code, with synthetic data at data/fer2013.zip and a local folder as
the remote: add, push, lose everything, pull it back byte for byte; and ``dvc repro`` of the
whole pipeline with a tiny recipe.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fercore import storage
from tests.utils import synthetic
from training import data as data_module
from training import evaluate, train

ROOT = Path(__file__).resolve().parents[1]
needs_dvc = pytest.mark.skipif(
    importlib.util.find_spec("dvc") is None or shutil.which("git") is None,
    reason="needs the dvc package (dev extra) and git",
)
# The tiny recipe the tests write over the copy of configs/compact.yaml: one epoch in seconds.
TINY_RECIPE = {
    "model": "compact",
    "model_kwargs": {"width": 4},
    "epochs": 1,
    "batch_size": 16,
    "lr": 0.05,
    "precision": "fp32",
    "warmup_epochs": 0,
    "eval_batch_size": 64,
    "num_threads": 1,
}


# ---------------------------------------------------------------------------- the commands DVC runs


def test_data_cli_prints_and_writes_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = synthetic.write_zip(tmp_path / "fer.zip", synthetic.default_splits(per_class=3))
    out = tmp_path / "data" / "summary.json"
    assert data_module.main(["--data", str(source), "--summary-json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == summary
    assert summary["fingerprint"] == data_module.fingerprint_source(source)
    assert summary["splits"]["train"]["images"] == 21 and summary["splits"]["test"]["images"] == 7
    assert set(summary["splits"]["train"]["class_counts"].values()) == {3}
    assert list(summary["splits"]["test"]["class_counts"]) == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    assert summary["skipped"] == {}


@pytest.mark.slow
def test_evaluate_takes_a_training_output_folder(tmp_path: Path) -> None:
    source = synthetic.write_zip(tmp_path / "fer.zip", synthetic.default_splits(per_class=6))
    out = tmp_path / "runs"
    flags = [f"--{k.replace('_', '-')}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in TINY_RECIPE.items()]
    assert train.main(["--data", str(source), "--output", str(out), *flags]) == 0
    report = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(out), "--data", str(source), "--output-json", str(report)]) == 0
    latest, evaluated = storage.read_latest(out), json.loads(report.read_text())
    # The folder's served model, found through latest.json as the service finds it.
    assert (evaluated["checkpoint"], evaluated["run_id"]) == (str(out), latest.run_id)
    assert evaluated["precision"] in ("int8", "fp32")  # an ONNX export


# ---------------------------------------------------------------------------- the committed DVC files


def test_pipeline_stages_call_the_project_commands() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["prepare", "train", "evaluate"]
    prepare, train_stage, evaluate_stage = stages.values()
    assert prepare["cmd"].startswith("python -m training.data --data data/fer2013.zip ")
    assert train_stage["cmd"].startswith("python -m training.train --config configs/compact.yaml --data data/fer2013.zip ")
    assert evaluate_stage["cmd"].startswith("python -m training.evaluate --checkpoint runs/dvc ")
    # The order is in the dependencies: prepare -> train -> evaluate.
    assert "data/summary.json" in train_stage["deps"] and "runs/dvc" in evaluate_stage["deps"]
    assert train_stage["params"] == [{"configs/compact.yaml": None}]  # every key of the recipe
    assert evaluate_stage["metrics"] == [{"metrics/eval.json": {"cache": False}}]


def test_data_is_tracked_by_dvc_and_ignored_by_git() -> None:
    (out,) = yaml.safe_load((ROOT / "data" / "fer2013.zip.dvc").read_text())["outs"]
    assert out["path"] == "fer2013.zip" and out["hash"] == "md5"
    assert re.fullmatch(r"[0-9a-f]{32}", out["md5"]) and out["size"] > 10_000_000  # the real zip, 64 MB
    assert (ROOT / "data" / ".gitignore").read_text().splitlines() == ["/fer2013.zip"]
    config = (ROOT / ".dvc" / "config").read_text()
    assert re.search(r"^\s*remote = gcs$", config, re.M) and "url = gs://YOUR_BUCKET/dvc" in config


SHARED_ZIP = ROOT.parent / "shared" / "data" / "fer2013.zip"


@pytest.mark.skipif(not SHARED_ZIP.is_file(), reason="the development copy of FER2013 is not beside the checkout")
def test_dvc_file_describes_the_shared_development_zip() -> None:
    (out,) = yaml.safe_load((ROOT / "data" / "fer2013.zip.dvc").read_text())["outs"]
    md5 = hashlib.md5()
    with open(SHARED_ZIP, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
    assert (out["md5"], out["size"]) == (md5.hexdigest(), SHARED_ZIP.stat().st_size)


# ---------------------------------------------------------------------------- real DVC


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the dvc CLI in ``repo``; its stages find this interpreter as ``python``."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        # Keep DVC's per-user state out of the user's home and /var/tmp.
        "DVC_SITE_CACHE_DIR": str(repo.parent / "dvc-site-cache"),
        "DVC_GLOBAL_CONFIG_DIR": str(repo.parent / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(repo.parent / "dvc-system"),
    }
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_repo(tmp_path: Path, with_code: bool = False) -> Path:
    """A git repository with the project's DVC set-up (and, for repro, its code and configs)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    for name in [".dvcignore", "data/.gitignore", "data/fer2013.zip.dvc"]:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    if with_code:
        shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
        for name in ["configs", "fercore", "training"]:
            shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    return repo


@pytest.mark.slow
@needs_dvc
def test_committed_files_parse_and_name_the_gcs_remote(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    assert dvc(repo, "remote", "list").stdout.split()[:2] == ["gcs", "gs://YOUR_BUCKET/dvc"]
    assert dvc(repo, "remote", "default").stdout.strip() == "gcs"
    # data/fer2013.zip.dvc is read: its data is simply not here yet (`dvc pull` would get it).
    status = json.loads(dvc(repo, "status", "--json", "data/fer2013.zip.dvc").stdout)
    assert status == {"data/fer2013.zip.dvc": [{"changed outs": {"data/fer2013.zip": "not in cache"}}]}


@pytest.mark.slow
@needs_dvc
def test_push_then_pull_on_a_fresh_checkout_restores_the_data(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    zip_path = synthetic.write_zip(repo / "data" / "fer2013.zip", synthetic.default_splits(per_class=4))
    original = zip_path.read_bytes()
    dvc(repo, "add", "data/fer2013.zip")
    (out,) = yaml.safe_load((repo / "data" / "fer2013.zip.dvc").read_text())["outs"]
    assert out["size"] == len(original)
    # A developer's own remote, in the git-ignored .dvc/config.local: the committed config is untouched.
    remote = tmp_path / "remote"
    dvc(repo, "remote", "add", "--local", "--default", "local", str(remote))
    dvc(repo, "push")
    assert [p for p in remote.rglob("*") if p.is_file()], "nothing was pushed"

    # A new machine: no cache, no data, only what git has.
    shutil.rmtree(repo / ".dvc" / "cache")
    zip_path.unlink()
    assert "not in cache" in dvc(repo, "status").stdout
    dvc(repo, "pull")
    assert zip_path.read_bytes() == original
    assert "up to date" in dvc(repo, "status").stdout


@pytest.mark.slow
@needs_dvc
def test_repro_runs_prepare_train_evaluate(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, with_code=True)
    (repo / "configs" / "compact.yaml").write_text(yaml.safe_dump(TINY_RECIPE))
    synthetic.write_zip(repo / "data" / "fer2013.zip", synthetic.default_splits(per_class=12))
    dvc(repo, "add", "data/fer2013.zip")

    dvc(repo, "repro")
    summary = json.loads((repo / "data" / "summary.json").read_text())
    assert summary["splits"]["train"]["images"] == 84
    latest = storage.read_latest(repo / "runs" / "dvc")
    assert latest.run_id.endswith("-dvc-s0") and (repo / "runs" / "dvc" / latest.path).is_file()
    report = json.loads((repo / "metrics" / "eval.json").read_text())
    assert report["run_id"] == latest.run_id and report["split"] == "test" and report["num_samples"] == 28
    metrics = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    assert "accuracy" in json.dumps(metrics)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["configs/compact.yaml"]["epochs"] == 1

    # Nothing changed: nothing to run (the __pycache__ Python wrote is in .dvcignore).
    assert "up to date" in dvc(repo, "status").stdout
    # A recipe change re-runs training (and what follows), not the data preparation.
    (repo / "configs" / "compact.yaml").write_text(yaml.safe_dump({**TINY_RECIPE, "lr": 0.02}))
    status = json.loads(dvc(repo, "status", "--json").stdout)
    assert set(status) == {"train"} and status["train"] == [{"changed deps": {"configs/compact.yaml": {"lr": "modified"}}}]
