"""The local MLX teacher: batched generation, real token counts, cost 0, context checks, the demo style."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_distill.collect import CollectConfig, cli, collect, read_records
from mlx_distill.teachers import make_teacher, style_prompt


def write(path: Path, prompts: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts))
    )
    return path


def test_local_teacher_records_real_token_counts_at_zero_cost(tiny_model_dir, tmp_path):
    prompts = write(
        tmp_path / "p.jsonl",
        ["Reverse a string.", "Sum a list of numbers in Python.", "Sort words."],
    )
    out = tmp_path / "t.jsonl"
    s = collect(
        CollectConfig(
            prompts=str(prompts),
            out=str(out),
            teacher=f"local:{tiny_model_dir}",
            max_tokens=4,
            system="Be brief.",
        ),
        echo=lambda m: None,
    )
    assert s.done == 3 and s.cost_usd == 0.0
    teacher = make_teacher(f"local:{tiny_model_dir}")
    for r in read_records(out):
        assert (
            r["cost_usd"] == 0.0
            and r["teacher"] == f"local:{tiny_model_dir}"
            and r["system"] == "Be brief."
        )
        assert r["usage"]["input_tokens"] == teacher.prompt_tokens(r["prompt"], "Be brief.")
        assert 1 <= r["usage"]["output_tokens"] <= 4 and r["usage"]["cache_read_input_tokens"] == 0
        assert r["stop_reason"] in ("end_turn", "max_tokens") and r["params"]["temperature"] == 0.0
    again = collect(
        CollectConfig(
            prompts=str(prompts),
            out=str(out),
            teacher=f"local:{tiny_model_dir}",
            max_tokens=4,
            system="Be brief.",
        ),
        echo=lambda m: None,
    )
    assert again.skipped == 3 and again.done == 0


def test_prompt_longer_than_the_teacher_context_exits_2_naming_the_line(tiny_model_dir, tmp_path):
    # The tiny model has max_position_embeddings 2048; this prompt is ~2,500 tokens.
    prompts = write(tmp_path / "p.jsonl", ["Short one.", "word " * 2500])
    out = tmp_path / "t.jsonl"
    res = CliRunner().invoke(
        cli, ["--prompts", str(prompts), "--out", str(out), "--teacher", f"local:{tiny_model_dir}"]
    )
    assert res.exit_code == 2
    assert (
        f"{prompts}:2:" in res.stderr
        and "context of 2,048 tokens" in res.stderr
        and "fix:" in res.stderr
    )
    assert not out.exists()


def test_local_dry_run_counts_with_the_tokenizer(tiny_model_dir, tmp_path):
    prompts = write(tmp_path / "p.jsonl", ["Reverse a string.", "Sum a list."])
    s = collect(
        CollectConfig(
            prompts=str(prompts),
            out=str(tmp_path / "t.jsonl"),
            teacher=f"local:{tiny_model_dir}",
            dry_run=True,
            max_tokens=16,
            system="Be brief.",
        ),
        echo=lambda m: None,
    )
    teacher = make_teacher(f"local:{tiny_model_dir}")
    want = sum(teacher.prompt_tokens(p, "Be brief.") for p in ("Reverse a string.", "Sum a list."))
    assert s.estimate["input_tokens"] == want and s.estimate["cost_max_usd"] == 0.0
    assert s.estimate["output_tokens_max"] == 32 and not (tmp_path / "t.jsonl").exists()


def _style(text: str) -> int:
    """Type-hinted signatures plus docstrings."""
    return len(re.findall(r"\) -> ", text)) + text.count('"""') // 2


@pytest.mark.slow
def test_demo_teacher_answers_in_the_style_of_its_system_prompt(demo_model_dir, tmp_path):
    """Context distillation: the embedded model under the style prompt vs without it (greedy)."""
    prompts = write(
        tmp_path / "p.jsonl",
        [
            "Write a Python function that parses a CSV line with quoted fields into a list of strings.",
            "Write a Python function that merges overlapping intervals.",
            "Write a Python function that reads a JSON config file and returns a dict.",
        ],
    )
    styled, plain = tmp_path / "styled.jsonl", tmp_path / "plain.jsonl"
    collect(
        CollectConfig(prompts=str(prompts), out=str(styled), teacher="demo", max_tokens=48),
        echo=lambda m: None,
    )
    collect(
        CollectConfig(
            prompts=str(prompts), out=str(plain), teacher="demo", max_tokens=48, system=""
        ),
        echo=lambda m: None,
    )
    s_recs, p_recs = read_records(styled), read_records(plain)
    assert all(r["system"] == style_prompt() for r in s_recs) and all(
        r["system"] is None for r in p_recs
    )
    assert all(r["response"].strip() and r["cost_usd"] == 0.0 for r in s_recs + p_recs)
    # the style prompt (~250 tokens) is part of every chat the teacher reads
    assert (
        min(r["usage"]["input_tokens"] for r in s_recs)
        > 200 + max(r["usage"]["input_tokens"] for r in p_recs) - 30
    )
    assert sum(_style(r["response"]) for r in s_recs) > sum(_style(r["response"]) for r in p_recs)
