"""``mlx-distill prepare``: teacher data -> mlx-lm chat splits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_distill.dataset import PrepareConfig, build_splits, prepare, split_of
from mlx_distill.errors import ConfigError, DataError
from mlx_distill.files import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "teacher_data.jsonl"


def rec(i: int | str, **kw: object) -> dict:
    r = {"id": f"p{i}", "prompt": f"Write function number {i}.", "response": f"def f{i}():\n    return {i}\n",
         "stop_reason": "end_turn"}
    r.update(kw)
    return r


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(tmp_path: Path, rows: list, **kw: object) -> tuple[object, list[str]]:
    src = write_jsonl(tmp_path / "teacher.jsonl", rows)
    lines: list[str] = []
    cfg = PrepareConfig(teacher_data=str(src), out=str(tmp_path / "data"), **kw)
    return prepare(cfg, echo=lines.append), lines


def test_examples_become_chat_rows_without_the_teachers_system(tmp_path: Path) -> None:
    rows = [rec(i, system="You are a meticulous senior engineer. " * 20, model="claude-x",
                usage={"input_tokens": 1}) for i in range(30)]
    result, lines = run(tmp_path, rows)
    assert result.counts["train"] + result.counts["valid"] == 30
    assert result.counts["valid"] >= 1 and result.counts["test"] == 0
    train = read_jsonl(tmp_path / "data" / "train.jsonl")
    for r in train:
        # The teacher's context (its system prompt) must not reach the student.
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][0]["content"].startswith("Write function number")
    assert not (tmp_path / "data" / "test.jsonl").exists()
    assert any("test.jsonl not written" in ln for ln in lines)
    assert json.loads((tmp_path / "data" / "prepare_config.json").read_text())["valid_fraction"] == 0.1


def test_system_flag_adds_a_system_message(tmp_path: Path) -> None:
    (tmp_path / "sys.txt").write_text("Answer with code.")
    run(tmp_path, [rec(i) for i in range(5)], system=f"@{tmp_path / 'sys.txt'}")
    r = read_jsonl(tmp_path / "data" / "train.jsonl")[0]
    assert r["messages"][0] == {"role": "system", "content": "Answer with code."}


def test_split_is_a_function_of_the_id_and_stable_as_data_grows(tmp_path: Path) -> None:
    small, _, _ = build_splits(write_jsonl(tmp_path / "a.jsonl", [rec(i) for i in range(40)]), valid_fraction=0.25)
    big, _, _ = build_splits(write_jsonl(tmp_path / "b.jsonl", [rec(i) for i in range(400)]), valid_fraction=0.25)
    where_small = {r["id"]: s for s, rows in small.items() for r in rows}
    where_big = {r["id"]: s for s, rows in big.items() for r in rows}
    assert all(where_big[k] == v for k, v in where_small.items())
    assert all(split_of(k, 0.25) == v for k, v in where_big.items())
    share = len(big["valid"]) / 400
    assert 0.18 < share < 0.32, share


def test_held_out_ids_and_texts_always_go_to_test(tmp_path: Path) -> None:
    held = write_jsonl(tmp_path / "held.jsonl", [
        {"id": "p3", "prompt": "anything"},
        {"id": "other-id", "prompt": "Write   function number 7."},  # same text as p7, other spacing
    ])
    result, _ = run(tmp_path, [rec(i) for i in range(20)], held_out=str(held), valid_fraction=0.5)
    test_ids = {r["id"] for r in read_jsonl(tmp_path / "data" / "test.jsonl")}
    assert test_ids == {"p3", "p7"}
    others = read_jsonl(tmp_path / "data" / "train.jsonl") + read_jsonl(tmp_path / "data" / "valid.jsonl")
    assert not {"p3", "p7"} & {r["id"] for r in others}
    assert result.counts["test"] == 2


def test_truncated_empty_duplicate_and_refused_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    rows = [rec(i) for i in range(6)] + [
        rec(10, stop_reason="max_tokens"),
        rec(11, stop_reason="length"),
        rec(12, response="   "),
        rec(13, response=None),
        rec(0, response="a second answer for p0"),
        rec(14, stop_reason="refusal"),
    ]
    result, lines = run(tmp_path, rows)
    assert result.counts["train"] + result.counts["valid"] == 6
    assert result.dropped == {
        "stopped at the token limit (max_tokens)": 1,
        "stopped at the token limit (length)": 1,
        "empty prompt or response": 2,
        "duplicate id": 1,
        "not an answer (refusal)": 1,
    }
    assert lines[1].startswith("dropped 6:")
    kept = read_jsonl(tmp_path / "data" / "train.jsonl") + read_jsonl(tmp_path / "data" / "valid.jsonl")
    p0 = next(r for r in kept if r["id"] == "p0")
    assert p0["messages"][1]["content"] == "def f0():\n    return 0\n"  # the first p0 wins


@pytest.mark.parametrize(
    ("bad", "expect"),
    [
        ('{"id": "x", "prompt": "p", "response": "r", "stop_reason": "end_turn"', "invalid JSON"),
        (json.dumps({"id": "x", "prompt": "p", "stop_reason": "end_turn"}), "missing 'response'"),
        (json.dumps({"id": "x", "prompt": 5, "response": "r", "stop_reason": "end_turn"}), "'prompt' must be a string"),
        (json.dumps({"id": "", "prompt": "p", "response": "r", "stop_reason": "end_turn"}), "'id' must be"),
        (json.dumps([1, 2]), "expected a JSON object"),
    ],
)
def test_a_bad_line_names_file_and_line_and_writes_nothing(tmp_path: Path, bad: str, expect: str) -> None:
    rows = [json.dumps(rec(i)) for i in range(3)] + [bad] + [json.dumps(rec(9))]
    with pytest.raises(DataError) as e:
        run(tmp_path, rows)
    assert f"teacher.jsonl:4: {expect}" in str(e.value)
    assert "fix:" in str(e.value)
    assert not (tmp_path / "data").exists()


def test_everything_dropped_is_an_error_that_says_why(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no training examples left.*max_tokens"):
        run(tmp_path, [rec(i, stop_reason="max_tokens") for i in range(3)])
    assert not (tmp_path / "data").exists()


def test_existing_output_is_not_replaced_without_overwrite(tmp_path: Path) -> None:
    rows = [rec(i) for i in range(10)]
    run(tmp_path, rows)
    before = (tmp_path / "data" / "train.jsonl").read_text()
    run(tmp_path, rows)  # identical content: fine
    with pytest.raises(ConfigError, match="already holds different train.jsonl.*--overwrite"):
        run(tmp_path, rows + [rec(99)])
    assert (tmp_path / "data" / "train.jsonl").read_text() == before
    result, _ = run(tmp_path, rows + [rec(99)], overwrite=True)
    assert sum(result.counts.values()) == 11


def test_bad_fractions_fail_before_reading(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--valid-fraction 1.5"):
        run(tmp_path, [rec(1)], valid_fraction=1.5)
    with pytest.raises(ConfigError, match="leaves nothing to train on"):
        run(tmp_path, [rec(1)], valid_fraction=0.5, test_fraction=0.5)


def test_student_token_lengths_and_truncation_count(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [rec(i) for i in range(8)] + [rec(50, response="word " * 300)]
    result, lines = run(tmp_path, rows, student=str(tiny_model_dir), max_seq_length=128)
    s = result.lengths
    assert s["examples"] == 9 and s["min"] <= s["median"] < s["max"]
    assert s["max"] > 300 and s["truncated"] == 1 and s["no_answer_left"] == 0
    assert any("1 of 9 exceed --max-seq-length 128" in ln for ln in lines)


def test_cli_prints_the_folder_last_and_exit_code_2_on_bad_data(tmp_path: Path) -> None:
    from mlx_distill.cli import main

    src = write_jsonl(tmp_path / "t.jsonl", [rec(i) for i in range(5)])
    out = tmp_path / "d"
    res = CliRunner().invoke(main, ["prepare", "--teacher-data", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == str(out)
    write_jsonl(src, [rec(1), "{oops"])
    res = CliRunner().invoke(main, ["prepare", "--teacher-data", str(src), "--out", str(tmp_path / "e")])
    assert res.exit_code == 2
    assert "t.jsonl:2: invalid JSON" in res.output
    assert not (tmp_path / "e").exists()


def test_the_examples_file_prepares_cleanly(tmp_path: Path) -> None:
    held = ROOT / "examples" / "heldout.jsonl"
    result = prepare(PrepareConfig(teacher_data=str(EXAMPLES), out=str(tmp_path / "d"), held_out=str(held)),
                     echo=lambda _: None)
    assert result.dropped == {} and result.counts["train"] + result.counts["valid"] == 16


@pytest.mark.slow
def test_upstream_mlx_lm_lora_accepts_the_output(tmp_path: Path, tiny_model_dir: Path) -> None:
    held = write_jsonl(tmp_path / "held.jsonl", [{"id": "p1", "prompt": "x"}])
    run(tmp_path, [rec(i) for i in range(12)], held_out=str(held), system="Be brief.")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mlx_lm", "lora", "--model", str(tiny_model_dir), "--data", str(tmp_path / "data"),
           "--train", "--test", "--iters", "2", "--batch-size", "1", "--num-layers", "1", "--val-batches", "1",
           "--test-batches", "1", "--steps-per-eval", "1", "--adapter-path", str(tmp_path / "ad"), "--mask-prompt"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Test loss" in res.stdout + res.stderr
    assert (tmp_path / "ad" / "adapters.safetensors").is_file()


def test_trim_truncated_ends_at_a_clean_boundary() -> None:
    from mlx_distill.dataset import trim_truncated

    cut = "## Overview\nA.\n\n```python\ndef f():\n    return 1\n```\n\nExample usage:\n\n```python\nf("
    assert trim_truncated(cut) == "## Overview\nA.\n\n```python\ndef f():\n    return 1\n```"
    assert trim_truncated("Para one is long enough to keep.\n\nPara two is cut mid-sen") == (
        "Para one is long enough to keep.")
    assert trim_truncated("```python\ndef f(): retu") is None  # nothing complete is left
    # Cut inside one long code block: its complete top-level blocks stay, and the fence is closed.
    code = "```python\nimport os\n\ndef f():\n    return 1\n\ndef g():\n    x = 1\n\n    return x\n\ndef h():\n    re"
    assert trim_truncated(code) == "```python\nimport os\n\ndef f():\n    return 1\n\ndef g():\n    x = 1\n\n    return x\n```"
    assert trim_truncated("```python\nimport os\n\nclass C:\n    def a(self):\n        return 1\n    def b") is None


def test_keep_truncated_keeps_trimmed_answers(tmp_path: Path) -> None:
    td = tmp_path / "td.jsonl"
    rows = [{"id": f"p{i}", "prompt": f"task {i}", "stop_reason": "max_tokens",
             "response": f"Answer {i} is complete here.\n\nThen it is cu"} for i in range(6)]
    td.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="stopped at the token limit"):
        build_splits(td)
    splits, dropped, notes = build_splits(td, keep_truncated=True)
    kept = [r for rs in splits.values() for r in rs]
    assert len(kept) == 6 and not dropped
    assert all(r["messages"][-1]["content"].endswith("is complete here.") for r in kept)
    assert any("--keep-truncated" in n for n in notes)
