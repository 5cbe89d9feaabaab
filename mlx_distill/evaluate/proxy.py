"""The offline scorecard: 0-10 per reference dimension from execution + style metrics.

Used when there are no judge scores (no API key, ``--judge none``, or a judge
miss). Deterministic and crude on purpose: it measures what can be counted,
not quality. ``scores.json`` marks it ``"scorecard_source": "metrics"`` and the
report says so. Points per dimension (each capped at 10, rounded to 0.1):

correctness
    10 x tests passed / tests run (SQL: cases). No tests: 5 if the code parses, else 1.
structure (Python)
    2 if the code parses + 1 per function (max 3) + 2 if it defines a class
    + 1 if a dataclass + 2 x type-hint coverage.
    E.g. a ``@dataclass TreeNode`` plus two fully typed functions: 2+2+2+1+2 = 9;
    the same without hints or dataclass: 2+2+2+0+0 = 6.
structure (SQL)
    3 if the query ran on at least one case + 3 for a CTE or subquery + 2 for a
    window function + 2 for an explicit JOIN.
documentation
    Python: 4 x docstring coverage + 1 module docstring + 2 x comment density
    (full at one comment line per 10 code lines) + 2 x markdown headers (full at 2)
    + 1 if the prose explains (>= 50 words outside code).
    SQL: 4 x comments (full at 2 lines) + 3 x headers (full at 2) + 3 if >= 50 prose words.
error_handling (Python only; SQL: None, left out of averages)
    4 if it raises + 3 if it validates input (an ``if`` that raises)
    + 2 for ``try`` without a bare ``except`` (1 with one) + 1 for a custom exception class.
completeness
    10 - 4 if cut off (unclosed fence or stop=length) - 3 if no code defines the
    asked-for name - 3 if the code errors or times out.
"""

from __future__ import annotations

from typing import Any

from mlx_distill.rubric import DIMENSION_KEYS


def _cap(x: float) -> float:
    return round(max(0.0, min(10.0, x)), 1)


def _correctness(ex: dict[str, Any], code: dict[str, Any]) -> float:
    if ex.get("total"):
        return _cap(10.0 * ex.get("passed", 0) / ex["total"])
    return 5.0 if code.get("parses") else 1.0


def _structure(lang: str, ex: dict[str, Any], code: dict[str, Any]) -> float:
    if lang == "sql":
        ran = ex.get("outcome") in ("pass", "fail")
        return _cap(
            3 * ran
            + 3 * bool(code.get("ctes") or code.get("subqueries"))
            + 2 * bool(code.get("window_functions"))
            + 2 * bool(code.get("joins"))
        )
    return _cap(
        2 * bool(code.get("parses"))
        + min(code.get("functions", 0), 3)
        + 2 * bool(code.get("classes"))
        + 1 * bool(code.get("dataclasses"))
        + 2 * code.get("type_hint_coverage", 0.0)
    )


def _documentation(lang: str, text: dict[str, Any], code: dict[str, Any]) -> float:
    headers = min(1.0, text.get("headers", 0) / 2)
    prose = text.get("prose_words", 0) >= 50
    if lang == "sql":
        return _cap(4 * min(1.0, code.get("comment_lines", 0) / 2) + 3 * headers + 3 * prose)
    lines = max(1, code.get("code_lines", 0))
    density = min(1.0, code.get("comment_lines", 0) / lines / 0.1)
    return _cap(
        4 * code.get("docstring_coverage", 0.0)
        + 1 * bool(code.get("module_docstring"))
        + 2 * density
        + 2 * headers
        + 1 * prose
    )


def _error_handling(lang: str, code: dict[str, Any]) -> float | None:
    if lang == "sql":
        return None
    tries = code.get("try_blocks", 0)
    return _cap(
        4 * bool(code.get("raises"))
        + 3 * bool(code.get("validations"))
        + (2 if tries and not code.get("bare_excepts") else 1 if tries else 0)
        + 1 * bool(code.get("custom_exceptions"))
    )


def _completeness(ex: dict[str, Any], text: dict[str, Any]) -> float:
    found = (ex.get("extraction") or {}).get("found", True)
    broken = ex.get("outcome") in ("error", "timeout")
    return _cap(10 - 4 * bool(text.get("cut_off")) - 3 * (not found) - 3 * broken)


def metric_scores(
    language: str, execution: dict[str, Any], style: dict[str, Any]
) -> dict[str, float | None]:
    """The five dimensions (0-10, None where not measurable) for one answer."""
    lang = "sql" if (language or "").lower() == "sql" else "python"
    text, code = style.get("text", {}), style.get("code", {})
    scores = {
        "correctness": _correctness(execution, code),
        "structure": _structure(lang, execution, code),
        "documentation": _documentation(lang, text, code),
        "error_handling": _error_handling(lang, code),
        "completeness": _completeness(execution, text),
    }
    assert tuple(scores) == DIMENSION_KEYS
    return scores
