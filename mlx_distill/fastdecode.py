"""Greedy batched decoding on the CPU with one-query attention in the BLAS shim's C kernel.

Why: in a decode step of 8 sequences on a 2-core CPU, after the matmuls went
to the shim's own kernel (``_skinny_blas``), MLX's one-query attention and
the KV-cache update took ~18-20 ms of a ~62-70 ms step (2026-12-04,
measured by swapping them out of ``mlx_lm.models.llama``): every layer
writes the new key and value into mlx-lm's cache with a slice update, then
``scaled_dot_product_attention`` runs two small matmuls and a softmax per
sequence and head. Here each layer's keys and values live in a numpy slot
cache, ``(slots, kv heads, capacity, head dim)``, and one C call a layer
(``mlx_distill_attend`` in ``assets/skinny_blas.c``) appends the new key and
value of every sequence and attends over its slot, the query heads of a key
head sharing each row read, split between the shim's threads. The layer's
queries, keys and values are evaluated for it (one ``mx.eval`` a layer), so
the graph is cut there; the rest of the step is mlx-lm's model as it is.
BatchGenerator's per-step log-softmax (5 ms of a step for 8 x 49,152, which
greedy decoding does not need) goes too.

The SwiGLU (``silu(gate) * up``) of the steps and the prefills runs in the
shim too (``mlx_distill_swiglu``): MLX 0.32's CPU ``exp`` is scalar, and the
30 layers' SwiGLU of 8 rows x 1536 took ~6.4 ms of a ~44 ms step (2026-12-06,
2-core AMD EPYC; it costs a second cut in each layer's graph, ~0.06 ms).
``MLX_DISTILL_DECODE_SWIGLU=0`` keeps mlx-lm's.

Continuous batching: a finished sequence frees its slot, and the next prompt
is prefilled (one prompt a call, with mlx-lm's own cache, after the shared
system prompt, which is prefilled once) and copied into it. The answers are
plain greedy decoding's; the attention's sums run in another order than
MLX's, so a near-tie between two tokens can go the other way (the tests
compare the logits and the answers with mlx-lm's path).

Only greedy, on the CPU, with the shim built for this CPU, and for models
whose attention takes ``cache.offset`` and ``cache.make_mask`` (as
:mod:`mlx_distill.lookup`); otherwise mlx-lm's ``BatchGenerator``.
``MLX_DISTILL_FAST_DECODE=0`` turns it off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from mlx_distill.errors import ConfigError

ENV = "MLX_DISTILL_FAST_DECODE"
SWIGLU_ENV = "MLX_DISTILL_DECODE_SWIGLU"  # "0": fastdecode keeps mlx-lm's SwiGLU
SPIN_US = 2000  # the shim's helpers spin this long between jobs while decoding (MLX_DISTILL_DECODE_SPIN_US)


def supported(model: Any) -> bool:
    """Whether :func:`decode` can run ``model`` here (CPU, the native shim, an attention as in ``lookup``)."""
    import mlx.core as mx

    from mlx_distill import _skinny_blas, lookup
    from mlx_distill.training.fastops import env_off

    if env_off(ENV) or mx.default_device() != mx.cpu or _skinny_blas.attend_fn() is None:
        return False
    return (lookup.supported(model) and all(hasattr(layer, "self_attn") for layer in model.layers)
            and not any(getattr(layer, "use_sliding", False) for layer in model.layers))  # every layer sees all


class _Rows:
    """What the layers share in a step: the slot of each batch row, its length so far and its RoPE position."""

    def __init__(self, slots: int, capacity: int):
        import numpy as np

        from mlx_distill import _skinny_blas

        self.kernel = _skinny_blas.attend_fn()  # mlx_distill_attend
        self.capacity = capacity
        self.lens = np.zeros(slots, dtype=np.int32)  # tokens in each slot's cache
        self.slots = np.zeros(0, dtype=np.int32)  # the step's batch rows -> slots
        self.step_lens = np.zeros(0, dtype=np.int32)  # lens of those slots at the step's start
        self.offset: Any = None  # mx int32 (rows,): the RoPE position of each row's token
        self.ropes: dict[tuple[float, int], tuple[Any, Any]] = {}  # (base, dims) -> the step's (cos, sin) tables

    def start(self, slots: list[int]) -> None:
        import mlx.core as mx
        import numpy as np

        self.slots = np.array(slots, dtype=np.int32)
        self.step_lens = np.ascontiguousarray(self.lens[self.slots])
        self.offset = mx.array(self.step_lens)
        for base, dims in self.ropes:  # in float32, as mx.fast.rope computes its angles
            inv = np.power(np.float32(base), -np.arange(0, dims, 2, dtype=np.float32) / np.float32(dims))
            theta = self.step_lens.astype(np.float32)[:, None] * inv.astype(np.float32)[None, :]
            self.ropes[(base, dims)] = (np.ascontiguousarray(np.cos(theta)), np.ascontiguousarray(np.sin(theta)))


class _InKernel:
    """The ``offset`` a layer whose RoPE runs in the kernel hands its ``rope`` (:class:`_KernelRoPE` passes through)."""


class _Layer:
    """One layer's slot cache; the model's attention reads ``offset`` and ``make_mask`` from here."""

    def __init__(self, rows: _Rows, rope: tuple[float, int] | None):
        self.rows = rows
        self.rope = rope  # (base, dims): the kernel rotates the queries and the new key; None: MLX did
        self.keys: Any = None  # numpy (slots, kv heads, capacity, head dim), made at the first write
        self.values: Any = None

    @property
    def offset(self) -> Any:
        return _InKernel() if self.rope else self.rows.offset

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> Any:
        if n != 1:
            raise ValueError("fastdecode takes one token a row per step")
        return None  # each row attends exactly its own slot's tokens

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        return keys, values  # the kernel appends them while it attends

    def _alloc(self, heads: int, dim: int) -> None:
        import numpy as np

        if self.keys is None:
            shape = (len(self.rows.lens), heads, self.rows.capacity, dim)
            self.keys = np.zeros(shape, dtype=np.float32)  # pages are touched only as slots fill
            self.values = np.zeros(shape, dtype=np.float32)

    def fill(self, slot: int, keys: Any, values: Any) -> None:
        """A prefilled prompt's keys and values, (1, kv heads, n, dim) MLX arrays, into ``slot``."""
        import numpy as np

        self._alloc(keys.shape[1], keys.shape[3])
        n = keys.shape[2]
        self.keys[slot, :, :n] = np.asarray(keys[0])
        self.values[slot, :, :n] = np.asarray(values[0])

    def attend(self, queries: Any, keys: Any, values: Any, scale: float) -> Any:
        import mlx.core as mx
        import numpy as np

        mx.eval(queries, keys, values)
        b, hq, _, d = queries.shape
        hkv = keys.shape[1]
        self._alloc(hkv, d)
        q, k, v = (np.ascontiguousarray(a, dtype=np.float32) for a in (queries, keys, values))
        out = np.empty((b, hq, 1, d), dtype=np.float32)
        rows = self.rows
        cos = sin = None
        if self.rope:
            if self.rope[1] != d:
                raise RuntimeError(f"RoPE over {self.rope[1]} of a head's {d} dimensions is not the kernel's")
            cos, sin = (t.ctypes.data for t in rows.ropes[self.rope])
        rc = rows.kernel(b, hq, hkv, d, rows.capacity, scale, q.ctypes.data, k.ctypes.data, v.ctypes.data,
                         self.keys.ctypes.data, self.values.ctypes.data, rows.slots.ctypes.data,
                         rows.step_lens.ctypes.data, out.ctypes.data, cos, sin)
        if rc != 0:
            raise RuntimeError(f"mlx_distill_attend refused shapes q{q.shape} k{k.shape} (capacity {rows.capacity})")
        out_mx = mx.array(out)
        return out_mx if queries.dtype == mx.float32 else out_mx.astype(queries.dtype)


def _kernel_rope(attn: Any) -> tuple[float, int] | None:
    """(base, dims) when ``attn.rope`` is a plain ``nn.RoPE`` over the whole head, which the kernel can apply."""
    import mlx.nn as nn

    rope = getattr(attn, "rope", None)
    head = getattr(attn, "head_dim", None)
    if type(rope) is not nn.RoPE or rope.traditional or rope.scale != 1.0 or (head is not None and rope.dims != head):
        return None
    return float(rope.base), int(rope.dims)


def _wrap_rope() -> Any:
    import mlx.nn as nn

    class _KernelRoPE(nn.Module):
        """A layer's ``nn.RoPE`` that passes the queries and keys of a :class:`_Layer` step through unrotated."""

        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner

        def __call__(self, x: Any, offset: Any = 0) -> Any:
            return x if isinstance(offset, _InKernel) else self.inner(x, offset=offset)

    return _KernelRoPE


@contextmanager
def _kernel_attention(model: Any) -> Iterator[list[tuple[float, int] | None]]:
    """Within the block, the model's attention over a :class:`_Layer` runs in the C kernel.

    And the shim's helper threads spin :data:`SPIN_US` between jobs instead of
    100 µs: a decode step's calls come further apart here (the Python between
    layers), and waking a sleeping helper cost ~100 µs a call on a 2-core VM
    (2026-12-05: 30 layers' attention from cold caches 237 -> 143 µs a call;
    batched generation 17.1-18.3 -> 14.2-14.6 s).
    """
    from mlx_distill import _skinny_blas

    module = sys.modules[type(model).__module__]
    original = module.scaled_dot_product_attention

    def attention(queries: Any, keys: Any, values: Any, cache: Any, scale: float, mask: Any, **kw: Any) -> Any:
        if not isinstance(cache, _Layer):
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask, **kw)
        if queries.shape[2] != 1 or mask is not None or kw.get("sinks") is not None:
            raise ValueError("fastdecode: one query a row, no mask, no sinks")
        return cache.attend(queries, keys, values, scale)

    raw = os.environ.get("MLX_DISTILL_DECODE_SPIN_US", str(SPIN_US)).strip()
    if not raw.isdigit():
        raise ConfigError(f"MLX_DISTILL_DECODE_SPIN_US must be a whole number of microseconds, got {raw!r}")
    spin = int(raw)
    attns = [layer.self_attn for layer in model.layers]
    ropes = [_kernel_rope(a) for a in attns]
    wrapper = _wrap_rope()
    swiglu = _kernel_swiglu(module)
    module.scaled_dot_product_attention = attention
    if swiglu is not None:
        module.swiglu = swiglu
    was = _skinny_blas.set_spin(spin)
    try:
        for a, rope in zip(attns, ropes):
            if rope:
                a.rope = wrapper(a.rope)
        yield ropes
    finally:
        for a, rope in zip(attns, ropes):
            if rope and type(a.rope).__name__ == "_KernelRoPE":
                a.rope = a.rope.inner
        module.scaled_dot_product_attention = original
        if swiglu is not None:
            module.swiglu = swiglu.original
        if was is not None:
            _skinny_blas.set_spin(was)


def _kernel_swiglu(module: Any) -> Any:
    """A stand-in for ``module.swiglu`` whose fp32 calls run in the shim, or None (not mlx-lm's, or off).

    The gate and up projections are evaluated first (a second cut in the
    layer's graph), then ``mlx_distill_swiglu`` makes the product; other
    dtypes keep mlx-lm's. Steps and prefills alike (prefills too: 2026-12-06,
    AMD EPYC, 8 prompts alternating, 4 rounds, 132.5 -> 137.9 useful tok/s mean).
    """
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models import activations

    from mlx_distill import _skinny_blas
    from mlx_distill.training.fastops import env_off

    original = getattr(module, "swiglu", None)
    kernel = _skinny_blas.swiglu_fn()
    if env_off(SWIGLU_ENV) or original is not activations.swiglu or kernel is None:
        return None

    def swiglu(gate: Any, x: Any) -> Any:
        if gate.shape != x.shape or gate.dtype != mx.float32 or x.dtype != mx.float32:
            return original(gate, x)
        mx.eval(gate, x)
        g, u = np.ascontiguousarray(gate), np.ascontiguousarray(x)
        out = np.empty_like(g)
        kernel(g.size, g.ctypes.data, u.ctypes.data, out.ctypes.data)
        return mx.array(out)

    swiglu.original = original  # type: ignore[attr-defined]
    return swiglu


def _last_logits(model: Any, tokens: list[int], cache: list[Any]) -> Any:
    """A prefill's logits at its last position only (the lm_head of a 49,152-word vocabulary over every prompt
    token was ~15% of a prefill's time; 2026-12-05: 8 prompts 4.08 -> 3.51 s before OpenBLAS's kernels were fixed)."""
    import mlx.core as mx

    inner, args = getattr(model, "model", None), getattr(model, "args", None)
    if inner is None or args is None or not hasattr(inner, "embed_tokens"):
        return model(mx.array([tokens]), cache=cache)[0, -1]
    h = inner(mx.array([tokens]), cache=cache)[:, -1:]
    head = inner.embed_tokens.as_linear if getattr(args, "tie_word_embeddings", False) else model.lm_head
    return head(h)[0, -1]


def decode(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int,
    stop: set[int],
    batch_size: int = 8,
    on_done: Callable[[int, list[int], str], None] | None = None,
) -> list[tuple[list[int], str]]:
    """Greedy answers to token-id ``prompts``, ``batch_size`` at a time; ``[(tokens, "eos" | "length")]`` in order.

    The stop token itself is not returned; ``on_done(index, tokens, reason)``
    is called as each sequence finishes.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be 1 or more, got {max_tokens}")
    if not prompts:
        return []
    with _kernel_attention(model) as ropes:
        return _decode(model, prompts, max_tokens=max_tokens, stop=stop, batch_size=batch_size, on_done=on_done,
                       ropes=ropes)


def _decode(
    model: Any, prompts: Sequence[Sequence[int]], *, max_tokens: int, stop: set[int], batch_size: int,
    on_done: Callable[[int, list[int], str], None] | None, ropes: list[tuple[float, int] | None],
) -> list[tuple[list[int], str]]:
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from mlx_distill.lookup import shared_prefix

    n_slots = max(1, min(batch_size, len(prompts)))
    rows = _Rows(n_slots, max(len(p) for p in prompts) + max_tokens)
    layers = [_Layer(rows, rope) for rope in ropes]
    rows.ropes = {rope: (None, None) for rope in ropes if rope}
    shared = shared_prefix(prompts)
    prefix: list[tuple[Any, Any]] = []
    if shared:  # a common system prompt: prefilled once
        cache = [KVCache() for _ in model.layers]
        model(mx.array([list(prompts[0][:shared])]), cache=cache)
        prefix = [c.keys_and_values() for c in cache]
        mx.eval(prefix)

    answers: list[list[int]] = [[] for _ in prompts]
    results: list[tuple[list[int], str] | None] = [None] * len(prompts)
    last: dict[int, int] = {}  # slot -> the token it feeds next
    owner: dict[int, int] = {}  # slot -> prompt index
    queue = iter(range(len(prompts)))

    def emit(slot: int, token: int) -> None:
        i = owner[slot]
        if token not in stop:
            answers[i].append(token)
        if token in stop or len(answers[i]) >= max_tokens:
            results[i] = (answers[i], "eos" if token in stop else "length")
            if on_done is not None:
                on_done(i, *results[i])
            del owner[slot]
            last.pop(slot, None)
            admit(slot)
        else:
            last[slot] = token

    def admit(slot: int) -> None:
        i = next(queue, None)
        if i is None:
            return
        cache = [KVCache() for _ in model.layers]
        for c, (k, v) in zip(cache, prefix):
            c.state = (k, v, k.shape[2])  # a later update makes new arrays: the prefix stays
        token = int(mx.argmax(_last_logits(model, list(prompts[i][shared:]), cache)).item())
        for layer, c in zip(layers, cache):
            layer.fill(slot, *c.keys_and_values())
        rows.lens[slot] = len(prompts[i])
        owner[slot] = i
        emit(slot, token)

    for slot in range(n_slots):
        admit(slot)
    while last:
        batch = sorted(last)
        rows.start(batch)
        logits = model(mx.array([[last[s]] for s in batch]), cache=layers)
        tokens = mx.argmax(logits[:, -1], axis=-1).tolist()
        rows.lens[batch] += 1
        for slot, token in zip(batch, tokens):
            emit(slot, token)
    return [r for r in results if r is not None]
