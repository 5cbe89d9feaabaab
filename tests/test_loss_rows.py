"""The chunked lm_head over the loss positions only: the same training and validation as over every position."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx  # conftest imported mlx_distill first (OpenBLAS)
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_distill.training import fastops, headce
from mlx_distill.training.data import TokenizedDataset, iterate_batches
from mlx_distill.training.loop import make_step
from mlx_distill.training.losses import count_lm_positions, lm_loss, loss_mask, position_counter
from mlx_distill.training.packing import count_packed_positions, iterate_packed_batches, packed_lm_loss
from mlx_distill.training.validation import compiled_eval_loss, evaluate
from tests.helpers import TINY_ARGS


def _dataset(seed: int = 0) -> TokenizedDataset:
    rng = np.random.default_rng(seed)
    lengths = [37, 61, 20, 45, 90, 12, 33, 70, 5, 64]
    offsets = [3, 10, 0, 6, 20, 2, 5, 1, 5, 63]  # an offset of 0 and 1, and rows with 0 and 1 targets
    items = [(rng.integers(1, 300, n).tolist(), o) for n, o in zip(lengths, offsets)]
    return TokenizedDataset(Path("train.jsonl"), items, list(range(1, len(items) + 1)))


def _model(seed: int = 0) -> Any:
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict({**TINY_ARGS, "vocab_size": 300}))
    mx.eval(model.parameters())
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    return model


def test_the_host_counts_match_the_loss_masks() -> None:
    ds = _dataset()
    for tokens, lengths in iterate_batches(ds, 3, 2048):
        want = int(loss_mask(lengths, tokens.shape[1] - 1).sum().item())
        assert count_lm_positions(tokens, lengths) == (want, tokens.shape[0] * (tokens.shape[1] - 1))
    for batch in iterate_packed_batches(ds, 2, 256):
        assert count_packed_positions(*batch)[0] == int(batch[3].sum().item()) > 0
        assert count_packed_positions(*batch, mx.zeros((2, 3, 4)))[0] == count_packed_positions(*batch)[0]  # replay
    tokens, lengths = next(iterate_batches(ds, 3, 2048))  # a plain batch under packed_lm_loss, replayed
    assert count_packed_positions(tokens, lengths, mx.zeros((3, 4, 8))) == count_lm_positions(tokens, lengths)
    assert position_counter(lm_loss) is count_lm_positions
    assert position_counter(packed_lm_loss) is count_packed_positions
    assert position_counter(lambda *a: a) is None  # any other loss: the head over every position


def test_the_rounded_count() -> None:
    step = headce.LOSS_ROWS_STEP
    assert headce.slots_for(1, 10 * step) == step
    assert headce.slots_for(step + 1, 10 * step) == 2 * step
    assert headce.slots_for(0, 10 * step) == step  # a batch of filler rows still compiles a valid step
    assert headce.slots_for(3 * step - 5, 3 * step) == 0  # no fewer than all: no gather


def _train(batches: list[tuple[Any, ...]], loss: Any) -> tuple[list[float], dict[str, np.ndarray]]:
    import mlx.optimizers as optim

    model = _model()
    opt = optim.Adam(learning_rate=1e-2, bias_correction=True)
    opt.init(model.trainable_parameters())
    out = []
    with fastops.fast_cpu_ops(model), headce.chunked_head(8):
        step = make_step(model, opt, loss, mx.distributed.init())
        for batch in batches:
            value, ntoks, metrics, _, _ = step(*batch)
            mx.eval(model.state, opt.state)
            out += [value.item(), ntoks.item(), metrics["acc"].item()]
    return out, {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


@pytest.fixture()
def head_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many positions each traced head call got (one trace per batch shape and count); buckets of 16."""
    monkeypatch.setattr(headce, "LOSS_ROWS_STEP", 16)
    seen: list[int] = []
    real = headce.head_cross_entropy_and_hits

    def spy(h: Any, weight: Any, targets: Any, rows: int) -> Any:
        seen.append(int(np.prod(targets.shape)))
        return real(h, weight, targets, rows)

    monkeypatch.setattr(headce, "head_cross_entropy_and_hits", spy)
    return seen


@pytest.mark.parametrize("pack", [False, True])
def test_training_on_the_loss_rows_only_matches_every_row(pack: bool, head_rows: list[int],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _dataset()
    batches = list(iterate_packed_batches(ds, 2, 128) if pack else iterate_batches(ds, 3, 2048))
    loss = packed_lm_loss if pack else lm_loss
    gathered, w_gathered = _train(batches, loss)
    sizes = set(head_rows)
    head_rows.clear()
    monkeypatch.setenv(headce.LOSS_ROWS_ENV, "0")
    whole, w_whole = _train(batches, loss)
    counts = [count_packed_positions(*b) if pack else count_lm_positions(*b) for b in batches]
    assert set(head_rows) == {c[1] for c in counts}  # every position of every batch
    monkeypatch.delenv(headce.LOSS_ROWS_ENV)
    assert sizes == {headce.slots_for(*c) or c[1] for c in counts}  # the loss positions, rounded up
    assert sizes != set(head_rows)
    np.testing.assert_allclose(gathered, whole, rtol=1e-5, atol=1e-6)
    for k in w_whole:
        np.testing.assert_allclose(w_gathered[k], w_whole[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_validation_on_the_loss_rows_only_matches_every_row(head_rows: list[int],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    ds, model = _dataset(1), _model(1)
    settings = SimpleNamespace(batch_size=3, max_seq_length=2048, val_batches=-1)
    group = mx.distributed.init()

    def run() -> dict[str, float]:
        with fastops.fast_cpu_ops(model), headce.chunked_head(8):
            return evaluate(model, ds, settings, lm_loss, iterate_batches, group,
                            compiled=compiled_eval_loss(model, lm_loss))

    gathered = run()
    counts = [count_lm_positions(*b) for b in iterate_batches(ds, 3, 2048)]
    assert set(head_rows) == {headce.slots_for(*c) or c[1] for c in counts} != {c[1] for c in counts}
    monkeypatch.setenv(headce.LOSS_ROWS_ENV, "0")
    whole = run()
    assert gathered["loss_tokens"] == whole["loss_tokens"] > 0
    assert gathered["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert gathered["acc"] == pytest.approx(whole["acc"], abs=1e-6)


def test_the_replay_variant_counts_the_batch_without_its_stored_hidden_states(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_distill.training import losses

    counted: list[int] = []

    def spy(*batch: Any) -> tuple[int, int]:
        counted.append(len(batch))
        return count_lm_positions(*batch)

    class Prefix:  # FrozenPrefix.variants' shape: capture(*batch), replay(*batch, hidden)
        def variants(self, fn: Any) -> tuple[Any, Any]:
            return (lambda *batch: fn(*batch), lambda *args: fn(*args[:-1]))

    monkeypatch.setitem(losses.POSITION_COUNTERS, lm_loss, spy)
    tokens, lengths = next(iter(iterate_batches(_dataset(), 3, 2048)))
    with headce.chunked_head(8):
        plain, capture, replay = headce.compile_keyed(lambda f: f, lambda *batch: len(batch), _model(), lm_loss,
                                                      Prefix())
        assert (plain(tokens, lengths), capture(tokens, lengths), replay(tokens, lengths, mx.zeros((3, 4)))) == (2, 2, 2)
    assert counted == [2, 2, 2]
