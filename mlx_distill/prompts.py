"""Prompt files: loading and validation (expansion through a teacher is added below).

Line format: ``{"id", "prompt", "category", "language", "source", "tests"?}``;
only ``id`` and ``prompt`` are required to load. Bad input raises DataError
naming the file, the line and the fix; callers write nothing in that case.
"""

from __future__ import annotations

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
                f"prompt {pid!r} has no 'prompt' text", p, lineno, fix='add a non-empty "prompt" string'
            )
        if pid in seen:
            raise DataError(
                f"duplicate id {pid!r} (first on line {seen[pid]})", p, lineno, fix="make every id unique"
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
        raise DataError("the file has no prompts", p, fix='add one JSON object per line: {"id": ..., "prompt": ...}')
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
