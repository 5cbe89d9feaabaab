"""Losses for the training loop.

The protocol (what ``mlx-distill train`` accepts as ``loss=``)::

    loss(model, tokens, lengths, *extra) -> (loss, ntoks, metrics)

* ``tokens``: int32 (B, W); ``lengths``: int32 (B, 2) rows of (offset, length)
  as :func:`mlx_distill.training.data.iterate_batches` yields them; ``extra``:
  any further arrays a swapped-in batch iterator yields (e.g. cached teacher
  top-K log-probs), passed through untouched.
* ``loss``: scalar, the *mean* over the ``ntoks`` loss tokens of this batch
  (finite even when ``ntoks`` is 0: a rank can get only filler rows).
* ``metrics``: name -> scalar, each also a mean over the loss tokens (``acc``,
  and e.g. ``kl``/``ce`` for distillation); they are weighted by ``ntoks``
  across steps and ranks and written to metrics.jsonl.

The step differentiates ``loss * ntoks`` and divides the summed gradient by
the global token count, so a batch split over N ranks gives the same update
as one process (a mean of per-rank means would not when ranks hold different
token counts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LossFn = Callable[[Any, Any, Any], tuple[Any, Any, dict[str, Any]]]


def loss_mask(lengths: Any, width: int) -> Any:
    """(B, width) bool: which targets count.

    ``targets[:, t] = tokens[:, t + 1]``; a row of ``length`` L with
    ``offset`` o has real tokens 0..L-1, so its targets are t + 1 in
    [max(o, 1), L - 1]. mlx-lm 0.32.2's ``default_loss`` uses ``t + 1 <= L``,
    which also trains every row to predict the pad id 0 after its last token
    (mlx-lm PR #1697); with an 8-token answer that is 1 target in 9.
    """
    import mlx.core as mx

    steps = mx.arange(1, width + 1)
    return mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])


def cross_entropy_and_hits(logits: Any, targets: Any) -> tuple[Any, Any]:
    """(per-position cross-entropy, bool ``argmax == target``) over the last axis.

    On the CPU both come from one pass of ``training.fastops`` (fast exp,
    hand-written gradient; a target tied for the maximum counts as a hit);
    elsewhere from mlx-lm's ``cross_entropy`` and an ``argmax``.
    """
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_distill.training import fastops

    if fastops.use_fast_ops():
        return fastops.cross_entropy_and_hits(logits, targets)
    return nn.losses.cross_entropy(logits, targets), mx.argmax(logits, axis=-1) == targets


def count_lm_positions(tokens: Any, lengths: Any, *extra: Any) -> tuple[int, int]:
    """(loss positions, all positions) of a batch for :func:`lm_loss`, on the host: :func:`loss_mask`'s count."""
    import numpy as np

    width = int(tokens.shape[1])
    lens = np.asarray(lengths, dtype=np.int64)
    return int(np.maximum(np.minimum(lens[:, 1], width) - np.maximum(lens[:, 0], 1), 0).sum()), \
        int(tokens.shape[0]) * (width - 1)


POSITION_COUNTERS: dict[Any, Callable[..., tuple[int, int]]] = {}


def position_counter(loss: Any) -> Callable[..., tuple[int, int]] | None:
    """``count(*batch) -> (loss positions, all positions)`` for a loss that computes the head there only, or None.

    The training step and the validation loss of such a loss are compiled
    per rounded count (``headce.keyed_by_loss_rows``); any other loss gets
    the head over every position.
    """
    return POSITION_COUNTERS.get(loss)


def lm_loss(model: Any, tokens: Any, lengths: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Masked next-token cross-entropy and token accuracy (argmax == target)."""
    targets = tokens[:, 1:]
    return masked_lm_loss(model, tokens[:, :-1], targets, loss_mask(lengths, targets.shape[1]))


def masked_lm_loss(model: Any, inputs: Any, targets: Any, mask: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Mean cross-entropy over ``mask``'s positions, their count and the token accuracy.

    Under ``--grad-checkpoint`` (``headce.head_chunk_rows()`` set) the lm_head
    and cross-entropy run in chunks of rows, never holding the whole logits.
    """
    import mlx.core as mx

    from mlx_distill.training import headce

    ntoks = mask.sum()
    denom = mx.maximum(ntoks, 1).astype(mx.float32)
    rows = headce.head_chunk_rows()
    head = headce.head_of(model) if rows else None
    if head is not None:  # inside a keyed step (headce.keyed_by_loss_rows) at the loss positions only
        h, targets, mask = headce.loss_rows(model.model(inputs), targets, mask)
        ce, hits = headce.head_cross_entropy_and_hits(h, head, targets, rows)
    else:
        ce, hits = cross_entropy_and_hits(model(inputs), targets)
    ce = (ce * mask).astype(mx.float32).sum() / denom
    correct = mx.logical_and(hits, mask).sum()
    return ce, ntoks, {"acc": correct.astype(mx.float32) / denom}


POSITION_COUNTERS[lm_loss] = count_lm_positions
