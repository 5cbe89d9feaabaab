"""A run config (``mlx-distill run --config``): its top-level options, stage sections and fingerprints.

:func:`load_run_config` reads the YAML and checks every stage section
against that stage's config class before anything runs; :func:`fingerprint`
hashes a stage's resolved config and input files (``run_state.json``), so an
unchanged stage is skipped and a changed one runs again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlx_distill.config import load_yaml, opt, resolve
from mlx_distill.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("collect", "prepare", "train", "generate", "compare", "export")


@dataclass
class RunConfig:
    """Top-level options of a run config (stage options live in sections named after the stage)."""

    student: str = opt("demo", "Student: demo, a .gguf file, an mlx-lm directory or a hub id.")
    teacher: str = opt("demo", "Teacher: anthropic:MODEL, local:PATH or demo (offline).")
    judge: str = opt("none", "LLM judge for the comparison: anthropic:MODEL, or none (metrics scorecard).")
    prompts: list[str] = opt(["prompts/base.jsonl", "prompts/expanded.jsonl"], "Training prompt files.")
    heldout: str = opt("prompts/heldout.jsonl", "Held-out comparison prompts with tests (never trained on).")
    limit: int | None = opt(None, "Use only N training prompts, spread evenly over the files' categories.")
    expand_per_prompt: int = opt(0, "Ask the teacher for N variants of each prompt of the first file.")
    export: bool = opt(True, "Run the export stage (false skips it; a mapping configures it).")
    sections: dict[str, Any] = field(default_factory=dict, metadata={"help": "Stage sections.", "cli": False})


def _file_hash(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(config: Any, inputs: list[Path]) -> str:
    data = {"config": asdict(config) if hasattr(config, "__dataclass_fields__") else config,
            "inputs": {f"{p.parent.name}/{p.name}": _file_hash(p) for p in inputs}}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def repo_path(p: str) -> Path:
    """Relative prompt paths resolve against the cwd, then the checkout (so `demo` works anywhere)."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO / p if (REPO / p).exists() else path


def spread(rows: list[Any], limit: int | None) -> list[Any]:
    """The first ``limit`` prompts taken round-robin over categories, so a subset stays varied."""
    if not limit or limit >= len(rows):
        return rows
    by_cat: dict[str, list[Any]] = {}
    for p in rows:
        by_cat.setdefault(p.category or p.language or "other", []).append(p)
    out: list[Any] = []
    while len(out) < limit:
        for cat in list(by_cat):
            if by_cat[cat] and len(out) < limit:
                out.append(by_cat[cat].pop(0))
    return out


def load_run_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Top-level keys -> RunConfig; stage sections are kept raw and resolved per stage."""
    data = load_yaml(path) if path else {}
    # `export: false` skips the stage; `export: {...}` configures it.
    sections = {k: v for k, v in data.items() if k in SECTIONS and not (k == "export" and isinstance(v, bool))}
    bad = [k for k, v in sections.items() if not isinstance(v, dict)]
    if bad:
        raise ConfigError(f"{path}: section {bad[0]!r} must be a mapping of option: value")
    top = {k: v for k, v in data.items() if k not in sections}
    cfg = resolve(RunConfig, overrides or {}, top)
    cfg.sections = sections
    # Validate every section now, before any stage runs (unknown keys, wrong types).
    from mlx_distill.collect import CollectConfig
    from mlx_distill.compare import CompareConfig
    from mlx_distill.dataset import PrepareConfig
    from mlx_distill.export import ExportConfig
    from mlx_distill.generate import GenerateConfig
    from mlx_distill.train import TrainConfig

    classes = {"collect": CollectConfig, "prepare": PrepareConfig, "train": TrainConfig,
               "generate": GenerateConfig, "compare": CompareConfig, "export": ExportConfig}
    for name, sec in sections.items():
        resolve(classes[name], {}, {name: sec}, section=name)
    return cfg
