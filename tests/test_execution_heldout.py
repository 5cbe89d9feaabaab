"""The 4 held-out prompts: well-formed, and their tests pass a right answer and fail a plausible wrong one.

The reference answers live here (never in prompts/heldout.jsonl, so they cannot
leak into prompts or training data). Each wrong answer is a mistake a small
model really makes (the reference run's base student made the pool and TTL ones).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlx_distill.evaluate.execution import check_answer, validate_tests
from mlx_distill.prompts import load_prompts

HELDOUT = Path(__file__).resolve().parent.parent / "prompts" / "heldout.jsonl"

BAL_GOOD = '''Here is an O(n) solution.

```python
from dataclasses import dataclass
from typing import Optional


@dataclass
class TreeNode:
    """A binary tree node."""
    val: int
    left: Optional["TreeNode"] = None
    right: Optional["TreeNode"] = None


def is_balanced(root: Optional[TreeNode]) -> bool:
    """Return True if every node's subtree heights differ by at most 1."""
    def height(node) -> int:
        if node is None:
            return 0
        lh = height(node.left)
        if lh < 0:
            return -1
        rh = height(node.right)
        if rh < 0 or abs(lh - rh) > 1:
            return -1
        return 1 + max(lh, rh)
    return height(root) >= 0
```
'''
BAL_WRONG = """```python
class TreeNode:
    def __init__(self, val, left=None, right=None):
        self.val = val
        self.left = left
        self.right = right

def height(node):
    if node is None:
        return 0
    return 1 + max(height(node.left), height(node.right))

def is_balanced(root):
    # only checks the root
    if root is None:
        return True
    return abs(height(root.left) - height(root.right)) <= 1
```
"""
POOL_GOOD = '''```python
import threading
from typing import Any, Callable


class ConnectionPool:
    """A bounded, lazily filled, thread-safe pool."""

    def __init__(self, factory: Callable[[], Any], max_size: int) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self._factory = factory
        self._max = max_size
        self._idle: list = []
        self._created = 0
        self._cond = threading.Condition()

    def acquire(self, timeout: float | None = None) -> Any:
        with self._cond:
            while True:
                if self._idle:
                    return self._idle.pop()
                if self._created < self._max:
                    self._created += 1
                    break
                if not self._cond.wait(timeout):
                    raise TimeoutError("no connection became free")
        try:
            return self._factory()
        except BaseException:
            with self._cond:
                self._created -= 1
                self._cond.notify()
            raise

    def release(self, conn: Any) -> None:
        with self._cond:
            self._idle.append(conn)
            self._cond.notify()
```
'''
POOL_WRONG = """```python
import threading

class ConnectionPool:
    def __init__(self, factory, max_size):
        self.factory = factory
        self.max_size = max_size
        self.pool = []
        self.lock = threading.Lock()

    def acquire(self, timeout=None):
        with self.lock:
            if self.pool:
                return self.pool.pop()
            return self.factory()

    def release(self, conn):
        with self.lock:
            self.pool.append(conn)
```
"""
SQL_GOOD = """```sql
-- Employees above their department's average
SELECT employee_name, department_name, salary, dept_avg_salary
FROM (
  SELECT e.name AS employee_name, d.name AS department_name, e.salary,
         ROUND(AVG(e.salary) OVER (PARTITION BY e.department_id), 2) AS dept_avg_salary,
         AVG(e.salary) OVER (PARTITION BY e.department_id) AS avg_raw
  FROM employees e JOIN departments d ON d.id = e.department_id
) t
WHERE salary > avg_raw
ORDER BY department_name, salary DESC;
```

Sample check:

```sql
SELECT * FROM employees;
```
"""
SQL_WRONG = """```sql
SELECT e.name AS employee_name, d.name AS department_name, e.salary,
       ROUND(AVG(e.salary) OVER (), 2) AS dept_avg_salary
FROM employees e JOIN departments d ON d.id = e.department_id
ORDER BY department_name, e.salary DESC;
```
"""
TTL_GOOD = '''```python
import functools
import threading
import time
from typing import Any, Callable


def ttl_cache(ttl: float) -> Callable:
    """Cache results per arguments for ``ttl`` seconds."""
    if ttl <= 0:
        raise ValueError("ttl must be positive")

    def decorator(fn: Callable) -> Callable:
        cache: dict = {}
        lock = threading.Lock()

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            key = (args, tuple(sorted(kwargs.items())))
            now = time.monotonic()
            with lock:
                hit = cache.get(key)
                if hit is not None and hit[0] > now:
                    return hit[1]
                value = fn(*args, **kwargs)
                cache[key] = (now + ttl, value)
                return value
        return wrapper
    return decorator
```
'''
TTL_WRONG = """```python
import time

def ttl_cache(ttl):
    def decorator(fn):
        cache = {}
        def wrapper(*args, **kwargs):
            key = (fn.__name__,) + args
            start = time.time()
            if key in cache:
                if time.time() - start > ttl:
                    raise Exception("stale")
                return cache[key]
            cache[key] = fn(*args, **kwargs)
            return cache[key]
        return wrapper
    return decorator
```
"""

# (right answer, wrong answer, the test the wrong answer must fail)
CASES = {
    "heldout-balanced-tree": (BAL_GOOD, BAL_WRONG, "test_imbalance_below_the_root"),
    "heldout-connection-pool": (POOL_GOOD, POOL_WRONG, "test_acquire_times_out_when_exhausted"),
    "heldout-sql-above-average": (SQL_GOOD, SQL_WRONG, "above_department_average"),
    "heldout-ttl-cache": (TTL_GOOD, TTL_WRONG, "test_expired_entry_is_recomputed"),
}


def _prompts() -> dict:
    return {p.id: p for p in load_prompts(HELDOUT)}


def test_heldout_file_has_the_reference_runs_four_prompts() -> None:
    prompts = _prompts()
    assert list(prompts) == list(CASES)
    assert {p.language for p in prompts.values()} == {"python", "sql"}
    for p in prompts.values():
        assert p.source == "heldout" and p.category
        validate_tests(p.tests, HELDOUT)


def test_each_prompt_names_what_its_tests_call() -> None:
    for p in _prompts().values():
        if p.tests["kind"] == "python":
            assert f"`{p.tests['entrypoint']}" in p.prompt
            # every name the tests call on the answer is spelled out in the prompt
            for attr in re.findall(r"pool\.(\w+)\(", p.tests["code"]):
                assert f"`{attr}(" in p.prompt, attr
        else:
            for col in ("employee_name", "department_name", "salary", "dept_avg_salary"):
                assert f"`{col}`" in p.prompt
            for t in p.tests["tables"]:
                assert f"`{t}(" in p.prompt


def test_reference_answers_are_not_in_the_prompt_file() -> None:
    text = HELDOUT.read_text()
    assert "check_height" not in text and "def height" not in text and "OVER (PARTITION" not in text


@pytest.mark.slow
@pytest.mark.parametrize("pid", list(CASES))
def test_right_answer_passes_and_wrong_answer_fails(pid: str) -> None:
    prompt = _prompts()[pid]
    good, wrong, must_fail = CASES[pid]
    ok = check_answer(good, prompt.tests)
    assert ok.outcome == "pass", (ok.message, ok.stderr_tail)
    assert ok.passed == ok.total > 0
    bad = check_answer(wrong, prompt.tests)
    assert bad.outcome == "fail", (bad.message, bad.stderr_tail)
    failed = {t["test"] for t in bad.tests if not t["ok"]}
    assert must_fail in failed, failed
    assert 0 <= bad.passed < bad.total


@pytest.mark.slow
def test_sql_greater_or_equal_is_wrong_too() -> None:
    """`>=` keeps Bob (paid exactly the average) and lone Finn: both cases must catch it."""
    tests = _prompts()["heldout-sql-above-average"].tests
    res = check_answer(SQL_GOOD.replace("WHERE salary > avg_raw", "WHERE salary >= avg_raw"), tests)
    assert res.outcome == "fail" and res.passed == 0


@pytest.mark.slow
def test_sql_without_order_by_passes_only_the_unordered_case() -> None:
    tests = _prompts()["heldout-sql-above-average"].tests
    res = check_answer(
        SQL_GOOD.replace("ORDER BY department_name, salary DESC", "ORDER BY salary"), tests
    )
    assert res.outcome == "fail" and res.passed == 1
    assert "order matters" in res.message
