"""Greedy batched decoding with prompt-lookup drafts: several tokens a row per model call, the tokens of plain greedy.

Each step, every row proposes up to ``k`` draft tokens by prompt lookup: the
most recent earlier place where the last 3 (else 2, else 1) tokens of its
prompt + answer occurred, and the tokens that followed there. One model call
verifies them all: it takes ``[last token, drafts...]`` for every row, and the
row keeps the drafts that equal its own greedy predictions, plus one more
token (the prediction after the last kept one). The answer is the greedy
answer; only the number of model calls changes. Code repeats its own names
and lines, and a call of a few rows is bound by reading the weights more
than by its few tokens.

Rows keep different numbers of the slots each call writes into the KV cache;
the slots they rejected stay behind as holes, masked out of attention
(:class:`_Rows`), and each row's RoPE position counts only its kept tokens,
so every kept token sees exactly what plain decoding would show it. Left
padding of the prompts is such a hole too; rows that finish leave the batch.

Only for models whose attention takes ``cache.offset`` for RoPE and
``cache.make_mask`` for the mask (:data:`MODULES`); others, and sampling
(temperature > 0), use mlx-lm's ``BatchGenerator`` (``generate.generate_batch``).

Opt-in (``--lookup-tokens``): on the 2-core CPU of docs/benchmarks.md
(2026-11-28, ``scripts/bench_cpu_ops.py --worker lookup``), a call of 8 rows
took 118 ms at 1 token a row and 163 / 204 / 216 ms at 2 / 3 / 4, while the
calls of a batch fell only 1.30-1.47x (it runs until its slowest row ends):
0.99-1.16x end to end at ``k`` = 1 across runs, slower above; the same
answers throughout. Since greedy decoding on the CPU runs on
:mod:`mlx_distill.fastdecode` (attention in a C kernel; 2026-12-05), lookup,
which keeps MLX's attention, is slower than it: 0.64-0.71x.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

MODULES = ("llama", "qwen2", "qwen3", "mistral")  # rope(offset=cache.offset), create_attention_mask(h, cache[0])
NGRAMS = (3, 2, 1)
GROW = 256  # KV slots added at a time
MIN_SHARED_PREFIX = 32  # a common prefix shorter than this is not worth prefilling once
MAX_SPLIT = 16  # calls of up to this many tokens a row take the attention one query at a time (a prefill does not)


def supported(model: Any) -> bool:
    """Whether :func:`decode` can run ``model`` (its attention reads the cache as above)."""
    return type(model).__module__.rsplit(".", 1)[-1] in MODULES and hasattr(model, "layers")


class _Rows:
    """What the layers' caches share: which slots each row keeps, and each row's next RoPE position."""

    def __init__(self, offset: Any):
        import mlx.core as mx

        self.valid = mx.zeros((offset.shape[0], 0), dtype=mx.bool_)  # (rows, slots written)
        self.offset = offset  # (rows,) int32: the position of the call's first token in each row
        self.incoming: Any = None  # (rows, N) bool: which of the call's tokens are real (left padding is not)

    def mask(self, n: int) -> Any:
        """(rows, 1, n, slots + n): the kept slots, then causal over the call's tokens (each sees itself)."""
        import mlx.core as mx

        rows = self.offset.shape[0]
        causal = mx.tril(mx.ones((n, n), dtype=mx.bool_))
        new = causal[None] & (self.incoming[:, None, :] | mx.eye(n, dtype=mx.bool_)[None])
        old = mx.broadcast_to(self.valid[:, None, :], (rows, n, self.valid.shape[1]))
        return mx.concatenate([old, new], axis=-1)[:, None]


class _LayerCache:
    """One layer's keys and values, in slots; the attention reads ``offset`` and ``make_mask`` from here."""

    def __init__(self, rows: _Rows):
        self.rows = rows
        self.keys: Any = None
        self.values: Any = None
        self.used = 0

    @property
    def offset(self) -> Any:
        return self.rows.offset

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> Any:
        return self.rows.mask(n)

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        import mlx.core as mx

        b, h, n, _ = keys.shape
        if self.keys is None or self.used + n > self.keys.shape[2]:
            more = -(-n // GROW) * GROW
            k = mx.zeros((b, h, more, keys.shape[3]), keys.dtype)
            v = mx.zeros((b, h, more, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = k, v
            else:
                self.keys = mx.concatenate([self.keys[..., :self.used, :], k], axis=2)
                self.values = mx.concatenate([self.values[..., :self.used, :], v], axis=2)
        self.keys[..., self.used:self.used + n, :] = keys
        self.values[..., self.used:self.used + n, :] = values
        self.used += n
        return self.keys[..., :self.used, :], self.values[..., :self.used, :]

    def keep_rows(self, idx: Any) -> None:
        self.keys, self.values = self.keys[idx], self.values[idx]


class _Lookup:
    """One row's prompt + answer, with the positions that followed each of its 1-, 2- and 3-grams last."""

    def __init__(self, tokens: Sequence[int]):
        self.tokens: list[int] = []
        self.seen: dict[tuple[int, ...], int] = {}
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        t = len(self.tokens)
        for n in NGRAMS:
            if t >= n:
                self.seen[tuple(self.tokens[t - n:t])] = t
        self.tokens.append(token)

    def drafts(self, k: int) -> list[int]:
        for n in NGRAMS:
            at = self.seen.get(tuple(self.tokens[-n:])) if len(self.tokens) >= n else None
            if at is not None:
                return self.tokens[at:at + k]
        return []


@contextmanager
def _attention_by_query(model: Any) -> Iterator[None]:
    """Within the block, the model's attention over a :class:`_LayerCache` runs one query position at a time.

    MLX 0.32's CPU ``scaled_dot_product_attention`` has a fast path for one
    query a row only: 4 queries over 104 keys took 3.0-3.3 ms without a mask
    or causal and 6.7 ms with a boolean one, one query 0.28-0.30 ms (8 rows,
    9 heads; 2026-11-28, ``bench_cpu_ops.py --worker lookup``). A verification
    call has 2-5 queries a row; each goes through the one-query path with its
    own row of the mask (a call of 4 tokens a row: 216 ms against 264 with
    mlx-lm's cache).
    """
    import sys

    import mlx.core as mx

    module = sys.modules[type(model).__module__]
    original = getattr(module, "scaled_dot_product_attention", None)
    if original is None:
        yield
        return

    def by_query(queries: Any, keys: Any, values: Any, cache: Any, scale: float, mask: Any, **kw: Any) -> Any:
        n = queries.shape[2]
        if not isinstance(cache, _LayerCache) or n == 1 or n > MAX_SPLIT or kw.get("sinks") is not None:
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask, **kw)
        return mx.concatenate([mx.fast.scaled_dot_product_attention(
            queries[:, :, j:j + 1], keys, values, scale=scale, mask=mask[:, :, j:j + 1]) for j in range(n)], axis=2)

    module.scaled_dot_product_attention = by_query
    try:
        yield
    finally:
        module.scaled_dot_product_attention = original


def shared_prefix(prompts: Sequence[Sequence[int]], minimum: int = MIN_SHARED_PREFIX, limit: int | None = None) -> int:
    """The length of the prompts' common first tokens, or 0 under ``minimum`` (a system prompt to prefill once).

    At most ``limit`` tokens (default: each prompt keeps one of its own).
    Also used by ``generate.shared_prefix_cache`` and ``training.teacher_cache``.
    """
    if len(prompts) < 2:
        return 0
    most = min(len(p) for p in prompts) - 1 if limit is None else limit
    first = prompts[0]
    k = 0
    while k < most and all(p[k] == first[k] for p in prompts):
        k += 1
    return k if k >= minimum else 0


def decode(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int,
    stop: set[int],
    k: int = 1,
    on_done: Callable[[int, list[int], str, int], None] | None = None,
) -> tuple[list[tuple[list[int], str]], dict[str, int]]:
    """Greedy answers to token-id ``prompts``, all rows together; ``[(tokens, "eos" | "length")]`` in order.

    The stop token itself is not returned. ``k``: drafts a row per call (0:
    plain greedy, one token a call). ``on_done(index, tokens, reason, calls)``
    is called as each row finishes. Also returns counts: model calls and
    tokens kept.
    """
    if not prompts:
        return [], {"calls": 0, "tokens": 0}
    with _attention_by_query(model):
        return _decode(model, prompts, max_tokens=max_tokens, stop=stop, k=k, on_done=on_done)


def _decode(
    model: Any, prompts: Sequence[Sequence[int]], *, max_tokens: int, stop: set[int], k: int,
    on_done: Callable[[int, list[int], str, int], None] | None,
) -> tuple[list[tuple[list[int], str]], dict[str, int]]:
    import mlx.core as mx

    n = len(prompts)
    shared = shared_prefix(prompts)
    rows = _Rows(mx.zeros((1,), dtype=mx.int32))
    caches = [_LayerCache(rows) for _ in model.layers]
    if shared:  # a common system prompt: prefilled once, its slots copied to every row
        rows.incoming = mx.ones((1, shared), dtype=mx.bool_)
        model(mx.array([list(prompts[0][:shared])]), cache=caches)
        for c in caches:
            c.keys, c.values = (mx.repeat(a[:, :, :c.used], n, axis=0) for a in (c.keys, c.values))
        rows.valid = mx.ones((n, shared), dtype=mx.bool_)
    width = max(len(p) for p in prompts) - shared
    pad = [width - (len(p) - shared) for p in prompts]
    rows.offset = mx.array([shared - p for p in pad], dtype=mx.int32)  # left padding is a hole
    real = mx.arange(width)[None, :] >= mx.array(pad)[:, None]
    rows.incoming = real
    logits = model(mx.array([[0] * p + list(t[shared:]) for p, t in zip(pad, prompts)]), cache=caches)
    rows.valid = mx.concatenate([rows.valid, real], axis=1) if shared else real
    rows.offset, rows.incoming = rows.offset + width, None
    nxt = mx.argmax(logits[:, -1], axis=-1).tolist()
    active = list(range(n))  # prompt index of each batch row
    lookups = [_Lookup(p) for p in prompts]
    answers: list[list[int]] = [[] for _ in prompts]
    results: list[tuple[list[int], str] | None] = [None] * n
    counts = {"calls": 1, "tokens": 0}

    def emit(i: int, tokens: list[int]) -> bool:
        """Add kept tokens to answer i; True when it has finished."""
        for t in tokens:
            if t not in stop:
                answers[i].append(t)
                lookups[i].append(t)
                counts["tokens"] += 1
            if t in stop or len(answers[i]) >= max_tokens:
                reason = "eos" if t in stop else "length"
                results[i] = (answers[i], reason)
                if on_done is not None:
                    on_done(i, answers[i], reason, counts["calls"])
                return True
        return False

    last = {}
    for row, i in enumerate(active):
        if not emit(i, [nxt[row]]):
            last[i] = nxt[row]
    while True:
        keep = [row for row, i in enumerate(active) if results[i] is None]
        if not keep:
            break
        if len(keep) < len(active):  # finished rows leave the batch
            idx = mx.array(keep)
            for c in caches:
                c.keep_rows(idx)
            rows.valid, rows.offset = rows.valid[idx], rows.offset[idx]
            active = [active[row] for row in keep]
        drafts = [lookups[i].drafts(k) if k else [] for i in active]
        length = 1 + max(len(d) for d in drafts)
        inputs = [[last[i], *d, *[last[i]] * (length - 1 - len(d))] for i, d in zip(active, drafts)]
        rows.incoming = mx.ones((len(active), length), dtype=mx.bool_)
        greedy = mx.argmax(model(mx.array(inputs), cache=caches), axis=-1).tolist()
        counts["calls"] += 1
        kept = []
        for i, d, g in zip(active, drafts, greedy):
            a = 0
            while a < len(d) and d[a] == g[a]:
                a += 1
            kept.append(a + 1)
            if not emit(i, g[:a + 1]):
                last[i] = g[a]
        kept_arr = mx.array(kept)
        rows.valid = mx.concatenate([rows.valid, mx.arange(length)[None, :] < kept_arr[:, None]], axis=1)
        rows.offset = rows.offset + kept_arr.astype(mx.int32)
        rows.incoming = None
    return [r for r in results if r is not None], counts
