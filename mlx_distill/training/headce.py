"""The lm_head and the cross-entropy, chunked over positions: on the CPU always, elsewhere under ``--grad-checkpoint``.

Neither the (positions, vocab) logits nor their gradient is ever whole: each
chunk's logits are recomputed in the backward pass (one more lm_head matmul
per step). At 4 x 353 positions and SmolLM2's 49,152 words the whole logits
are 278 MB each (logits, softmax, gradient, and the fused ops' temporaries).
Measured on the 2-core box (2026-11-28, ``scripts/bench_cpu_ops.py``), the
lm_head + cross-entropy and its gradient for 1412 positions, compiled: peak
memory 2.2 GB whole, 1.39 GB in chunks of 256 rows without the chunk-by-chunk
dependency below, 1.0 GB with it, 0.26 GB in chunks of :data:`CHUNK_ROWS` = 64
with it (1.0 GB without); 1.9-2.4 s in every case. In the training step on the
CPU the speed is unchanged within noise (193.5 vs 198.0 tok/s whole,
docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mlx_distill.training.fastops import exp_neg, use_fast_ops

HEAD_MODULES = ("llama", "qwen2", "qwen3", "mistral")  # Model.__call__ is exactly model.model + the head
CHUNK_ROWS = 64  # positions per chunk: 64 x 49,152 fp32 logits = 12.6 MB
_head_chunk: dict[str, int | None] = {"rows": None}


@contextmanager
def chunked_head(rows: int | None) -> Iterator[None]:
    """Within the block, :func:`head_of` models compute the lm_head + cross-entropy ``rows`` positions at a time.

    Neither the (positions, vocab) logits nor their gradient is kept: each
    chunk's logits are recomputed in the backward pass (one more lm_head
    matmul per step). ``--grad-checkpoint`` turns it on, as it does for the
    layers' activations, and so do the CPU levers (``cpu_levers``).
    """
    old = _head_chunk["rows"]
    _head_chunk["rows"] = rows
    try:
        yield
    finally:
        _head_chunk["rows"] = old


def head_chunk_rows() -> int | None:
    """The chunk size set by :func:`chunked_head`, or None (whole logits)."""
    return _head_chunk["rows"]


def head_of(model: Any) -> Any:
    """The (V, d) lm_head weight when ``model(x) == model.model(x) @ W.T`` holds (plain float, frozen heads), else None."""
    import mlx.core as mx
    import mlx.nn as nn

    if type(model).__module__.rsplit(".", 1)[-1] not in HEAD_MODULES or not hasattr(model, "model"):
        return None
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    layer = model.model.embed_tokens if tied else getattr(model, "lm_head", None)
    if type(layer) not in ((nn.Embedding,) if tied else (nn.Linear,)) or "bias" in layer:
        return None
    if layer.trainable_parameters():  # the chunked op gives the head no gradient: whole logits instead
        return None
    w = layer.weight
    return w if mx.issubdtype(w.dtype, mx.floating) else None


def _ce_rows(logits: Any, t: Any) -> tuple[Any, Any, Any]:
    """(ce, lse, hit) for (n, V) logits and (n, 1) targets; exp from :func:`exp_neg` on the CPU."""
    import mlx.core as mx

    m = mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))
    e = exp_neg(logits - m) if use_fast_ops() else mx.exp(logits - m)
    lse = m + mx.log(e.sum(axis=-1, keepdims=True))
    picked = mx.take_along_axis(logits, t, axis=-1)
    return (lse - picked).squeeze(-1), lse, (picked >= m).squeeze(-1)


def _make_head_ce(rows: int) -> Any:
    import mlx.core as mx

    def chunks(n: int) -> list[tuple[int, int]]:
        return [(a, min(a + rows, n)) for a in range(0, n, rows)]

    def after(x: Any, done: list[Any]) -> Any:
        # Chunk by chunk: without the dependency MLX's scheduler runs the chunks side by
        # side and most of their buffers are alive at once (see the module docstring).
        return mx.depends(x, done) if done else x

    @mx.custom_function
    def head_ce(h: Any, w: Any, targets: Any) -> Any:
        ces, hits = [], []
        for a, b in chunks(h.shape[0]):
            ce, _, hit = _ce_rows(after(h[a:b], ces[-1:] + hits[-1:]) @ w.T, targets[a:b, None])
            ces.append(ce)
            hits.append(hit)
        return mx.concatenate(ces), mx.concatenate(hits)

    @head_ce.vjp
    def _head_ce_vjp(primals: Any, cotangents: Any, outputs: Any) -> Any:
        h, w, targets = primals
        g = cotangents[0] if isinstance(cotangents, (tuple, list)) else cotangents
        ce = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        grads = []
        for a, b in chunks(h.shape[0]):
            logits = after(h[a:b], grads[-1:]) @ w.T  # recomputed: the point of the chunking
            t = targets[a:b, None]
            lse = ce[a:b, None] + mx.take_along_axis(logits, t, axis=-1)
            d = logits - lse
            p = exp_neg(d) if use_fast_ops() else mx.exp(d)
            # (softmax - onehot) @ W = softmax @ W - W[target], each row scaled by its g.
            grads.append(g[a:b, None] * (p @ w - w[targets[a:b]]))
        # The head is frozen (LoRA and our full fine-tuning leave it alone): its gradient is
        # never evaluated, so this zeros array costs nothing.
        return mx.concatenate(grads), mx.zeros_like(w), mx.zeros_like(targets)

    return head_ce


_HEAD_OPS: dict[int, Any] = {}


def head_cross_entropy_and_hits(h: Any, weight: Any, targets: Any, rows: int) -> tuple[Any, Any]:
    """(cross-entropy, hits) of ``h @ weight.T`` against ``targets`` per position, ``rows`` positions at a time.

    ``h`` (..., d), ``targets`` (...). Same numbers as :func:`cross_entropy_and_hits`
    on the full logits; the gradient reaches ``h`` only (the head is frozen).
    """
    shape = targets.shape
    if rows not in _HEAD_OPS:
        _HEAD_OPS[rows] = _make_head_ce(rows)
    ce, hits = _HEAD_OPS[rows](h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1))
    return ce.reshape(shape), hits.reshape(shape)
