"""fastdecode: the C kernel's one-query attention against numpy, and its answers against plain greedy decoding."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import mlx.core as mx  # conftest imported mlx_distill first (OpenBLAS)
import numpy as np
import pytest

from mlx_distill import _skinny_blas, fastdecode, generate, models
from tests.helpers import greedy_reference as _greedy
from tests.helpers import sharp_tiny_llama as _model

needs_kernel = pytest.mark.skipif(_skinny_blas.attend_fn() is None,
                                  reason="no BLAS shim built for this CPU (no compiler, or not Linux/OpenBLAS)")


def _attend(q: np.ndarray, kn: np.ndarray, vn: np.ndarray, kc: np.ndarray, vc: np.ndarray, slots: list[int],
            lens: list[int], scale: float, rope: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[int, np.ndarray]:
    b, hq, d = q.shape
    out = np.full((b, hq, d), np.nan, dtype=np.float32)
    s, n = np.array(slots, dtype=np.int32), np.array(lens, dtype=np.int32)
    ptr = ctypes.c_void_p
    tables = [ptr(t.ctypes.data) for t in rope] if rope else [None, None]
    rc = _skinny_blas.attend_fn()(b, hq, kn.shape[1], d, kc.shape[2], scale, *(ptr(a.ctypes.data) for a in (
        q, kn, vn, kc, vc, s, n, out)), *tables)
    return rc, out


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """mx.fast.rope(traditional=False) of one head at one position."""
    half = x.shape[-1] // 2
    return np.concatenate([x[:half] * cos - x[half:] * sin, x[half:] * cos + x[:half] * sin])


@needs_kernel
@pytest.mark.parametrize(("hq", "hkv", "d", "rope"), [(9, 3, 64, False), (9, 3, 64, True), (4, 4, 16, True),
                                                    (12, 2, 128, False), (6, 1, 256, True)])
def test_the_kernel_appends_the_new_key_and_attends_like_numpy(hq: int, hkv: int, d: int, rope: bool) -> None:
    rng = np.random.default_rng(hq * d)
    slots_n, cap = 5, 70
    kc = rng.standard_normal((slots_n, hkv, cap, d)).astype(np.float32)
    vc = rng.standard_normal((slots_n, hkv, cap, d)).astype(np.float32)
    slots, lens = [3, 0, 4], [0, 17, 69]  # an empty slot, a tail of 2 past 16, the last position
    q = (rng.standard_normal((3, hq, d)) * 3).astype(np.float32)  # sharp softmax: exp over a wide range
    kn = rng.standard_normal((3, hkv, d)).astype(np.float32)
    vn = rng.standard_normal((3, hkv, d)).astype(np.float32)
    k_before, v_before = kc.copy(), vc.copy()
    scale = d ** -0.5
    theta = np.array(lens, dtype=np.float32)[:, None] * 10000.0 ** (-np.arange(0, d, 2) / d).astype(np.float32)
    tables = (np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)) if rope else None
    rc, out = _attend(q, kn, vn, kc, vc, slots, lens, scale, tables)
    assert rc == 0
    g = hq // hkv
    for i, (s, n) in enumerate(zip(slots, lens)):
        turn = (lambda x, i=i: _rotate(x, tables[0][i], tables[1][i])) if tables else (lambda x: x)
        np.testing.assert_allclose(kc[s, :, n], np.stack([turn(x) for x in kn[i]]), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(vc[s, :, n], vn[i])
        for h in range(hq):
            keys, values = kc[s, h // g, :n + 1].astype(np.float64), vc[s, h // g, :n + 1].astype(np.float64)
            logits = keys @ turn(q[i, h]).astype(np.float64) * scale
            p = np.exp(logits - logits.max())
            want = (p / p.sum()) @ values
            np.testing.assert_allclose(out[i, h], want, rtol=2e-5, atol=2e-6)
    written = np.zeros(kc.shape, dtype=bool)
    for s, n in zip(slots, lens):
        written[s, :, n] = True
    np.testing.assert_array_equal(kc[~written], k_before[~written])  # nothing else in the caches changed
    np.testing.assert_array_equal(vc[~written], v_before[~written])


@needs_kernel
def test_the_kernel_refuses_shapes_it_does_not_take() -> None:
    z = np.zeros((2, 4, 1, 32), dtype=np.float32)
    q, kv = np.zeros((1, 4, 32), dtype=np.float32), np.zeros((1, 2, 32), dtype=np.float32)
    assert _attend(q, kv, kv, z[:, :2], z[:, :2], [0], [1], 1.0)[0] == -1  # position 1 is past a capacity of 1
    q3 = np.zeros((1, 3, 32), dtype=np.float32)
    assert _attend(q3, kv, kv, z[:, :2], z[:, :2], [0], [0], 1.0)[0] == -1  # 3 query heads over 2 key heads
    q24, kv24 = np.zeros((1, 4, 24), dtype=np.float32), np.zeros((1, 2, 24), dtype=np.float32)
    z24 = np.zeros((2, 2, 1, 24), dtype=np.float32)
    assert _attend(q24, kv24, kv24, z24, z24, [0], [0], 1.0)[0] == -1  # head dim not a multiple of 16
    cos = np.zeros((1, 16), dtype=np.float32)
    assert _attend(q, kv, kv, z[:, :2], z[:, :2], [0], [0], 1.0)[0] == 0
    half = _skinny_blas.attend_fn()(1, 4, 2, 32, 1, 1.0, *(ctypes.c_void_p(a.ctypes.data) for a in (
        q, kv, kv, z[:, :2].copy(), z[:, :2].copy(), np.zeros(1, np.int32), np.zeros(1, np.int32),
        np.zeros((1, 4, 32), np.float32), cos)), None)
    assert half == -1  # a cos table without a sin table


@needs_kernel
@pytest.mark.parametrize("n", [16, 37, 12288])  # 37: a tail past the last 16 floats
def test_the_swiglu_kernel_matches_silu_times_up(n: int) -> None:
    from mlx_lm.models.activations import swiglu

    rng = np.random.default_rng(n)
    gate = (rng.standard_normal(n) * 6).astype(np.float32)
    gate[:8] = [0.0, -0.0, 100.0, -100.0, 88.5, -88.5, 1e-30, -1e-30]  # e^-|g| clamped at -87; no overflow
    up = rng.standard_normal(n).astype(np.float32)
    out = np.full(n, np.nan, dtype=np.float32)
    _skinny_blas.swiglu_fn()(n, *(ctypes.c_void_p(a.ctypes.data) for a in (gate, up, out)))
    g = gate.astype(np.float64)
    np.testing.assert_allclose(out, g / (1 + np.exp(-g)) * up, rtol=2e-6, atol=1e-30)
    np.testing.assert_allclose(out, np.array(swiglu(mx.array(gate), mx.array(up))), rtol=1e-5, atol=1e-7)


@needs_kernel
@pytest.mark.parametrize("on", [True, False])
def test_decode_runs_swiglu_in_the_kernel_and_puts_mlx_lms_back(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    from mlx_lm.models import activations, llama

    model = _model()
    kernel, calls = _skinny_blas.swiglu_fn(), []
    monkeypatch.setattr(_skinny_blas, "swiglu_fn", lambda: lambda *a: calls.append(a[0]) or kernel(*a))
    if not on:
        monkeypatch.setenv(fastdecode.SWIGLU_ENV, "0")
    prompts = [[3, 9, 27, 17], [5, 1, 2, 40, 41, 7]]
    got = fastdecode.decode(model, prompts, max_tokens=6, stop=set(), batch_size=2)
    assert got == [_greedy(model, p, 6, set()) for p in prompts]
    # one call a layer: the two prefills (4 and 6 tokens), then 5 steps of 2 rows; 128 floats a token
    layers = len(model.layers)
    assert calls == ([4 * 128] * layers + [6 * 128] * layers + [2 * 128] * 5 * layers if on else [])
    assert llama.swiglu is activations.swiglu


@needs_kernel
@pytest.mark.parametrize(("shared", "batch_size"), [(0, 2), (40, 2), (40, 8)])
def test_the_answers_are_the_greedy_answers_with_slots_reused(shared: int, batch_size: int) -> None:
    model = _model()
    assert fastdecode.supported(model)
    rng = np.random.default_rng(1)
    head = rng.integers(1, 64, shared).tolist()
    prompts = [head + rng.integers(1, 64, int(rng.integers(3, 20))).tolist() for _ in range(5)]
    plain = [_greedy(model, p, 30, set()) for p in prompts]
    ends = next(t for t in plain[1][0][4:] if t not in plain[4][0] + plain[0][0][:1])
    stop = {plain[0][0][0], ends}  # rows stop early, the first on its first token; the last runs to the limit
    want = [_greedy(model, p, 30, stop) for p in prompts]
    assert {r for _, r in want} == {"eos", "length"} and want[0] == ([], "eos")
    finished: list[int] = []
    got = fastdecode.decode(model, prompts, max_tokens=30, stop=stop, batch_size=batch_size,
                            on_done=lambda i, toks, reason: finished.append(i))
    assert got == want
    assert sorted(finished) == list(range(len(prompts)))
    # with 2 slots, later prompts went into slots that earlier ones had used (and left keys behind in)
    assert fastdecode.decode(model, prompts, max_tokens=1, stop=set(), batch_size=batch_size) == [
        (w[:1] if w else [plain[i][0][0]], "length") for i, (w, _) in enumerate(want)]


@needs_kernel
@pytest.mark.parametrize("traditional", [False, True])  # True: a RoPE the kernel does not take stays MLX's
def test_the_logits_match_mlx_lms_cache_step_by_step(monkeypatch: pytest.MonkeyPatch, traditional: bool) -> None:
    """Through mlx-lm's own KV cache and attention, the same model gives the same logits at every step."""
    from mlx_lm.models.cache import make_prompt_cache

    model = _model(num_attention_heads=8, num_key_value_heads=2, rope_traditional=traditional)
    assert [fastdecode._kernel_rope(layer.self_attn) is None for layer in model.layers] == [traditional] * 2
    prompt = [3, 9, 27, 17, 51, 25, 11]
    cache = make_prompt_cache(model)
    refs = [model(mx.array([prompt]), cache=cache)[0, -1]]
    tokens = [int(mx.argmax(refs[-1]).item())]
    for _ in range(12):
        refs.append(model(mx.array([[tokens[-1]]]), cache=cache)[0, -1])
        tokens.append(int(mx.argmax(refs[-1]).item()))
    seen: list[Any] = []
    real = type(model).__call__

    def spy(self: Any, inputs: Any, cache: Any = None, **kw: Any) -> Any:
        out = real(self, inputs, cache=cache, **kw)
        seen.append(out[0, -1])
        return out

    monkeypatch.setattr(type(model), "__call__", spy)
    got, _ = fastdecode.decode(model, [prompt], max_tokens=13, stop=set())[0]
    assert got == tokens
    assert all(type(layer.self_attn.rope).__name__ == "RoPE" for layer in model.layers)  # put back
    assert len(seen) == len(refs) - 1  # one call a token after the prefill (which computes its last logits only)
    for a, b in zip(seen, refs[1:]):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_generate_batch_takes_fastdecode_for_greedy_only(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok, _ = models.load(str(tiny_model_dir))
    prompts = ["hello there", "a b a b a b", "write code", "one more prompt than slots"]
    calls: list[int] = []
    real = fastdecode.decode
    monkeypatch.setattr(fastdecode, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    done: list[int] = []
    fast = generate.generate_batch(model, tok, prompts, max_tokens=24, batch_size=3,
                                   on_done=lambda i, c: done.append(i))
    assert calls == [1] and sorted(done) == [0, 1, 2, 3]
    monkeypatch.setenv(fastdecode.ENV, "0")
    assert not fastdecode.supported(model)
    plain = generate.generate_batch(model, tok, prompts, max_tokens=24, batch_size=3)  # mlx-lm's BatchGenerator
    assert calls == [1]
    assert [(c.text, c.completion_tokens, c.stop_reason) for c in fast] == [
        (c.text, c.completion_tokens, c.stop_reason) for c in plain]
    monkeypatch.delenv(fastdecode.ENV)
    generate.generate_batch(model, tok, prompts[:1], max_tokens=4, temperature=0.7)
    assert calls == [1]  # sampling keeps BatchGenerator


@needs_kernel
def test_a_bad_spin_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_distill.errors import ConfigError

    model = _model()
    monkeypatch.setenv("MLX_DISTILL_DECODE_SPIN_US", "2ms")
    with pytest.raises(ConfigError, match="MLX_DISTILL_DECODE_SPIN_US must be a whole number of microseconds, got '2ms'"):
        fastdecode.decode(model, [[1, 2, 3]], max_tokens=2, stop=set())
    assert all(type(layer.self_attn.rope).__name__ == "RoPE" for layer in model.layers)  # nothing left swapped
    from mlx_lm.models import activations, llama

    assert llama.swiglu is activations.swiglu


def test_the_generate_cli_rejects_a_max_tokens_or_batch_size_below_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from mlx_distill.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "prompt": "write code"}) + "\n")
    base = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")]
    for flag, value in (("--max-tokens", "0"), ("--batch-size", "0")):
        bad = CliRunner().invoke(main, [*base, flag, value])
        assert bad.exit_code == 2 and f"{flag} must be 1 or more, got 0" in bad.output, bad.output
    assert not (tmp_path / "o.jsonl").exists()
