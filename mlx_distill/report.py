"""``report.html``: one self-contained page comparing teacher, base and distilled answers.

Rendered on the server side from ``scores.json`` (see :mod:`mlx_distill.compare`):
no scripts, no network. A Content-Security-Policy forbids every script and
remote resource, so even if escaping were wrong, model text could not run code;
every piece of model text also goes through :func:`html.escape` before any
markup is added. Charts in ``RUN/visuals/*.png`` are embedded as data URIs.
Markdown and syntax highlighting: :mod:`mlx_distill.markup`.
"""

from __future__ import annotations

import base64
import html
from importlib import resources
from pathlib import Path
from typing import Any

from mlx_distill.markup import highlight, render_markdown
from mlx_distill.rubric import DIMENSION_KEYS, LABELS, MODEL_LABELS
from mlx_distill.runs import RunDir

__all__ = ["CSP", "highlight", "render_markdown", "render_report", "write_report"]

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)  # frame-ancestors is ignored in <meta>
MAX_CHART_BYTES = 5 * 2**20
DEFAULT_BIAS_NOTE = (
    "The judge is a Claude model grading answers distilled from Claude. LLM judges tend to prefer "
    "answers that resemble their own style (self-preference bias), so the distilled student's gains "
    "in structure and documentation may be overstated. The execution results are free of this bias."
)


def _fmt(v: Any, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def _scorecard(avgs: dict[str, Any], imp: dict[str, Any] | None, models: list[str]) -> str:
    head = "".join(f"<th>{html.escape(MODEL_LABELS.get(m, m))}</th>" for m in models)
    rows = []
    for k in (*DIMENSION_KEYS, "average"):
        cells = "".join(f"<td>{_fmt(avgs[m].get(k))}</td>" for m in models)
        if imp:
            d = imp.get(k)
            cls = "pos" if d is not None and d > 0 else "neg" if d is not None and d < 0 else ""
            cells += f'<td class="{cls}">{_fmt(d, True)}</td>'
        label = LABELS.get(k, "Average")
        rows.append(
            f'<tr class="{"avg" if k == "average" else ""}"><td>{html.escape(label)}</td>{cells}</tr>'
        )
    imp_head = "<th>Improvement<br>(distilled − base)</th>" if imp else ""
    return f'<table class="scorecard"><tr><th>Dimension</th>{head}{imp_head}</tr>{"".join(rows)}</table>'


def _exec_table(summary: dict[str, Any], models: list[str]) -> str:
    keys = ("pass", "fail", "error", "timeout", "skipped", "missing")
    head = "".join(f"<th>{k}</th>" for k in keys) + "<th>tests passed</th>"
    rows = "".join(
        f"<tr><td>{html.escape(MODEL_LABELS.get(m, m))}</td>"
        + "".join(f"<td>{summary[m].get(k, 0)}</td>" for k in keys)
        + f"<td>{summary[m]['tests_passed']}/{summary[m]['tests_total']}</td></tr>"
        for m in models
    )
    return f'<table class="exec"><tr><th>Model</th>{head}</tr>{rows}</table>'


def _training(tr: dict[str, Any] | None, data: dict[str, Any] | None) -> str:
    parts = []
    if tr and "error" not in tr and tr.get("first"):
        f, last, best = tr["first"], tr["last"], tr.get("best_acc")

        def num(x: Any, pct: bool = False) -> str:
            return (
                "n/a"
                if not isinstance(x, (int, float))
                else (f"{100 * x:.1f}%" if pct else f"{x:.3f}")
            )

        parts.append(
            f"<tr><td>Loss</td><td>{num(f.get('loss'))} → {num(last.get('loss'))}</td></tr>"
        )
        parts.append(
            f"<tr><td>Accuracy</td><td>{num(f.get('acc'), True)} → {num(last.get('acc'), True)}</td></tr>"
        )
        if best:
            parts.append(
                f"<tr><td>Best accuracy</td><td>{num(best['acc'], True)} at epoch "
                f"{html.escape(str(best.get('epoch')))} ({html.escape(best['split'])})</td></tr>"
            )
        parts.append(f"<tr><td>Steps</td><td>{tr.get('train_records', 0)}</td></tr>")
    elif tr and "error" in tr:
        parts.append(
            f"<tr><td>Training metrics</td><td>unreadable: {html.escape(tr['error'])}</td></tr>"
        )
    if data and "error" not in data:
        parts.append(
            f"<tr><td>Teacher examples</td><td>{data['examples']} "
            f"({html.escape(', '.join(data.get('teacher_models') or []))}, ${data.get('cost_usd', 0):.2f})</td></tr>"
        )
    return f"<h2>Training</h2><table>{''.join(parts)}</table>" if parts else ""


def _charts(rd: RunDir | None) -> str:
    if rd is None or not rd.visuals.is_dir():
        return ""
    figs = []
    for png in sorted(rd.visuals.glob("*.png")):
        data = png.read_bytes()
        if len(data) > MAX_CHART_BYTES or not data.startswith(b"\x89PNG"):
            continue
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        name = html.escape(png.stem.replace("_", " "))
        figs.append(
            f'<figure><img alt="{name}" src="{uri}"><figcaption>{name}</figcaption></figure>'
        )
    return f'<h2>Charts</h2><div class="charts">{"".join(figs)}</div>' if figs else ""


def _column(model: str, cell: dict[str, Any] | None, source: str) -> str:
    label = html.escape(MODEL_LABELS.get(model, model))
    if not cell or not cell.get("available"):
        return f'<article class="col missing" data-model="{model}"><h3>{label}</h3><p>No answer for this prompt.</p></article>'
    ex, text = cell["execution"], cell["style"]["text"]
    oc = ex["outcome"]
    badges = [f'<span class="badge {oc}">{oc}</span>']
    if ex.get("total"):
        badges.append(f'<span class="badge plain">tests {ex["passed"]}/{ex["total"]}</span>')
    if text.get("cut_off"):
        badges.append('<span class="badge error">cut off</span>')
    if cell.get("completion_tokens") is not None:
        badges.append(
            f'<span class="badge plain">{int(cell["completion_tokens"])} tokens, {html.escape(str(cell.get("stop_reason")))}</span>'
        )
    sc, j = cell.get("scores") or {}, cell.get("judge") or {}
    std = j.get("std") or {}
    rows = "".join(
        f"<tr><td>{html.escape(LABELS[k])}</td><td>{_fmt(sc.get(k))}"
        + (f" ± {std[k]:.1f}" if isinstance(std.get(k), (int, float)) and std[k] else "")
        + "</td></tr>"
        for k in DIMENSION_KEYS
    )
    src = "judge" if source == "judge" else "metrics"
    if source == "judge" and not j:
        rows = '<tr><td colspan="2">judge miss: no valid grade</td></tr>'
    scores = f'<table class="scores"><tr><th>Score ({src})</th><th>{_fmt(cell.get("average"))}</th></tr>{rows}</table>'
    rationale = (
        f'<div class="rationale">{html.escape(j["rationale"])}</div>' if j.get("rationale") else ""
    )
    failing = [t for t in ex.get("tests") or [] if not t.get("ok")]
    fails = "".join(
        f"<li><b>{html.escape(str(t.get('test')))}</b>: {html.escape(str(t.get('error') or ''))}</li>"
        for t in failing[:10]
    )
    tail = ex.get("stderr_tail") or ""
    debug = ""
    if fails or tail:
        debug = (
            f"<details><summary>Failures and stderr</summary><ul>{fails}</ul>"
            + (f'<pre class="tail">{html.escape(tail)}</pre>' if tail else "")
            + "</details>"
        )
    code = cell["style"].get("code") or {}
    metrics = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in {**code, **text}.items()
    )
    return (
        f'<article class="col" data-model="{model}"><h3>{label}</h3><div class="badges">{"".join(badges)}</div>'
        f'<p class="msg">{html.escape(ex.get("message") or "")}</p>{scores}{rationale}{debug}'
        f'<details><summary>Style metrics</summary><table class="scores">{metrics}</table></details>'
        f'<div class="answer">{render_markdown(cell.get("response") or "")}</div></article>'
    )


def _pairwise(pw: Any) -> str:
    if not isinstance(pw, dict) or "winner" not in pw:
        return ""
    flip = (
        " (the verdict flipped with the order, so it counts as a tie)" if pw.get("flipped") else ""
    )
    votes = "".join(
        f"<li>order {html.escape(' vs '.join(map(str, v.get('order', []))))}: "
        f"{html.escape(str(v.get('winner')))}: {html.escape(str(v.get('rationale') or ''))}</li>"
        for v in pw.get("votes") or []
        if isinstance(v, dict)
    )
    return f"<p><b>Pairwise, base vs distilled:</b> {html.escape(str(pw['winner']))}{flip}</p>" + (
        f"<details><summary>Votes</summary><ul>{votes}</ul></details>" if votes else ""
    )


def _containment(scores: dict[str, Any]) -> str:
    for p in scores["prompts"]:
        for c in p["models"].values():
            layers = (c.get("execution") or {}).get("containment") if c.get("available") else None
            if layers:
                user = layers.get("user") or {}
                return (
                    f"Sandbox: network {html.escape(str(layers.get('network')))}, "
                    f"uid {html.escape(str(user.get('uid')))}{' (dropped)' if user.get('dropped') else ''}, "
                    f"audit hook {'on' if layers.get('audit_hook') else 'off'}, Python {html.escape(str(layers.get('python')))}."
                )
    return ""


def write_report(run_dir: str | Path) -> Path:
    """Re-render RUN/report.html from RUN/scores.json (and RUN/visuals/*.png, drawn after compare)."""
    import json

    from mlx_distill.errors import ConfigError
    from mlx_distill.files import write_text_atomic

    rd = RunDir(Path(run_dir))
    if not rd.scores.is_file():
        raise ConfigError(
            f"{rd.scores}: not found; run `mlx-distill compare --run {rd.root}` first"
        )
    try:
        scores = json.loads(rd.scores.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(
            f"{rd.scores}: not valid JSON ({e}); rerun `mlx-distill compare`"
        ) from None
    if scores.get("schema") != 1:
        raise ConfigError(
            f"{rd.scores}: schema {scores.get('schema')!r}, expected 1; rerun compare"
        )
    return write_text_atomic(rd.report, render_report(scores, rd))


def render_report(scores: dict[str, Any], rd: RunDir | None = None) -> str:
    """The whole report as one HTML string."""
    css = (
        resources.files("mlx_distill")
        .joinpath("assets/report_style.css")
        .read_text(encoding="utf-8")
    )
    models = scores["models"]
    judge = scores.get("judge") or {}
    source = scores["scorecard_source"]
    reused = (
        " Reused from an earlier compare of these exact answers: no new calls."
        if judge.get("reused")
        else ""
    )
    if source == "judge":
        banner = (
            f'<div class="banner judge">Scores from the LLM judge <b>{html.escape(str(judge.get("model")))}</b> '
            f"({judge.get('repeats', 1)} repeat(s), {judge.get('calls', 0)} calls, {judge.get('misses', 0)} misses, "
            f"${float(judge.get('cost_usd') or 0):.2f}), answers shown blind and in both orders.{reused}</div>"
        )
        if "claude" in str(judge.get("model") or "").lower():
            note = judge.get("bias_note") or DEFAULT_BIAS_NOTE
            banner += (
                f'<div class="banner bias"><b>Self-preference bias.</b> {html.escape(note)}</div>'
            )
    else:
        why = html.escape(judge.get("notice") or "no judge scores")
        banner = (
            f'<div class="banner">No LLM judge scores ({why}). The scorecard below is derived from '
            "execution and style metrics by a fixed mapping (mlx_distill/evaluate/proxy.py): "
            "it counts what can be counted, not quality.</div>"
        )
    parts = [
        f"<h2>Scorecard ({'judge' if source == 'judge' else 'from metrics'})</h2>",
        _scorecard(scores["averages"], scores.get("improvement"), models),
    ]
    if source == "judge":
        parts.append(
            "<details><summary>Scorecard from execution and style metrics</summary>"
            + _scorecard(scores["metric_averages"], scores.get("metric_improvement"), models)
            + "</details>"
        )
    parts += ["<h2>Execution checks</h2>", _exec_table(scores["execution_summary"], models)]
    pws = scores.get("pairwise_summary")
    if pws:
        parts.append(
            f"<p>Pairwise (base vs distilled, both orders): distilled {pws['distilled']}, base {pws['base']}, "
            f"tie {pws['tie']} (of which flipped {pws['flipped']}).</p>"
        )
    parts += [_training(scores.get("training"), scores.get("data")), _charts(rd)]
    for n, p in enumerate(scores["prompts"], start=1):
        cols = "".join(_column(m, p["models"].get(m), source) for m in models)
        parts.append(
            f'<section class="prompt" id="{html.escape(p["id"])}"><h2>Prompt {n}: {html.escape(p["id"])}</h2>'
            f'<div class="prompt-text">{render_markdown(p["prompt"])}</div>{_pairwise(p.get("pairwise"))}'
            f'<div class="cols">{cols}</div></section>'
        )
    title = f"mlx-distill comparison: {Path(str(scores.get('run', ''))).name}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{css}</style></head><body><main>"
        f'<h1>{html.escape(title)}</h1><p class="meta">{html.escape(str(scores.get("created_at", "")))} · '
        f"{len(scores['prompts'])} held-out prompts · models: {html.escape(', '.join(models))}</p>"
        f"{banner}{''.join(parts)}<footer>{_containment(scores)} Generated by mlx-distill.</footer>"
        "</main></body></html>\n"
    )
