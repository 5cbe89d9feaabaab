"""Sequence packing (``mlx-distill train --pack``): several examples per row, no attention across them.

Rows have one fixed width, so the compiled step is traced once and no row is
padded to its batch's longest example. Each example keeps its own loss
targets, and attention is causal *within* an example only
(``fastops.attention_segments``); RoPE sees only relative positions, so an
example packed at offset 300 gives the same logits as alone at offset 0
(to float rounding): the same loss as unpacked batches of the same examples,
which ``tests/test_packing.py`` checks.

Rows are planned once by first-fit decreasing (longest example first, into
the first row with room): 16 examples of 220-330 tokens in rows of 673
tokens fill 8 rows, 88-98% of their positions real. The row order is shuffled
per epoch by ``(seed, epoch)``; a batch is ``--batch-size`` rows (so a step
holds more examples than unpacked: the step count per epoch is
ceil(rows / batch)).

Batches are ``(tokens (B, W), lengths (B, 2), segments (B, W), targets (B, W - 1))``:
``lengths`` = (0, real tokens in the row), so the loop's token count holds;
``segments`` numbers the examples of a row from 1 (0 = padding);
``targets`` marks the positions whose next token is in the loss.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mlx_distill.training.data import PAD_TO
from mlx_distill.training.losses import POSITION_COUNTERS, count_lm_positions

MIN_WIDTH = 512  # rows at least this wide, so short examples share them


def pack_width(lengths: list[int], max_seq_length: int) -> int:
    """The row width: 1 + a multiple of 32 that holds the longest example and at least ``MIN_WIDTH``.

    Capped at ``max_seq_length`` (longer examples are truncated, as unpacked).
    """
    longest = min(max(lengths), max_seq_length)
    return min(max(1 + PAD_TO * math.ceil(longest / PAD_TO), 1 + MIN_WIDTH), max(max_seq_length, 2))


def plan_rows(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: example indices per row, every row's total <= width.

    Ties keep file order, so the plan is deterministic.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-min(lengths[i], width), i)):
        n = min(lengths[i], width)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(width - n)
    return rows


def _items(dataset: Any) -> list[tuple[list[int], int]]:
    return [dataset[i] for i in range(len(dataset))]


def packed_rows(dataset: Any, max_seq_length: int) -> tuple[list[list[int]], int]:
    """(example indices per row, width) for a dataset of (tokens, offset) items."""
    lengths = [len(t) for t, _ in _items(dataset)]
    if not lengths:
        raise ValueError("the dataset is empty")
    width = pack_width(lengths, max_seq_length)
    return plan_rows(lengths, width), width


def row_arrays(items: list[tuple[list[int], int]], width: int) -> tuple[np.ndarray, ...]:
    """tokens (W,), segments (W,), targets (W - 1,) of one packed row."""
    tokens = np.zeros(width, np.int32)
    segments = np.zeros(width, np.int32)
    targets = np.zeros(width - 1, bool)
    at = 0
    for seg, (toks, offset) in enumerate(items, start=1):
        n = min(len(toks), width - at)
        tokens[at:at + n] = toks[:n]
        segments[at:at + n] = seg
        # Position t predicts t + 1; as losses.loss_mask for one example at 0, the
        # targets are at + [max(offset, 1), n - 1].
        first, last = at + max(offset, 1), at + n - 1
        if last >= first:
            targets[first - 1:last] = True
        at += n
    return tokens, segments, targets


def iterate_packed_batches(
    dataset: Any,
    batch_size: int,
    max_seq_length: int,
    loop: bool = False,
    seed: int | None = None,
    comm_group: Any = None,
) -> Any:
    """Yield packed batches (mlx-lm's ``iterate_batches`` signature; see the module docstring).

    Rank r of N takes rows r, r+N, ... of each global batch, and a short last
    batch gets empty filler rows up to a multiple of N, as
    ``data.iterate_batches`` does.
    """
    import mlx.core as mx

    world = comm_group.size() if comm_group is not None else 1
    rank = comm_group.rank() if comm_group is not None else 0
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} is not divisible by the {world} workers")
    plan, width = packed_rows(dataset, max_seq_length)
    items = _items(dataset)
    built = [row_arrays([items[i] for i in row], width) for row in plan]
    epoch = 0
    while True:
        order = (list(range(len(plan))) if seed is None
                 else list(np.random.default_rng([seed, epoch]).permutation(len(plan))))
        for start in range(0, len(order), batch_size):
            rows: list[int | None] = list(order[start:start + batch_size])
            rows += [None] * (-len(rows) % world)
            mine = rows[rank::world]
            tokens = np.zeros((len(mine), width), np.int32)
            segments = np.zeros((len(mine), width), np.int32)
            targets = np.zeros((len(mine), width - 1), bool)
            lengths = np.zeros((len(mine), 2), np.int32)
            for j, r in enumerate(mine):
                if r is None:
                    continue
                tokens[j], segments[j], targets[j] = built[r]
                lengths[j, 1] = int((segments[j] > 0).sum())
            yield mx.array(tokens), mx.array(lengths), mx.array(segments), mx.array(targets)
        epoch += 1
        if not loop:
            break


def packed_steps_per_epoch(dataset: Any, batch_size: int, max_seq_length: int) -> int:
    """ceil(rows / batch): 16 examples in 8 rows / batch 4 = 2 steps per epoch."""
    plan, _ = packed_rows(dataset, max_seq_length)
    return math.ceil(len(plan) / batch_size)


def packed_lm_loss(model: Any, tokens: Any, lengths: Any, segments: Any = None,
                   targets_mask: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """``losses.lm_loss`` for packed rows (and plain batches, when no segments are given)."""
    from mlx_distill.training import fastops
    from mlx_distill.training.losses import lm_loss, masked_lm_loss

    if segments is None:
        return lm_loss(model, tokens, lengths)
    with fastops.attention_segments(model, segments[:, :-1]):
        return masked_lm_loss(model, tokens[:, :-1], tokens[:, 1:], targets_mask)


def count_packed_positions(tokens: Any, lengths: Any, segments: Any = None,
                           targets_mask: Any = None, *extra: Any) -> tuple[int, int]:
    """(loss positions, all positions) of a batch for :func:`packed_lm_loss`, on the host.

    A batch without segments and a targets mask (a plain one) counts as for
    :func:`~mlx_distill.training.losses.lm_loss`.
    """
    if segments is None or targets_mask is None:
        return count_lm_positions(tokens, lengths)
    return int(np.asarray(targets_mask).sum()), int(tokens.shape[0]) * (int(tokens.shape[1]) - 1)


POSITION_COUNTERS[packed_lm_loss] = count_packed_positions
