"""The lm_head and the cross-entropy, chunked over positions: on the CPU always, elsewhere under ``--grad-checkpoint``.

Neither the (positions, vocab) logits nor their gradient is ever whole. Each
chunk's gradient with respect to the hidden states is made in the forward
pass, from the chunk's own exps (:func:`_ce_rows`), and kept (positions x
hidden, 3.3 MB at 1412 x 576); the backward pass only scales it. At 4 x 353
positions and SmolLM2's 49,152 words the whole logits are 278 MB each.
Measured on the 2-core box (2026-11-28, ``scripts/bench_cpu_ops.py``), the
lm_head + cross-entropy and its gradient for 1412 positions, compiled: whole
logits 1942-1971 ms and 2224 MB at the peak; chunks of 64 positions
(:data:`LEAN_CHUNK_ROWS`), one after the other, 1240-1346 ms and 205 MB (468 MB
when MLX's scheduler is left to order the chunks: it runs them side by side). Before the gradient
moved into the forward pass, the backward recomputed each chunk's logits and
exps: 2382 ms and 264 MB. In the training step the chunked head is now faster
than whole logits (272.4 vs 172.3 tok/s, docs/benchmarks.md). A 64-row
chunk's matmuls run slower than larger ones (161-181 vs 279-321 GFLOP/s on
whole logits), so the CPU lever uses :data:`CHUNK_ROWS` = 256 positions
(50 MB of logits a chunk; the training step 1.03-1.22x faster than at 64
rows in four comparisons, bench_train way ``mlx-head64``; peak RSS +0.2 GB);
``--grad-checkpoint``, whose point is memory, keeps 64.
Evaluation (:func:`forward_only`) skips the gradient's matmul.

Only the positions whose target counts go through the head (:func:`loss_rows`);
the prompt's and the padding's do not. Their number depends on the batch and
a compiled step has static shapes, so :func:`keyed_by_loss_rows` counts them
on the host (``losses.position_counter``), rounds up to a multiple of
:data:`LOSS_ROWS_STEP` and compiles one step per rounded count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mlx_distill.training.fastops import env_off, exp_neg, use_fast_ops

HEAD_MODULES = ("llama", "qwen2", "qwen3", "mistral")  # Model.__call__ is exactly model.model + the head
CHUNK_ROWS = 256  # positions per chunk, CPU lever: 256 x 49,152 fp32 logits = 50 MB
LEAN_CHUNK_ROWS = 64  # under --grad-checkpoint: 12.6 MB a chunk
LOSS_ROWS_ENV = "MLX_DISTILL_LOSS_ROWS"  # "0": the chunked head runs over every position
LOSS_ROWS_STEP = CHUNK_ROWS  # the head's position count is rounded up to a multiple of this
_head_chunk: dict[str, int | None] = {"rows": None}
_forward_only = {"on": False}
_slots = {"n": 0}  # positions the head computes in the step being traced (0: all)


@contextmanager
def chunked_head(rows: int | None) -> Iterator[None]:
    """Within the block, :func:`head_of` models compute the lm_head + cross-entropy ``rows`` positions at a time.

    Neither the (positions, vocab) logits nor their gradient is ever whole:
    each chunk's gradient is made in the forward pass from its own exps
    (:func:`_ce_rows`). ``--grad-checkpoint`` turns it on, as it does for the
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


def _ce_rows(logits: Any, t: Any, w: Any = None) -> tuple[Any, ...]:
    """(ce, hit) for (n, V) logits ``h @ w.T`` and (n, 1) targets, and ``d ce / d h`` when ``w`` is given.

    The gradient is made here, from the forward's own exps: ``(softmax - onehot) @ w
    = (e @ w) / sum(e) - w[target]`` with ``e = exp(logits - max)``. The backward
    pass then only scales it by each position's cotangent, instead of
    recomputing the chunk's logits (a second lm_head matmul) and their exps.
    The exp is :func:`exp_neg` on the CPU.
    """
    import mlx.core as mx

    m = mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))
    e = exp_neg(logits - m) if use_fast_ops() else mx.exp(logits - m)
    s = e.sum(axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, t, axis=-1)
    out = (m + mx.log(s) - picked).squeeze(-1), (picked >= m).squeeze(-1)
    if w is None:
        return out
    return (*out, (e @ w) * mx.reciprocal(s) - w[t.squeeze(-1)])


def _chunked(h: Any, w: Any, targets: Any, rows: int, with_grad: bool) -> tuple[Any, ...]:
    """:func:`_ce_rows` over ``rows`` positions at a time, one chunk after the other."""
    import mlx.core as mx

    outs: list[list[Any]] = []
    for a in range(0, h.shape[0], rows):
        x = h[a:a + rows]
        if outs:  # without the dependency MLX's scheduler runs the chunks side by side and
            # most of their buffers are alive at once (see the module docstring)
            x = mx.depends(x, [o[-1] for o in outs])
        got = _ce_rows(x @ w.T, targets[a:a + rows, None], w if with_grad else None)
        outs = outs or [[] for _ in got]
        for o, v in zip(outs, got):
            o.append(v)
    return tuple(mx.concatenate(o) for o in outs)


def _make_head_ce(rows: int) -> Any:
    import mlx.core as mx

    @mx.custom_function
    def head_ce(h: Any, w: Any, targets: Any) -> Any:
        return _chunked(h, w, targets, rows, with_grad=True)

    @head_ce.vjp
    def _head_ce_vjp(primals: Any, cotangents: Any, outputs: Any) -> Any:
        h, w, targets = primals
        # The head is frozen (LoRA and our full fine-tuning leave it alone): its gradient is
        # never evaluated, so this zeros array costs nothing.
        return cotangents[0][:, None] * outputs[2], mx.zeros_like(w), mx.zeros_like(targets)

    return head_ce


_HEAD_OPS: dict[int, Any] = {}


@contextmanager
def forward_only() -> Iterator[None]:
    """Within the block, the chunked head makes no gradient in its forward pass (evaluation).

    The training op computes each chunk's gradient from the forward's exps
    (:func:`_ce_rows`): an extra ``e @ w`` matmul per chunk that a loss without
    a backward pass does not need. Differentiating inside this block still
    works, through MLX's own autodiff.
    """
    old = _forward_only["on"]
    _forward_only["on"] = True
    try:
        yield
    finally:
        _forward_only["on"] = old


def head_cross_entropy_and_hits(h: Any, weight: Any, targets: Any, rows: int) -> tuple[Any, Any]:
    """(cross-entropy, hits) of ``h @ weight.T`` against ``targets`` per position, ``rows`` positions at a time.

    ``h`` (..., d), ``targets`` (...). Same numbers as :func:`cross_entropy_and_hits`
    on the full logits; the gradient reaches ``h`` only (the head is frozen).
    """
    import mlx.core as mx

    from mlx_distill.training import streams

    shape = targets.shape
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    two = streams.active_streams()
    if two is None or h.shape[0] < 2:
        ce, hits = _head_ce(h, weight, targets, rows)
    else:  # each half of the positions on its own CPU stream (``training.streams``)
        parts = []
        for stream, part in zip(two, streams.halves(h.shape[0])):
            with mx.stream(stream):
                parts.append(_head_ce(h[part], weight, targets[part], rows))
        ce, hits = (mx.concatenate([p[i] for p in parts]) for i in (0, 1))
    return ce.reshape(shape), hits.reshape(shape)


def _head_ce(h: Any, weight: Any, targets: Any, rows: int) -> tuple[Any, Any]:
    if _forward_only["on"]:
        return _chunked(h, weight, targets, rows, with_grad=False)
    if rows not in _HEAD_OPS:
        _HEAD_OPS[rows] = _make_head_ce(rows)
    ce, hits, _ = _HEAD_OPS[rows](h, weight, targets)
    return ce, hits


# -- the head over the loss positions only ---------------------------------------------------------


def slots_for(count: int, total: int) -> int:
    """Positions the head computes for a batch of ``total`` with ``count`` loss positions (0: all of them).

    ``count`` rounded up to a multiple of :data:`LOSS_ROWS_STEP` (= the CPU
    lever's chunk), so that a run compiles a step for only a few counts per
    batch width.
    """
    if env_off(LOSS_ROWS_ENV):
        return 0
    k = max(1, -(-count // LOSS_ROWS_STEP)) * LOSS_ROWS_STEP
    return k if k < total else 0


def compile_keyed(compile_fn: Any, fn: Any, model: Any, loss: Any, prefix: Any = None) -> Any:
    """``compile_fn(fn)`` keyed by :func:`keyed_by_loss_rows`; with a ``prefix``, its (plain, capture, replay).

    The training step (``loop.make_step``) and the validation loss
    (``validation.compiled_eval_loss``) are both made here. Keyed only when
    ``model``'s head can be chunked (:func:`head_of`) and ``loss`` has a
    counter (``losses.position_counter``). ``replay(*batch, hidden)``'s last
    argument is the stored hidden states, not the batch: its count leaves it out.
    """
    from mlx_distill.training.losses import position_counter

    count = position_counter(loss) if head_of(model) is not None else None
    if prefix is None:
        return keyed_by_loss_rows(compile_fn, fn, count)
    capture, replay = prefix.variants(fn)
    replay_count = None if count is None else (lambda *args: count(*args[:-1]))
    return (keyed_by_loss_rows(compile_fn, fn, count), keyed_by_loss_rows(compile_fn, capture, count),
            keyed_by_loss_rows(compile_fn, replay, replay_count))


def keyed_by_loss_rows(compile_fn: Any, fn: Any, count: Any) -> Any:
    """``compile_fn(fn)``, traced once per rounded number of loss positions (:func:`slots_for`).

    ``count(*args) -> (loss positions, all positions)`` counts a batch on the
    host (``losses.position_counter``); the call passes the rounded count as a
    constant, so ``mx.compile`` traces again when it changes, and the trace
    reads it through :func:`loss_rows`. ``count`` None: ``compile_fn(fn)`` as it is.
    """
    if count is None:
        return compile_fn(fn)
    compiled = compile_fn(lambda slots, *args: fn(*args))

    def call(*args: Any) -> Any:
        slots = slots_for(*count(*args)) if head_chunk_rows() else 0
        old = _slots["n"]
        _slots["n"] = slots
        try:
            return compiled(slots, *args)
        finally:
            _slots["n"] = old

    return call


def loss_rows(h: Any, targets: Any, mask: Any) -> tuple[Any, Any, Any]:
    """``h`` (..., d), ``targets`` and ``mask`` (...) at the loss positions only, in order, when a step is keyed.

    Inside a :func:`keyed_by_loss_rows` trace with a count ``k``: the first
    ``k`` positions of ``mask``'s true ones (then padding positions, whose
    new mask is False), flattened; otherwise the inputs unchanged.
    """
    import mlx.core as mx

    k = _slots["n"]
    if not k:
        return h, targets, mask
    flat = mask.reshape(-1)
    n = flat.shape[0]
    order = mx.argsort(mx.where(flat, 0, n) + mx.arange(n))[:k]  # loss positions first, in order
    keep = mx.arange(k) < flat.sum()
    return h.reshape(n, h.shape[-1])[order], targets.reshape(-1)[order], keep
