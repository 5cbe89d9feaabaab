"""Style metrics (AST + markdown) and the documented offline-scorecard mapping."""

from __future__ import annotations

from mlx_distill.evaluate.proxy import metric_scores
from mlx_distill.evaluate.style import python_metrics, sql_metrics, style_metrics, text_metrics

TEACHER_LIKE = '''"""Balanced binary trees."""
from dataclasses import dataclass
from typing import Optional


class TreeError(ValueError):
    """Raised for malformed trees."""


@dataclass
class TreeNode:
    """A node."""
    val: int
    left: Optional["TreeNode"] = None
    right: Optional["TreeNode"] = None


def is_balanced(root: Optional[TreeNode]) -> bool:
    """True if heights differ by at most 1 everywhere."""
    if root is not None and not hasattr(root, "left"):
        raise TreeError("not a node")
    # -1 marks an unbalanced subtree, so we stop early.
    return _height(root) >= 0


def _height(node: Optional[TreeNode]) -> int:
    """Height, or -1 if unbalanced."""
    try:
        if node is None:
            return 0
        lh, rh = _height(node.left), _height(node.right)
    except RecursionError:
        return -1
    return -1 if min(lh, rh) < 0 or abs(lh - rh) > 1 else 1 + max(lh, rh)
'''

BASE_LIKE = """class TreeNode:
    def __init__(self, val, left=None, right=None):
        self.val, self.left, self.right = val, left, right

def height(n):
    return 0 if n is None else 1 + max(height(n.left), height(n.right))

def is_balanced(root):
    return root is None or abs(height(root.left) - height(root.right)) <= 1
"""


def test_text_metrics_headers_outside_code_and_cut_off() -> None:
    text = "## Overview\n\nIntro.\n\n```python\n# not a header\nx = 1\n```\n\n### Usage\n- one\n- two\n"
    m = text_metrics(text, "eos")
    assert (m["headers"], m["bullets"], m["code_blocks"], m["cut_off"]) == (2, 2, 1, False)
    assert text_metrics("```python\nx = (", "eos")["cut_off"] is True  # unclosed fence
    assert text_metrics("done", "length")["cut_off"] is True  # hit max tokens
    assert text_metrics("plain words here", None)["prose_words"] == 3


def test_python_metrics_from_the_ast() -> None:
    m = python_metrics(TEACHER_LIKE)
    assert m["parses"] and m["module_docstring"]
    assert (m["functions"], m["classes"], m["dataclasses"], m["custom_exceptions"]) == (2, 2, 1, 1)
    assert m["docstring_coverage"] == 1.0 and m["type_hint_coverage"] == 1.0
    assert (m["raises"], m["try_blocks"], m["bare_excepts"], m["validations"]) == (1, 1, 0, 1)
    assert m["comment_lines"] == 1
    b = python_metrics(BASE_LIKE)
    assert b["docstring_coverage"] == 0.0 and b["type_hint_coverage"] == 0.0 and b["methods"] == 1
    assert (b["functions"], b["classes"], b["raises"]) == (3, 1, 0)


def test_type_hints_ignore_self_and_count_returns() -> None:
    m = python_metrics("class A:\n    def f(self, x: int, y) -> int:\n        return x\n")
    assert m["type_hint_coverage"] == round(2 / 3, 3)  # x and the return of 3 slots (x, y, return)


def test_cut_off_code_is_measured_on_its_parsable_prefix() -> None:
    code = BASE_LIKE + "\ndef extra(node):\n    if node is None:\n        return ("
    m = python_metrics(code)
    assert not m["parses"] and m["parsed_lines"] == len(BASE_LIKE.splitlines()) + 1
    assert m["functions"] == 3


def test_sql_metrics() -> None:
    q = (
        "-- above average\nWITH a AS (SELECT e.*, AVG(salary) OVER (PARTITION BY department_id) m FROM employees e)\n"
        "SELECT a.name, COALESCE(d.name, '?') FROM a LEFT JOIN departments d ON d.id = a.department_id "
        "WHERE salary > (SELECT 0)"
    )
    m = sql_metrics(q)
    assert (m["ctes"], m["window_functions"], m["joins"], m["comment_lines"], m["subqueries"]) == (
        1,
        1,
        1,
        1,
        1,
    )
    assert m["handles_nulls"]


def test_style_metrics_uses_all_blocks_of_the_language_when_nothing_was_extracted() -> None:
    text = (
        "```python\ndef a():\n    pass\n```\n```bash\nls\n```\n```python\nclass B:\n    pass\n```\n"
    )
    m = style_metrics(text, "python")
    assert (m["code"]["functions"], m["code"]["classes"]) == (1, 1)
    assert m["text"]["code_blocks"] == 3


def _ex(outcome: str, passed: int, total: int, found: bool = True) -> dict:
    return {"outcome": outcome, "passed": passed, "total": total, "extraction": {"found": found}}


def test_proxy_mapping_matches_its_documented_worked_numbers() -> None:
    # proxy.py's docstring: a @dataclass TreeNode plus two fully typed functions -> structure 9;
    # the same without hints or dataclass -> 6.
    typed = (
        "from dataclasses import dataclass\n\n@dataclass\nclass TreeNode:\n    val: int\n\n"
        "def is_balanced(root: TreeNode) -> bool:\n    return True\n\n"
        "def height(node: TreeNode) -> int:\n    return 0\n"
    )
    plain = (
        "class TreeNode:\n    pass\n\ndef is_balanced(root):\n    return True\n\n"
        "def height(node):\n    return 0\n"
    )
    s_typed = metric_scores(
        "python", _ex("pass", 8, 8), style_metrics(f"```python\n{typed}```", "python")
    )
    s_plain = metric_scores(
        "python", _ex("fail", 7, 8), style_metrics(f"```python\n{plain}```", "python")
    )
    assert s_typed["structure"] == 9.0 and s_plain["structure"] == 6.0
    assert s_typed["correctness"] == 10.0 and s_plain["correctness"] == 8.8
    assert s_typed["completeness"] == s_plain["completeness"] == 10.0


def test_proxy_rewards_what_the_dimensions_name() -> None:
    teacher = metric_scores(
        "python",
        _ex("pass", 8, 8),
        style_metrics(f"## Overview\n\n```python\n{TEACHER_LIKE}```\n\n## Usage\n", "python"),
    )
    base = metric_scores(
        "python", _ex("fail", 7, 8), style_metrics(f"```python\n{BASE_LIKE}```", "python")
    )
    for dim in ("structure", "documentation", "error_handling"):
        assert teacher[dim] > base[dim], dim
    assert teacher["error_handling"] == 10.0 and base["error_handling"] == 0.0
    assert all(0.0 <= v <= 10.0 for v in (*teacher.values(), *base.values()))


def test_proxy_completeness_and_sql_error_handling() -> None:
    cut = metric_scores(
        "python", _ex("error", 0, 8), style_metrics("```python\ndef f(:", "python", None, "length")
    )
    assert cut["completeness"] == 3.0 and cut["correctness"] == 0.0  # 10 - 4 cut - 3 error
    missing = metric_scores(
        "python", _ex("error", 0, 8, found=False), style_metrics("no code", "python", None, "eos")
    )
    assert missing["completeness"] == 4.0  # 10 - 3 not found - 3 error
    sql = metric_scores(
        "sql", _ex("pass", 2, 2), style_metrics("```sql\nSELECT 1 FROM a JOIN b ON 1;\n```", "sql")
    )
    assert sql["error_handling"] is None and sql["structure"] == 5.0  # 3 ran + 2 join
