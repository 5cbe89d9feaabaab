"""Aggregations for scores.json: averages and improvement, execution and pairwise tallies,
and summaries of the run's training metrics and teacher data."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from mlx_distill.files import iter_jsonl
from mlx_distill.rubric import DIMENSION_KEYS


def mean(xs: list[float]) -> float | None:
    return round(statistics.fmean(xs), 2) if xs else None


def training_summary(path: Path) -> dict[str, Any] | None:
    """First/last loss and accuracy, best accuracy and its epoch, from metrics.jsonl."""
    if not path.is_file():
        return None
    recs: dict[tuple[str, Any], dict[str, Any]] = {}
    for _, r in iter_jsonl(path, what="training metric"):
        if r.get("type") in ("train", "val"):
            recs[(r["type"], r.get("step"))] = r  # a resumed run rewrites steps: last wins
    train = sorted(
        (r for (t, _), r in recs.items() if t == "train"), key=lambda r: r.get("step") or 0
    )
    val = sorted((r for (t, _), r in recs.items() if t == "val"), key=lambda r: r.get("step") or 0)
    if not train and not val:
        return None

    def pick(r: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if r is None else {k: r.get(k) for k in ("step", "epoch", "loss", "acc")}

    best = None
    for split, rows in (("val", val), ("train", train)):
        with_acc = [r for r in rows if isinstance(r.get("acc"), (int, float))]
        if with_acc:
            b = max(with_acc, key=lambda r: r["acc"])
            best = {"acc": b["acc"], "epoch": b.get("epoch"), "step": b.get("step"), "split": split}
            break
    return {
        "first": pick(train[0] if train else None),
        "last": pick(train[-1] if train else None),
        "best_acc": best,
        "val_first": pick(val[0] if val else None),
        "val_last": pick(val[-1] if val else None),
        "train_records": len(train),
        "val_records": len(val),
    }


def data_summary(path: Path) -> dict[str, Any] | None:
    """How much teacher data the student saw (teacher_data.jsonl), for the report header."""
    if not path.is_file():
        return None
    rows = [r for _, r in iter_jsonl(path, what="teacher record")]
    resp = [len(r["response"]) for r in rows if isinstance(r.get("response"), str)]
    cost = sum(float(r.get("cost_usd") or 0) for r in rows)
    return {
        "examples": len(rows),
        "mean_response_chars": mean([float(x) for x in resp]),
        "cost_usd": round(cost, 4),
        "teacher_models": sorted({str(r.get("model")) for r in rows if r.get("model")}),
    }


def averages(
    prompts: list[dict[str, Any]], models: list[str], field: str
) -> dict[str, dict[str, Any]]:
    """Per model: the mean over prompts of each dimension, and the mean of those means."""
    out: dict[str, dict[str, Any]] = {}
    for m in models:
        row: dict[str, Any] = {}
        n = 0
        for dim in DIMENSION_KEYS:
            vals = []
            for p in prompts:
                cell = p["models"].get(m) or {}
                v = (cell.get(field) or {}).get(dim)
                if isinstance(v, (int, float)):
                    vals.append(float(v))
            row[dim] = mean(vals)
            n = max(n, len(vals))
        dims = [row[d] for d in DIMENSION_KEYS if row[d] is not None]
        row["average"] = mean(dims)
        row["n"] = n
        out[m] = row
    return out


def improvement(avgs: dict[str, dict[str, Any]]) -> dict[str, float | None] | None:
    if "base" not in avgs or "distilled" not in avgs:
        return None
    b, d = avgs["base"], avgs["distilled"]
    return {
        k: (round(d[k] - b[k], 2) if d.get(k) is not None and b.get(k) is not None else None)
        for k in (*DIMENSION_KEYS, "average")
    }


def exec_summary(prompts: list[dict[str, Any]], models: list[str]) -> dict[str, dict[str, int]]:
    out = {}
    for m in models:
        row = {k: 0 for k in ("pass", "fail", "error", "timeout", "skipped", "missing")}
        row.update(tests_passed=0, tests_total=0)
        for p in prompts:
            c = p["models"][m]
            if not c["available"]:
                row["missing"] += 1
                continue
            ex = c["execution"]
            row[ex["outcome"]] += 1
            row["tests_passed"] += ex.get("passed", 0)
            row["tests_total"] += ex.get("total", 0)
        out[m] = row
    return out


def pairwise_summary(prompts: list[dict[str, Any]]) -> dict[str, int]:
    out = {"distilled": 0, "base": 0, "tie": 0, "flipped": 0, "missing": 0}
    for p in prompts:
        pw = p.get("pairwise")
        if not isinstance(pw, dict) or pw.get("winner") not in ("distilled", "base", "tie"):
            out["missing"] += 1
            continue
        out[pw["winner"]] += 1
        out["flipped"] += bool(pw.get("flipped"))
    return out
