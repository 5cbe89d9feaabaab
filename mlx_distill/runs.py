"""Where things live: the cache home and the layout of a run folder.

``RunDir`` is the only place that knows the file names inside a run folder;
stages ask it for paths instead of joining strings themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def home() -> Path:
    """Cache root: ``$MLX_DISTILL_HOME``, else ``~/.cache/mlx-distill``."""
    env = os.environ.get("MLX_DISTILL_HOME")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "mlx-distill"
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass(frozen=True)
class RunDir:
    """The files of one pipeline run (``mlx-distill run`` / ``demo``)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # stage 1-2: prompts and teacher answers
    @property
    def prompts(self) -> Path:
        return self.root / "prompts.jsonl"

    @property
    def heldout(self) -> Path:
        """The held-out comparison prompts (never in training data)."""
        return self.root / "heldout.jsonl"

    @property
    def teacher_data(self) -> Path:
        return self.root / "teacher_data.jsonl"

    # stage 3: mlx-lm chat data (train/valid/test.jsonl)
    @property
    def data(self) -> Path:
        return self.root / "data"

    # stage 4: training
    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    # stage 5-6: generations and comparison
    @property
    def generations(self) -> Path:
        return self.root / "generations"

    def generation(self, model_label: str) -> Path:
        """``generations/{teacher,base,distilled}.jsonl``."""
        return self.generations / f"{model_label}.jsonl"

    @property
    def scores(self) -> Path:
        return self.root / "scores.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    # stage 7-8
    @property
    def visuals(self) -> Path:
        return self.root / "visuals"

    @property
    def export(self) -> Path:
        return self.root / "export"

    # bookkeeping: each stage's resolved config and completion stamp
    @property
    def configs(self) -> Path:
        return self.root / "configs"

    def stage_config(self, stage: str) -> Path:
        return self.configs / f"{stage}.json"

    @property
    def state(self) -> Path:
        return self.root / "run_state.json"
