"""Execution checks: extract an answer's code and run the prompt's tests in the sandbox.

Outcomes (one per answer):

* ``pass``: every test passed;
* ``fail``: the code ran, at least one test failed (wrong result, exception in a test);
* ``error``: nothing testable: no code block defines the asked-for name, the code
  does not load (syntax error from a cut-off answer, exception at import), or
  every SQL case raised;
* ``timeout``: a test, the load, or the whole child ran out of time (per-test
  SIGALRM, RLIMIT_CPU, or the wall limit that kills the process group);
* ``skipped``: the prompt has no tests.

``passed``/``total`` count tests (SQL: cases), so a half-right answer is visible.
"""

from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlx_distill.errors import DataError
from mlx_distill.evaluate.extract import Extraction, extract_python, extract_sql
from mlx_distill.evaluate.sandbox import SandboxLimits, SandboxResult, run_in_sandbox

OUTCOMES = ("pass", "fail", "error", "timeout", "skipped")


@dataclass
class ExecResult:
    outcome: str
    passed: int = 0
    total: int = 0
    message: str = ""
    tests: list[dict[str, Any]] = field(default_factory=list)
    stderr_tail: str = ""
    stdout_tail: str = ""
    duration_s: float = 0.0
    extraction: dict[str, Any] = field(default_factory=dict)
    containment: dict[str, Any] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)

    @property
    def pass_fraction(self) -> float | None:
        return self.passed / self.total if self.total else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pass_fraction"] = self.pass_fraction
        return d


def validate_tests(tests: Any, where: str | Path = "tests", line: int | None = None) -> None:
    """Fail fast (DataError naming the file and line) on a malformed ``tests`` object."""
    fix = "see the tests schema in mlx_distill/evaluate/__init__.py"

    def bad(msg: str) -> DataError:
        return DataError(msg, where, line, fix=fix)

    if not isinstance(tests, dict):
        raise bad(f"'tests' must be an object, got {type(tests).__name__}")
    kind = tests.get("kind")
    if kind == "python":
        code = tests.get("code")
        if not isinstance(code, str) or not code.strip():
            raise bad("python tests need a non-empty 'code' string with test_* functions")
        try:
            tree = ast.parse(code)
        except SyntaxError as e:
            raise bad(
                f"python tests 'code' has a syntax error at its line {e.lineno}: {e.msg}"
            ) from None
        if not _test_names(tree):
            raise bad("python tests 'code' defines no test_* function")
        if "entrypoint" in tests and not isinstance(tests["entrypoint"], str):
            raise bad("'entrypoint' must be a name (string)")
    elif kind == "sql":
        cases = tests.get("cases")
        if not isinstance(cases, list) or not cases:
            raise bad("sql tests need a non-empty 'cases' list")
        for i, c in enumerate(cases):
            if (
                not isinstance(c, dict)
                or not isinstance(c.get("setup"), str)
                or not isinstance(c.get("expected"), list)
            ):
                raise bad(f"sql case {i}: needs 'setup' (SQL text) and 'expected' (list of rows)")
            if not all(isinstance(r, list) for r in c["expected"]):
                raise bad(f"sql case {i}: each expected row must be a list")
    else:
        raise bad(f"unknown tests kind {kind!r}; expected 'python' or 'sql'")


def _test_names(tree: ast.Module) -> list[str]:
    return [
        n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
    ]


def _values_match(got: Any, want: Any, tol: float) -> bool:
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        if isinstance(got, str):
            try:
                got = float(got)
            except ValueError:
                return False
        return isinstance(got, (int, float)) and abs(float(got) - float(want)) <= tol + 1e-9
    if isinstance(want, str) and isinstance(got, str):
        return got.strip() == want.strip()
    return got == want


def _row_match(got: list[Any], want: list[Any], tol: float) -> bool:
    return len(got) == len(want) and all(_values_match(g, w, tol) for g, w in zip(got, want))


def compare_rows(
    got: list[list[Any]], want: list[list[Any]], ordered: bool, tol: float
) -> str | None:
    """None when the rows match; otherwise what differs (for the report)."""
    if want and got and len(got[0]) != len(want[0]):
        return f"returned {len(got[0])} columns, expected {len(want[0])}"
    if len(got) != len(want):
        return f"returned {len(got)} rows, expected {len(want)}"
    if ordered:
        for i, (g, w) in enumerate(zip(got, want)):
            if not _row_match(g, w, tol):
                return f"row {i + 1} is {g}, expected {w} (the order matters here)"
        return None
    unused = list(range(len(got)))
    for w in want:
        hit = next((j for j in unused if _row_match(got[j], w, tol)), None)
        if hit is None:
            return f"expected row {w} is missing"
        unused.remove(hit)
    return None


def _one_line(err: str) -> str:
    """The last line of an error (``SyntaxError: invalid syntax``) plus where, when known."""
    lines = [ln.strip() for ln in (err or "").strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    where = next((ln for ln in reversed(lines) if ln.startswith('File "answer.py"')), "")
    m = re.search(r"line (\d+)", where)
    return lines[-1] + (f" (answer.py line {m.group(1)})" if m else "")


def _classify_sandbox(res: SandboxResult) -> tuple[str, str] | None:
    if res.finished:
        return None
    if res.timed_out:
        return "timeout", f"killed after the {res.duration_s:.0f} s wall limit"
    if res.signal in ("SIGXCPU",):
        return "timeout", "stopped by the CPU-time limit"
    if res.signal == "SIGXFSZ":
        return "error", "stopped by the file-size limit (too much output)"
    how = f"signal {res.signal}" if res.signal else f"exit code {res.returncode}"
    return "error", f"the sandboxed process ended early ({how}); see stderr"


def _python_result(res: SandboxResult, total: int) -> tuple[str, int, str, list[dict[str, Any]]]:
    tests = [r for r in res.records if "test" in r]
    passed = sum(1 for t in tests if t.get("ok"))
    phases = {r["phase"]: r for r in res.records if "phase" in r}
    load, entry, tcode = phases.get("load"), phases.get("entrypoint"), phases.get("tests")
    if load is not None and not load.get("ok"):
        return (
            ("timeout" if load.get("timeout") else "error"),
            0,
            _one_line(load.get("error", "")),
            tests,
        )
    if entry is not None:
        return "error", 0, entry["error"], tests
    if tcode is not None:
        return "error", 0, _one_line(tcode["error"]), tests
    early = _classify_sandbox(res)
    if early:
        return early[0], passed, early[1], tests
    if any(t.get("timeout") for t in tests):
        return (
            "timeout",
            passed,
            f"{sum(1 for t in tests if t.get('timeout'))} test(s) timed out",
            tests,
        )
    failed = [t for t in tests if not t.get("ok")]
    if not failed and passed == total:
        return "pass", passed, f"all {total} tests passed", tests
    first = failed[0] if failed else {"test": "?", "error": "tests missing from the result"}
    return (
        "fail",
        passed,
        f"{len(failed)} of {total} failed; first: {first['test']}: {_one_line(first.get('error') or '')}",
        tests,
    )


def _sql_result(
    res: SandboxResult, spec: dict[str, Any]
) -> tuple[str, int, str, list[dict[str, Any]]]:
    tol = float(spec.get("tolerance", 0.01))
    by_name = {r["case"]: r for r in res.records if "case" in r}
    tests: list[dict[str, Any]] = []
    errors = timeouts = 0
    for case in spec["cases"]:
        name = case.get("name") or f"case{len(tests) + 1}"
        rec = by_name.get(name)
        if rec is None:
            tests.append({"test": name, "ok": False, "error": "no result (the run ended first)"})
            continue
        if "rows" not in rec:
            errors += 1
            timeouts += 1 if rec.get("timeout") else 0
            tests.append(
                {
                    "test": name,
                    "ok": False,
                    "error": rec.get("error", ""),
                    "timeout": rec.get("timeout", False),
                }
            )
            continue
        diff = compare_rows(rec["rows"], case["expected"], bool(case.get("ordered", False)), tol)
        t = {
            "test": name,
            "ok": diff is None,
            "columns": rec.get("columns", []),
            "rows": rec["rows"][:20],
        }
        if diff:
            t["error"] = diff
        tests.append(t)
    passed = sum(1 for t in tests if t["ok"])
    early = _classify_sandbox(res)
    if early:
        return early[0], passed, early[1], tests
    if timeouts:
        return "timeout", passed, f"{timeouts} case(s) timed out", tests
    if errors == len(tests):
        return "error", 0, "the query failed on every case: " + (tests[0].get("error") or ""), tests
    if passed == len(tests):
        return "pass", passed, f"all {passed} cases matched", tests
    first = next(t for t in tests if not t["ok"])
    return (
        "fail",
        passed,
        f"{len(tests) - passed} of {len(tests)} cases differ; {first['test']}: {first.get('error')}",
        tests,
    )


def extract_for(text: str, tests: dict[str, Any]) -> Extraction:
    """The code the prompt's tests would run from answer ``text``."""
    if tests["kind"] == "python":
        return extract_python(text, tests.get("entrypoint"))
    return extract_sql(text, tests.get("tables"))


def check_answer(
    text: str,
    tests: dict[str, Any] | None,
    limits: SandboxLimits | None = None,
    extraction: Extraction | None = None,
) -> ExecResult:
    """Extract the code from answer ``text`` and run ``tests`` on it in the sandbox."""
    if not tests:
        return ExecResult("skipped", message="the prompt has no tests")
    kind = tests["kind"]
    total = len(_test_names(ast.parse(tests["code"]))) if kind == "python" else len(tests["cases"])
    ext = extraction or extract_for(text, tests)
    if not ext.found:
        return ExecResult("error", 0, total, ext.reason, extraction=ext.to_dict())
    spec = (
        {"code": tests["code"], "entrypoint": tests.get("entrypoint")}
        if kind == "python"
        else {
            "cases": [
                {"name": c.get("name") or f"case{i + 1}", "setup": c["setup"]}
                for i, c in enumerate(tests["cases"])
            ]
        }
    )
    res = run_in_sandbox(kind, ext.code, spec, limits)
    if kind == "python":
        outcome, passed, msg, rows = _python_result(res, total)
    else:
        named = {
            **tests,
            "cases": [
                {**c, "name": c.get("name") or f"case{i + 1}"} for i, c in enumerate(tests["cases"])
            ],
        }
        outcome, passed, msg, rows = _sql_result(res, named)
    if not ext.closed and outcome != "pass":
        msg += " (the answer was cut off inside its code block)"
    return ExecResult(
        outcome,
        passed,
        total,
        msg,
        rows,
        res.stderr_tail[-1500:],
        res.stdout_tail[-500:],
        res.duration_s,
        ext.to_dict(),
        res.containment,
        res.blocked,
    )
