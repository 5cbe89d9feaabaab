"""The LLM judge's part of ``mlx-distill compare``: which judge, reusing paid results, keeping old ones.

:func:`run_judge` makes the ``judge`` section of scores.json: it reuses the
results already in scores.json when the answers, judge model and repeats are
the same (their hash, :func:`judge_key`), and otherwise calls
``judge.judge_items`` (or a swapped-in ``judge_fn``). :func:`keep_paid_judge`
renames an older scores.json whose judged answers differ, so paid results
are never overwritten.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

from mlx_distill.errors import ConfigError
from mlx_distill.rubric import DIMENSION_KEYS
from mlx_distill.runs import RunDir

JudgeFn = Callable[[list[Any], Any], dict[str, Any]]


def judge_scores(cell: Any) -> dict[str, Any] | None:
    """A judge 'single' entry, if its scores are all numbers in 0..10 (else a miss)."""
    if not isinstance(cell, dict) or not isinstance(cell.get("scores"), dict):
        return None
    scores = cell["scores"]
    if not all(
        isinstance(scores.get(d), (int, float)) and 0 <= scores[d] <= 10 for d in DIMENSION_KEYS
    ):
        return None
    return {
        "scores": {d: float(scores[d]) for d in DIMENSION_KEYS},
        "std": cell.get("std") or {},
        "rationale": str(cell.get("rationale") or ""),
        "n": cell.get("n", 1),
    }


def judge_key(items: list[Any], model: str, repeats: int) -> str:
    blob = json.dumps(
        [model, repeats, [[i.id, i.prompt, sorted(i.answers.items())] for i in items]]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_judge_spec(judge: str | None) -> str | None:
    """The judge spec, or None for no judge; a ConfigError before any work for anything else."""
    spec = (judge or "none").strip()
    if spec.lower() in ("none", "off", ""):
        return None
    if not spec.startswith("anthropic:") or not spec.split(":", 1)[1]:
        raise ConfigError(
            f"--judge {spec!r}: expected anthropic:MODEL (e.g. anthropic:claude-opus-4-6) or none"
        )
    return spec


def run_judge(
    cfg: Any,
    items: list[Any],
    previous: dict[str, Any] | None,
    judge_fn: JudgeFn | None,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """The judge section of scores.json for ``cfg`` (a ``compare.CompareConfig``); one notice when it is skipped."""
    info: dict[str, Any] = {
        "used": False,
        "model": None,
        "notice": None,
        "repeats": cfg.repeats,
        "calls": 0,
        "misses": 0,
        "cost_usd": 0.0,
        "bias_note": None,
        "key": None,
        "result": None,
        "reused": False,
    }
    spec = check_judge_spec(cfg.judge)
    if spec is None:
        info["notice"] = "judge disabled with --judge none"
        echo(info["notice"] + "; the scorecard comes from execution and style metrics")
        return info
    if not items:
        info["notice"] = "no prompt has answers to judge"
        return info
    info["model"] = spec.split(":", 1)[1]
    info["key"] = key = judge_key(items, spec, cfg.repeats)
    old = (previous or {}).get("judge") or {}
    if old.get("key") == key and old.get("result") and not cfg.rejudge:
        echo(
            "judge: reusing the results in scores.json for these exact answers (--rejudge to call again)"
        )
        result = old["result"]
        info["reused"] = True
    else:
        if judge_fn is None:
            try:
                from mlx_distill import judge as judge_mod
            except ImportError as e:
                info["notice"] = f"judge skipped: the judge module is unavailable ({e})"
                echo(info["notice"])
                return info
            jcfg = judge_mod.JudgeConfig(model=spec, repeats=cfg.repeats)
            ok, reason = judge_mod.judge_available(jcfg)
            if not ok:
                info["notice"] = f"judge skipped: {reason}"
                echo(info["notice"])
                return info
            judge_fn = judge_mod.judge_items
        else:
            jcfg = SimpleNamespace(model=spec, repeats=cfg.repeats)
        echo(
            f"judge: {spec}, {len(items)} prompts x {cfg.repeats} repeat(s), both orders for base vs distilled"
        )
        result = judge_fn(items, jcfg)
    info.update(
        used=True,
        result=result,
        calls=result.get("calls", 0),
        misses=result.get("misses", 0),
        cost_usd=result.get("cost_usd", 0.0),
        bias_note=result.get("bias_note"),
        model=result.get("judge_model") or info["model"],
    )
    return info


def keep_paid_judge(rd: RunDir, previous: dict[str, Any] | None, judge: dict[str, Any]) -> None:
    """Before scores.json is replaced: keep a paid judge's results for other answers as ``scores.<UTC time>.json``."""
    old = (previous or {}).get("judge") or {}
    if old.get("result") and old.get("key") != judge.get("key"):
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        rd.scores.rename(rd.scores.with_name(f"scores.{stamp}.json"))
