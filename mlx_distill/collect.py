"""``mlx-distill collect``: teacher answers for a prompt file, concurrent, resumable and cost-exact.

One JSONL record per prompt, appended (flushed and fsynced) as each answer
arrives: ``id, key, prompt, system, response, model, stop_reason, usage (4 token
fields), cost_usd, latency_s, request_id, created_at`` (+ ``teacher``, ``params``,
``batch_id``, the prompt's ``category/language/source``). ``key`` hashes what
determines the answer (prompt, system, teacher model, max_tokens, temperature,
top_p), not concurrency or batching. A rerun skips done keys, repairs a torn
last line, and refuses an output made with other settings. After ``kill -9``
only the requests in flight (at most ``--concurrency``) are paid twice.

Side files next to ``--out``: ``.config.json`` (resolved config), ``.errors.jsonl``
(prompts that failed, retried by a rerun), ``.batches.json`` (``--batch`` ids).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import click

from mlx_distill.config import click_options, opt, resolve, save_config
from mlx_distill.cost_estimate import estimate, format_estimate
from mlx_distill.errors import BudgetExceeded, ConfigError, DataError, cli_errors
from mlx_distill.files import JsonlAppender
from mlx_distill.pricing import Budget, add_usage, load_prices, zero_usage
from mlx_distill.prompts import load_prompts
from mlx_distill.teacher_data import mismatch, read_records, record_key, sidecar
from mlx_distill.teachers import Failure, Reply, Request, Teacher, check_sampling, make_teacher

__all__ = ["CollectConfig", "CollectSummary", "cli", "collect", "read_records", "record_key", "sidecar"]


@dataclass
class CollectConfig:
    prompts: str | None = opt(None, "Prompt JSONL file ({'id', 'prompt', ...} per line).")
    out: str | None = opt(None, "Output JSONL (append-only; rerunning the same command resumes).")
    teacher: str = opt(
        "demo", "anthropic:MODEL, local:PATH (dir, .gguf, hub id) or demo (offline)."
    )
    system: str | None = opt(
        None, "System prompt, TEXT or @file [default: the teacher's own; demo: the style prompt]."
    )
    max_tokens: int | None = opt(
        None, "Max answer tokens [default: 2048 for Claude, 512 for a local teacher]."
    )
    temperature: float | None = opt(
        None,
        "Local teacher: sampling temperature [default: 0, greedy]. "
        "Not for Claude: API version 2026-10-21 rejects it.",
    )
    top_p: float | None = opt(
        None, "Local teacher: nucleus sampling mass (unset: 1.0). Not for Claude."
    )
    concurrency: int = opt(
        8, "Claude: requests in flight (lowered automatically while 429s arrive)."
    )
    batch: bool = opt(
        False, "Claude: use the Message Batches API (50% cheaper; results within 24 h)."
    )
    dry_run: bool = opt(False, "Estimate tokens and cost; send nothing.")
    budget: float | None = opt(None, "Stop before this run spends more than this many USD.")
    prices: str | None = opt(
        None, "JSON/YAML price table overriding the built-in one (see pricing.py)."
    )
    max_attempts: int = opt(8, "Claude: tries per prompt on 429/5xx/dropped connections.")
    timeout: float = opt(
        600.0, "Claude: seconds per request before it counts as a dropped connection."
    )
    batch_size: int = opt(8, "Local teacher: sequences decoded together.")
    poll_interval: float = opt(60.0, "--batch: longest wait between status polls (seconds).")
    batch_rounds: int = opt(
        3, "--batch: submissions per prompt (errored/expired items are resubmitted)."
    )


@dataclass
class CollectSummary:
    out: str
    total: int = 0
    done: int = 0  # answered in this run
    skipped: int = 0  # already in --out
    failed: int = 0
    not_sent: int = 0  # held back by --budget
    truncated: int = 0  # stop_reason max_tokens
    usage: dict[str, int] = field(default_factory=zero_usage)
    cost_usd: float = 0.0
    wall_s: float = 0.0
    file_records: int = 0
    file_cost_usd: float = 0.0
    lowest_concurrency: int | None = None
    batches_submitted: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    estimate: dict[str, Any] | None = None

    def text(self) -> str:
        u = self.usage
        lines = [
            f"collect: {self.done} done, {self.failed} failed, {self.skipped} skipped (already in {self.out})"
            + (f", {self.not_sent} not sent (budget)" if self.not_sent else "")
            + f" of {self.total}",
            f"  tokens: {u['input_tokens']:,} in, {u['output_tokens']:,} out, "
            f"{u['cache_creation_input_tokens']:,} cache write, {u['cache_read_input_tokens']:,} cache read",
            f"  cost: ${self.cost_usd:.4f} this run; ${self.file_cost_usd:.4f} for all {self.file_records} "
            f"records in the file; wall time {self.wall_s:.1f}s",
        ]
        if self.truncated:
            lines.append(f"  {self.truncated} answers hit --max-tokens (stop_reason max_tokens)")
        for f in self.failures[:5]:
            lines.append(f"  failed {f['id']}: {f['error']}")
        if self.failed:
            lines.append("  rerun the same command to retry the failed prompts")
        return "\n".join(lines)


class Progress:
    """done/total, rate and cost so far, on stderr (redrawn in place on a terminal)."""

    def __init__(
        self, total: int, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic
    ):
        self.total, self.stream, self.clock = total, stream or sys.stderr, clock
        self.t0 = clock()
        self.last = -1e9
        self.last_n = -1
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, done: int, failed: int, cost: float, final: bool = False) -> None:
        now = self.clock()
        n = done + failed
        if final and not self.tty and n == self.last_n:
            return  # the last line printed already says this
        if not (final or self.tty or now - self.last >= 10 or n in (1, self.total)):
            return
        self.last, self.last_n = now, n
        el = max(now - self.t0, 1e-9)
        eta = (self.total - n) * el / n if n else 0
        line = (
            f"[{n}/{self.total}] {done} ok, {failed} failed | {60 * n / el:.1f}/min | "
            f"${cost:.4f} | {el:.0f}s elapsed, ~{eta:.0f}s left"
        )
        self.stream.write(
            ("\r" + line + " " * 4 + ("\n" if final else "")) if self.tty else line + "\n"
        )
        self.stream.flush()


def collect(
    cfg: CollectConfig,
    *,
    teacher: Teacher | None = None,
    echo: Callable[[str], None] | None = None,
    progress_stream: TextIO | None = None,
) -> CollectSummary:
    """Answer every prompt of ``cfg.prompts`` not yet in ``cfg.out``; return the summary.

    Raises DataError/ConfigError (exit 2) before writing anything when the input or
    the settings are wrong, and BudgetExceeded (exit 1) after a clean stop at ``--budget``.
    """
    say = echo or (lambda s: click.echo(s, err=True))
    if not cfg.prompts or not cfg.out:
        raise ConfigError("--prompts and --out are required")
    if cfg.batch_rounds < 1 or cfg.batch_size < 1:
        raise ConfigError("--batch-rounds and --batch-size must be >= 1")
    out = Path(cfg.out)
    prompts = load_prompts(cfg.prompts)
    first: dict[str, str] = {}
    for pr in prompts:  # one key per prompt text: a second id would never get its own answer
        if pr.prompt in first:
            from mlx_distill.prompts import _line_of

            raise DataError(
                f"prompt {pr.id!r} has the same text as {first[pr.prompt]!r}",
                cfg.prompts,
                _line_of(cfg.prompts, pr.id),
                fix="remove one of the two lines (each prompt text is answered once)",
            )
        first[pr.prompt] = pr.id
    prices = load_prices(cfg.prices)
    from mlx_distill.generate import read_text_arg

    system = read_text_arg(cfg.system)
    teacher = teacher or make_teacher(
        cfg.teacher,
        concurrency=cfg.concurrency,
        max_attempts=cfg.max_attempts,
        timeout_s=cfg.timeout,
        batch_size=cfg.batch_size,
        log=say,
    )
    if cfg.batch and not teacher.paid:
        raise ConfigError(
            f"--batch needs an anthropic: teacher (the Message Batches API), not {teacher.spec}"
        )
    check_sampling(teacher, cfg.temperature, cfg.top_p)
    if teacher.paid:
        prices.price(teacher.model)  # an unknown model fails here, before anything is spent
    if cfg.system is None:
        system = teacher.default_system
    system = system or None
    max_tokens = cfg.max_tokens or teacher.default_max_tokens
    if max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1, got {max_tokens}")
    temperature = (
        cfg.temperature if cfg.temperature is not None else (None if teacher.paid else 0.0)
    )
    for pr in prompts:  # a prompt too large for the teacher: file:line, nothing written
        why = teacher.context_limit(pr.prompt, system, max_tokens)
        if why:
            from mlx_distill.prompts import _line_of

            raise DataError(
                f"prompt {pr.id!r} is too large: {why}",
                cfg.prompts,
                _line_of(cfg.prompts, pr.id),
                fix="shorten or split the prompt, or lower --max-tokens",
            )
    want = {
        "teacher": teacher.spec,
        "system": system,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": cfg.top_p,
    }
    plan = [
        (
            pr,
            Request(
                record_key(pr.prompt, system, teacher.spec, max_tokens, temperature, cfg.top_p),
                pr.prompt,
                system,
                max_tokens,
                temperature,
                cfg.top_p,
            ),
        )
        for pr in prompts
    ]
    existing = read_records(out)
    done_keys = {r["key"] for r in existing}
    by_id = {pr.id: (pr, req) for pr, req in plan}
    clash = [
        (r, by_id[r["id"]])
        for r in existing
        if r.get("id") in by_id and r["key"] != by_id[r["id"]][1].key
    ]
    if clash:
        rec, (pr, _) = clash[0]
        raise ConfigError(
            f"--out {out} already holds {len(clash)} answer(s) made with other settings; e.g. {rec['id']!r} "
            f"used {mismatch(rec, pr, want)}. Mixing them would train on two different teachers.\n"
            "  fix: rerun with the flags that made that file to resume it, or pass a new --out"
        )
    todo = [(pr, req) for pr, req in plan if req.key not in done_keys]
    summary = CollectSummary(out=str(out), total=len(plan), skipped=len(plan) - len(todo))
    foreign = len({r["key"] for r in existing} - {req.key for _, req in plan})
    if foreign:
        say(
            f"note: {foreign} record(s) in {out} are not in {cfg.prompts}; they are kept as they are"
        )

    if cfg.dry_run:
        summary.estimate = estimate(todo, teacher, prices, cfg.batch, existing)
        summary.estimate["skipped"] = summary.skipped
        return summary

    teacher.check_ready()  # a missing key or unloadable model fails here, before writing
    budget = (
        Budget(cfg.budget, prices, teacher.model, cfg.batch)
        if teacher.paid
        else Budget(None, prices, "", False)
    )
    save_config(cfg, sidecar(out, "config.json"))
    summary.file_records = len(existing)
    summary.file_cost_usd = sum(float(r.get("cost_usd") or 0) for r in existing)
    meta = {req.key: pr for pr, req in todo}
    progress = Progress(len(todo), progress_stream)
    t0 = time.monotonic()
    errors: JsonlAppender | None = None

    with JsonlAppender(out) as app:
        if app.repaired_bytes:
            say(
                f"repaired {out}: cut a torn last line ({app.repaired_bytes} bytes) left by a crash"
            )

        def on_result(req: Request, outcome: Reply | Failure) -> None:
            nonlocal errors
            pr = meta[req.key]
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            if isinstance(outcome, Failure):
                budget.settle(req.key, 0.0)
                summary.failed += 1
                summary.failures.append({"id": pr.id, "error": outcome.error})
                errors = errors or JsonlAppender(sidecar(out, "errors.jsonl"))
                errors.append(
                    {
                        "id": pr.id,
                        "key": req.key,
                        "error": outcome.error,
                        "status": outcome.status,
                        "retryable": outcome.retryable,
                        "created_at": now,
                    }
                )
            else:
                cost = (
                    prices.cost(teacher.model, outcome.usage, batch=outcome.batch_id is not None)
                    if teacher.paid
                    else 0.0
                )
                rec = {
                    "id": pr.id,
                    "key": req.key,
                    "prompt": pr.prompt,
                    "system": system,
                    "response": outcome.text,
                    "model": outcome.model or teacher.model,
                    "stop_reason": outcome.stop_reason,
                    "usage": outcome.usage,
                    "cost_usd": round(cost, 10),
                    "latency_s": outcome.latency_s,
                    "request_id": outcome.request_id,
                    "created_at": now,
                    "teacher": teacher.spec,
                    "params": {k: want[k] for k in ("max_tokens", "temperature", "top_p")},
                    "category": pr.category,
                    "language": pr.language,
                    "source": pr.source,
                }
                if outcome.batch_id:
                    rec["batch_id"] = outcome.batch_id
                app.append(rec)
                budget.settle(req.key, cost)
                summary.done += 1
                summary.truncated += outcome.stop_reason == "max_tokens"
                add_usage(summary.usage, outcome.usage)
                summary.cost_usd += rec["cost_usd"]
                summary.file_records += 1
                summary.file_cost_usd += rec["cost_usd"]
            progress.update(summary.done, summary.failed, summary.cost_usd)

        def admit(req: Request) -> bool:
            return budget.admit(req.key, req.prompt, req.system, req.max_tokens)

        try:
            requests = [req for _, req in todo]
            if cfg.batch:
                from mlx_distill.teachers.anthropic_batches import BatchRunner, state_path_for

                runner = BatchRunner(
                    teacher,
                    state_path_for(out),
                    rounds=cfg.batch_rounds,  # type: ignore[arg-type]
                    poll_max_s=cfg.poll_interval,
                    status=say,
                )
                runner.run(requests, on_result, done_keys=done_keys, admit=admit)
                summary.batches_submitted = runner.submitted
            elif requests:
                teacher.run(requests, on_result, admit=admit)
        finally:
            summary.wall_s = time.monotonic() - t0
            summary.not_sent = budget.refused and (
                summary.total - summary.skipped - summary.done - summary.failed
            )
            limiter = getattr(teacher, "limiter", None)
            summary.lowest_concurrency = getattr(limiter, "lowest", None)
            if errors is not None:
                errors.close()
            if todo:
                progress.update(summary.done, summary.failed, summary.cost_usd, final=True)
    if summary.not_sent:
        err = BudgetExceeded(
            f"stopped at --budget ${cfg.budget:.2f}: spent ${budget.spent:.4f}; {summary.not_sent} prompt(s) not "
            "sent, since one more could have gone over.\n  fix: rerun the same command with a higher --budget to continue"
        )
        err.summary = summary  # type: ignore[attr-defined]
        raise err
    return summary


@click.command("collect")
@click_options(CollectConfig)
@click.option("--config", "config_file", type=click.Path(), help="YAML file with these options.")
@cli_errors
def cli(config_file: str | None, **kwargs: Any) -> None:
    """Collect teacher answers for a prompt file (resumable; rerun to continue)."""
    from mlx_distill.terms import TERMS_NOTICE, is_claude_teacher

    cfg = resolve(CollectConfig, kwargs, config_file, section="collect")
    if is_claude_teacher(cfg.teacher):
        click.echo(TERMS_NOTICE + "\n", err=True)
    try:
        summary = collect(cfg)
    except BudgetExceeded as e:
        click.echo(e.summary.text(), err=True)  # type: ignore[attr-defined]
        raise
    if summary.estimate is not None:
        click.echo(format_estimate(summary.estimate, cfg.teacher), err=True)
        return
    click.echo(summary.text(), err=True)
    click.echo(str(summary.out))


if __name__ == "__main__":
    cli()
