"""The reference run's charts, drawn from a run folder's real artifacts (never constants).

``python -m mlx_distill.visuals RUN_DIR`` (or ``mlx-distill visuals RUN_DIR``) writes
into ``RUN_DIR/visuals/``:

* ``training_curves.png``  train/val loss and token accuracy per step, epochs marked
  (plus CE and KL when the run used the KD loss) — from ``metrics.jsonl``;
* ``model_scorecard.png``  grouped bars per dimension for teacher/base/distilled
  with the averages — from ``scores.json`` (judge scores, or the metric proxy
  scores when there was no judge, which the chart says);
* ``prompt_comparison.png`` per-prompt scores base vs distilled, with execution
  pass/fail — from ``scores.json``;
* ``cost_scaling.png``    estimated cost vs number of prompts, sync vs batch, at the
  reference run's scales — from the mean tokens per prompt measured in
  ``teacher_data.jsonl`` and the price table;
* ``pipeline.mmd``         a mermaid flowchart carrying the run's real numbers.

Each ``draw_*`` function returns the data it plotted, so tests can check that
the charts follow the artifacts.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mlx_distill.errors import cli_errors
from mlx_distill.files import read_jsonl, write_text_atomic
from mlx_distill.rubric import DIMENSIONS, MODEL_LABELS, MODELS
from mlx_distill.runs import RunDir

# The reference run's palette (dark background; yellow/cyan/red per pipeline step).
BG, PANEL, FG, GRID = "#1a1a2e", "#16213e", "#e0e0e0", "#2e3a5c"
COLORS = {"teacher": "#ffd93d", "base": "#ff6b6b", "distilled": "#00d4ff", "val": "#9bff8a"}


def _style() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "figure.facecolor": BG, "axes.facecolor": PANEL, "axes.edgecolor": GRID,
        "axes.labelcolor": FG, "text.color": FG, "xtick.color": FG, "ytick.color": FG,
        "grid.color": GRID, "axes.grid": True, "grid.alpha": 0.6, "font.size": 10,
        "legend.facecolor": PANEL, "legend.edgecolor": GRID, "savefig.facecolor": BG,
    })
    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---------------------------------------------------------------- training curves


def training_series(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step series from metrics.jsonl rows (``type`` train/val)."""
    train = [r for r in rows if r.get("type") == "train"]
    val = [r for r in rows if r.get("type") == "val"]
    out: dict[str, Any] = {
        "train_step": [r["step"] for r in train], "train_loss": [r["loss"] for r in train],
        "train_acc": [r.get("acc") for r in train],
        "val_step": [r["step"] for r in val], "val_loss": [r["loss"] for r in val],
        "val_acc": [r.get("acc") for r in val],
    }
    for key in ("ce", "kl"):
        if any(key in r for r in train):
            out[f"train_{key}"] = [r.get(key) for r in train]
    # Epoch boundaries: the first step whose epoch reaches each whole number.
    bounds, nxt = [], 1
    for r in train:
        while r.get("epoch", 0) >= nxt:
            bounds.append((nxt, r["step"]))
            nxt += 1
    out["epochs"] = bounds
    return out


def draw_training_curves(rows: list[dict[str, Any]], path: Path) -> dict[str, Any]:
    s = training_series(rows)
    if not s["train_step"]:
        raise ValueError("metrics.jsonl has no training steps")
    plt = _style()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax_l.plot(s["train_step"], s["train_loss"], color=COLORS["distilled"], lw=1.6, label="train loss")
    if s["val_step"]:
        ax_l.plot(s["val_step"], s["val_loss"], "o-", color=COLORS["val"], lw=1.6, label="validation loss")
    for key, color in (("train_ce", COLORS["teacher"]), ("train_kl", COLORS["base"])):
        if key in s:
            ax_l.plot(s["train_step"], s[key], "--", color=color, lw=1.2, label=key.replace("train_", "").upper())
    ax_l.set(title="Loss", xlabel="step", ylabel="loss")
    accs = [(st, a) for st, a in zip(s["train_step"], s["train_acc"]) if a is not None]
    if accs:
        ax_a.plot([a[0] for a in accs], [100 * a[1] for a in accs], color=COLORS["distilled"], lw=1.6, label="train")
    vaccs = [(st, a) for st, a in zip(s["val_step"], s["val_acc"]) if a is not None]
    if vaccs:
        ax_a.plot([a[0] for a in vaccs], [100 * a[1] for a in vaccs], "o-", color=COLORS["val"], lw=1.6, label="validation")
    ax_a.set(title="Token accuracy (top-1 = teacher's next token)", xlabel="step", ylabel="accuracy (%)")
    for ax in (ax_l, ax_a):
        for epoch, step in s["epochs"]:
            ax.axvline(step, color=FG, alpha=0.25, lw=1, ls=":")
            ax.text(step, 1.0, f" ep {epoch}", transform=ax.get_xaxis_transform(), va="top", fontsize=8, alpha=0.7)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("Distillation training (LoRA on MLX)", color=FG)
    _save(fig, path)
    return s


# ---------------------------------------------------------------- scorecard


def scorecard_data(scores: dict[str, Any]) -> dict[str, Any]:
    avgs = scores.get("averages") or {}
    models = [m for m in MODELS if m in avgs]
    return {
        "source": scores.get("scorecard_source", "metrics"),
        "models": models,
        "dimensions": [label for _, label in DIMENSIONS],
        "values": {m: [avgs[m].get(k) for k, _ in DIMENSIONS] for m in models},
        "averages": {m: avgs[m].get("average") for m in models},
    }


def draw_scorecard(scores: dict[str, Any], path: Path) -> dict[str, Any]:
    import numpy as np

    d = scorecard_data(scores)
    plt = _style()
    fig, ax = plt.subplots(figsize=(12, 4.8))
    dims = d["dimensions"] + ["Average"]
    x = np.arange(len(dims))
    width = 0.8 / max(1, len(d["models"]))
    for i, m in enumerate(d["models"]):
        vals = [v if v is not None else 0.0 for v in d["values"][m]] + [d["averages"][m] or 0.0]
        bars = ax.bar(x + (i - (len(d["models"]) - 1) / 2) * width, vals, width, color=COLORS[m],
                      label=f"{MODEL_LABELS[m]} (avg {d['averages'][m] or 0:.1f})", edgecolor=BG)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.1, f"{v:.1f}", ha="center", fontsize=7)
    ax.set_xticks(x, dims)
    ax.set_ylim(0, 10.8)
    ax.set_ylabel("score (0-10)")
    title = "Quality scorecard: LLM judge" if d["source"] == "judge" else (
        "Quality scorecard: metric proxy scores (no LLM judge: from execution tests and style metrics)")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)
    return d


# ---------------------------------------------------------------- per prompt


def prompt_data(scores: dict[str, Any]) -> dict[str, Any]:
    ids, base, dist, outcomes = [], [], [], []
    for p in scores.get("prompts", []):
        ms = p.get("models", {})
        ids.append(p["id"])
        base.append((ms.get("base") or {}).get("average"))
        dist.append((ms.get("distilled") or {}).get("average"))
        outcomes.append({m: ((ms.get(m) or {}).get("execution") or {}).get("outcome") for m in ("base", "distilled")})
    return {"ids": ids, "base": base, "distilled": dist, "outcomes": outcomes,
            "source": scores.get("scorecard_source", "metrics")}


def draw_prompt_comparison(scores: dict[str, Any], path: Path) -> dict[str, Any]:
    import numpy as np

    d = prompt_data(scores)
    plt = _style()
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(d["ids"]) + 2), 4.6))
    x = np.arange(len(d["ids"]))
    marks = {"pass": "PASS", "fail": "FAIL", "error": "ERROR", "timeout": "TIMEOUT"}
    for off, m in ((-0.2, "base"), (0.2, "distilled")):
        vals = [v if v is not None else 0.0 for v in d[m]]
        bars = ax.bar(x + off, vals, 0.38, color=COLORS[m], label=MODEL_LABELS[m], edgecolor=BG)
        for b, v, o in zip(bars, vals, d["outcomes"]):
            tag = marks.get(o[m] or "", "no tests")
            color = "#9bff8a" if o[m] == "pass" else "#ff9b9b"
            ax.text(b.get_x() + b.get_width() / 2, v + 0.15, f"{v:.1f}\n{tag}", ha="center", fontsize=7, color=color)
    ax.set_xticks(x, [i if len(i) <= 22 else i[:20] + "…" for i in d["ids"]], rotation=0, fontsize=8)
    ax.set_ylim(0, 11.5)
    ax.set_ylabel("average score (0-10)")
    src = "LLM judge" if d["source"] == "judge" else "metric proxy scores"
    ax.set_title(f"Per-prompt comparison: base vs distilled ({src}; execution tests below scores)")
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)
    return d


# ---------------------------------------------------------------- cost


def token_means(records: list[dict[str, Any]]) -> tuple[float, float, int]:
    """Mean (input, output) tokens per prompt from teacher_data usage, and the record count."""
    ins, outs = [], []
    for r in records:
        u = r.get("usage") or {}
        if u.get("output_tokens") is not None:
            ins.append((u.get("input_tokens") or 0) + (u.get("cache_creation_input_tokens") or 0)
                       + (u.get("cache_read_input_tokens") or 0))
            outs.append(u["output_tokens"])
    if not outs:
        raise ValueError("teacher_data.jsonl has no usage to measure tokens per prompt from")
    return statistics.fmean(ins), statistics.fmean(outs), len(outs)


def draw_cost_scaling(records: list[dict[str, Any]], path: Path, model: str | None = None) -> dict[str, Any]:
    from mlx_distill.pricing import REFERENCE_MODEL, SCALES, PriceTable, cost_at_scale

    mean_in, mean_out, n = token_means(records)
    teacher = model or next((r.get("model") for r in records if str(r.get("model", "")).startswith("claude")), None)
    priced_as = teacher or REFERENCE_MODEL
    rows = cost_at_scale(mean_in, mean_out, priced_as, SCALES, PriceTable())
    plt = _style()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    xs = [r["prompts"] for r in rows]
    ax.plot(xs, [r["sync_usd"] for r in rows], "o-", color=COLORS["base"], lw=2, label="synchronous API")
    ax.plot(xs, [r["batch_usd"] for r in rows], "s--", color=COLORS["distilled"], lw=2, label="Message Batches (-50%)")
    for r in rows:
        ax.annotate(f"{r['label']}\n${r['sync_usd']:,.2f}", (r["prompts"], r["sync_usd"]),
                    textcoords="offset points", xytext=(0, 10), ha="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(xs[0] / 3, xs[-1] * 4)
    ax.set_ylim(min(r["batch_usd"] for r in rows) / 3, max(r["sync_usd"] for r in rows) * 12)
    ax.set_xlabel("prompts collected")
    ax.set_ylabel("estimated cost (USD, log scale)")
    note = "" if teacher else f" (local teacher: priced as if {priced_as} wrote the same tokens)"
    ax.set_title(f"Cost at scale: {mean_in:.0f} in + {mean_out:.0f} out tokens per prompt, "
                 f"measured on {n} prompts{note}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)
    return {"mean_input_tokens": mean_in, "mean_output_tokens": mean_out, "priced_as": priced_as, "rows": rows}


# ---------------------------------------------------------------- pipeline.mmd


def pipeline_mermaid(facts: dict[str, Any]) -> str:
    """The reference run's three-step flowchart, with this run's numbers."""
    def f(key: str, default: str = "?") -> str:
        v = facts.get(key)
        return default if v in (None, "") else str(v)

    return f"""flowchart LR
    subgraph step1["Step 1: Collect"]
        P["{f('prompts')} Coding\\nPrompts"] --> API["Teacher\\n({f('teacher')})"]
        API --> D["teacher_data.jsonl\\n{f('cost')}, {f('collect_time')}"]
    end

    subgraph step2["Step 2: Fine-tune"]
        D --> LORA["{f('method', 'LoRA')} Training\\n{f('epochs')} epochs, {f('train_time')}"]
        BASE["{f('student')}\\n(base)"] --> LORA
        LORA --> DIST["Distilled\\nStudent"]
    end

    subgraph step3["Step 3: Compare"]
        TEACHER["Teacher\\n({f('teacher')})"] --> CMP["Side-by-Side\\nComparison\\n{f('scorecard')}"]
        BASE2["Base\\nStudent"] --> CMP
        DIST --> CMP
    end

    style step1 fill:#1a1a2e,stroke:#ffd93d,color:#e0e0e0
    style step2 fill:#1a1a2e,stroke:#00d4ff,color:#e0e0e0
    style step3 fill:#1a1a2e,stroke:#ff6b6b,color:#e0e0e0
    style P fill:#16213e,stroke:#ffd93d,color:#e0e0e0
    style API fill:#16213e,stroke:#ffd93d,color:#e0e0e0
    style D fill:#16213e,stroke:#ffd93d,color:#e0e0e0
    style LORA fill:#16213e,stroke:#00d4ff,color:#e0e0e0
    style BASE fill:#16213e,stroke:#00d4ff,color:#e0e0e0
    style DIST fill:#16213e,stroke:#00d4ff,color:#e0e0e0
    style TEACHER fill:#16213e,stroke:#ff6b6b,color:#e0e0e0
    style BASE2 fill:#16213e,stroke:#ff6b6b,color:#e0e0e0
    style CMP fill:#16213e,stroke:#ff6b6b,color:#e0e0e0
"""


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    m, s = divmod(int(round(seconds)), 60)
    return f"~{m}m{s:02d}s" if m else f"~{s}s"


DISPLAY = {"demo": "SmolLM2-135M-Instruct"}


def _display(model: str | None, teacher: bool = False) -> str | None:
    if model in ("demo", "local:demo"):
        return "SmolLM2-135M + style prompt" if teacher else DISPLAY["demo"]
    return model.split(":", 1)[1] if model and model.startswith(("anthropic:", "local:")) else model


def run_facts(run: RunDir) -> dict[str, Any]:
    """The numbers pipeline.mmd shows, from the run's artifacts (missing ones stay '?')."""
    facts: dict[str, Any] = {}
    if run.teacher_data.exists():
        recs = read_jsonl(run.teacher_data)
        facts["prompts"] = len(recs)
        models = sorted({str(r.get("model")) for r in recs if r.get("model")})
        facts["teacher"] = ", ".join(_display(m, teacher=True) or m for m in models) or None
        facts["cost"] = f"${sum(float(r.get('cost_usd') or 0) for r in recs):.2f}"
    state = json.loads(run.state.read_text()) if run.state.exists() else {}
    stages = state.get("stages", {})
    facts["collect_time"] = _duration(stages.get("collect", {}).get("seconds"))
    ac = run.adapters / "adapter_config.json"
    if ac.exists():
        cfg = json.loads(ac.read_text())
        facts["student"] = _display(cfg.get("model"))
        facts["method"] = str(cfg.get("fine_tune_type", "lora")).upper().replace("LORA", "LoRA").replace("DORA", "DoRA")
    if run.metrics.exists():
        rows = [r for r in read_jsonl(run.metrics) if r.get("type") == "train"]
        if rows:
            facts["epochs"] = f"{rows[-1].get('epoch', 0):.1f}".rstrip("0").rstrip(".")
            facts["train_time"] = _duration(rows[-1].get("time_s"))
    if stages.get("train", {}).get("seconds") is not None:
        facts["train_time"] = _duration(stages["train"]["seconds"])
    if run.scores.exists():
        avgs = json.loads(run.scores.read_text()).get("averages", {})
        parts = [f"{m} {avgs[m]['average']:.1f}" for m in MODELS if (avgs.get(m) or {}).get("average") is not None]
        facts["scorecard"] = " / ".join(parts) or None
    return facts


# ---------------------------------------------------------------- all


def render(run_dir: str | Path, echo: Callable[[str], None] = print) -> dict[str, Path]:
    """Draw every chart the run's artifacts allow; report the ones that cannot be drawn and why."""
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        from mlx_distill.errors import ConfigError

        raise ConfigError(f"RUN_DIR {run.root}: no such run folder")
    out = run.visuals
    made: dict[str, Path] = {}
    jobs: list[tuple[str, Path, Callable[[], Any]]] = []
    if run.metrics.exists():
        jobs.append(("training_curves", run.metrics, lambda: draw_training_curves(read_jsonl(run.metrics), out / "training_curves.png")))
    if run.scores.exists():
        scores = json.loads(run.scores.read_text())
        jobs.append(("model_scorecard", run.scores, lambda: draw_scorecard(scores, out / "model_scorecard.png")))
        jobs.append(("prompt_comparison", run.scores, lambda: draw_prompt_comparison(scores, out / "prompt_comparison.png")))
    if run.teacher_data.exists():
        jobs.append(("cost_scaling", run.teacher_data, lambda: draw_cost_scaling(read_jsonl(run.teacher_data), out / "cost_scaling.png")))
    for name, src, job in jobs:
        try:
            job()
            made[name] = out / f"{name}.png"
        except (ValueError, KeyError, TypeError) as e:
            echo(f"visuals: skipped {name}.png: {src.name} cannot be drawn ({e})")
    made["pipeline"] = write_text_atomic(out / "pipeline.mmd", pipeline_mermaid(run_facts(run)))
    missing = {"training_curves": "metrics.jsonl", "model_scorecard": "scores.json",
               "prompt_comparison": "scores.json", "cost_scaling": "teacher_data.jsonl"}
    for name, src in missing.items():
        if name not in made and not any(j[0] == name for j in jobs):
            echo(f"visuals: skipped {name}.png: the run has no {src} yet")
    return made


@click.command("visuals")
@click.argument("run_dir", type=click.Path())
@cli_errors
def cli(run_dir: str) -> None:
    """Draw the run's charts (training curves, scorecard, per-prompt, cost, pipeline) into RUN_DIR/visuals."""
    made = render(run_dir, echo=lambda s: click.echo(s, err=True))
    for path in made.values():
        click.echo(str(path))


if __name__ == "__main__":
    cli()
