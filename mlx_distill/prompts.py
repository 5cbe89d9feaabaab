"""Prompt files: loading and validation, and near-duplicate checks (expansion: ``expand.py``).

Line format: ``{"id", "prompt", "category", "language", "source", "tests"?}``;
only ``id`` and ``prompt`` are required to load. Bad input raises DataError
naming the file, the line and the fix; callers write nothing in that case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_distill.errors import DataError
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
    """
    a an the and or of to in on for with by from as at is are be it its this that these those
    which who what how when where into than then so such each every any all some no not only
    also can could should would will must may might do does did make makes write implement
    create build given using use uses return returns returning function functions method
    methods class program script code snippet please simple small short example examples me you
    your we our i my let lets show explain if whether there their them they has have had was
    were been being about over after before both more most other same own just very into out up
    """.split()
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
