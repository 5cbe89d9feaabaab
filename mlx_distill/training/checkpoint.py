"""Adapter files, atomic checkpoints and resume state.

Layout of an adapter folder (upstream mlx-lm reads the first two unchanged)::

    adapter_config.json            fine_tune_type, num_layers, lora_parameters + our fields
    adapters.safetensors           the latest trained weights (replaced atomically)
    checkpoints/step-0000040/      adapters.safetensors, optimizer.safetensors, state.json
    metrics.jsonl                  (default --metrics-path)

A checkpoint is written into ``checkpoints/.tmp-step-N`` and then renamed to
``step-N``: a directory rename is atomic, so a ``step-*`` folder is always
complete and resume simply takes the highest one. Older ones are pruned after
the new one exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_distill.errors import ConfigError
from mlx_distill.files import (
    JsonlAppender,
    atomic_path,
    iter_jsonl,
    repair_torn_tail,
    write_json_atomic,
    write_jsonl_atomic,
)

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Files train owns in an adapter folder; --overwrite removes only these, so a
# mistaken --adapter-path (say, a project folder) never loses anything else.
OWNED = (ADAPTER_FILE, CONFIG_FILE, CHECKPOINTS, "metrics.jsonl", "metrics.discarded.jsonl")


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]


def save_safetensors_atomic(path: str | Path, arrays: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """``mx.save_safetensors`` via a temp file in the same folder, fsync, then rename."""
    import mlx.core as mx

    with atomic_path(path, suffix=".safetensors") as tmp:  # the suffix keeps MLX from adding one
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
    return Path(path)


def trainable_weights(model: Any) -> dict[str, Any]:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.trainable_parameters()))


def optimizer_arrays(optimizer: Any) -> dict[str, Any]:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(optimizer.state))


def list_checkpoints(adapter_path: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = Path(adapter_path) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / "state.json").is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def save_checkpoint(
    adapter_path: str | Path, step: int, model: Any, optimizer: Any, state: dict[str, Any], keep: int = 2
) -> Path:
    """Write ``checkpoints/step-N`` atomically, refresh ``adapters.safetensors``, prune old ones."""
    root = Path(adapter_path) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step-{step:07d}-"))
    try:
        weights = trainable_weights(model)
        save_safetensors_atomic(tmp / ADAPTER_FILE, weights)
        save_safetensors_atomic(tmp / "optimizer.safetensors", optimizer_arrays(optimizer))
        write_json_atomic(tmp / "state.json", {**state, "step": step})
        if final.exists():  # left by a run that crashed after this step; same trajectory
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    save_safetensors_atomic(Path(adapter_path) / ADAPTER_FILE, weights)
    for _, old in list_checkpoints(adapter_path)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(adapter_path: str | Path) -> Checkpoint | None:
    found = list_checkpoints(adapter_path)
    if not found:
        return None
    step, path = found[-1]
    return Checkpoint(path, step, json.loads((path / "state.json").read_text()))


def restore(checkpoint: Checkpoint, model: Any, optimizer: Any) -> None:
    """Load a checkpoint's weights into ``model`` and its state into ``optimizer`` (in place)."""
    import mlx.core as mx

    model.load_weights(str(checkpoint.path / ADAPTER_FILE), strict=False)
    optimizer.init(model.trainable_parameters())
    set_optimizer_leaves(optimizer, mx.load(str(checkpoint.path / "optimizer.safetensors")))
    mx.eval(model.parameters(), optimizer.state)


def set_optimizer_leaves(optimizer: Any, flat: dict[str, Any]) -> None:
    """Replace the optimizer's arrays by flattened name, keeping its tree as ``init`` built it.

    (Rebuilding it with ``tree_unflatten`` would lose the empty branches that
    mirror non-parameter model attributes, e.g. llama's ``layer_types``, and
    ``optimizer.update`` would then fail with a KeyError.) The top-level dict
    is updated in place, so a compiled step that captured it sees the change.
    """
    from mlx.utils import tree_map_with_path

    missing = [k for k in flat if k not in _leaf_names(optimizer.state)]
    if missing:
        raise ValueError(f"optimizer state has no {', '.join(missing[:3])}: the checkpoint is from another setup")
    optimizer.state.update(tree_map_with_path(lambda path, x: flat.get(path, x), optimizer.state))


def _leaf_names(tree: Any) -> set[str]:
    from mlx.utils import tree_flatten

    return {k for k, _ in tree_flatten(tree)}


def existing_outputs(adapter_path: str | Path, metrics_path: str | Path) -> list[str]:
    """Names of files a fresh run would replace (empty: safe to start)."""
    ap = Path(adapter_path)
    found = []
    if ap.is_dir():
        found = sorted(p.name for p in ap.iterdir() if not p.name.startswith("."))
    elif ap.exists():
        found = [str(ap)]
    mp = Path(metrics_path)
    if mp.is_file() and mp.stat().st_size > 0 and mp.parent.resolve() != ap.resolve():
        found.append(str(mp))
    return found


def clear_outputs(adapter_path: str | Path, metrics_path: str | Path) -> None:
    """For --overwrite: remove only the files train writes (never the whole folder)."""
    ap = Path(adapter_path)
    for name in OWNED:
        p = ap / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    Path(metrics_path).unlink(missing_ok=True)


def adapter_config(
    cfg: dict[str, Any], *, num_layers: int, lora_parameters: dict[str, Any] | None, extra: dict[str, Any]
) -> dict[str, Any]:
    """``adapter_config.json``: mlx-lm's keys first (what ``load_adapters``/``fuse`` read), then ours."""
    out: dict[str, Any] = {
        "fine_tune_type": cfg["fine_tune_type"],
        "num_layers": num_layers,
        "lora_parameters": lora_parameters,
    }
    out.update({k: v for k, v in cfg.items() if k not in out})
    out.update(extra)
    return out


def write_adapter_config(adapter_path: str | Path, config: dict[str, Any]) -> Path:
    return write_json_atomic(Path(adapter_path) / CONFIG_FILE, config)


def prepare_outputs(adapter: Path, metrics: Path, fingerprint: dict[str, Any], *, resume: bool,
                    overwrite: bool, echo: Callable[[str], None]) -> Checkpoint | None:
    """Rank 0: refuse to clobber, clear for --overwrite, or pick the checkpoint to resume."""
    existing = existing_outputs(adapter, metrics)
    if existing and not (resume or overwrite):
        last = latest_checkpoint(adapter)
        hint = f" (last checkpoint: step {last.step})" if last else ""
        raise ConfigError(
            f"--adapter-path {adapter} is not empty: {', '.join(existing[:6])}{hint}. Pass --resume to "
            "continue that run, --overwrite to start over, or choose another --adapter-path"
        )
    if overwrite:
        clear_outputs(adapter, metrics)
        return None
    if not resume:
        return None
    last = latest_checkpoint(adapter)
    if last is not None:
        saved = last.state.get("fingerprint", {})
        diff = [k for k in fingerprint if saved.get(k) != fingerprint[k]]
        if diff:
            got = ", ".join(f"{k}: {saved.get(k)!r} -> {fingerprint[k]!r}" for k in diff)
            raise ConfigError(f"--resume: the checkpoint at step {last.step} was trained with other settings "
                              f"({got}). Rerun with the same options, or pass --overwrite to start over")
    truncate_metrics(metrics, last.step if last else -1, echo)  # no checkpoint: every record goes
    if last is None:
        echo(f"--resume: no checkpoint in {adapter}; starting from step 0")
    return last


def truncate_metrics(metrics: Path, step: int, echo: Callable[[str], None]) -> None:
    """Resume: records after the checkpoint step move to metrics.discarded.jsonl (never lost)."""
    if not metrics.is_file():
        return
    repair_torn_tail(metrics)
    keep, drop = [], []
    for _, rec in iter_jsonl(metrics, what="metrics record"):
        (keep if int(rec.get("step", 0)) <= step else drop).append(rec)
    if drop:
        with JsonlAppender(metrics.with_name(metrics.stem + ".discarded.jsonl")) as out:
            for rec in drop:
                out.append({**rec, "discarded_on_resume_from": step})
        write_jsonl_atomic(metrics, keep)
        echo(f"--resume: {len(drop)} metrics records after step {step} moved to "
             f"{metrics.stem}.discarded.jsonl")
