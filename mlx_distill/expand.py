"""``mlx-distill expand``: ask a teacher for variants of each base prompt.

Variants that are near-duplicates of each other, of the base set or of a held-out
prompt (:func:`mlx_distill.prompts.near_duplicate`) are dropped; ids record the
parent (``base-07.v2``); the output is append-only and a rerun skips parents
already expanded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from mlx_distill.config import click_options, opt, resolve, save_config
from mlx_distill.errors import ConfigError, cli_errors
from mlx_distill.prompts import Prompt, jaccard, load_prompts, near_duplicate

EXPAND_SYSTEM = "You write clear, self-contained programming exercises. You reply with JSON only."
EXPAND_TEMPLATE = """Here is a programming task:

{prompt}

Write {n} new programming tasks inspired by it. Change the scenario, the data, the constraints or the \
language (Python, SQL, JavaScript, TypeScript or shell). Each task must be self-contained and specific: \
name the function, class or table, its inputs and the expected behaviour, in one to three sentences.

Reply with only a JSON array of {n} strings."""
_LANGS = (
    ("typescript", "typescript"),
    ("javascript", "javascript"),
    ("node.js", "javascript"),
    ("sql", "sql"),
    ("bash", "bash"),
    ("shell", "bash"),
    ("python", "python"),
)


def parse_variants(text: str, n: int) -> list[str]:
    """Task strings from a teacher reply: a JSON array, else numbered or bulleted lines."""
    import json
    import re

    start, end = text.find("["), text.rfind("]")
    items: list[str] = []
    if 0 <= start < end:
        try:
            data = json.loads(text[start : end + 1])
            items = (
                [str(x) for x in data if isinstance(x, (str, int, float))]
                if isinstance(data, list)
                else []
            )
        except ValueError:
            items = []
    if not items:
        items = [m.group(1) for m in re.finditer(r"^\s*(?:\d+[.)]|[-*\u2022])\s+(.+)$", text, re.M)]
    out = []
    for it in items:
        it = " ".join(it.strip().strip('"').split())
        if 20 <= len(it) <= 2000 and it not in out:
            out.append(it)
    return out[:n]


def _language_of(text: str, default: str) -> str:
    low = text.lower()
    for word, lang in _LANGS:
        if word in low:
            return lang
    return default


@dataclass
class ExpandConfig:
    prompts: str | None = opt(None, "Base prompt JSONL to expand.")
    out: str | None = opt(
        None, "Output JSONL of variants (append-only; a rerun skips parents already expanded)."
    )
    teacher: str = opt("demo", "anthropic:MODEL, local:PATH or demo.")
    per_prompt: int = opt(2, "Variants to ask for per base prompt.")
    heldout: str | None = opt(
        None,
        "Held-out prompt JSONL that variants must not resemble "
        "[default: heldout.jsonl beside --prompts, if present].",
    )
    heldout_threshold: float = opt(
        0.6, "Drop a variant this similar (0-1, see prompts.similarity) to a held-out prompt."
    )
    dup_threshold: float = opt(
        0.7, "Drop a variant this similar (Jaccard) to a base prompt or another variant."
    )
    max_tokens: int = opt(1024, "Max tokens of each teacher reply.")
    temperature: float | None = opt(
        None, "Local teacher: sampling temperature [default: 0]. Not for Claude."
    )
    concurrency: int = opt(8, "Claude: requests in flight.")


def expand(cfg: ExpandConfig, *, teacher: Any = None, echo: Any = None) -> dict[str, Any]:
    """``mlx-distill expand``: ask the teacher for variants of each base prompt; keep the
    ones that are neither near-duplicates of each other/the base set nor of a held-out
    prompt. Ids record the parent (``base-07.v2``). Returns counts."""
    from mlx_distill.files import JsonlAppender
    from mlx_distill.teachers import Failure, Request, check_sampling, make_teacher

    say = echo or print
    if not cfg.prompts or not cfg.out:
        raise ConfigError("--prompts and --out are required")
    if cfg.per_prompt < 1:
        raise ConfigError(f"--per-prompt must be >= 1, got {cfg.per_prompt}")
    base = load_prompts(cfg.prompts)
    held_path = Path(cfg.heldout) if cfg.heldout else Path(cfg.prompts).with_name("heldout.jsonl")
    heldout = load_prompts(held_path) if (cfg.heldout or held_path.is_file()) else []
    if not heldout:
        say(
            "note: no held-out prompts given (--heldout); variants are only checked against each other"
        )
    out = Path(cfg.out)
    existing = load_prompts(out) if out.exists() and out.stat().st_size > 0 else []
    done_parents = {str(p.extra.get("parent")) for p in existing}
    accepted: list[Prompt] = list(base) + existing
    todo = [p for p in base if p.id not in done_parents]
    teacher = teacher or make_teacher(cfg.teacher, concurrency=cfg.concurrency, log=say)
    check_sampling(teacher, cfg.temperature, None)
    stats = {
        "asked": len(todo),
        "accepted": 0,
        "near_heldout": 0,
        "near_duplicate": 0,
        "unparsed": 0,
        "failed": 0,
        "skipped_parents": len(base) - len(todo),
    }
    if not todo:
        return stats
    teacher.check_ready()
    save_config(cfg, out.with_name(f"{out.stem}.config.json"))
    reqs = {f"expand-{i}": p for i, p in enumerate(todo)}
    with JsonlAppender(out) as app:

        def on_result(req: Request, outcome: Any) -> None:
            parent = reqs[req.key]
            if isinstance(outcome, Failure):
                stats["failed"] += 1
                say(f"{parent.id}: failed ({outcome.error})")
                return
            variants = parse_variants(outcome.text, cfg.per_prompt)
            stats["unparsed"] += cfg.per_prompt - len(variants)
            k = 1 + sum(1 for p in accepted if p.extra.get("parent") == parent.id)
            for text in variants:
                hit = near_duplicate(text, heldout, cfg.heldout_threshold)
                if hit:
                    stats["near_heldout"] += 1
                    say(
                        f"{parent.id}: dropped a variant {hit[1]:.2f} similar to held-out {hit[0].id}"
                    )
                    continue
                hit = near_duplicate(text, accepted, cfg.dup_threshold, jaccard)
                if hit:
                    stats["near_duplicate"] += 1
                    continue
                v = Prompt(
                    id=f"{parent.id}.v{k}",
                    prompt=text,
                    category=parent.category,
                    language=_language_of(text, parent.language),
                    source="expanded",
                    extra={"parent": parent.id, "teacher": teacher.spec},
                )
                app.append(v.to_dict())
                accepted.append(v)
                stats["accepted"] += 1
                k += 1

        teacher.run(
            [
                Request(
                    key,
                    EXPAND_TEMPLATE.format(prompt=p.prompt, n=cfg.per_prompt),
                    EXPAND_SYSTEM,
                    cfg.max_tokens,
                    cfg.temperature,
                )
                for key, p in reqs.items()
            ],
            on_result,
        )
    return stats


@click.command("expand")
@click_options(ExpandConfig)
@click.option("--config", "config_file", type=click.Path(), help="YAML file with these options.")
@cli_errors
def cli(config_file: str | None, **kwargs: Any) -> None:
    """Ask a teacher for variants of each base prompt (ids record the parent: base-07.v2)."""
    from mlx_distill.terms import TERMS_NOTICE, is_claude_teacher

    cfg = resolve(ExpandConfig, kwargs, config_file, section="expand")
    if is_claude_teacher(cfg.teacher):
        click.echo(TERMS_NOTICE + "\n", err=True)
    stats = expand(cfg, echo=lambda s: click.echo(s, err=True))
    click.echo(
        f"expand: {stats['accepted']} variants written to {cfg.out} from {stats['asked']} prompts "
        f"({stats['skipped_parents']} already expanded); dropped {stats['near_heldout']} near held-out, "
        f"{stats['near_duplicate']} near-duplicates, {stats['unparsed']} missing/unparseable; "
        f"{stats['failed']} requests failed",
        err=True,
    )
    click.echo(str(cfg.out))


if __name__ == "__main__":
    cli()
