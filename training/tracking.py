"""Experiment tracking with Weights & Biases, when asked for (``--wandb``) and installed.

``WANDB_MODE=offline`` is honoured by wandb itself. Without wandb nothing breaks: the run's
own metrics.json and curves are always written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from training.config import TrainConfig

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, cfg: TrainConfig, run_id: str, work_dir: Path) -> None:
        self._run: Any = None
        if not cfg.wandb:
            return
        try:
            import wandb
        except ImportError:
            log.warning("--wandb given but wandb is not installed (pip install wandb); not tracking")
            return
        self._run = wandb.init(
            project=cfg.wandb_project, name=run_id, id=run_id, resume="allow", config=cfg.to_dict(), dir=str(work_dir)
        )

    def log(self, row: dict[str, float]) -> None:
        if self._run is not None:
            self._run.log(row, step=int(row["epoch"]))

    def finish(self, summary: dict[str, Any]) -> None:
        if self._run is not None:
            for k, v in summary.items():
                if isinstance(v, int | float | str):
                    self._run.summary[k] = v
            self._run.finish()
