"""The teacher-data file of ``mlx-distill collect``: record keys, side files, reading, settings checks.

A record's ``key`` hashes what determines the answer (prompt, system, teacher,
max_tokens, temperature, top_p), so a rerun knows which prompts are done and
refuses a file made with other settings (:func:`mismatch` says which).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mlx_distill.errors import DataError
from mlx_distill.prompts import Prompt


def record_key(
    prompt: str,
    system: str | None,
    teacher: str,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
) -> str:
    """Hash of what determines an answer (not concurrency or batching); also the batch custom_id."""
    blob = json.dumps(
        {
            "prompt": prompt,
            "system": system or None,
            "teacher": teacher,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def sidecar(out: str | Path, suffix: str) -> Path:
    """A side file next to ``out``: ``teacher_data.jsonl`` -> ``teacher_data.<suffix>``."""
    p = Path(out)
    return p.with_name(f"{p.stem}.{suffix}")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Complete records of an output file. A torn last line (no newline: a crash mid-write)
    is ignored here and cut when the file is next opened for appending."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n") or not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
                if not isinstance(obj, dict) or "key" not in obj:
                    raise ValueError("not a record")
            except (UnicodeDecodeError, ValueError):
                raise DataError(
                    "this line of the existing output is not a teacher record",
                    p,
                    lineno,
                    fix="--out must be a file written by mlx-distill collect; choose another --out",
                ) from None
            out.append(obj)
    return out


def mismatch(rec: dict[str, Any], pr: Prompt, want: dict[str, Any]) -> str:
    """Which settings of ``want`` (teacher, system, sampling, prompt text) made ``rec`` differently, for an error."""
    diffs = []
    if rec.get("teacher", want["teacher"]) != want["teacher"]:
        diffs.append(f"teacher {rec.get('teacher')} (now {want['teacher']}; --teacher)")
    if (rec.get("system") or None) != (want["system"] or None):
        diffs.append("a different system prompt (--system)")
    params = rec.get("params") or {}
    for name in ("max_tokens", "temperature", "top_p"):
        if name in params and params[name] != want[name]:
            diffs.append(f"{name} {params[name]} (now {want[name]}; --{name.replace('_', '-')})")
    if rec.get("prompt") != pr.prompt:
        diffs.append("a different prompt text (--prompts)")
    return ", ".join(diffs) or "different settings"
