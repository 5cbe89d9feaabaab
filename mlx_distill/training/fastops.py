"""Fast CPU versions of the exp-heavy training ops: softmax, attention, SwiGLU, cross-entropy.

Why: MLX 0.32's CPU ``exp`` is a scalar, single-threaded polynomial that calls
libm's ``fmaf`` six times per element: ~17-20 ns an element on this 2-core
x86 box, against ~0.6-1 ns for a fused multiply-add chain that ``mx.compile``
JIT-compiles into one SSE-vectorized loop. One training step of 4 x 400
tokens on the 135M demo model evaluates ~100M exps in the cross-entropy
(4 x 400 x 49,152 vocab), ~90M in the attention softmaxes (16 layers'
forward + backward, 9 heads x 400 x 400 x 4) and ~60M in SiLU: ~5 s of a
~13 s step (FACTS.md: attention 36%, cross-entropy 19%, SwiGLU 12%).

:func:`exp_neg` computes ``exp(x)`` for ``x <= 0`` with only multiplies and
adds: ``exp(x) = exp(x / 256) ** 256``, a degree-6 Taylor polynomial on
``[-0.34, 0]`` followed by 8 squarings. Measured on 8M elements: 3.8 ns
against 17 ns for ``mx.exp`` and 6.7 ns for ``mx.power(2, x * log2(e))``
(1.0 ns with the native JIT of ``cpu_levers``); max relative error 3e-5
(float32 ``mx.exp``: 3e-6), well below what a softmax or a loss notices. Inputs below -87 are
clamped there (exp(-87) = 1.6e-38, the smallest normal float is 1.2e-38), so
no squaring ever produces a denormal (x86 denormal arithmetic is ~100x
slower), and a masked ``-inf`` score becomes 1.6e-38 instead of 0: against a
softmax denominator of at least 1 that is below float resolution.

Every op here has a hand-written VJP (``mx.custom_function``), so autodiff
does not differentiate through the polynomial. They are meant for the CPU
only: on Metal (and CUDA) ``exp`` is fast and mlx-lm's fused kernels win, so
:func:`use_fast_ops` is False there and callers keep mlx-lm's path.

Reusable by other losses (e.g. the KD loss): :func:`log_softmax`,
:func:`logsumexp`, :func:`softmax`, :func:`cross_entropy` all take the class
axis last.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CLAMP = -87.0  # exp(-87) = 1.6e-38 > FLT_MIN: no denormals in the squarings
ENV = "MLX_DISTILL_FAST_OPS"  # "0" turns the CPU ops off, "1" forces them on any device
FLAT_ENV = "MLX_DISTILL_FLAT_SECOND"  # "0": the second CPU stream's ops keep their shapes (flat_on_second)


def env_off(name: str) -> bool:
    """Whether the environment variable ``name`` switches something off ("0", "false", "off", "no")."""
    return os.environ.get(name, "").strip().lower() in ("0", "false", "off", "no")


def use_fast_ops() -> bool:
    """True on the CPU (``mx.default_device()``), unless ``MLX_DISTILL_FAST_OPS=0``."""
    import mlx.core as mx

    flag = os.environ.get(ENV, "").strip().lower()
    if env_off(ENV):
        return False
    if flag in ("1", "true", "on", "yes"):
        return True
    return mx.default_device() == mx.cpu


def on_second_stream() -> bool:
    """True while ops are made on the second of ``training.streams``' two CPU streams.

    Why it matters: ``mx.compile`` merges identical subgraphs whatever their
    stream, so a constant broadcast to the same shape on both streams (the
    halves of a batch have the same shapes) becomes one node on the first
    stream. The second stream's fused kernels cannot take in another stream's
    node, so they read it as a stride-0 input and MLX builds them as loops
    with run-time strides, which g++ does not vectorize. :func:`flat_on_second`
    gives the second stream's elementwise chains 1-D views instead, whose
    broadcasts have a shape of their own (measured: lever table of
    docs/benchmarks.md).
    """
    from mlx_distill.training import streams

    two = streams.active_streams()
    if two is None or env_off(FLAT_ENV):
        return False
    import mlx.core as mx

    return mx.default_stream(mx.cpu) == two[1]


def flat_on_second(fn: Any) -> Any:
    """``fn`` of same-shaped arrays, called on 1-D views of them on the second CPU stream (:func:`on_second_stream`).

    Outputs (an array or a tuple of arrays) get the inputs' shape back;
    reshaping a contiguous array is free. Elsewhere ``fn`` is called as it is.
    """

    @functools.wraps(fn)
    def call(*arrays: Any) -> Any:
        shape = arrays[0].shape
        if len(shape) < 2 or any(a.shape != shape for a in arrays) or not on_second_stream():
            return fn(*arrays)
        out = fn(*(a.reshape(-1) for a in arrays))
        return tuple(o.reshape(shape) for o in out) if isinstance(out, tuple) else out.reshape(shape)

    return call


@flat_on_second
def exp_neg(x: Any) -> Any:
    """``exp(x)`` for ``x <= 0`` from multiplies and adds only (relative error < 4e-5).

    Positive inputs are not supported (the result is wrong, not an error):
    callers subtract a maximum first, as softmax does. On the second CPU
    stream it runs on a 1-D view (:func:`flat_on_second`).
    """
    import mlx.core as mx

    y = mx.maximum(x, CLAMP) * (1.0 / 256)
    # Taylor to degree 7 in Horner form (truncation 0.34^8 / 8! = 4e-9, x256 = 1e-6 after
    # the squarings; float rounding adds ~2e-5); mx.compile fuses it all into 2 loops.
    p = 1.0 + y * (1.0 + y * (0.5 + y * (1 / 6 + y * (1 / 24 + y * (1 / 120 + y * (1 / 720 + y / 5040))))))
    # Exactly 0 below the clamp: 1.6e-38 would turn into denormals once divided by a
    # softmax sum or multiplied by a gradient, and x86 denormal arithmetic (OpenBLAS
    # included) is ~100x slower; a causal softmax has half its entries at -inf.
    # Zeroed before the squarings, so they never see a denormal either.
    p = mx.where(x < CLAMP, 0.0, p)
    for _ in range(8):
        p = p * p
    return p


def _softmax_impl(x: Any) -> Any:
    import mlx.core as mx

    e = exp_neg(x - mx.stop_gradient(mx.max(x, axis=-1, keepdims=True)))
    return e * mx.reciprocal(e.sum(axis=-1, keepdims=True))


def _make_ops(stream: Any = None) -> dict[str, Any]:
    """The custom ops; with ``stream``, their forward and VJP ops are made on it (``on_stream``)."""
    import mlx.core as mx

    def pinned(fn: Any) -> Any:
        if stream is None:
            return fn

        def on(*args: Any) -> Any:
            # A VJP is called when the backward graph is built, outside the forward's
            # ``with mx.stream``: without this its ops would land on the default stream.
            with mx.stream(stream):
                return fn(*args)

        return on

    @mx.custom_function
    @pinned
    def softmax(x: Any) -> Any:
        return _softmax_impl(x)

    @softmax.vjp
    @pinned
    def _softmax_vjp(primals: Any, cotangent: Any, output: Any) -> Any:
        y = output
        return (y * (cotangent - (cotangent * y).sum(axis=-1, keepdims=True)),)

    @mx.custom_function
    @pinned
    def logsumexp(x: Any) -> Any:
        m = mx.stop_gradient(mx.max(x, axis=-1, keepdims=True))
        return (m + mx.log(exp_neg(x - m).sum(axis=-1, keepdims=True))).squeeze(-1)

    @logsumexp.vjp
    @pinned
    def _logsumexp_vjp(primals: Any, cotangent: Any, output: Any) -> Any:
        x = primals[0] if isinstance(primals, (tuple, list)) else primals
        # d lse / dx = softmax(x) = exp(x - lse); x - lse <= 0 always.
        return (cotangent[..., None] * exp_neg(x - output[..., None]),)

    @flat_on_second
    def sigmoid(g: Any) -> Any:
        # exp(-|g|) <= 1 never overflows; sigmoid(-g) = 1 - sigmoid(g) = e / (1 + e).
        e = exp_neg(-mx.abs(g))
        r = mx.reciprocal(1.0 + e)
        return mx.where(g >= 0, r, e * r)

    @mx.custom_function
    @pinned
    @flat_on_second
    def swiglu(gate: Any, x: Any) -> Any:
        return gate * sigmoid(gate) * x

    @flat_on_second
    def _swiglu_grads(gate: Any, x: Any, cotangent: Any) -> tuple[Any, Any]:
        s = sigmoid(gate)
        silu = gate * s
        # d silu / d gate = s + gate * s * (1 - s) = s * (1 + gate * (1 - s))
        return cotangent * x * s * (1.0 + gate * (1.0 - s)), cotangent * silu

    @swiglu.vjp
    @pinned
    def _swiglu_vjp(primals: Any, cotangent: Any, output: Any) -> Any:
        gate, x = primals
        return _swiglu_grads(gate, x, cotangent)

    @mx.custom_function
    @pinned
    def ce_and_hit(logits: Any, targets: Any) -> Any:
        t = targets[..., None]
        m = mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))
        lse = m + mx.log(exp_neg(logits - m).sum(axis=-1, keepdims=True))
        picked = mx.take_along_axis(logits, t, axis=-1)
        # The target holds the row maximum iff argmax == target (up to exact ties):
        # accuracy for free instead of a second pass over the vocabulary.
        return (lse - picked).squeeze(-1), (picked >= m).squeeze(-1)

    @ce_and_hit.vjp
    @pinned
    def _ce_vjp(primals: Any, cotangents: Any, outputs: Any) -> Any:
        logits, targets = primals
        g = (cotangents[0] if isinstance(cotangents, (tuple, list)) else cotangents)[..., None]
        ce = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        t = targets[..., None]
        lse = ce[..., None] + mx.take_along_axis(logits, t, axis=-1)
        # d ce / d logits = softmax - onehot(target); softmax = exp(logits - lse), exponent <= 0.
        grad = exp_neg(logits - lse) * g
        grad = mx.put_along_axis(grad, t, mx.take_along_axis(grad, t, axis=-1) - g, axis=-1)
        return grad, mx.zeros_like(targets)

    return {"softmax": softmax, "logsumexp": logsumexp, "swiglu": swiglu, "sigmoid": sigmoid,
            "ce_and_hit": ce_and_hit}


_OPS: dict[Any, dict[str, Any]] = {}  # per stream (None: the default one)
_stream: dict[str, Any] = {"current": None}


@contextmanager
def on_stream(stream: Any) -> Iterator[None]:
    """Within the block, the ops here make their forward and gradient ops on ``stream`` (``training.streams``)."""
    old = _stream["current"]
    _stream["current"] = stream
    try:
        yield
    finally:
        _stream["current"] = old


def current_stream() -> Any:
    """The stream set by :func:`on_stream`, or None."""
    return _stream["current"]


def _op(name: str) -> Any:
    stream = _stream["current"]
    if stream not in _OPS:
        _OPS[stream] = _make_ops(stream)
    return _OPS[stream][name]


def softmax(x: Any) -> Any:
    """Softmax over the last axis (fast exp; VJP ``y * (g - sum(g * y))``)."""
    return _op("softmax")(x)


def logsumexp(x: Any) -> Any:
    """``log(sum(exp(x)))`` over the last axis, which is dropped (fast exp; VJP ``g * softmax``)."""
    return _op("logsumexp")(x)


def log_softmax(x: Any) -> Any:
    """``x - logsumexp(x)`` over the last axis, keeping it."""
    return x - logsumexp(x)[..., None]


def sigmoid(x: Any) -> Any:
    """Numerically safe sigmoid from :func:`exp_neg` (no custom VJP: use inside other ops)."""
    return _op("sigmoid")(x)


def swiglu(gate: Any, x: Any) -> Any:
    """``silu(gate) * x``, as mlx-lm's ``activations.swiglu`` (fast exp, hand-written VJP)."""
    return _op("swiglu")(gate, x)


def cross_entropy(logits: Any, targets: Any) -> Any:
    """Per-position ``logsumexp(logits) - logits[target]`` (as ``nn.losses.cross_entropy``, no reduction)."""
    return _op("ce_and_hit")(logits, targets)[0]


def cross_entropy_and_hits(logits: Any, targets: Any) -> tuple[Any, Any]:
    """(per-position cross-entropy, bool "the target has the largest logit"), in one pass.

    ``hits`` equals ``argmax(logits) == targets`` except on exact ties for the
    maximum (then it counts as a hit); it saves a second 75M-element pass
    (4 x 384 positions x 49,152 vocab: ~250 ms a step on this CPU).
    """
    ce, hits = _op("ce_and_hit")(logits, targets)
    return ce, hits


ATTENTION_BLOCK = 128  # queries per block in causal attention


def _attend(q: Any, keys: Any, values: Any, mask: Any, shape: tuple[int, ...]) -> Any:
    """softmax(q k^T + mask) v for q already scaled and grouped to (B, kvh, rep * t, D)."""
    import mlx.core as mx

    B, kvh, rep, t, S = shape
    scores = (q @ keys.swapaxes(-1, -2)).reshape(B, kvh, rep, t, S)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
    return softmax(scores).reshape(B, kvh, rep * t, S) @ values


def attention(queries: Any, keys: Any, values: Any, scale: float, mask: Any = None,
              block: int = ATTENTION_BLOCK, segments: Any = None) -> Any:
    """``softmax(q k^T * scale + mask) v`` with grouped KV heads, on :func:`softmax`.

    ``queries`` (B, H, T, D), ``keys``/``values`` (B, KVH, S, D) with H a
    multiple of KVH; ``mask`` None, ``"causal"`` (query t sees keys up to
    S - T + t), a boolean array (True = attend) or an additive array, all
    broadcastable to (B, H, T, S) as for ``mx.fast.scaled_dot_product_attention``.
    The query heads that share a KV head are stacked into one matmul, so no
    K/V copy per head is made. A causal mask is computed in query blocks of
    ``block`` that only see the keys up to their last query: at T = 384 and
    blocks of 128, 6 of 9 score tiles are computed instead of 9, and only the
    3 diagonal tiles need a mask.

    ``segments`` (B, S) int, with ``"causal"``: a query also sees only keys of
    its own segment (packed rows: several examples per row, no attention
    across them).
    """
    import mlx.core as mx

    B, H, T, D = queries.shape
    kvh, S = keys.shape[1], keys.shape[2]
    rep = H // kvh
    q = (queries * scale).reshape(B, kvh, rep, T, D)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}; expected 'causal', None or an array")
        past = S - T  # keys before the first query (a KV cache)
        outs = []
        for start in range(0, T, block):
            t = min(block, T - start)
            end = past + start + t  # the last key this block sees, + 1
            qi = q[:, :, :, start:start + t].reshape(B, kvh, rep * t, D)
            allowed = mx.arange(end)[None] <= (mx.arange(t) + past + start)[:, None]
            if segments is not None:  # (B, 1, 1, t, end): causal and the same example
                same = segments[:, past + start:past + start + t, None] == segments[:, None, :end]
                allowed = mx.logical_and(allowed, same)[:, None, None]
            outs.append(_attend(qi, keys[:, :, :end], values[:, :, :end], allowed, (B, kvh, rep, t, end))
                        .reshape(B, kvh, rep, t, D))
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=3)
        return out.reshape(B, H, T, D)
    if mask is not None and mask.ndim == 4:  # (B|1, H|1, T, S) -> (B|1, kvh|1, rep|1, T, S)
        mask = (mask.reshape(mask.shape[0], 1, 1, T, S) if mask.shape[1] == 1
                else mask.reshape(mask.shape[0], kvh, rep, T, S))
    out = _attend(q.reshape(B, kvh, rep * T, D), keys, values, mask, (B, kvh, rep, T, S))
    return out.reshape(B, H, T, D)


_segments: dict[str, Any] = {"ids": None}


def packed_segments() -> Any:
    """The (B, T) segment ids while :func:`attention_segments` applies (packed rows), else None."""
    return _segments["ids"]


def segment_causal_mask(segments: Any) -> Any:
    """(B, 1, T, T) bool: causal, and only within a segment (a packed example)."""
    import mlx.core as mx

    T = segments.shape[1]
    causal = mx.arange(T)[None] <= mx.arange(T)[:, None]
    return mx.logical_and(causal, segments[:, :, None] == segments[:, None, :])[:, None]


def _sdpa(original: Any, fast: bool) -> Any:
    def scaled_dot_product_attention(queries: Any, keys: Any, values: Any, cache: Any, scale: float,
                                     mask: Any, sinks: Any = None) -> Any:
        segments = _segments["ids"]
        plain = cache is None and sinks is None and not queries.shape[1] % keys.shape[1]
        if segments is not None and cache is None and isinstance(mask, str) and mask == "causal":
            if fast and plain:
                return attention(queries, keys, values, scale, "causal", segments=segments)
            mask = segment_causal_mask(segments)
        if fast and plain:
            return attention(queries, keys, values, scale, mask)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    scaled_dot_product_attention._mlx_distill = True  # type: ignore[attr-defined]
    return scaled_dot_product_attention


@contextmanager
def attention_segments(model: Any, segments: Any) -> Iterator[None]:
    """Within the block, the model's causal attention stays inside each segment of ``segments`` (B, T).

    For packed rows (``training.packing``): mlx-lm builds its own ``"causal"``
    mask inside the model, so the model module's attention function is
    wrapped (unless :func:`fast_cpu_ops` already did) to add "and the same
    segment". RoPE only sees relative positions, so an example packed at
    offset 300 attends exactly as it would at offset 0.
    """
    from mlx_lm.models import base

    module = sys.modules.get(type(model).__module__)
    current = getattr(module, "scaled_dot_product_attention", None)
    swapped = False
    if current is base.scaled_dot_product_attention:
        module.scaled_dot_product_attention = _sdpa(current, fast=False)
        swapped = True
    elif not getattr(current, "_mlx_distill", False):
        from mlx_distill.errors import ConfigError

        raise ConfigError(f"--pack: {type(model).__module__} does not use mlx-lm's scaled_dot_product_attention, "
                          "so its attention cannot be kept inside each packed example; train without --pack")
    old = _segments["ids"]
    _segments["ids"] = segments
    try:
        yield
    finally:
        _segments["ids"] = old
        if swapped:
            module.scaled_dot_product_attention = current


@contextmanager
def fast_cpu_ops(model: Any, enabled: bool | None = None) -> Iterator[bool]:
    """Within the block, the model's module uses :func:`swiglu` and :func:`attention` (CPU only).

    mlx-lm model files import ``swiglu`` and ``scaled_dot_product_attention``
    into their own namespace; those names are swapped (only where they are
    still mlx-lm's own functions) and restored on exit, so generation and
    other models in the process are untouched. Yields whether it applied.
    """
    from mlx_lm.models import activations, base

    on = use_fast_ops() if enabled is None else enabled
    module = sys.modules.get(type(model).__module__)
    saved: dict[str, Any] = {}
    if on and module is not None:
        if getattr(module, "swiglu", None) is activations.swiglu:
            saved["swiglu"] = module.swiglu
            module.swiglu = swiglu
        if getattr(module, "scaled_dot_product_attention", None) is base.scaled_dot_product_attention:
            saved["scaled_dot_product_attention"] = module.scaled_dot_product_attention
            module.scaled_dot_product_attention = _sdpa(base.scaled_dot_product_attention, fast=True)
    try:
        yield bool(saved)
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
