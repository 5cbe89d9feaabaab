"""The CPU fast ops and levers give the same numbers as MLX's own ops (values and gradients)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlx.core as mx  # conftest imported mlx_distill first (OpenBLAS)
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import activations, base, llama

from mlx_distill.training import cpu_levers, fastops
from mlx_distill.training.loop import make_step
from mlx_distill.training.losses import lm_loss


def close(a: mx.array, b: mx.array, tol: float) -> None:
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=tol, atol=tol)


def test_exp_neg_matches_exp_and_is_exactly_zero_below_the_clamp() -> None:
    x = mx.concatenate([mx.linspace(-86.9, 0.0, 100_001), mx.array([-87.5, -1e4, -mx.inf])])
    got = np.array(mx.compile(fastops.exp_neg)(x)).astype(np.float64)
    want = np.exp(np.array(x, np.float64))
    normal = want > 1e-37
    assert np.max(np.abs(got[normal] - want[normal]) / want[normal]) < 4e-5
    # Below -87 exactly 0, never a denormal (slow on x86) or a garbage polynomial value.
    assert (got[-3:] == 0).all()
    assert not np.any((got > 0) & (got < 1.2e-38))


def test_softmax_logsumexp_and_their_gradients() -> None:
    x = mx.random.normal((3, 5, 70), key=mx.random.key(1)) * 6
    g = mx.random.normal((3, 5, 70), key=mx.random.key(2))
    close(fastops.softmax(x), mx.softmax(x, axis=-1), 1e-5)
    close(fastops.logsumexp(x), mx.logsumexp(x, axis=-1), 1e-5)
    close(fastops.log_softmax(x), x - mx.logsumexp(x, axis=-1, keepdims=True), 1e-5)
    close(mx.vjp(fastops.softmax, [x], [g])[1][0], mx.vjp(lambda a: mx.softmax(a, axis=-1), [x], [g])[1][0], 1e-5)
    gl = g[..., 0]
    close(mx.vjp(fastops.logsumexp, [x], [gl])[1][0],
          mx.vjp(lambda a: mx.logsumexp(a, axis=-1), [x], [gl])[1][0], 1e-5)


def test_cross_entropy_hits_and_gradient_match_mlx() -> None:
    logits = mx.random.normal((2, 9, 300), key=mx.random.key(3)) * 4
    targets = mx.random.randint(0, 300, (2, 9), key=mx.random.key(4))
    weights = mx.random.uniform(shape=(2, 9), key=mx.random.key(5))
    ce, hits = fastops.cross_entropy_and_hits(logits, targets)
    close(ce, nn.losses.cross_entropy(logits, targets), 1e-5)
    assert (np.array(hits) == np.array(mx.argmax(logits, axis=-1) == targets)).all()
    # A row whose target holds the maximum is a hit.
    forced = mx.put_along_axis(logits, targets[..., None], mx.full((2, 9, 1), 50.0), axis=-1)
    assert bool(fastops.cross_entropy_and_hits(forced, targets)[1].all())

    def ours(a: mx.array) -> mx.array:
        return (fastops.cross_entropy(a, targets) * weights).sum()

    def theirs(a: mx.array) -> mx.array:
        return (nn.losses.cross_entropy(a, targets) * weights).sum()

    close(mx.grad(ours)(logits), mx.grad(theirs)(logits), 1e-5)
    close(mx.grad(mx.compile(ours))(logits), mx.grad(theirs)(logits), 1e-5)


def test_swiglu_and_its_gradients() -> None:
    gate = mx.random.normal((4, 33), key=mx.random.key(6)) * 8  # large |gate| on both sides
    x = mx.random.normal((4, 33), key=mx.random.key(7))
    ct = mx.random.normal((4, 33), key=mx.random.key(8))
    close(fastops.swiglu(gate, x), activations.swiglu(gate, x), 1e-5)
    ours = mx.vjp(fastops.swiglu, [gate, x], [ct])[1]
    theirs = mx.vjp(lambda g, v: nn.silu(g) * v, [gate, x], [ct])[1]
    for a, b in zip(ours, theirs):
        close(a, b, 1e-5)


@pytest.mark.parametrize("T, S, block", [(37, 37, 8), (20, 50, 8), (64, 64, 128)])
def test_attention_causal_matches_sdpa_with_kv_offset_and_blocks(T: int, S: int, block: int) -> None:
    k1, k2, k3, k4 = mx.random.split(mx.random.key(9), 4)
    q = mx.random.normal((2, 6, T, 16), key=k1)
    k = mx.random.normal((2, 2, S, 16), key=k2)
    v = mx.random.normal((2, 2, S, 16), key=k3)
    ct = mx.random.normal((2, 6, T, 16), key=k4)

    def ref(a: mx.array, b: mx.array, c: mx.array) -> mx.array:
        return mx.fast.scaled_dot_product_attention(a, b, c, scale=0.25, mask="causal")

    def ours(a: mx.array, b: mx.array, c: mx.array) -> mx.array:
        return fastops.attention(a, b, c, 0.25, "causal", block=block)

    (o1,), g1 = mx.vjp(ref, [q, k, v], [ct])
    (o2,), g2 = mx.vjp(ours, [q, k, v], [ct])
    close(o2, o1, 2e-5)
    for a, b in zip(g2, g1):
        close(a, b, 5e-5)


def test_attention_with_array_masks() -> None:
    q = mx.random.normal((2, 4, 10, 8), key=mx.random.key(10))
    k = mx.random.normal((2, 2, 10, 8), key=mx.random.key(11))
    v = mx.random.normal((2, 2, 10, 8), key=mx.random.key(12))
    allowed = mx.logical_or(mx.random.uniform(shape=(2, 1, 10, 10), key=mx.random.key(13)) > 0.4,
                            mx.eye(10, dtype=mx.bool_))
    additive = mx.where(allowed, 0.0, -1e9)
    for mask in (allowed, additive, None):
        ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
        close(fastops.attention(q, k, v, 0.3, mask), ref, 2e-5)
    with pytest.raises(ValueError, match="unknown attention mask"):
        fastops.attention(q, k, v, 0.3, "sliding")


def _tiny(seed: int = 0) -> llama.Model:
    from tests.helpers import TINY_ARGS

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict({**TINY_ARGS, "vocab_size": 300}))
    mx.eval(model.parameters())
    return model


def test_fast_cpu_ops_patches_only_inside_and_keeps_the_logits() -> None:
    model = _tiny()
    tokens = mx.random.randint(0, 300, (2, 40), key=mx.random.key(14))
    before = model(tokens)
    with fastops.fast_cpu_ops(model, enabled=True) as applied:
        assert applied
        assert llama.swiglu is fastops.swiglu
        assert llama.scaled_dot_product_attention is not base.scaled_dot_product_attention
        inside = model(tokens)
    assert llama.swiglu is activations.swiglu
    assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention
    close(inside, before, 1e-4)
    with fastops.fast_cpu_ops(model, enabled=False) as applied:
        assert not applied and llama.swiglu is activations.swiglu


def test_use_fast_ops_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fastops.use_fast_ops()  # the tests run on the CPU
    monkeypatch.setenv(fastops.ENV, "0")
    assert not fastops.use_fast_ops()


def _lora_model(seed: int = 0) -> llama.Model:
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = _tiny(seed)
    model.freeze()
    mx.random.seed(seed)
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    return model


def _batch() -> tuple[mx.array, mx.array]:
    tokens = mx.random.randint(0, 300, (4, 33), key=mx.random.key(15))
    lengths = mx.array([[3, 33], [0, 20], [5, 28], [0, 0]])  # a filler row too
    return tokens, lengths


def _train(fast: bool, steps: int = 3) -> tuple[list[float], dict[str, np.ndarray]]:
    import mlx.optimizers as optim

    model = _lora_model()
    opt = optim.Adam(learning_rate=1e-2, bias_correction=True)
    opt.init(model.trainable_parameters())
    losses = []
    with fastops.fast_cpu_ops(model, enabled=fast):
        step = make_step(model, opt, lm_loss, mx.distributed.init())
        for _ in range(steps):
            value, *_ = step(*_batch())
            mx.eval(model.state, opt.state)
            losses.append(value.item())
    return losses, {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def test_fast_ops_train_like_mlx_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    lf, wf = _train(fast=True)
    assert any(np.abs(v).max() > 1e-4 for k, v in wf.items() if k.endswith("lora_b"))  # it trained
    monkeypatch.setenv(fastops.ENV, "0")  # lm_loss's cross-entropy follows the switch too
    ls, ws = _train(fast=False)
    np.testing.assert_allclose(lf, ls, rtol=1e-4)
    for k in ws:
        np.testing.assert_allclose(wf[k], ws[k], rtol=1e-3, atol=1e-5, err_msg=k)


def test_native_jit_restores_the_environment_and_gives_the_same_numbers(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_DISTILL_HOME", str(tmp_path / "home"))
    before = {k: os.environ.get(k) for k in ("PATH", "TMPDIR")}
    x = mx.linspace(-50, 0, 4097)
    want = mx.compile(fastops.exp_neg)(x)
    with cpu_levers.native_cpu_jit(enabled=True) as applied:
        if not applied:
            pytest.skip("needs Linux x86-64 with AVX2/FMA and g++")
        assert shutil.which("g++").startswith(str(tmp_path / "home" / "jit"))
        got = mx.compile(lambda a: fastops.exp_neg(a) * 1.0)(x)  # a new kernel, built by the wrapper
        mx.eval(got)
    assert {k: os.environ.get(k) for k in ("PATH", "TMPDIR")} == before
    # -march=native turns the Horner steps into FMAs: a different rounding, amplified by
    # the 8 squarings, but within exp_neg's documented error (4e-5) of both MLX's build and exp.
    close(got, want, 4e-5)
    close(got, mx.exp(x), 4e-5)
    built = list((tmp_path / "home" / "jit").glob("*/tmp/mlx/*/cpu/*.so"))
    assert built, "the kernel was not built into the private cache"
    monkeypatch.setenv(cpu_levers.NATIVE_ENV, "0")
    with cpu_levers.native_cpu_jit(enabled=True) as applied:
        assert not applied


def test_levers_are_off_when_disabled() -> None:
    model = _tiny()
    with cpu_levers.cpu_levers(model, enabled=False) as lv:
        assert (lv.fast_ops, lv.native_jit, lv.chunked_head) == (False, False, False)
        assert lv.describe() == "none"


def test_the_cpu_levers_chunk_the_head_of_a_frozen_head_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_distill.training import headce

    model = _lora_model()
    with cpu_levers.cpu_levers(model, enabled=True) as lv:
        assert lv.chunked_head and "chunked lm_head" in lv.describe()
        assert headce.head_chunk_rows() == headce.CHUNK_ROWS
    assert headce.head_chunk_rows() is None
    with headce.chunked_head(16), cpu_levers.cpu_levers(model, enabled=True) as lv:  # an outer setting wins
        assert lv.chunked_head and headce.head_chunk_rows() == 16
    from mlx_distill.training.loop import grad_checkpointing

    with grad_checkpointing(model, True), cpu_levers.cpu_levers(model, enabled=True) as lv:
        # --grad-checkpoint is for memory: its smaller chunks, not the lever's faster ones
        assert lv.chunked_head and headce.head_chunk_rows() == headce.LEAN_CHUNK_ROWS < headce.CHUNK_ROWS
    monkeypatch.setenv(cpu_levers.CHUNKED_HEAD_ENV, "0")
    with cpu_levers.cpu_levers(model, enabled=True) as lv:
        assert not lv.chunked_head and headce.head_chunk_rows() is None


def test_a_trainable_head_is_never_chunked() -> None:
    """The chunked op gives the head no gradient, so a trainable head keeps the whole logits."""
    from mlx_distill.training import headce

    model = _lora_model()
    model.model.embed_tokens.unfreeze()
    assert headce.head_of(model) is None
    with cpu_levers.cpu_levers(model, enabled=True) as lv:
        assert not lv.chunked_head and headce.head_chunk_rows() is None


def test_chunks_run_one_after_another_so_peak_memory_follows_the_chunk() -> None:
    """MLX runs independent chunks side by side; the chunk-by-chunk dependency bounds the peak."""
    from mlx_distill.training import headce

    n, d, V = 512, 64, 8192  # whole logits: 16 MB; a chunk of 32 rows: 1 MB
    h = mx.random.normal((n, d), key=mx.random.key(0)) * 0.1
    w = mx.random.normal((V, d), key=mx.random.key(1)) * 0.1
    t = mx.random.randint(0, V, (n,), key=mx.random.key(2))
    mx.eval(h, w, t)

    def peak(rows: int | None) -> float:
        if rows is None:
            fn = mx.grad(lambda h: fastops.cross_entropy(h @ w.T, t).sum())
        else:
            fn = mx.grad(lambda h: headce.head_cross_entropy_and_hits(h, w, t, rows)[0].sum())
        fn = mx.compile(fn)
        mx.eval(fn(h))  # compiled once
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(fn(h))
        return mx.get_peak_memory() - base

    whole, chunked = peak(None), peak(32)
    assert chunked < 0.25 * whole, (chunked, whole)


def test_chunked_head_gives_the_loss_and_gradient_of_the_whole_logits() -> None:
    from mlx_distill.training import headce

    model = _lora_model()
    assert headce.head_of(model) is model.model.embed_tokens.weight  # tied llama head
    tokens, lengths = _batch()
    from mlx.nn import value_and_grad

    def run() -> tuple[float, dict[str, np.ndarray], float]:
        metrics = lm_loss(model, tokens, lengths)[2]
        v, g = value_and_grad(model, lambda m: lm_loss(m, tokens, lengths)[0])(model)
        return v.item(), {k: np.array(x) for k, x in tree_flatten(g)}, metrics["acc"].item()

    whole = run()
    with headce.chunked_head(16):  # 4 rows x 32 positions in 8 chunks
        assert headce.head_chunk_rows() == 16
        chunked = run()
    assert headce.head_chunk_rows() is None
    assert chunked[0] == pytest.approx(whole[0], rel=1e-5) and chunked[2] == pytest.approx(whole[2])
    for k in whole[1]:
        np.testing.assert_allclose(chunked[1][k], whole[1][k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_head_of_refuses_models_it_does_not_know() -> None:
    from mlx_distill.training import headce

    class Other:
        pass

    assert headce.head_of(Other()) is None


def _matmuls(*outputs: mx.array) -> int:
    import io

    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return dot.getvalue().count('label ="Matmul"')


def test_chunked_head_makes_its_gradient_in_the_forward_pass() -> None:
    """Two lm_head-sized matmuls a chunk for loss + gradient (logits, softmax @ W), not three (no recompute)."""
    from mlx_distill.training import headce

    n, d, V, rows = 64, 16, 100, 16
    h = mx.random.normal((n, d), key=mx.random.key(0))
    w = mx.random.normal((V, d), key=mx.random.key(1)) * 0.3
    t = mx.random.randint(0, V, (n,), key=mx.random.key(2))

    def loss(x: mx.array) -> mx.array:
        return headce.head_cross_entropy_and_hits(x, w, t, rows)[0].sum()

    grad = mx.grad(loss)(h)
    assert _matmuls(grad) == 2 * (n // rows)
    with headce.forward_only():  # evaluation: one matmul a chunk, the same loss and hits
        assert _matmuls(loss(h)) == n // rows
        ce, hits = headce.head_cross_entropy_and_hits(h, w, t, rows)
        # still differentiable, through MLX's autodiff
        np.testing.assert_allclose(np.array(mx.grad(loss)(h)), np.array(grad), rtol=1e-4, atol=1e-6)
    assert not headce._forward_only["on"]
    ce_train, hits_train = headce.head_cross_entropy_and_hits(h, w, t, rows)
    np.testing.assert_allclose(np.array(ce), np.array(ce_train), rtol=1e-6)
    assert np.array_equal(np.array(hits), np.array(hits_train))


def test_evaluate_computes_the_loss_forward_only() -> None:
    from mlx_distill.training import headce
    from mlx_distill.training.loop import LoopSettings, evaluate

    seen: list[bool] = []

    def loss(model: object, tokens: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array, dict]:
        seen.append(headce._forward_only["on"])
        return mx.array(2.0), mx.array(3), {}

    def batches(**_: object):  # noqa: ANN202
        yield mx.zeros((1, 4), dtype=mx.int32), mx.array([[0, 4]])

    settings = LoopSettings(batch_size=1, max_seq_length=8, total_steps=1, steps_per_epoch=1, eval_every=0,
                            save_every=0)
    out = evaluate(_lora_model(), None, settings, loss, batches, mx.distributed.init())
    assert seen == [True] and out["loss"] == pytest.approx(2.0) and not headce._forward_only["on"]


def _openblas_threads() -> int | None:
    from mlx_distill import _blas

    return _blas.get_threads()  # MKL's or OpenBLAS's, whichever MLX runs on


def _train_two_streams(two: bool, steps: int = 3, checkpoint: bool = False) -> tuple[list[float], dict[str, np.ndarray]]:
    import mlx.optimizers as optim

    from mlx_distill.training import headce, streams
    from mlx_distill.training.loop import grad_checkpointing

    model = _lora_model()
    opt = optim.Adam(learning_rate=1e-2, bias_correction=True)
    opt.init(model.trainable_parameters())
    losses = []
    threads = _openblas_threads()
    with grad_checkpointing(model, checkpoint), fastops.fast_cpu_ops(model, enabled=True), headce.chunked_head(8), \
            streams.two_streams(model, enabled=two) as applied:
        assert applied == two
        assert (type(model.layers[0]) is not llama.TransformerBlock) == two
        assert (streams.active_streams() is not None) == two
        if two and threads is not None:  # the two halves' matmuls would oversubscribe the cores
            assert _openblas_threads() == streams.threads_per_stream(len(os.sched_getaffinity(0)))
        step = make_step(model, opt, lm_loss, mx.distributed.init())
        for _ in range(steps):
            value, *_ = step(*_batch())
            mx.eval(model.state, opt.state)
            losses.append(value.item())
    assert type(model.layers[0]) is llama.TransformerBlock and streams.active_streams() is None
    assert _openblas_threads() == threads
    return losses, {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def test_two_streams_train_as_one_stream() -> None:
    """Batch halves on two CPU streams (layers, chunked head, fast ops' gradients): the same training."""
    one, one_w = _train_two_streams(False)
    for stream in [s for s in fastops._OPS if s is not None]:  # built afresh by this run only
        del fastops._OPS[stream]
    two, two_w = _train_two_streams(True)
    assert two == pytest.approx(one, rel=1e-5)
    for k in one_w:
        np.testing.assert_allclose(two_w[k], one_w[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # The fast ops were built for the second stream: their hand-written gradients ran there.
    assert any(s is not None for s in fastops._OPS)
    # With --grad-checkpoint each half's recomputation runs on its own stream: the same training too.
    gc, gc_w = _train_two_streams(True, checkpoint=True)
    assert gc == pytest.approx(one, rel=1e-5)
    for k in one_w:
        np.testing.assert_allclose(gc_w[k], one_w[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_two_streams_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_distill.training import streams

    model = _lora_model()
    monkeypatch.setenv(streams.ENV, "0")
    with streams.two_streams(model, enabled=True) as applied:
        assert not applied and type(model.layers[0]) is llama.TransformerBlock
    monkeypatch.delenv(streams.ENV)
    with streams.two_streams(model, enabled=True) as outer, streams.two_streams(model, enabled=True) as inner:
        assert outer and not inner  # nested: applied once, undone once
    assert type(model.layers[0]) is llama.TransformerBlock
    assert streams.halves(5) == [slice(0, 2), slice(2, 5)]
    assert [streams.threads_per_stream(n) for n in (1, 2, 3, 8)] == [1, 1, 1, 4]


def test_the_second_streams_elementwise_chains_run_on_flat_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the second CPU stream the fast ops' elementwise chains get 1-D views, with the same numbers.

    (mx.compile would otherwise merge their constants' broadcasts with the first stream's, and
    build the second stream's kernels as unvectorized strided loops: docs/benchmarks.md.)
    """
    from mlx_distill.training import streams

    seen: list[tuple[int, ...]] = []

    def fn(a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
        seen.append(a.shape)
        return a * b, a + b

    flat = fastops.flat_on_second(fn)
    x, y = mx.arange(24, dtype=mx.float32).reshape(2, 3, 4), mx.full((2, 3, 4), 2.0)
    z = -mx.abs(mx.random.normal((4, 5, 7))) * 20
    alone = fastops.exp_neg(z)
    with streams.two_streams(_lora_model(), enabled=True):
        first, second = streams.active_streams()
        with mx.stream(first):
            assert not fastops.on_second_stream()
            flat(x, y)
        with mx.stream(second):
            assert fastops.on_second_stream()
            prod, total = flat(x, y)
            flat(x, y[0])  # not all of one shape: called as it is
            on_second = fastops.exp_neg(z)
            mx.eval(prod, total, on_second)
        monkeypatch.setenv(fastops.FLAT_ENV, "0")
        with mx.stream(second):
            assert not fastops.on_second_stream()
            flat(x, y)
    assert not fastops.on_second_stream()
    flat(x, y)
    assert seen == [(2, 3, 4), (24,), (2, 3, 4), (2, 3, 4), (2, 3, 4)]
    assert prod.shape == total.shape == (2, 3, 4)
    assert np.array_equal(np.array(prod), np.array(x * y)) and np.array_equal(np.array(total), np.array(x + y))
    assert np.array_equal(np.array(on_second), np.array(alone))
