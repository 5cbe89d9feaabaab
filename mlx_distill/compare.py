"""``mlx-distill compare``: score teacher, base and distilled answers; write scores.json and report.html.

Reads from the run folder (:class:`~mlx_distill.runs.RunDir`): ``heldout.jsonl``
(prompts with tests), ``generations/{teacher,base,distilled}.jsonl`` (records
with at least ``id`` and ``response``; ``stop_reason`` and token counts used when
present), and, optionally, ``metrics.jsonl`` and ``teacher_data.jsonl``.
Every answer is executed in the sandbox and measured (:mod:`mlx_distill.evaluate`);
the LLM judge (:mod:`mlx_distill.judge`) adds its scores when it is available.

``scores.json`` (schema 1)::

    {"schema": 1, "created_at": str, "run": str,
     "scorecard_source": "judge" | "metrics",   # what "averages" and cell "scores" are
     "models": ["teacher", "base", "distilled"],           # those with generations
     "dimensions": [{"key": "correctness", "label": "Code Correctness"}, ...],
     "judge": {"used": bool, "model": str|null, "notice": str|null, "repeats": int,
               "calls": int, "misses": int, "cost_usd": float, "bias_note": str|null,
               "key": str|null, "reused": bool, "result": {...judge_items() result...}|null},
     "prompts": [{"id", "prompt", "category", "language",
                  "models": {"base": {"available": bool, "response", "stop_reason", "completion_tokens",
                                      "execution": {"outcome": "pass"|"fail"|"error"|"timeout"|"skipped",
                                                    "passed", "total", "pass_fraction", "message",
                                                    "tests": [...], "stderr_tail", "extraction",
                                                    "containment", ...},
                                      "style": {"text": {...}, "code": {...}},
                                      "metric_scores": {dim: float|null},
                                      "judge": {"scores", "std", "rationale", "n"} | null,
                                      "scores": {dim: float|null},   # headline source
                                      "average": float|null},
                             "teacher": {...}, "distilled": {...}},
                  "pairwise": {"winner", "flipped", "votes"} | null}],
     "averages": {model: {dim: float|null, "average": float|null, "n": int}},   # headline
     "improvement": {dim: distilled - base, "average": ...},                    # headline
     "metric_averages": {...}, "metric_improvement": {...},
     "judge_averages": {...} | null, "judge_improvement": {...} | null,
     "execution_summary": {model: {"pass": n, "fail": n, "error": n, "timeout": n, "skipped": n,
                                   "missing": n, "tests_passed": n, "tests_total": n}},
     "pairwise_summary": {"distilled": n, "base": n, "tie": n, "flipped": n, "missing": n} | null,
     "training": {"first": {"step", "epoch", "loss", "acc"}, "last": {...},
                  "best_acc": {"acc", "epoch", "step", "split"}, "val_first", "val_last",
                  "train_records", "val_records"} | null,
     "data": {"examples", "mean_response_chars", "cost_usd", "teacher_models"} | null}

Averages are means over the prompts that have a score (``n`` says how many: a
judge miss or SQL's unmeasurable error handling is left out, not counted as 0);
``average`` is the mean of the five dimension means, as in the reference table
(9.5, 9.5, 9.0, 9.0, 8.5 -> 9.1). The charts stage reads ``averages``
(model_scorecard.png) and, per prompt, ``models.{base,distilled}.average`` and
``.execution.outcome`` (prompt_comparison.png). After drawing charts,
``mlx-distill compare --run R --report-only`` (or :func:`mlx_distill.report.write_report`)
re-renders report.html with them embedded.

Paid judge results are never thrown away: a rerun whose answers, judge and
repeats are unchanged reuses ``judge.result`` from the existing scores.json
(``--rejudge`` to call again); when they changed, the old file is kept as
``scores.<UTC time>.json`` first. Metrics-only files are recomputed in place.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

from mlx_distill.compare_judge import JudgeFn, check_judge_spec, judge_scores, keep_paid_judge, run_judge
from mlx_distill.config import click_options, opt, resolve, save_config
from mlx_distill.errors import ConfigError, DataError, cli_errors
from mlx_distill.evaluate.summaries import (
    averages,
    data_summary,
    exec_summary,
    improvement,
    mean,
    pairwise_summary,
    training_summary,
)
from mlx_distill.files import iter_jsonl, write_json_atomic, write_text_atomic
from mlx_distill.rubric import DIMENSION_KEYS, DIMENSIONS, MODELS
from mlx_distill.runs import RunDir


@dataclass
class CompareConfig:
    run: str | None = opt(None, "Run folder with heldout.jsonl and generations/.")
    judge: str = opt(
        "anthropic:claude-opus-4-6",
        "LLM judge: anthropic:MODEL, or none for the metrics scorecard.",
    )
    repeats: int = opt(1, "Judge gradings per answer (mean and spread).")
    heldout: str | None = opt(None, "Held-out prompts with tests [default: RUN/heldout.jsonl].")
    timeout_s: float = opt(20.0, "Wall-time limit per sandboxed answer (seconds).")
    memory_mb: int = opt(1024, "Address-space limit per sandboxed answer (MB).")
    jobs: int = opt(2, "Answers executed in parallel.")
    rejudge: bool = opt(
        False, "Call the judge even when scores.json has results for these exact answers."
    )
    report: bool = opt(True, "Also write report.html.")
    report_only: bool = opt(
        False, "Only re-render report.html from scores.json (e.g. after `mlx-distill visuals`)."
    )


def load_generations(path: Path, heldout_ids: set[str]) -> tuple[dict[str, dict[str, Any]], int]:
    """``{id: record}`` of one model's generations; also how many ids were not held out."""
    out: dict[str, dict[str, Any]] = {}
    lines: dict[str, int] = {}
    other = 0
    for lineno, rec in iter_jsonl(path, what='generation: {"id": ..., "response": ...}'):
        rid = rec.get("id")
        if rid is None or not isinstance(rec.get("response"), str):
            raise DataError(
                "a generation record needs 'id' and a string 'response'",
                path,
                lineno,
                fix="regenerate with `mlx-distill generate`, or fix the record",
            )
        rid = str(rid)
        if rid in lines:
            raise DataError(
                f"duplicate id {rid!r} (first on line {lines[rid]})",
                path,
                lineno,
                fix="keep one answer per prompt id",
            )
        lines[rid] = lineno
        if rid in heldout_ids:
            out[rid] = rec
        else:
            other += 1
    return out, other


def _cell(p: Any, rec: dict[str, Any] | None, limits: Any) -> dict[str, Any]:
    from mlx_distill.evaluate import evaluate_answer

    if rec is None:
        return {"available": False}
    ev = evaluate_answer(rec["response"], p.language, p.tests, rec.get("stop_reason"), limits)
    return {
        "available": True,
        "response": rec["response"],
        "stop_reason": rec.get("stop_reason"),
        "completion_tokens": rec.get("completion_tokens"),
        "prompt_tokens": rec.get("prompt_tokens"),
        **ev,
    }


def compare_run(
    run_dir: str | Path,
    cfg: CompareConfig,
    *,
    judge_fn: JudgeFn | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Execute, measure and (optionally) judge every answer; write scores.json (+ report.html)."""
    from mlx_distill.evaluate import SandboxLimits
    from mlx_distill.evaluate.execution import validate_tests
    from mlx_distill.prompts import load_prompts

    rd = RunDir(Path(run_dir))
    check_judge_spec(cfg.judge)
    if not rd.root.is_dir():
        raise ConfigError(
            f"--run {rd.root}: no such folder; pass the run folder that holds generations/"
        )
    if cfg.repeats < 1 or cfg.jobs < 1:
        raise ConfigError(f"--repeats and --jobs must be >= 1, got {cfg.repeats} and {cfg.jobs}")
    heldout_path = Path(cfg.heldout) if cfg.heldout else rd.heldout
    if not heldout_path.is_file():
        raise ConfigError(
            f"{heldout_path}: the held-out prompts are missing; copy prompts/heldout.jsonl "
            "there or pass --heldout FILE"
        )
    prompts = load_prompts(heldout_path)
    for lineno, obj in iter_jsonl(heldout_path):
        if obj.get("tests") is not None:
            validate_tests(obj["tests"], heldout_path, lineno)
    ids = {p.id for p in prompts}
    gens: dict[str, dict[str, dict[str, Any]]] = {}
    for m in MODELS:
        path = rd.generation(m)
        if path.is_file():
            gens[m], other = load_generations(path, ids)
            if other:
                echo(f"{path}: {other} record(s) for prompts not in {heldout_path.name} ignored")
    if not gens:
        raise ConfigError(
            f"{rd.generations}: no generations found; expected "
            + ", ".join(f"{m}.jsonl" for m in MODELS)
            + " (run `mlx-distill generate`)"
        )
    models = [m for m in MODELS if m in gens]
    limits = SandboxLimits(
        timeout_s=cfg.timeout_s, cpu_s=max(1, int(cfg.timeout_s)), memory_mb=cfg.memory_mb
    )
    jobs = [(p, m) for p in prompts for m in models]
    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
        cells = list(pool.map(lambda pm: _cell(pm[0], gens[pm[1]].get(pm[0].id), limits), jobs))
    table: dict[str, dict[str, Any]] = {p.id: {} for p in prompts}
    for (p, m), c in zip(jobs, cells):
        table[p.id][m] = c
    previous = None
    if rd.scores.is_file():
        try:
            previous = json.loads(rd.scores.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
    items = [
        SimpleNamespace(
            id=p.id,
            prompt=p.prompt,
            answers={m: table[p.id][m]["response"] for m in models if table[p.id][m]["available"]},
        )
        for p in prompts
    ]
    items = [i for i in items if i.answers]
    try:
        from mlx_distill.judge import JudgeItem

        items = [JudgeItem(id=i.id, prompt=i.prompt, answers=i.answers) for i in items]
    except ImportError:
        pass
    judge = run_judge(cfg, items, previous, judge_fn, echo)
    jprompts = ((judge.get("result") or {}).get("prompts") or {}) if judge["used"] else {}
    out_prompts = []
    for p in prompts:
        jp = jprompts.get(p.id) or {}
        entry = {
            "id": p.id,
            "prompt": p.prompt,
            "category": p.category,
            "language": p.language,
            "models": {},
            "pairwise": jp.get("pairwise") if judge["used"] else None,
        }
        for m in models:
            c = table[p.id][m]
            if c["available"]:
                c["judge"] = (
                    judge_scores((jp.get("single") or {}).get(m)) if judge["used"] else None
                )
            entry["models"][m] = c
        out_prompts.append(entry)
    source = (
        "judge"
        if any(c.get("judge") for e in out_prompts for c in e["models"].values())
        else "metrics"
    )
    for e in out_prompts:
        for c in e["models"].values():
            if c["available"]:
                c["scores"] = (
                    (c["judge"] or {}).get("scores") if source == "judge" else c["metric_scores"]
                )
                vals = [v for v in (c["scores"] or {}).values() if v is not None]
                c["average"] = mean(vals)
    if judge["used"] and source == "metrics":
        judge["notice"] = f"the judge returned no valid grade ({judge['misses']} misses)"
        echo(judge["notice"] + "; the scorecard comes from execution and style metrics")
    metric_avg = averages(out_prompts, models, "metric_scores")
    judge_avg = averages(out_prompts, models, "scores") if source == "judge" else None
    head = judge_avg if judge_avg is not None else metric_avg
    scores: dict[str, Any] = {
        "schema": 1,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": str(rd.root),
        "scorecard_source": source,
        "models": models,
        "dimensions": [{"key": k, "label": label} for k, label in DIMENSIONS],
        "judge": judge,
        "prompts": out_prompts,
        "averages": head,
        "improvement": improvement(head),
        "metric_averages": metric_avg,
        "metric_improvement": improvement(metric_avg),
        "judge_averages": judge_avg,
        "judge_improvement": improvement(judge_avg) if judge_avg else None,
        "execution_summary": exec_summary(out_prompts, models),
        "pairwise_summary": pairwise_summary(out_prompts) if judge["used"] else None,
        "training": _optional(training_summary, rd.metrics, echo),
        "data": _optional(data_summary, rd.teacher_data, echo),
    }
    keep_paid_judge(rd, previous, judge)
    write_json_atomic(rd.scores, scores)
    save_config(cfg, rd.stage_config("compare"))
    if cfg.report:
        from mlx_distill.report import render_report

        write_text_atomic(rd.report, render_report(scores, rd))
    return scores


def _optional(fn: Callable[[Path], Any], path: Path, echo: Callable[[str], None]) -> Any:
    try:
        return fn(path)
    except DataError as e:  # e.g. a torn last line from a killed training run
        echo(f"skipping {path.name}: {e}")
        return {"error": str(e)}


@click.command("compare")
@click_options(CompareConfig)
@click.option("--config", "config_file", type=click.Path(), help="YAML file with these options.")
@cli_errors
def cli(config_file: str | None, **kwargs: Any) -> None:
    """Execute, measure and judge teacher/base/distilled answers; write scores.json and report.html."""
    cfg = resolve(CompareConfig, kwargs, config_file, section="compare")
    if not cfg.run:
        raise ConfigError(
            "--run DIR is required (the run folder with heldout.jsonl and generations/)"
        )
    rd = RunDir(Path(cfg.run))
    if cfg.report_only:
        from mlx_distill.report import write_report

        click.echo(str(write_report(rd.root)))
        return
    scores = compare_run(cfg.run, cfg, echo=lambda s: click.echo(s, err=True))
    click.echo(_summary_table(scores), err=True)
    click.echo(str(rd.scores))
    if cfg.report:
        click.echo(str(rd.report))


def _summary_table(scores: dict[str, Any]) -> str:
    models = scores["models"]
    head = (
        f"{'Dimension':<20}"
        + "".join(f"{m:>12}" for m in models)
        + (f"{'Improvement':>13}" if scores.get("improvement") else "")
    )
    lines = [f"scorecard from {scores['scorecard_source']}", head]
    labels = dict(DIMENSIONS) | {"average": "Average"}
    for k in (*DIMENSION_KEYS, "average"):
        row = f"{labels[k]:<20}"
        for m in models:
            v = scores["averages"][m].get(k)
            row += f"{'n/a' if v is None else f'{v:.1f}':>12}"
        imp = (scores.get("improvement") or {}).get(k)
        if scores.get("improvement"):
            row += f"{'n/a' if imp is None else f'{imp:+.1f}':>13}"
        lines.append(row)
    ex = scores["execution_summary"]
    lines.append(
        "tests: " + ", ".join(f"{m} {ex[m]['tests_passed']}/{ex[m]['tests_total']}" for m in models)
    )
    return "\n".join(lines)


if __name__ == "__main__":
    cli()
