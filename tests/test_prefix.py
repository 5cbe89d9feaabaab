"""The frozen layers' output is kept after a row's first epoch and reused: the same training as recomputing it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx  # conftest imported mlx_distill first (OpenBLAS)
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from mlx_distill.training import prefix as prefix_mod
from mlx_distill.training.data import TokenizedDataset, iterate_batches
from mlx_distill.training.loop import LoopSettings, grad_checkpointing, run_loop
from mlx_distill.training.losses import lm_loss
from mlx_distill.training.packing import iterate_packed_batches, packed_lm_loss
from tests.helpers import TINY_ARGS

LAYERS = 4  # LoRA on the last 2: layers 0-1 are the frozen prefix


def lora_model(seed: int = 0, trained: int = 2) -> Any:
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict({**TINY_ARGS, "vocab_size": 300, "num_hidden_layers": LAYERS}))
    mx.eval(model.parameters())
    model.freeze()
    linear_to_lora_layers(model, trained, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    return model


def dataset(n: int = 10, seed: int = 0) -> TokenizedDataset:
    rng = np.random.default_rng(seed)
    items = [(list(rng.integers(3, 300, int(k))), 2) for k in rng.integers(12, 40, n)]
    return TokenizedDataset(Path("train.jsonl"), items, list(range(1, n + 1)))


def train(cache_gb: str, monkeypatch: pytest.MonkeyPatch, *, epochs: int = 3, pack: bool = False,
          checkpoint: bool = False, loss: Any = None, valid: TokenizedDataset | None = None,
          eval_every: int = 0) -> tuple[list[dict], dict[str, np.ndarray], list[str]]:
    import mlx.optimizers as optim

    monkeypatch.setenv(prefix_mod.ENV, cache_gb)
    model = lora_model()
    opt = optim.Adam(learning_rate=1e-2, bias_correction=True)
    opt.init(model.trainable_parameters())
    ds = dataset()
    batches = iterate_packed_batches if pack else iterate_batches
    per_epoch = sum(1 for _ in batches(ds, 4, 64, loop=False, seed=0))
    settings = LoopSettings(batch_size=4, max_seq_length=64, total_steps=epochs * per_epoch,
                            steps_per_epoch=per_epoch, eval_every=eval_every, save_every=0, seed=0)
    records: list[dict] = []
    logs: list[str] = []
    with grad_checkpointing(model, checkpoint):
        run_loop(model, opt, ds, valid, settings, loss=loss or (packed_lm_loss if pack else lm_loss),
                 iterate_batches=batches, group=mx.distributed.init(), write=records.append,
                 checkpoint=lambda step, state: None, progress=False, echo=logs.append)
    assert all(type(layer) is llama.TransformerBlock for layer in model.layers)  # classes restored
    assert prefix_mod._active["prefix"] is None
    return records, {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}, logs


def same_training(a: tuple, b: tuple, rtol: float = 1e-5) -> None:
    assert [(r["type"], r["step"]) for r in a[0]] == [(r["type"], r["step"]) for r in b[0]]
    assert [r["loss"] for r in a[0]] == pytest.approx([r["loss"] for r in b[0]], rel=rtol)
    for k in b[1]:
        np.testing.assert_allclose(a[1][k], b[1][k], rtol=100 * rtol, atol=1e-6, err_msg=k)


@pytest.mark.parametrize(("pack", "checkpoint"), [(False, False), (True, False), (False, True)])
def test_later_epochs_start_after_the_frozen_layers_and_train_the_same(
        pack: bool, checkpoint: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain batches (fixed rows), --pack (rows dealt into new batches every epoch), --grad-checkpoint."""
    off = train("0", monkeypatch, pack=pack, checkpoint=checkpoint)
    on = train("1", monkeypatch, pack=pack, checkpoint=checkpoint)
    assert "frozen_cached" not in off[0][0] and not any("frozen layers" in m for m in off[2])
    assert any(m.startswith("frozen layers 0-1:") for m in on[2])
    per_epoch = len(on[0]) // 3
    cached = [r["frozen_cached"] for r in on[0]]
    assert cached == [False] * per_epoch + [True] * (2 * per_epoch)  # every later step starts from the store
    same_training(on, off)


def test_later_validations_start_after_the_frozen_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The validation rows are the same every time: the first validation keeps them, later ones replay them."""
    seen: list[str] = []
    plan = prefix_mod.FrozenPrefix.plan

    def spy(self: Any, batch: Any, again: bool) -> Any:
        got = plan(self, batch, again)
        seen.append(got[0])
        return got

    monkeypatch.setattr(prefix_mod.FrozenPrefix, "plan", spy)
    valid = dataset(6, seed=1)
    off = train("0", monkeypatch, valid=valid, eval_every=2)
    assert not seen  # no store, no plan
    on = train("1", monkeypatch, valid=valid, eval_every=2)
    vals = [r for r in on[0] if r["type"] == "val"]
    n_valid = sum(1 for _ in iterate_batches(valid, 4, 64, loop=False))
    train_steps = len(on[0]) - len(vals)
    assert len(vals) >= 3 and len(seen) == train_steps + len(vals) * n_valid
    assert seen[:n_valid] == ["capture"] * n_valid  # step 0's validation keeps its rows...
    assert seen[-n_valid:] == ["replay"] * n_valid  # ...and the last one starts from them
    same_training(on, off)
    for a, b in zip(vals, [r for r in off[0] if r["type"] == "val"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_rows_past_the_budget_are_recomputed(monkeypatch: pytest.MonkeyPatch) -> None:
    off = train("0", monkeypatch)
    row = 40 * TINY_ARGS["hidden_size"] * 4  # the widest padded row's bytes (width 41 - 1)
    small = train(str(6 * row / 1e9), monkeypatch)  # room for one or two batches' rows
    cached = [r["frozen_cached"] for r in small[0]]
    per_epoch = len(cached) // 3
    assert not any(cached[:per_epoch]) and 0 < sum(cached[per_epoch:]) < 2 * per_epoch
    same_training(small, off)


def test_a_loss_that_calls_the_model_twice_turns_the_store_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def twice(model: Any, tokens: Any, lengths: Any) -> Any:
        value, n, metrics = lm_loss(model, tokens, lengths)
        return value + 0.0 * model(tokens[:, :2]).sum(), n, metrics

    off = train("0", monkeypatch, loss=twice)
    on = train("1", monkeypatch, loss=twice)
    assert not any(r["frozen_cached"] for r in on[0])
    same_training(on, off)


def test_nothing_is_cached_for_one_epoch_or_without_a_frozen_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    one = train("1", monkeypatch, epochs=1)
    assert not any(r["frozen_cached"] for r in one[0]) if "frozen_cached" in one[0][0] else True
    assert not any("frozen layers" in m for m in one[2])
    assert prefix_mod.frozen_depth(lora_model(trained=2)) == 2
    assert prefix_mod.frozen_depth(lora_model(trained=LAYERS)) == 0  # every layer trains
    model = lora_model(trained=2)
    model.model.embed_tokens.unfreeze()  # a trained embedding changes the frozen layers' input
    assert prefix_mod.frozen_depth(model) == 0
    frozen = lora_model(trained=2)
    frozen.freeze()
    assert prefix_mod.frozen_depth(frozen) == 0  # nothing trains


def test_budget_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(prefix_mod.ENV, raising=False)
    assert prefix_mod.budget_bytes() == int(prefix_mod.DEFAULT_GB * 1e9)
    monkeypatch.setenv(prefix_mod.ENV, "0.5")
    assert prefix_mod.budget_bytes() == 500_000_000
    for bad in ("lots", "-1"):
        monkeypatch.setenv(prefix_mod.ENV, bad)
        with pytest.raises(ValueError, match=f"{prefix_mod.ENV}="):
            prefix_mod.budget_bytes()


def test_row_keys_follow_every_batch_array() -> None:
    tokens = mx.array([[1, 2, 3], [1, 2, 3], [1, 2, 4]])
    lengths = mx.array([[0, 3], [1, 3], [0, 3]])
    keys = prefix_mod.FrozenPrefix.keys((tokens, lengths))
    assert len(set(keys)) == 3  # row 1 differs from row 0 only in its offset
    assert prefix_mod.FrozenPrefix.keys((tokens[:1], lengths[:1])) == keys[:1]  # a row's key is its own


def test_mlx_distill_train_reuses_the_frozen_layer_in_later_epochs(tmp_path: Path, tiny_model_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Through ``train``: LoRA on the last of the tiny model's 2 layers, 2 epochs; the log says so."""
    from mlx_distill.train import train
    from tests.test_train import cached_tokenizer_loader, cfg_for, records

    monkeypatch.delenv(prefix_mod.ENV, raising=False)
    logs: list[str] = []
    train(cfg_for(tmp_path, tiny_model_dir, iters=None, epochs=2, num_layers=1, lora_rank=4),
          echo=logs.append, progress=False, model_loader=cached_tokenizer_loader)
    steps = [r for r in records(tmp_path / "ad" / "metrics.jsonl") if r["type"] == "train"]
    assert [r["frozen_cached"] for r in steps] == [False, False, True, True]  # 8 examples / batch 4 = 2 a epoch
    assert any(m.startswith("frozen layers 0-0:") for m in logs)


def test_a_layer_that_returns_a_tuple_turns_the_store_off() -> None:
    model = lora_model()
    with prefix_mod.frozen_prefix(model) as prefix:
        assert prefix is not None and prefix.depth == 2
        with prefix.capturing():
            prefix.captured.append((mx.zeros((1, 2, 3)), None))  # what such a layer would have recorded
        assert prefix.take_captured() is None and prefix.broken
        assert prefix.plan((mx.zeros((1, 4), mx.int32),), again=True) == ("plain", None, None)
