"""Code extraction from model answers: fences, the block that defines the name, SQL statements."""

from __future__ import annotations

from mlx_distill.evaluate.extract import (
    extract_python,
    extract_sql,
    fenced_blocks,
    parse_prefix,
    split_sql,
)


def test_fenced_blocks_languages_tildes_and_indentation() -> None:
    text = (
        "Intro\n```python\nx = 1\n```\n\n~~~sql\nSELECT 1;\n~~~\n"
        "1. step\n   ```py\n   def f():\n       return 2\n   ```\n"
    )
    blocks = fenced_blocks(text)
    assert [b.lang for b in blocks] == ["python", "sql", "py"]
    assert blocks[2].code == "def f():\n    return 2\n"  # the list indentation is removed
    assert all(b.closed for b in blocks)


def test_unclosed_fence_runs_to_the_end_and_is_flagged() -> None:
    blocks = fenced_blocks("Here:\n```python\ndef f(x):\n    return x +")
    assert len(blocks) == 1 and not blocks[0].closed
    assert blocks[0].code.startswith("def f(x):")


def test_longer_fence_is_not_closed_by_a_shorter_one() -> None:
    blocks = fenced_blocks("````markdown\n```python\nx = 1\n```\n````\n")
    assert len(blocks) == 1 and blocks[0].lang == "markdown"
    assert "```python" in blocks[0].code


def test_picks_the_block_defining_the_entrypoint_not_the_first() -> None:
    text = (
        "Usage first:\n```python\nprint(is_balanced(None))\n```\n"
        "The solution:\n```python\ndef is_balanced(root):\n    return True\n```\n"
        "Shell:\n```bash\npython x.py\n```\n"
    )
    ext = extract_python(text, "is_balanced")
    assert ext.found and ext.block == 1 and ext.blocks == 3
    assert ext.code.startswith("def is_balanced")
    assert "block 2 of 3" in ext.reason


def test_adds_definitions_from_other_blocks_that_the_chosen_one_uses() -> None:
    text = (
        "```python\nfrom typing import Optional\n\nclass TreeNode:\n    pass\n\nprint('demo')\n```\n"
        "```python\ndef is_balanced(root: Optional[TreeNode]) -> bool:\n    return root is None\n```\n"
    )
    ext = extract_python(text, "is_balanced")
    assert ext.found and ext.block == 1 and ext.support_blocks == [0]
    assert "from typing import Optional" in ext.code and "class TreeNode" in ext.code
    assert "print('demo')" not in ext.code  # only definitions are borrowed, not example code
    assert compile(ext.code, "x", "exec")


def test_prefers_the_complete_version_over_a_sketch() -> None:
    text = (
        "Naive:\n```python\ndef ttl_cache(ttl):\n    ...\n```\n"
        "Better:\n```python\nimport functools\n\ndef ttl_cache(ttl):\n    if ttl <= 0:\n        raise ValueError\n"
        "    def deco(f):\n        return functools.wraps(f)(f)\n    return deco\n```\n"
    )
    assert extract_python(text, "ttl_cache").block == 1


def test_cut_off_block_runs_up_to_its_last_complete_statement() -> None:
    text = "```python\ndef double(x):\n    return 2 * x\n\n\nprint(double(2)\nprint(dou"
    ext = extract_python(text, "double")
    assert ext.found and not ext.closed and ext.code.rstrip() == "def double(x):\n    return 2 * x"
    assert "only its first 4 of 6 lines" in ext.reason


def test_cut_off_block_that_defines_the_name_is_still_found() -> None:
    ext = extract_python(
        "```python\ndef is_balanced(root):\n    if root is None:\n        return True\n    lh =",
        "is_balanced",
    )
    assert ext.found and not ext.closed


def test_missing_name_and_missing_code_are_reported() -> None:
    assert "no fenced code block" in extract_python("I cannot help with that.", "f").reason
    ext = extract_python(
        "```python\nclass Node:\n    def is_balanced(self):\n        return True\n```",
        "is_balanced",
    )
    assert not ext.found and "at module level" in ext.reason
    assert "no Python block" in extract_python("```sql\nSELECT 1;\n```", "f").reason


def test_unfenced_answer_that_is_all_code() -> None:
    ext = extract_python("def f(x):\n    return x\n", "f")
    assert ext.found and "no fences" in ext.reason


def test_parse_prefix_drops_the_dangling_tail() -> None:
    tree, n = parse_prefix("def f():\n    return 1\n\ndef g(:\n")
    assert tree is not None and n == 3


def test_split_sql_respects_strings_and_comments() -> None:
    script = "SELECT ';' AS a; -- a comment; still comment\nSELECT 2 /* ; */ ;\nSELECT 3"
    assert split_sql(script) == [
        "SELECT ';' AS a",
        "-- a comment; still comment\nSELECT 2 /* ; */",
        "SELECT 3",
    ]


def test_sql_picks_the_solution_not_the_sample_data_query() -> None:
    text = (
        "```sql\nCREATE TABLE employees (id INT);\nINSERT INTO employees VALUES (1);\n```\n"
        "```sql\nSELECT * FROM employees;\n```\n"
        "```sql\n-- the answer\nWITH a AS (SELECT e.*, AVG(salary) OVER (PARTITION BY department_id) m FROM employees e)\n"
        "SELECT a.name FROM a JOIN departments d ON d.id = a.department_id WHERE salary > m;\n```\n"
    )
    ext = extract_sql(text, ["employees", "departments"])
    assert ext.found and ext.block == 2
    assert ext.code.startswith("-- the answer\nWITH a AS")


def test_sql_without_select_is_an_error_with_reason() -> None:
    ext = extract_sql("```sql\nCREATE TABLE t (x INT);\n```", ["t"])
    assert not ext.found and "SELECT" in ext.reason
