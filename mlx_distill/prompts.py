"""Prompt files: loading and validation, near-duplicate checks, and expansion through a teacher.

Line format: ``{"id", "prompt", "category", "language", "source", "tests"?}``;
only ``id`` and ``prompt`` are required to load. Bad input raises DataError
naming the file, the line and the fix; callers write nothing in that case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from mlx_distill.config import click_options, opt, resolve, save_config
from mlx_distill.errors import ConfigError, DataError, cli_errors
from mlx_distill.files import iter_jsonl

SOURCES = ("base", "expanded", "heldout")


@dataclass
class Prompt:
    id: str
    prompt: str
    category: str = ""
    language: str = ""
    source: str = ""
    tests: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "prompt": self.prompt,
            "category": self.category,
            "language": self.language,
            "source": self.source,
        }
        if self.tests is not None:
            d["tests"] = self.tests
        d.update(self.extra)
        return d


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read and validate a prompt JSONL file.

    Errors (DataError, exit code 2): missing file, empty file, non-UTF-8 bytes,
    invalid JSON, a missing or empty ``prompt``, a missing ``id``, duplicate ids.
    """
    p = Path(path)
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(p, what='prompt: {"id": ..., "prompt": ...}'):
        pid = obj.get("id")
        if pid is None or str(pid).strip() == "":
            raise DataError("missing 'id'", p, lineno, fix='give every line a unique "id"')
        pid = str(pid)
        text = obj.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"prompt {pid!r} has no 'prompt' text",
                p,
                lineno,
                fix='add a non-empty "prompt" string',
            )
        if pid in seen:
            raise DataError(
                f"duplicate id {pid!r} (first on line {seen[pid]})",
                p,
                lineno,
                fix="make every id unique",
            )
        seen[pid] = lineno
        known = {"id", "prompt", "category", "language", "source", "tests"}
        out.append(
            Prompt(
                id=pid,
                prompt=text,
                category=str(obj.get("category", "")),
                language=str(obj.get("language", "")),
                source=str(obj.get("source", "")),
                tests=obj.get("tests"),
                extra={k: v for k, v in obj.items() if k not in known},
            )
        )
    if not out:
        raise DataError(
            "the file has no prompts",
            p,
            fix='add one JSON object per line: {"id": ..., "prompt": ...}',
        )
    return out


def check_context(
    prompts: list[Prompt], count_tokens: Any, max_context: int, path: str | Path, reserve: int = 0
) -> None:
    """Fail (naming the prompt's line) when a prompt plus ``reserve`` exceeds ``max_context`` tokens."""
    for lineno, pr in enumerate(prompts, start=1):
        n = count_tokens(pr.prompt)
        if n + reserve > max_context:
            raise DataError(
                f"prompt {pr.id!r} is {n} tokens; with {reserve} reserved for the answer that exceeds "
                f"the model's context of {max_context}",
                path,
                _line_of(path, pr.id) or lineno,
                fix="shorten or split the prompt, or lower --max-tokens",
            )


def _line_of(path: str | Path, pid: str) -> int | None:
    try:
        for lineno, obj in iter_jsonl(path):
            if str(obj.get("id")) == pid:
                return lineno
    except DataError:
        return None
    return None


# ---- near-duplicates ----------------------------------------------------------------------
# Words that say nothing about a task's topic. Language names are kept: "do X in
# TypeScript" is a different training example from "do X in Python".
_STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "of",
        "to",
        "in",
        "on",
        "for",
        "with",
        "by",
        "from",
        "as",
        "at",
        "is",
        "are",
        "be",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "which",
        "who",
        "what",
        "how",
        "when",
        "where",
        "into",
        "than",
        "then",
        "so",
        "such",
        "each",
        "every",
        "any",
        "all",
        "some",
        "no",
        "not",
        "only",
        "also",
        "can",
        "could",
        "should",
        "would",
        "will",
        "must",
        "may",
        "might",
        "do",
        "does",
        "did",
        "make",
        "makes",
        "write",
        "implement",
        "create",
        "build",
        "given",
        "using",
        "use",
        "uses",
        "return",
        "returns",
        "returning",
        "function",
        "functions",
        "method",
        "methods",
        "class",
        "program",
        "script",
        "code",
        "snippet",
        "please",
        "simple",
        "small",
        "short",
        "example",
        "examples",
        "me",
        "you",
        "your",
        "we",
        "our",
        "i",
        "my",
        "let",
        "lets",
        "show",
        "explain",
        "if",
        "whether",
        "there",
        "their",
        "them",
        "they",
        "has",
        "have",
        "had",
        "was",
        "were",
        "been",
        "being",
        "about",
        "over",
        "after",
        "before",
        "both",
        "more",
        "most",
        "other",
        "same",
        "own",
        "just",
        "very",
        "into",
        "out",
        "up",
    ]
)
_SUFFIXES = ("ing", "ies", "ied", "es", "ed", "s", "y", "e")


def _stem(w: str) -> str:
    for suf in _SUFFIXES:
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            return w[: -len(suf)] + ("i" if suf in ("ies", "ied", "y") else "")
    return w


def content_words(text: str) -> frozenset[str]:
    """Lower-cased, crudely stemmed words of ``text`` without filler ("write a function that")."""
    import re

    return frozenset(
        _stem(w) for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOP and len(w) > 1
    )


def similarity(a: str, b: str) -> float:
    """How much of the shorter prompt's content the other one covers, 0..1.

    The overlap coefficient ``|A & B| / min(|A|, |B|)`` of content words, so a short
    paraphrase of a long, detailed prompt still scores high: "Check if a binary tree
    is balanced in Python" vs the held-out ``is_balanced`` prompt (30+ words) is
    5 of 5 = 1.0; "Serialize a binary tree to a string" vs it is 2 of 4 = 0.5.
    Below 4 content words it falls back to Jaccard, so "Write Python code" does not
    match everything that mentions Python.
    """
    wa, wb = content_words(a), content_words(b)
    if not wa or not wb:
        return 1.0 if a.strip().lower() == b.strip().lower() else 0.0
    if min(len(wa), len(wb)) < 4:
        return len(wa & wb) / len(wa | wb)
    return len(wa & wb) / min(len(wa), len(wb))


def jaccard(a: str, b: str) -> float:
    """Shared over all content words, 0..1: symmetric, so a variant that adds a requirement to
    its parent ("... and expose it as a REST endpoint") is not a copy of it."""
    wa, wb = content_words(a), content_words(b)
    return (
        len(wa & wb) / len(wa | wb) if wa and wb else float(a.strip().lower() == b.strip().lower())
    )


def near_duplicate(
    text: str,
    others: list[Prompt],
    threshold: float,
    measure: Callable[[str, str], float] | None = None,
) -> tuple[Prompt, float] | None:
    """The most similar prompt of ``others`` if its score (``measure``, default
    :func:`similarity`) reaches ``threshold``."""
    measure = measure or similarity
    best: tuple[Prompt, float] | None = None
    for o in others:
        s = measure(text, o.prompt)
        if s >= threshold and (best is None or s > best[1]):
            best = (o, s)
    return best


# ---- expansion through a teacher ----------------------------------------------------------
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
