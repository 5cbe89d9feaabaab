"""Sequence packing: the same loss as unpacked batches of the same examples, no attention across examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx  # conftest imported mlx_distill first (OpenBLAS)
import numpy as np
import pytest

from mlx_distill.errors import ConfigError
from mlx_distill.train import TrainConfig, train
from mlx_distill.training import fastops
from mlx_distill.training.data import TokenizedDataset, iterate_batches
from mlx_distill.training.losses import lm_loss
from mlx_distill.training.packing import (
    iterate_packed_batches,
    pack_width,
    packed_lm_loss,
    packed_rows,
    plan_rows,
    row_arrays,
)
from tests.helpers import TINY_ARGS, chat_rows


def dataset(lengths: list[int], offsets: list[int] | None = None, seed: int = 0) -> TokenizedDataset:
    rng = np.random.default_rng(seed)
    offsets = offsets or [min(5, n - 2) for n in lengths]
    items = [(list(rng.integers(3, 300, n)), o) for n, o in zip(lengths, offsets)]
    return TokenizedDataset(Path("train.jsonl"), items, list(range(1, len(items) + 1)))


def tiny_model(seed: int = 0) -> Any:
    from mlx_lm.models import llama

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict({**TINY_ARGS, "vocab_size": 300}))
    mx.eval(model.parameters())
    return model


def test_plan_rows_places_every_example_once_within_the_width() -> None:
    lengths = [300, 40, 250, 120, 90, 500, 10, 200]
    rows = plan_rows(lengths, 513)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 513 for r in rows)
    # 1510 tokens in 3 rows of 513: [500, 10], [300, 200], [250, 120, 90, 40]; deterministic
    assert rows == [[5, 6], [0, 7], [2, 3, 4, 1]] == plan_rows(lengths, 513)
    assert pack_width([100, 330], 4096) == 513 and pack_width([700], 4096) == 705 and pack_width([900], 600) == 600


def test_row_targets_are_the_unpacked_loss_mask_shifted() -> None:
    from mlx_distill.training.losses import loss_mask

    items = [([7] * 10, 4), ([8] * 6, 0), ([9] * 5, 2)]
    tokens, segments, targets = row_arrays(items, 33)
    assert list(segments[:22]) == [1] * 10 + [2] * 6 + [3] * 5 + [0] and tokens[21] == 0
    at = 0
    for toks, off in items:
        alone = np.array(loss_mask(mx.array([[off, len(toks)]]), 32))[0]
        assert (targets[at:at + len(toks) - 1] == alone[:len(toks) - 1]).all()
        at += len(toks)
    assert not targets[at - 1:].any()  # no target crosses into the padding (or the next example)


@pytest.mark.parametrize("fast", [True, False])
def test_packed_loss_equals_unpacked_loss_on_the_same_examples(fast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not fast:  # the mlx-lm path (Metal/CUDA): an explicit block mask into mx.fast.sdpa
        monkeypatch.setenv(fastops.ENV, "0")
    ds = dataset([37, 61, 20, 45, 90, 12, 33, 70], offsets=[3, 10, 0, 6, 20, 2, 5, 9])
    model = tiny_model()

    def totals(batches: Any, loss: Any) -> tuple[float, float, float]:
        ce = n = hits = 0.0
        with fastops.fast_cpu_ops(model):
            for batch in batches:
                value, ntoks, metrics = loss(model, *batch)
                ce += value.item() * ntoks.item()
                hits += metrics["acc"].item() * ntoks.item()
                n += ntoks.item()
        return ce, n, hits

    unpacked = totals(iterate_batches(ds, 2, 2048), lm_loss)
    packed = totals(iterate_packed_batches(ds, 2, 2048), packed_lm_loss)
    assert packed[1] == unpacked[1] == sum(len(t) - max(o, 1) for t, o in ds.items)
    assert packed[0] == pytest.approx(unpacked[0], rel=1e-5)
    assert packed[2] == pytest.approx(unpacked[2], abs=1e-3)
    plan, width = packed_rows(ds, 2048)
    assert len(plan) < len(ds) and width == 513


def test_no_attention_across_packed_examples() -> None:
    ds = dataset([30, 30])
    model = tiny_model(1)
    (tokens, lengths, segments, targets), = list(iterate_packed_batches(ds, 1, 2048))
    changed = np.array(tokens)
    changed[0, :30] = (changed[0, :30] + 7) % 300  # rewrite the first example entirely
    with fastops.fast_cpu_ops(model), fastops.attention_segments(model, segments[:, :-1]):
        a = model(tokens[:, :-1])
        b = model(mx.array(changed)[:, :-1])
    np.testing.assert_allclose(np.array(a[0, 30:60]), np.array(b[0, 30:60]), atol=1e-5)
    assert np.abs(np.array(a[0, :30]) - np.array(b[0, :30])).max() > 1e-3


def test_packed_batches_cover_each_example_once_per_epoch_with_one_shape() -> None:
    ds = dataset([37, 61, 20, 45, 90, 12, 33, 70, 400, 250])
    seen: list[tuple] = []
    shapes = set()
    for tokens, lengths, segments, _targets in iterate_packed_batches(ds, 2, 2048, seed=3):
        shapes.add(tokens.shape)
        t, s = np.array(tokens), np.array(segments)
        for row in range(t.shape[0]):
            for seg in range(1, s[row].max() + 1):
                seen.append(tuple(t[row][s[row] == seg]))
        assert (np.array(lengths)[:, 1] == (s > 0).sum(1)).all()
    assert sorted(seen) == sorted(tuple(x) for x, _ in ds.items)
    assert len(shapes) <= 2  # one width; the last batch may hold fewer rows


def test_ranks_take_alternate_packed_rows() -> None:
    class Group:
        def __init__(self, r: int) -> None:
            self.r = r

        def size(self) -> int:
            return 2

        def rank(self) -> int:
            return self.r

    ds = dataset([37, 61, 20, 45, 90, 12, 33, 70, 400, 250, 500])
    whole = [np.array(b[0]) for b in iterate_packed_batches(ds, 4, 2048, seed=1)]
    r0 = [np.array(b[0]) for b in iterate_packed_batches(ds, 4, 2048, seed=1, comm_group=Group(0))]
    r1 = [np.array(b[0]) for b in iterate_packed_batches(ds, 4, 2048, seed=1, comm_group=Group(1))]
    for w, a, b in zip(whole, r0, r1):
        n = w.shape[0]
        assert (a[: (n + 1) // 2] == w[0::2]).all() and (b[: n // 2] == w[1::2]).all()


def _data(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", chat_rows(8)), ("valid", chat_rows(2, prefix="v"))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_train_with_pack_writes_an_adapter_and_rejects_kd(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(_data(tmp_path / "data")),
                      adapter_path=str(tmp_path / "ad"), epochs=2, batch_size=2, learning_rate=1e-3, pack=True)
    result = train(cfg, echo=lambda _: None, progress=False)
    recs = [json.loads(x) for x in (tmp_path / "ad" / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["type"] == "train"]
    # 8 short examples fit one 513-token row: 1 row / batch 2 = 1 step per epoch.
    assert result.steps == 2 and len(train_recs) == 2
    assert all(np.isfinite(r["loss"]) and r["tokens"] > 0 for r in train_recs)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["pack"] is True
    with pytest.raises(ConfigError, match="--pack works with --loss sft"):
        train(TrainConfig(model=str(tiny_model_dir), data=str(tmp_path / "data"), pack=True, loss="kd",
                          teacher_model=str(tiny_model_dir), adapter_path=str(tmp_path / "kd")),
              echo=lambda _: None, progress=False)


def test_packed_gradients_hold_under_grad_checkpoint_and_two_streams() -> None:
    """The recomputed forward (--grad-checkpoint) and each stream's half keep the packed rows' segments."""
    from mlx.nn import value_and_grad
    from mlx.utils import tree_flatten

    from mlx_distill.training import streams
    from mlx_distill.training.loop import grad_checkpointing

    ds = dataset([100, 90, 80, 70, 60, 50])
    batch = next(iter(iterate_packed_batches(ds, 2, 200)))
    assert batch[0].shape[0] == 2 and int(batch[2].max()) >= 2  # two rows, several examples in a row
    model = tiny_model()

    def grads(checkpoint: bool, two: bool) -> tuple[float, dict[str, np.ndarray]]:
        with grad_checkpointing(model, checkpoint), fastops.fast_cpu_ops(model), \
                streams.two_streams(model, enabled=two):
            value, g = value_and_grad(model, lambda m: packed_lm_loss(m, *batch)[0])(model)
            return value.item(), {k: np.array(x) for k, x in tree_flatten(g)}

    plain = grads(False, False)
    for checkpoint, two in ((True, False), (False, True), (True, True)):
        value, g = grads(checkpoint, two)
        assert value == pytest.approx(plain[0], rel=1e-5), (checkpoint, two)
        for k in plain[1]:
            np.testing.assert_allclose(g[k], plain[1][k], rtol=1e-3, atol=1e-5, err_msg=f"{k} {checkpoint} {two}")
