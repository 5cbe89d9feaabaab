"""Outcome classification (pass/fail/error/timeout/skipped), SQL row comparison, tests-schema checks."""

from __future__ import annotations

import pytest

from mlx_distill.errors import DataError
from mlx_distill.evaluate.execution import check_answer, compare_rows, validate_tests
from mlx_distill.evaluate.sandbox import SandboxLimits

PY_TESTS = {
    "kind": "python",
    "entrypoint": "double",
    "code": "def test_two():\n    assert double(2) == 4\n\ndef test_neg():\n    assert double(-3) == -6\n",
}
SQL_TESTS = {
    "kind": "sql",
    "tables": ["t"],
    "cases": [
        {
            "name": "a",
            "setup": "CREATE TABLE t (k TEXT, v REAL); INSERT INTO t VALUES ('x', 1.0), ('y', 2.5);",
            "expected": [["y", 2.5]],
        },
        {
            "name": "b",
            "setup": "CREATE TABLE t (k TEXT, v REAL); INSERT INTO t VALUES ('z', 9);",
            "expected": [["z", 9]],
            "ordered": True,
        },
    ],
}


def fenced(code: str, lang: str = "python") -> str:
    return f"Here you go:\n\n```{lang}\n{code}```\n"


def test_compare_rows_tolerance_order_and_shape() -> None:
    want = [["a", 1.0], ["b", 2.0]]
    assert compare_rows([["b", 2.004], ["a", 1]], want, ordered=False, tol=0.01) is None
    assert "order matters" in compare_rows([["b", 2.0], ["a", 1.0]], want, ordered=True, tol=0.01)
    assert "columns" in compare_rows([["a"], ["b"]], want, ordered=False, tol=0.01)
    assert "rows" in compare_rows([["a", 1.0]], want, ordered=False, tol=0.01)
    assert "missing" in compare_rows([["a", 1.0], ["b", 2.5]], want, ordered=False, tol=0.01)
    # duplicates count: two identical expected rows need two actual rows
    assert compare_rows([["a", 1.0], ["b", 2.0]], [["a", 1.0], ["a", 1.0]], ordered=False, tol=0.0)


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("nope", "must be an object"),
        ({"kind": "java"}, "unknown tests kind"),
        ({"kind": "python", "code": ""}, "non-empty 'code'"),
        ({"kind": "python", "code": "def test_x(:\n"}, "syntax error"),
        ({"kind": "python", "code": "x = 1\n"}, "no test_* function"),
        ({"kind": "sql", "cases": []}, "non-empty 'cases'"),
        ({"kind": "sql", "cases": [{"setup": "x"}]}, "needs 'setup'"),
    ],
)
def test_malformed_tests_fail_fast_with_file_and_line(bad: object, msg: str) -> None:
    with pytest.raises(DataError) as e:
        validate_tests(bad, "heldout.jsonl", 3)
    assert msg in str(e.value) and "heldout.jsonl:3:" in str(e.value) and "fix:" in str(e.value)


def test_no_tests_is_skipped_without_running_anything() -> None:
    assert check_answer("anything", None).outcome == "skipped"


def test_pass_and_fail_count_tests() -> None:
    ok = check_answer(fenced("def double(x):\n    return 2 * x\n"), PY_TESTS)
    assert (ok.outcome, ok.passed, ok.total, ok.pass_fraction) == ("pass", 2, 2, 1.0)
    half = check_answer(fenced("def double(x):\n    return abs(2 * x)\n"), PY_TESTS)
    assert (half.outcome, half.passed, half.total) == ("fail", 1, 2)
    assert half.message.startswith("1 of 2 failed; first: test_neg: AssertionError")
    assert [t["ok"] for t in half.tests] == [True, False]


def test_not_runnable_answers_are_errors_with_a_one_line_reason() -> None:
    no_code = check_answer("Sorry, I can't.", PY_TESTS)
    assert (
        no_code.outcome == "error"
        and no_code.total == 2
        and "no fenced code block" in no_code.message
    )
    wrong_name = check_answer(fenced("def twice(x):\n    return 2 * x\n"), PY_TESTS)
    assert wrong_name.outcome == "error" and "defines 'double'" in wrong_name.message
    crash = check_answer(
        fenced("import numpy_not_here\n\ndef double(x):\n    return 2 * x\n"), PY_TESTS
    )
    assert crash.outcome == "error"
    assert (
        crash.message == "ModuleNotFoundError: No module named 'numpy_not_here' (answer.py line 1)"
    )


def test_cut_off_answer_is_an_error_and_says_it_was_cut() -> None:
    res = check_answer("```python\ndef double(x):\n    return [\n", PY_TESTS)
    assert res.outcome == "error" and not res.extraction["closed"]
    assert "cut off inside its code block" in res.message


def test_exit_during_import_is_an_error_not_a_pass() -> None:
    res = check_answer(
        fenced("import sys\n\ndef double(x):\n    return 2 * x\n\nsys.exit(0)\n"), PY_TESTS
    )
    assert res.outcome == "error" and "SystemExit" in res.message


@pytest.mark.slow
def test_hanging_answer_is_a_timeout() -> None:
    res = check_answer(
        fenced("def double(x):\n    while True:\n        pass\n"),
        PY_TESTS,
        SandboxLimits(timeout_s=10, test_timeout_s=1),
    )
    assert res.outcome == "timeout" and res.passed == 0 and "timed out" in res.message


def test_sql_pass_fail_and_error() -> None:
    good = check_answer(fenced("SELECT k, v FROM t WHERE v > 2 OR k = 'z';\n", "sql"), SQL_TESTS)
    assert (good.outcome, good.passed, good.total) == ("pass", 2, 2)
    wrong = check_answer(fenced("SELECT k, v FROM t;\n", "sql"), SQL_TESTS)
    assert (wrong.outcome, wrong.passed) == ("fail", 1) and "returned 2 rows" in wrong.message
    broken = check_answer(fenced("SELECT k, v FROM nowhere;\n", "sql"), SQL_TESTS)
    assert broken.outcome == "error" and "no such table" in broken.message


def test_sql_answer_can_only_read() -> None:
    """The picked statement runs under an authorizer that allows reads only (no DML, DDL, ATTACH)."""
    for sneaky in (
        "WITH x AS (SELECT 1) DELETE FROM t;",
        "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM t;",
    ):
        res = check_answer(fenced(sneaky, "sql"), SQL_TESTS)
        assert res.outcome == "error" and "not authorized" in res.message, res.message
    ext = check_answer(
        fenced("SELECT k, v FROM t WHERE load_extension('/tmp/x.so') IS NULL;", "sql"), SQL_TESTS
    )
    assert ext.outcome == "error" and "not authorized" in ext.message
