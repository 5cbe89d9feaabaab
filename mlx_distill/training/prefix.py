"""The frozen layers before the first trained one run once per example, not once per epoch.

With LoRA on the last 16 of the demo student's 30 layers, layers 0-13 hold
no trainable weight: their output for a row of tokens is the same in every
epoch, and nothing flows back into them. :class:`FrozenPrefix` keeps that
output (the hidden states entering the first trained layer) for each row the
first time the row is trained, and later epochs start from it: the frozen
layers' forward is skipped, the trained layers, the head and the backward
pass run as before, on the same values (tests/test_prefix.py: the same
losses and LoRA weights over three epochs as without it). Validation does the
same for its rows (``training.validation``): the first validation keeps them,
later ones start from them.

How: the frozen layers' classes are swapped (``layer_calls``, as ``streams`` does) for a
subclass whose call, in a step compiled to *capture*, records the last frozen
layer's output as an extra output of the step, and in a step compiled to
*replay* returns the stored hidden states (an input of that step) instead of
computing anything; otherwise it calls the layer as before. The store is
keyed per row by a hash of every batch array's row (tokens, lengths, and
whatever else the batch carries: packed segments, teacher log-probs), so it
hits whatever the batch order (``--pack`` deals rows into new batches every
epoch). A row costs width x hidden x 4 bytes: 353 x 576 x 4 = 0.8 MB; the
demo's 94 rows ~70 MB. Rows past the budget (``MLX_DISTILL_PREFIX_CACHE_GB``,
default 2; ``0`` turns the cache off) are recomputed every epoch.

Measured on the 2-core box (2026-11-28, ``scripts/bench_train.py``, the demo
student, LoRA on 16 of 30 layers): the second epoch trains at 341.9 tok/s
against the first's 277.9 (1.23x; way ``mlx-epoch2``; 337.6 vs 263.6 in an
earlier run), peak RSS 2.38 -> 2.46 GB. Torch + peft recomputes the frozen
layers in every epoch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mlx_distill.training.layer_calls import swapped_calls

ENV = "MLX_DISTILL_PREFIX_CACHE_GB"
DEFAULT_GB = 2.0
_active: dict[str, Any] = {"prefix": None}


def budget_bytes() -> int:
    """The store's budget from ``MLX_DISTILL_PREFIX_CACHE_GB`` (default 2 GB; 0 turns it off)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return int(DEFAULT_GB * 1e9)
    try:
        gb = float(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r}: expected a number of GB (e.g. 2, or 0 to turn the cache off)") from None
    if gb < 0:
        raise ValueError(f"{ENV}={raw!r}: expected 0 or more GB")
    return int(gb * 1e9)


def frozen_depth(model: Any) -> int:
    """How many leading decoder layers hold no trainable weight (0 when anything outside the layers trains).

    A trainable embedding (or norm, or head) would change the frozen layers'
    input or sit where the order is unknown, so then nothing is cached.
    """
    from mlx.utils import tree_flatten

    layers = list(getattr(model, "layers", None) or [])
    per_layer = [len(tree_flatten(layer.trainable_parameters())) for layer in layers]
    if len(tree_flatten(model.trainable_parameters())) != sum(per_layer):
        return 0
    depth = 0
    while depth < len(layers) and per_layer[depth] == 0:
        depth += 1
    return depth if depth < len(layers) else 0  # nothing trains: no step to speed up


def _prefix_call(base: type) -> Any:
    """``base.__call__``, or in a capturing/replaying step what :class:`FrozenPrefix` asks for."""

    def __call__(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
        owner = _active["prefix"]
        if owner is None or owner.mode is None:
            return base.__call__(self, x, *args, **kwargs)
        if owner.mode == "replay":  # the stored output of the last frozen layer; the others are skipped
            return owner.given if self is owner.last else x
        out = base.__call__(self, x, *args, **kwargs)
        if self is owner.last:
            owner.captured.append(out)
        return out

    return __call__


class FrozenPrefix:
    """The per-row store of the frozen layers' output; see the module docstring."""

    def __init__(self, model: Any, depth: int, budget: int):
        self.layers = list(model.layers)[:depth]
        self.depth, self.budget = depth, budget
        self.last = self.layers[-1]
        self.mode: str | None = None
        self.given: Any = None
        self.captured: list[Any] = []
        self.rows: dict[bytes, Any] = {}
        self.used = 0
        self.broken = False  # the model called the last frozen layer other than once a step

    # -- inside the compiled steps ------------------------------------------------------------------

    @contextmanager
    def capturing(self) -> Iterator[None]:
        self.mode, self.captured = "capture", []
        try:
            yield
        finally:
            self.mode = None

    @contextmanager
    def replaying(self, hidden: Any) -> Iterator[None]:
        self.mode, self.given = "replay", hidden
        try:
            yield
        finally:
            self.mode, self.given = None, None

    def take_captured(self) -> Any:
        """The last frozen layer's output of the traced step, or None (and the store off for good).

        None when the loss did not call the model exactly once, or when the
        layer returned something other than a (batch, positions, hidden) array.
        """
        import mlx.core as mx

        out = self.captured[0] if len(self.captured) == 1 else None
        if not (isinstance(out, mx.array) and out.ndim == 3):
            self.broken = True
            return None
        return out

    def variants(self, fn: Any) -> tuple[Any, Any]:
        """``fn``'s two variants, to be compiled beside it (a training step, a validation loss).

        ``capture(*args)`` returns ``(*fn(*args), hidden)``: the last frozen
        layer's output, or an empty array once the store is off
        (:meth:`take_captured`); ``replay(*args, hidden)`` runs ``fn(*args)``
        starting from ``hidden``.
        """
        import mlx.core as mx

        def capture(*args: Any) -> Any:
            with self.capturing():
                out = fn(*args)
            hidden = self.take_captured()
            return (*out, hidden if hidden is not None else mx.zeros((0,)))

        def replay(*args_and_hidden: Any) -> Any:
            *args, hidden = args_and_hidden
            with self.replaying(hidden):
                return fn(*args)

        return capture, replay

    # -- around the steps ---------------------------------------------------------------------------

    @staticmethod
    def keys(batch: tuple[Any, ...]) -> list[bytes]:
        """One key per row: a hash of that row of every batch array (its dtype and shape included)."""
        import numpy as np

        arrays = [np.asarray(a) for a in batch]
        keys = []
        for i in range(arrays[0].shape[0]):
            h = hashlib.blake2b(digest_size=16)
            for a in arrays:
                row = np.ascontiguousarray(a[i])
                h.update(f"{row.dtype}{row.shape}".encode())
                h.update(row.tobytes())
            keys.append(h.digest())
        return keys

    def plan(self, batch: tuple[Any, ...], again: bool) -> tuple[str, list[bytes] | None, Any]:
        """How to run this batch's step: ``("replay", keys, hidden)`` when every row is stored,
        ``("capture", keys, None)`` when the rows come back in a later epoch (``again``) and the
        budget has room, else ``("plain", None, None)``."""
        if self.broken:
            return "plain", None, None
        keys = self.keys(batch)
        hidden = self.lookup(keys)
        if hidden is not None:
            return "replay", keys, hidden
        if again and self.used < self.budget:
            return "capture", keys, None
        return "plain", None, None

    def lookup(self, keys: list[bytes]) -> Any:
        """The batch's stored hidden states (B, T, d), or None unless every row is stored."""
        import mlx.core as mx

        if not all(k in self.rows for k in keys):
            return None
        return mx.stack([self.rows[k] for k in keys])

    def store(self, keys: list[bytes], hidden: Any) -> None:
        """Keep each row of ``hidden`` (evaluated) while the budget lasts; a capture's empty array keeps nothing."""
        if hidden.ndim != 3:
            return
        for i, k in enumerate(keys):
            row = hidden[i]
            if k in self.rows or self.used + row.nbytes > self.budget:
                continue
            self.rows[k] = row
            self.used += row.nbytes


@contextmanager
def frozen_prefix(model: Any, enabled: bool = True) -> Iterator[FrozenPrefix | None]:
    """Within the block, ``model``'s frozen leading layers can be captured and replayed (see :class:`FrozenPrefix`).

    Yields None (and changes nothing) when it is off, when no leading layer is
    frozen, or when the budget is 0. The layers' classes are restored on exit.
    """
    depth = frozen_depth(model) if enabled else 0
    budget = budget_bytes() if depth else 0
    if not depth or budget <= 0:
        yield None
        return
    if _active["prefix"] is not None:
        raise RuntimeError("frozen_prefix is already active (one training loop at a time per process)")
    prefix = FrozenPrefix(model, depth, budget)
    _active["prefix"] = prefix
    try:
        with swapped_calls(prefix.layers, "frozen_prefix", _prefix_call):
            yield prefix
    finally:
        _active["prefix"] = None
