"""Prompt-lookup decoding gives exactly the greedy answers, from fewer model calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlx_distill import generate, lookup, models
from tests.helpers import greedy_reference as _greedy
from tests.helpers import sharp_tiny_llama as _model


def _prompts(shared: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(1)
    head = rng.integers(1, 64, shared).tolist()
    rows = [head + rng.integers(1, 64, int(rng.integers(3, 20))).tolist() for _ in range(5)]
    rows[0] = head + [5, 6, 7, 5, 6, 7, 5, 6]  # repeats itself: its drafts get kept
    return rows


@pytest.mark.parametrize("shared", [0, 40])  # 40: a common prefix, prefilled once
def test_the_answers_are_the_greedy_answers_from_fewer_calls(shared: int) -> None:
    model, prompts = _model(), _prompts(shared)
    assert lookup.shared_prefix(prompts) == shared
    plain = [_greedy(model, p, 30, set()) for p in prompts]
    stop = {plain[1][0][4], plain[3][0][9]}  # two rows stop early; the others run to the limit
    want = [_greedy(model, p, 30, stop) for p in prompts]
    assert {r for _, r in want} == {"eos", "length"}
    calls = {}
    for k in (0, 1, 3):
        finished: list[int] = []
        got, counts = lookup.decode(model, prompts, max_tokens=30, stop=stop, k=k,
                                    on_done=lambda i, toks, reason, c, f=finished: f.append(i))
        assert got == want, k
        assert sorted(finished) == list(range(len(prompts)))
        assert counts["tokens"] == sum(len(t) for t, _ in want)
        calls[k] = counts["calls"]
    assert calls[0] == max(len(t) for t, _ in want)  # one token a call (the prefill makes the first)
    assert calls[3] < calls[0]  # the repeating row kept drafts


def test_drafts_follow_the_latest_earlier_ngram() -> None:
    row = lookup._Lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3])
    assert row.drafts(2) == [7, 8]  # the latest earlier "1 2 3" was followed by 7 8
    row.append(4)
    assert row.drafts(3) == []  # "2 3 4", "3 4" and "4" never occurred before
    assert lookup._Lookup([5, 5]).drafts(3) == [5]


def test_generate_batch_with_lookup_matches_without(tiny_model_dir: Path) -> None:
    model, tok, _ = models.load(str(tiny_model_dir))
    prompts = ["hello there", "a b a b a b", "write code"]
    plain = generate.generate_batch(model, tok, prompts, max_tokens=24, batch_size=2)
    done: list[int] = []
    got = generate.generate_batch(model, tok, prompts, max_tokens=24, batch_size=2, lookup_tokens=3,
                                  on_done=lambda i, c: done.append(i))
    assert [c.text for c in got] == [c.text for c in plain]
    assert [(c.completion_tokens, c.stop_reason) for c in got] == [(c.completion_tokens, c.stop_reason)
                                                                  for c in plain]
    assert sorted(done) == [0, 1, 2]
    sampled = generate.generate_batch(model, tok, prompts[:1], max_tokens=4, temperature=0.7, lookup_tokens=3)
    assert len(sampled) == 1  # sampling keeps mlx-lm's BatchGenerator


def test_the_generate_cli_takes_lookup_tokens_and_rejects_a_negative_count(tiny_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from mlx_distill.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n"
                               for i, p in enumerate(["a b a b a b", "write code"])))
    base = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--max-tokens", "12"]
    plain = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "plain.jsonl")])
    looked = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "lookup.jsonl"), "--lookup-tokens", "2"])
    assert plain.exit_code == 0 and looked.exit_code == 0, plain.output + looked.output

    def answers(name: str) -> list[str]:
        return [json.loads(line)["response"] for line in (tmp_path / name).read_text().splitlines()]

    assert answers("lookup.jsonl") == answers("plain.jsonl")
    bad = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "bad.jsonl"), "--lookup-tokens", "-1"])
    assert bad.exit_code == 2 and "--lookup-tokens must be 0 (off) or more, got -1" in bad.output
    assert not (tmp_path / "bad.jsonl").exists()
