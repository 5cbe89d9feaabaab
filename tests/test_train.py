"""``mlx-distill train`` on the tiny random llama: loss math, batching, outputs, resume, guards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx  # conftest imported mlx_distill first (OpenBLAS)
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_distill.errors import ConfigError, DataError
from mlx_distill.train import TrainConfig, TrainingDiverged, train
from mlx_distill.training.data import TokenizedDataset, batches_per_epoch, iterate_batches
from mlx_distill.training.losses import lm_loss
from tests.helpers import chat_rows

TRAIN_KEYS = {"type", "step", "epoch", "loss", "acc", "lr", "tokens", "tok_per_s", "peak_mem_gb", "time_s"}
VAL_KEYS = {"type", "step", "epoch", "loss", "acc"}


def make_data(root: Path, n_train: int = 8, n_valid: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", chat_rows(n_train)), ("valid", chat_rows(n_valid, prefix="v"))):
        if rows:
            (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def cfg_for(tmp_path: Path, model: Path, **kw: Any) -> TrainConfig:
    if "data" not in kw:
        kw["data"] = str(make_data(tmp_path / "data"))
    base: dict[str, Any] = dict(model=str(model), adapter_path=str(tmp_path / "ad"), iters=4, batch_size=4,
                                learning_rate=1e-3, save_every=2)
    base.update(kw)
    return TrainConfig(**base)


_TOKENIZERS: dict[str, Any] = {}


def cached_tokenizer_loader(spec: str, adapter_path: Any = None, policy: str = "auto") -> Any:
    """models.load, but each tokenizer is built once (transformers takes ~2 s per load)."""
    from mlx_distill import models

    model, tokenizer, info = models.load(spec, adapter_path, policy) if spec not in _TOKENIZERS else (None,) * 3
    if model is None:
        from mlx_lm.utils import load_model

        model, _ = load_model(Path(spec))
        models.apply_dtype_policy(model, policy)
        tokenizer, info = _TOKENIZERS[spec]
    _TOKENIZERS[spec] = (tokenizer, info)
    return model, tokenizer, info


def quiet_train(cfg: TrainConfig, **kw: Any) -> Any:
    kw.setdefault("model_loader", cached_tokenizer_loader)
    return train(cfg, echo=lambda _: None, progress=False, **kw)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


# -- loss -----------------------------------------------------------------------------------------


def test_lm_loss_matches_numpy_and_ignores_prompt_and_padding() -> None:
    rng = np.random.default_rng(0)
    B, W, V = 3, 9, 11
    tokens = rng.integers(0, V, (B, W)).astype(np.int32)
    lengths = np.array([[3, 9], [0, 5], [4, 4 + 2]], np.int32)  # (offset, length)
    logits = rng.normal(size=(B, W - 1, V)).astype(np.float32)
    tokens[2, 6:] = 0  # padding after a length-6 row
    # Make the argmax right on a known subset so accuracy is non-trivial.
    for b, t in ((0, 2), (0, 5), (1, 0), (2, 3)):
        logits[b, t, tokens[b, t + 1]] = 50.0

    loss, ntoks, metrics = lm_loss(lambda x: mx.array(logits), mx.array(tokens), mx.array(lengths))

    ce, correct, n = 0.0, 0, 0
    for b, (off, length) in enumerate(lengths):
        for t in range(W - 1):
            if max(off, 1) <= t + 1 < length:  # target tokens[t+1] is a real answer token
                z = logits[b, t] - logits[b, t].max()
                ce += -(z[tokens[b, t + 1]] - np.log(np.exp(z).sum()))
                correct += int(logits[b, t].argmax() == tokens[b, t + 1])
                n += 1
    assert int(ntoks.item()) == n == 6 + 4 + 2
    assert loss.item() == pytest.approx(ce / n, rel=1e-5)
    assert metrics["acc"].item() == pytest.approx(correct / n) and correct == 4


def test_loss_does_not_train_the_pad_after_the_last_token() -> None:
    """Regression: mlx-lm 0.32.2's default_loss masks `t + 1 <= length` (PR #1697)."""
    tokens = mx.array([[5, 6, 7, 0, 0]], dtype=mx.int32)
    _, ntoks, _ = lm_loss(lambda x: mx.zeros((1, 4, 8)), tokens, mx.array([[0, 3]], dtype=mx.int32))
    assert int(ntoks.item()) == 2  # targets 6 and 7; not the pad id 0 at position 3


def test_filler_rows_give_a_finite_loss() -> None:
    loss, ntoks, metrics = lm_loss(lambda x: mx.zeros((2, 3, 5)), mx.zeros((2, 4), dtype=mx.int32),
                                   mx.zeros((2, 2), dtype=mx.int32))
    assert int(ntoks.item()) == 0 and loss.item() == 0.0 and metrics["acc"].item() == 0.0


# -- batching -------------------------------------------------------------------------------------


def _toy(lengths: list[int]) -> TokenizedDataset:
    items = [(list(range(1, n + 1)), 1) for n in lengths]
    return TokenizedDataset(Path("toy"), items, list(range(1, len(items) + 1)))


class _Group:
    def __init__(self, rank: int, size: int) -> None:
        self._r, self._s = rank, size

    def rank(self) -> int:
        return self._r

    def size(self) -> int:
        return self._s


def test_every_example_once_per_epoch_and_order_reproducible() -> None:
    ds = _toy([5, 40, 7, 33, 2, 19, 60, 11, 9, 25])  # 10 examples / batch 4 = 3 steps (last has 2)
    assert batches_per_epoch(len(ds), 4) == 3

    def epoch_rows(seed: int, skip: int) -> list[tuple[int, ...]]:
        it = iterate_batches(ds, 4, 2048, loop=True, seed=seed)
        for _ in range(skip):
            next(it)
        return [tuple(np.array(next(it)[1])[:, 1]) for _ in range(3)]

    first = epoch_rows(0, 0)
    assert sorted(n for b in first for n in b) == sorted([5, 40, 7, 33, 2, 19, 60, 11, 9, 25])
    assert epoch_rows(0, 0) == first
    assert epoch_rows(0, 3) != first or epoch_rows(0, 6) != first  # epochs are reshuffled
    assert sorted(map(len, first)) == [2, 4, 4]  # the short last batch has no filler row at 1 rank


def test_ranks_split_rows_and_share_the_batch_width() -> None:
    ds = _toy([5, 40, 7, 33, 2, 19, 61])
    single = list(iterate_batches(ds, 4, 2048, seed=None))
    r0 = list(iterate_batches(ds, 4, 2048, seed=None, comm_group=_Group(0, 2)))
    r1 = list(iterate_batches(ds, 4, 2048, seed=None, comm_group=_Group(1, 2)))
    for (t, ln), (t0, l0), (t1, l1) in zip(single, r0, r1):
        assert t0.shape[1] == t1.shape[1] == t.shape[1]
        assert t.shape[1] % 32 == 1  # 1 + a multiple of 32: few compiled shapes
        got = sorted(np.array(l0)[:, 1].tolist() + np.array(l1)[:, 1].tolist())
        assert got == sorted(np.array(ln)[:, 1].tolist() + [0] * (len(got) - ln.shape[0]))
    # 7 examples: the last global batch has 3 rows + 1 filler (length 0) so both ranks get 2 rows
    assert [x.shape[0] for x, _ in r1] == [2, 2]


def test_long_examples_are_truncated_to_max_seq_length() -> None:
    tokens, lengths = next(iterate_batches(_toy([100, 10]), 2, 64))
    assert tokens.shape == (2, 64) and sorted(np.array(lengths)[:, 1].tolist()) == [10, 64]


# -- training end to end (tiny model) ---------------------------------------------------------------


def test_train_writes_metrics_adapter_and_config(tmp_path: Path, tiny_model_dir: Path) -> None:
    seen: list[dict] = []
    result = quiet_train(cfg_for(tmp_path, tiny_model_dir, iters=None, epochs=3, lora_rank=4),
                         on_step=seen.append)
    ad = tmp_path / "ad"
    # 8 examples / batch 4 = 2 steps per epoch x 3 epochs = 6 steps
    assert result.steps == 6 and result.epochs == 3.0 and len(seen) == 6
    recs = records(ad / "metrics.jsonl")
    train_recs = [r for r in recs if r["type"] == "train"]
    val_recs = [r for r in recs if r["type"] == "val"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in val_recs] == [0, 2, 4, 6]  # start, each epoch, end
    for r in train_recs:
        assert set(r) >= TRAIN_KEYS
        assert 0.0 <= r["acc"] <= 1.0 and r["tokens"] > 0 and r["tok_per_s"] > 0 and r["peak_mem_gb"] > 0
    assert all(set(r) >= VAL_KEYS for r in val_recs)
    assert train_recs[-1]["epoch"] == 3.0 and train_recs[0]["epoch"] == 0.5
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]  # same 8 examples, lr 1e-3
    assert val_recs[-1]["loss"] < val_recs[0]["loss"]
    assert result.val_loss == pytest.approx(val_recs[-1]["loss"], rel=1e-5)

    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 2
    assert cfg["lora_parameters"] == {"rank": 4, "scale": 20.0, "dropout": 0.0}
    assert cfg["mask_prompt"] is True and cfg["result"]["steps"] == 6
    w = weights(ad / "adapters.safetensors")
    assert w and all(k.endswith(("lora_a", "lora_b")) for k in w)
    final_ckpt = ad / "checkpoints" / "step-0000006" / "adapters.safetensors"
    assert all(np.array_equal(w[k], v) for k, v in weights(final_ckpt).items())
    assert sorted(p.name for p in (ad / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]


def test_upstream_mlx_lm_loads_the_adapter_and_it_changes_the_output(tmp_path: Path, tiny_model_dir: Path) -> None:
    from mlx_lm.utils import load

    quiet_train(cfg_for(tmp_path, tiny_model_dir, iters=3))
    x = mx.array([[1, 2, 3, 4, 5]])
    base, _ = load(str(tiny_model_dir))
    tuned, _ = load(str(tiny_model_dir), adapter_path=str(tmp_path / "ad"))
    diff = mx.abs(base(x) - tuned(x)).max().item()
    assert diff > 1e-3


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_dora_and_full_fine_tuning_load_upstream(tmp_path: Path, tiny_model_dir: Path, kind: str) -> None:
    from mlx_lm.utils import load

    quiet_train(cfg_for(tmp_path, tiny_model_dir, iters=2, fine_tune_type=kind, num_layers=1))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == kind and cfg["num_layers"] == 1
    tuned, _ = load(str(tiny_model_dir), adapter_path=str(tmp_path / "ad"))
    base, _ = load(str(tiny_model_dir))
    x = mx.array([[1, 2, 3]])
    assert mx.abs(base(x) - tuned(x)).max().item() > 1e-4


def test_a_swapped_loss_and_batcher_reach_the_metrics(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The swap points issue 8 (distillation) needs: extra batch arrays reach the loss, and
    extra loss terms are written per step and per validation."""
    seen_extra: list[tuple[int, ...]] = []

    def with_extra(dataset: Any, batch_size: int, max_seq_length: int, loop: bool = False, seed: Any = None,
                   comm_group: Any = None) -> Any:
        for tokens, lengths in iterate_batches(dataset, batch_size, max_seq_length, loop, seed, comm_group):
            yield tokens, lengths, mx.full(tokens.shape, 0.5)  # stand-in for cached teacher log-probs

    def loss_with_terms(model: Any, tokens: Any, lengths: Any, extra: Any) -> Any:
        seen_extra.append(tuple(extra.shape))
        ce, ntoks, metrics = lm_loss(model, tokens, lengths)
        return ce, ntoks, {**metrics, "ce": ce, "kl": extra.mean()}

    quiet_train(cfg_for(tmp_path, tiny_model_dir, iters=2), loss=loss_with_terms, iterate_batches=with_extra)
    recs = records(tmp_path / "ad" / "metrics.jsonl")
    assert all(r["kl"] == pytest.approx(0.5) and r["ce"] == pytest.approx(r["loss"]) for r in recs)
    assert {r["type"] for r in recs} == {"train", "val"} and seen_extra


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    # dropout > 0 also checks that the random stream is the same after a resume
    kw = dict(iters=6, save_every=2, lora_dropout=0.1, lr_schedule="cosine", warmup_steps=2)
    full = quiet_train(cfg_for(tmp_path / "a", tiny_model_dir, **kw))

    class Crash(Exception):
        pass

    def crash_at_5(rec: dict) -> None:
        if rec["step"] == 5:
            raise Crash

    cfg = cfg_for(tmp_path / "b", tiny_model_dir, **kw)
    with pytest.raises(Crash):
        quiet_train(cfg, on_step=crash_at_5)
    with pytest.raises(ConfigError, match="not empty.*last checkpoint: step 4.*--resume"):
        quiet_train(cfg)
    cfg.resume = True
    resumed = quiet_train(cfg)
    assert resumed.resumed_from == 4 and resumed.steps == 6
    a = weights(tmp_path / "a" / "ad" / "adapters.safetensors")
    b = weights(tmp_path / "b" / "ad" / "adapters.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert resumed.train_loss == pytest.approx(full.train_loss, rel=1e-4)
    # metrics: step 5 of the crashed run moved aside, then steps 5-6 once each
    steps = [r["step"] for r in records(tmp_path / "b" / "ad" / "metrics.jsonl") if r["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    discarded = records(tmp_path / "b" / "ad" / "metrics.discarded.jsonl")
    assert [r["step"] for r in discarded] == [5]


def test_resume_without_a_checkpoint_starts_over_and_a_finished_run_is_left_alone(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    class Crash(Exception):
        pass

    def crash_at_1(rec: dict) -> None:
        raise Crash

    cfg = cfg_for(tmp_path, tiny_model_dir, iters=2, save_every=5)
    with pytest.raises(Crash):
        quiet_train(cfg, on_step=crash_at_1)
    cfg.resume = True
    first = quiet_train(cfg)
    assert first.resumed_from is None and first.steps == 2
    recs = records(tmp_path / "ad" / "metrics.jsonl")
    assert [(r["type"], r["step"]) for r in recs] == [("val", 0), ("train", 1), ("train", 2), ("val", 2)]
    assert [r["step"] for r in records(tmp_path / "ad" / "metrics.discarded.jsonl")] == [0, 1]
    before = (tmp_path / "ad" / "adapters.safetensors").read_bytes()
    again = quiet_train(cfg)  # already at step 2 of 2
    assert again.steps == 2 and again.val_loss == pytest.approx(first.val_loss)
    assert (tmp_path / "ad" / "adapters.safetensors").read_bytes() == before
    assert len(records(tmp_path / "ad" / "metrics.jsonl")) == 4


def test_a_metrics_file_elsewhere_is_not_appended_to_by_a_new_run(tmp_path: Path) -> None:
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text('{"type": "train", "step": 1}\n')
    with pytest.raises(ConfigError, match="not empty: .*metrics.jsonl"):
        quiet_train(cfg_for(tmp_path, Path("unused"), metrics_path=str(metrics)), model_loader=_no_model)


def test_resume_refuses_other_settings(tmp_path: Path, tiny_model_dir: Path) -> None:
    quiet_train(cfg_for(tmp_path, tiny_model_dir, iters=2))
    with pytest.raises(ConfigError, match="other settings.*lora_rank: 8 -> 4"):
        quiet_train(cfg_for(tmp_path, tiny_model_dir, iters=4, resume=True, lora_rank=4))
    more = quiet_train(cfg_for(tmp_path, tiny_model_dir, iters=4, resume=True))  # more steps is fine
    assert more.resumed_from == 2 and more.steps == 4


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Rows over 100 tokens make this loss NaN; with 8 examples sorted by length
    # into 2 batches the 4 long ones (~170 tokens) form one batch of each epoch.
    rows = chat_rows(4) + [{"messages": [{"role": "user", "content": "long " * 60},
                                         {"role": "assistant", "content": "x " * 60}]} for _ in range(4)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def nan_on_long(model: Any, tokens: Any, lengths: Any) -> Any:
        loss, ntoks, m = lm_loss(model, tokens, lengths)
        return mx.where(lengths[:, 1].max() > 100, mx.array(float("nan")), loss), ntoks, m

    cfg = cfg_for(tmp_path, tiny_model_dir, iters=8, save_every=1, data=str(data))
    with pytest.raises(TrainingDiverged) as e:
        quiet_train(cfg, loss=nan_on_long)
    msg = str(e.value)
    bad = int(msg.split("stopped at step ")[1].split()[0])
    assert f"last good checkpoint is step {bad - 1}" in msg and "--resume" in msg and "nan" in msg
    ad = tmp_path / "ad"
    good = weights(ad / "checkpoints" / f"step-{bad - 1:07d}" / "adapters.safetensors")
    top = weights(ad / "adapters.safetensors")
    assert all(np.isfinite(v).all() and np.array_equal(v, good[k]) for k, v in top.items())
    assert all(r["step"] < bad for r in records(ad / "metrics.jsonl"))


def test_an_overflowing_gradient_is_caught(tmp_path: Path, tiny_model_dir: Path) -> None:
    # A huge --lora-scale overflows the backward pass at once (the loss itself
    # stays finite, so the gradient norm is what catches it). A huge learning
    # rate alone does not: the final RMSNorm bounds the logits and the model
    # just stops learning (measured: grad norm 0.0 from step 2 at lr 1e12).
    cfg = cfg_for(tmp_path, tiny_model_dir, iters=6, lora_scale=1e30, save_every=100)
    with pytest.raises(TrainingDiverged, match="step 1 .*gradient norm inf.*no checkpoint was written yet"):
        quiet_train(cfg)
    assert not (tmp_path / "ad" / "adapters.safetensors").exists()


def test_grad_checkpointing_gives_the_same_weights_and_unpatches(tmp_path: Path, tiny_model_dir: Path) -> None:
    from mlx_lm.models import llama

    original = llama.TransformerBlock.__call__
    quiet_train(cfg_for(tmp_path / "a", tiny_model_dir, iters=2))
    quiet_train(cfg_for(tmp_path / "b", tiny_model_dir, iters=2, grad_checkpoint=True))
    assert llama.TransformerBlock.__call__ is original
    a, b = weights(tmp_path / "a" / "ad" / "adapters.safetensors"), weights(tmp_path / "b" / "ad" / "adapters.safetensors")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)


# -- validation before compute ----------------------------------------------------------------------


def _no_model(*_: Any) -> Any:
    raise AssertionError("the model must not be loaded before the inputs are checked")


@pytest.mark.parametrize(
    ("line", "expect"),
    [
        ("{not json", "train.jsonl:3: invalid JSON"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),
         "train.jsonl:3: message 1 (assistant) has empty"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "train.jsonl:3: the last message is 'user'"),
        (json.dumps({"foo": 1}), "train.jsonl:3: unknown record"),
        (json.dumps({"text": "plain"}), "train.jsonl:3: a text record in a chat file"),
    ],
)
def test_bad_training_lines_fail_with_file_line_before_loading(tmp_path: Path, line: str, expect: str) -> None:
    data = make_data(tmp_path / "data")
    rows = (data / "train.jsonl").read_text().splitlines()
    rows.insert(2, line)
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        quiet_train(cfg_for(tmp_path, Path("unused"), data=str(data)), model_loader=_no_model)


def test_missing_data_and_occupied_adapter_path_fail_before_loading(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no train.jsonl"):
        quiet_train(TrainConfig(data=str(tmp_path), adapter_path=str(tmp_path / "ad")), model_loader=_no_model)
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "notes.txt").write_text("mine")
    cfg = cfg_for(tmp_path, Path("unused"))
    with pytest.raises(ConfigError, match="not empty: notes.txt.*--overwrite"):
        quiet_train(cfg, model_loader=_no_model)
    with pytest.raises(ConfigError, match="contradict"):
        quiet_train(cfg_for(tmp_path, Path("unused"), resume=True, overwrite=True), model_loader=_no_model)


def test_overwrite_keeps_files_train_does_not_own(tmp_path: Path, tiny_model_dir: Path) -> None:
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "notes.txt").write_text("mine")
    quiet_train(cfg_for(tmp_path, tiny_model_dir, iters=1, overwrite=True))
    quiet_train(cfg_for(tmp_path, tiny_model_dir, iters=1, overwrite=True))
    assert (ad / "notes.txt").read_text() == "mine"
    assert [r["step"] for r in records(ad / "metrics.jsonl") if r["type"] == "train"] == [1]


def test_too_many_layers_and_too_big_a_batch(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="--num-layers 5: .* has only 2 layers"):
        quiet_train(cfg_for(tmp_path, tiny_model_dir, num_layers=5))
    with pytest.raises(ConfigError, match="--batch-size 16 is larger than the 8 training examples"):
        quiet_train(cfg_for(tmp_path, tiny_model_dir, batch_size=16, overwrite=True))
    with pytest.raises(DataError, match="no answer token to learn"):
        quiet_train(cfg_for(tmp_path, tiny_model_dir, max_seq_length=8, overwrite=True))


# -- CLI ---------------------------------------------------------------------------------------------


def test_cli_yaml_and_flags(tmp_path: Path, tiny_model_dir: Path) -> None:
    from mlx_distill import train as train_module
    from mlx_distill.cli import main

    assert main.get_command(None, "train") is train_module.cli  # `mlx-distill train` == python -m
    data = make_data(tmp_path / "data")
    (tmp_path / "run.yaml").write_text(
        f"train:\n  model: {tiny_model_dir}\n  data: {data}\n  iters: 1\n  lora_rank: 4\n  batch_size: 2\n")
    metrics = tmp_path / "run_metrics.jsonl"
    res = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "run.yaml"), "--lora-rank", "2",
                                    "--adapter-path", str(tmp_path / "ad"), "--metrics-path", str(metrics),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == str(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 2 and cfg["batch_size"] == 2 and cfg["iters"] == 1  # CLI > YAML
    assert cfg["learning_rate"] == TrainConfig().learning_rate  # default
    assert [r["type"] for r in records(metrics)] == ["val", "train", "val"]
    res = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "run.yaml"),
                                    "--adapter-path", str(tmp_path / "ad"), "--metrics-path", str(metrics)])
    assert res.exit_code == 2 and "--resume" in res.output


# -- the embedded demo model -----------------------------------------------------------------------


@pytest.mark.slow
def test_demo_model_trains_a_few_steps_in_fp32(tmp_path: Path, demo_model_dir: Path) -> None:
    from mlx_lm.utils import load

    from mlx_distill.dataset import PrepareConfig, prepare

    root = Path(__file__).resolve().parent.parent
    prepare(PrepareConfig(teacher_data=str(root / "examples" / "teacher_data.jsonl"), out=str(tmp_path / "data"),
                          valid_fraction=0.0), echo=lambda _: None)
    cfg = TrainConfig(model="demo", data=str(tmp_path / "data"), adapter_path=str(tmp_path / "ad"), iters=2,
                      batch_size=2, num_layers=4, max_seq_length=160)
    result = train(cfg, echo=lambda _: None, progress=False)
    recs = records(tmp_path / "ad" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]  # no valid.jsonl: no validation records
    # SmolLM2 already predicts ~70% of these hand-written answer tokens (measured 0.72 at step 0)
    assert all(0.5 < r["acc"] < 1.0 and 0.2 < r["loss"] < 3.0 for r in recs)
    cfg_json = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg_json["dtype"] == "float32" and cfg_json["num_layers"] == 4 and cfg_json["base_model"]
    x = mx.array([[1, 504, 3421, 28, 253]])
    base, _ = load(str(demo_model_dir))
    tuned, _ = load(str(demo_model_dir), adapter_path=str(tmp_path / "ad"))
    assert mx.abs(base(x) - tuned(x)).max().item() > 1e-4
    assert result.steps == 2 and result.val_loss is None
