"""Deterministic style metrics: the objective shadows of the judge's five dimensions.

Computed the same way for teacher, base and distilled answers. Every answer
gets the text metrics (markdown headers, code blocks, cut-off, length). The
code metrics come from the code that execution ran (the extracted block plus
its supporting definitions) or, when nothing was extracted, from all blocks of
the prompt's language:

* Python, from the AST: parses, docstring coverage, type-hint coverage, error
  handling (``raise``, ``try``, validation = an ``if`` whose body raises,
  custom exception classes), structure (functions, classes, dataclasses), length.
  A cut-off block that does not parse is measured on its longest parsable prefix
  (``parsed_lines`` says how much).
* SQL, from the text: CTEs, window functions, joins, comments, statements.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from mlx_distill.evaluate.extract import PY_LANGS, SQL_LANGS, fenced_blocks, parse_prefix, split_sql

_HEADER = re.compile(r"^\s{0,3}#{1,6}\s+\S")
_BULLET = re.compile(r"^\s*([-*+]|\d+[.)])\s+\S")


def text_metrics(text: str, stop_reason: str | None = None) -> dict[str, Any]:
    """Markdown structure and length of any answer."""
    blocks = fenced_blocks(text)
    prose, in_fence = [], False
    for line in text.splitlines():
        if re.match(r"^\s*(`{3,}|~{3,})", line):
            in_fence = not in_fence
            continue
        if not in_fence:
            prose.append(line)
    unclosed = any(not b.closed for b in blocks)
    return {
        "chars": len(text),
        "words": len(text.split()),
        "prose_words": sum(len(line.split()) for line in prose),
        "headers": sum(1 for line in prose if _HEADER.match(line)),
        "bullets": sum(1 for line in prose if _BULLET.match(line)),
        "code_blocks": len(blocks),
        "unclosed_fence": unclosed,
        "stop_reason": stop_reason,
        "cut_off": unclosed or stop_reason in ("length", "max_tokens"),
    }


def _is_dataclass(node: ast.ClassDef) -> bool:
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "dataclass":
            return True
    return False


def _hint_slots(fn: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> tuple[int, int]:
    """(annotated, total) over parameters (not self/cls) and the return."""
    a = fn.args
    params = a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]
    if is_method and params and params[0].arg in ("self", "cls"):
        params = params[1:]
    total = len(params) + 1
    done = sum(1 for p in params if p.annotation is not None) + (fn.returns is not None)
    return done, total


def python_metrics(code: str) -> dict[str, Any]:
    """AST metrics of Python source (see the module docstring)."""
    lines = code.splitlines()
    code_lines = [ln for ln in lines if ln.strip()]
    tree, parsed = parse_prefix(code)
    out: dict[str, Any] = {
        "language": "python",
        "parses": tree is not None and parsed == len(lines),
        "parsed_lines": parsed,
        "code_lines": len(code_lines),
        "comment_lines": sum(1 for ln in code_lines if ln.strip().startswith("#")),
    }
    if tree is None:
        return {
            **out,
            "functions": 0,
            "classes": 0,
            "dataclasses": 0,
            "methods": 0,
            "docstring_coverage": 0.0,
            "type_hint_coverage": 0.0,
            "raises": 0,
            "try_blocks": 0,
            "bare_excepts": 0,
            "validations": 0,
            "custom_exceptions": 0,
        }
    methods: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            methods.update(
                id(b) for b in node.body if isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef))
            )
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    documentable = funcs + classes
    documented = sum(1 for n in documentable if ast.get_docstring(n))
    hints = [_hint_slots(f, id(f) in methods) for f in funcs]
    hinted, slots = sum(h[0] for h in hints), sum(h[1] for h in hints)
    ifs_raising = sum(
        1
        for n in ast.walk(tree)
        if isinstance(n, ast.If) and any(isinstance(b, ast.Raise) for b in n.body)
    )
    custom_exc = sum(
        1
        for c in classes
        if any(
            re.search(r"(Error|Exception)$", getattr(b, "id", getattr(b, "attr", "")) or "")
            for b in c.bases
        )
    )
    return {
        **out,
        "functions": len(funcs),
        "classes": len(classes),
        "dataclasses": sum(1 for c in classes if _is_dataclass(c)),
        "methods": len(methods),
        "module_docstring": bool(ast.get_docstring(tree)),
        "docstring_coverage": round(documented / len(documentable), 3) if documentable else 0.0,
        "type_hint_coverage": round(hinted / slots, 3) if slots else 0.0,
        "raises": sum(1 for n in ast.walk(tree) if isinstance(n, ast.Raise)),
        "try_blocks": sum(1 for n in ast.walk(tree) if isinstance(n, ast.Try)),
        "bare_excepts": sum(
            1 for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler) and n.type is None
        ),
        "validations": ifs_raising,
        "custom_exceptions": custom_exc,
    }


def sql_metrics(code: str) -> dict[str, Any]:
    """Text metrics of SQL: CTEs, window functions, joins, comments."""
    low = code.lower()
    code_lines = [ln for ln in code.splitlines() if ln.strip()]
    ctes = (
        len(re.findall(r"\bas\s*\(\s*select\b", low)) if re.search(r"^\s*with\b", low, re.M) else 0
    )
    return {
        "language": "sql",
        "statements": len(split_sql(code)),
        "code_lines": len(code_lines),
        "comment_lines": sum(1 for ln in code_lines if ln.strip().startswith("--")),
        "ctes": ctes,
        "subqueries": max(
            0, len(re.findall(r"\(\s*select\b", low)) - ctes
        ),  # CTE bodies are not subqueries
        "window_functions": len(re.findall(r"\bover\s*\(", low)),
        "joins": len(re.findall(r"\bjoin\b", low)),
        "handles_nulls": bool(re.search(r"\b(coalesce|nullif|ifnull|is\s+(not\s+)?null)\b", low)),
    }


def style_metrics(
    text: str, language: str, code: str | None = None, stop_reason: str | None = None
) -> dict[str, Any]:
    """All style metrics of one answer. ``code``: what execution ran, when known."""
    out = {"text": text_metrics(text, stop_reason)}
    lang = (language or "").lower()
    if code is None:
        langs = SQL_LANGS if lang == "sql" else PY_LANGS
        code = "\n".join(b.code for b in fenced_blocks(text) if b.lang in langs)
    if lang == "sql":
        out["code"] = sql_metrics(code)
    elif lang in ("python", "py", ""):
        out["code"] = python_metrics(code)
    else:
        out["code"] = {
            "language": lang,
            "code_lines": len([ln for ln in code.splitlines() if ln.strip()]),
        }
    return out
