"""Objective checks of model answers: execution in a sandbox, style metrics, the offline scorecard.

Modules: :mod:`.extract` (find the code), :mod:`.sandbox` (contained child
process; its docstring lists what is and is not contained), :mod:`.execution`
(run a prompt's tests: pass / fail / error / timeout), :mod:`.style` (AST and
markdown metrics), :mod:`.proxy` (0-10 per dimension from those metrics).

The ``tests`` object of a prompt line
=====================================

Python::

    {"kind": "python",
     "entrypoint": "is_balanced",      # the name the answer must define at module level
     "code": "def test_x():\\n    assert is_balanced(None) is True\\n..."}

The answer's code is loaded as module ``answer``; ``code`` then runs in a copy
of that module's namespace, so tests call the answer's names directly. Every
top-level ``test_*`` function is one test, run in order; a test passes when it
returns and fails when it raises. Tests bring their own fixtures (e.g. their
own node class) rather than relying on the answer's helpers, and must finish in
``SandboxLimits.test_timeout_s`` (5 s) each; after one test times out the rest
are not run (a hung answer would cost 5 s per test). Only the standard library
exists (the child runs ``python -I -S``). A cut-off answer's block runs up to
its last complete statement, so the code the model did write is tested; the
cut itself costs completeness.

SQL (SQLite)::

    {"kind": "sql",
     "tables": ["employees", "departments"],  # used to pick the answer's query
     "tolerance": 0.01,                       # numeric tolerance per value
     "cases": [{"name": "basic",
                "setup": "CREATE TABLE ...; INSERT ...;",   # trusted, run first
                "expected": [["Alice", "Engineering", 120000, 100000.0], ...],
                "ordered": false}]}            # true: row order must match too

Each case gets a fresh in-memory database: ``setup`` runs, then the answer's
one query runs read-only (an SQLite authorizer denies anything but reads).
Result rows are compared positionally per column, strings exactly (trimmed),
numbers within ``tolerance``; order-insensitive unless ``ordered``.

A reference answer for every held-out prompt lives in
``tests/test_execution_heldout.py``, with a plausible wrong answer each, to show
that the tests pass the right code and fail the wrong.
"""

from __future__ import annotations

from typing import Any

from mlx_distill.evaluate.execution import ExecResult, check_answer, extract_for, validate_tests
from mlx_distill.evaluate.extract import extract_python, extract_sql, fenced_blocks
from mlx_distill.evaluate.proxy import metric_scores
from mlx_distill.evaluate.sandbox import SandboxLimits, run_in_sandbox, scrub_env
from mlx_distill.evaluate.style import style_metrics

__all__ = [
    "ExecResult",
    "SandboxLimits",
    "check_answer",
    "evaluate_answer",
    "extract_for",
    "extract_python",
    "extract_sql",
    "fenced_blocks",
    "metric_scores",
    "run_in_sandbox",
    "scrub_env",
    "style_metrics",
    "validate_tests",
]


def evaluate_answer(
    text: str,
    language: str,
    tests: dict[str, Any] | None,
    stop_reason: str | None = None,
    limits: SandboxLimits | None = None,
) -> dict[str, Any]:
    """Execution, style and metric scores of one answer (the per-model cell of scores.json)."""
    ext = extract_for(text, tests) if tests else None
    ex = check_answer(text, tests, limits, extraction=ext)
    lang = "sql" if (tests or {}).get("kind") == "sql" else (language or "python")
    # Style is measured on the code as written (a cut-off block whole), not the trimmed run.
    code = (ext.original or ext.code) if ext is not None and ext.found else None
    style = style_metrics(text, lang, code, stop_reason)
    exd = ex.to_dict()
    return {"execution": exd, "style": style, "metric_scores": metric_scores(lang, exd, style)}
