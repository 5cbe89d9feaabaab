"""Batched generation: records, stop reasons, the shared-prefix KV cache, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_distill import generate, models
from mlx_distill.cli import main

PROMPTS = ["Write a Python function that reverses a string.", "What is 2+2?", "Name a prime number."]


def test_generate_batch_records(tiny_model_dir: Path) -> None:
    model, tok, _ = models.load(str(tiny_model_dir))
    out = generate.generate_batch(model, tok, PROMPTS, max_tokens=7, batch_size=2)
    assert len(out) == 3
    for prompt, c in zip(PROMPTS, out):
        assert c.prompt_tokens == len(generate.chat_tokens(tok, prompt))
        assert c.stop_reason in ("eos", "length") and 0 < c.completion_tokens <= 7
        assert c.stop_reason == "eos" or c.completion_tokens == 7
        assert c.tok_per_s > 0


def test_shared_prefix_cache_covers_the_system_prompt(tiny_model_dir: Path) -> None:
    model, tok, _ = models.load(str(tiny_model_dir))
    system = "You are a careful senior engineer. " * 12
    enc = [generate.chat_tokens(tok, p, system) for p in PROMPTS]
    prefix, caches = generate.shared_prefix_cache(model, enc)
    assert caches is not None and len(caches) == 3
    assert all(e[: len(prefix)] == prefix for e in enc) and len(prefix) >= generate.MIN_SHARED_PREFIX
    assert all(c[0].offset == len(prefix) for c in caches)
    # No shared prefix worth caching without a system prompt, or with one prompt.
    assert generate.shared_prefix_cache(model, enc[:1]) == ([], None)


@pytest.mark.slow
def test_shared_prefix_gives_the_same_answers(demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_distill.teachers import style_prompt

    model, tok, _ = models.load("demo")
    system = style_prompt()
    cached = generate.generate_batch(model, tok, PROMPTS, system=system, max_tokens=24)
    monkeypatch.setattr(generate, "MIN_SHARED_PREFIX", 10**9)
    plain = generate.generate_batch(model, tok, PROMPTS, system=system, max_tokens=24)
    assert [c.text for c in cached] == [p.text for p in plain]


def test_generate_cli_writes_records_and_refuses_overwrite(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out), "--max-tokens", "5"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["p0", "p1", "p2"]
    assert {"response", "prompt_tokens", "completion_tokens", "stop_reason", "tok_per_s"} <= set(recs[0])
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert [json.loads(line) for line in out.read_text().splitlines()] == recs


def test_the_garbage_collector_is_off_while_decoding_and_restored(tiny_model_dir: Path) -> None:
    import gc

    model, tok, _ = models.load(str(tiny_model_dir))
    seen: list[bool] = []
    assert gc.isenabled()
    generate.generate_batch(model, tok, PROMPTS[:2], max_tokens=3, on_done=lambda i, c: seen.append(gc.isenabled()))
    assert seen == [False, False] and gc.isenabled()
    gc.disable()
    try:  # a caller's own "off" is kept
        generate.generate_batch(model, tok, PROMPTS[:1], max_tokens=2)
        assert not gc.isenabled()
    finally:
        gc.enable()
