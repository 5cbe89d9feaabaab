"""``train --loss kd`` on tiny random llamas: alignment, frozen teacher, vocabulary, top-K cache, metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx  # conftest imported mlx_distill first (OpenBLAS)
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlx_distill.errors import ConfigError, DataError
from mlx_distill.train import TrainConfig, cli, train
from mlx_distill.training import data as tdata
from mlx_distill.training.kd import log_softmax
from mlx_distill.training.kd_setup import SplitData, setup_kd
from mlx_distill.training.teacher_cache import compute_cache, load_cache, save_cache, shared_prefix
from tests.helpers import chat_rows, write_tiny_llama

SYSTEM = "You are a careful engineer. Answer with code."

_LOADED: dict[str, tuple[Any, Any]] = {}


class Loader:
    """models.load with each tokenizer built once (transformers takes ~2 s per load); keeps what it loaded."""

    def __init__(self) -> None:
        self.models: dict[str, list[Any]] = {}

    def __call__(self, spec: str, adapter_path: Any = None, policy: str = "auto") -> Any:
        from mlx_lm.utils import load_model

        from mlx_distill import models

        if spec not in _LOADED:
            _, tok, info = models.load(spec, None, policy)
            _LOADED[spec] = (tok, info)
        model, _ = load_model(Path(spec))
        models.apply_dtype_policy(model, policy)
        self.models.setdefault(spec, []).append(model)
        return model, *_LOADED[spec]


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("kd") / "teacher", tiny_model_dir, seed=1)


def make_data(root: Path, n_train: int = 8, n_valid: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(n_train)))
    if n_valid:
        (root / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(n_valid, "v")))
    return root


def kd_cfg(tmp_path: Path, student: Path, teacher: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(model=str(student), data=str(tmp_path / "data"), adapter_path=str(tmp_path / "ad"),
                                iters=2, batch_size=4, learning_rate=1e-3, lora_rank=4, loss="kd",
                                teacher_model=str(teacher), teacher_system=SYSTEM)
    base.update(kw)
    if not Path(base["data"]).is_dir():
        make_data(Path(base["data"]))
    return TrainConfig(**base)


def kd_parts(cfg: TrainConfig, loader: Loader | None = None, lora: bool = True) -> tuple[Any, Any, Any]:
    """(KDSetup, student, train dataset) as train() builds them, without training."""
    loader = loader or Loader()
    student, tok, info = loader(cfg.model)
    tp, vp = tdata.split_paths(cfg.data)
    splits = []
    for name, path in (("train", tp), ("valid", vp)):
        if path is None:
            continue
        rows, lines = tdata.read_examples(path, mask_prompt=cfg.mask_prompt)
        ds = tdata.tokenize_examples(path, rows, lines, tok, mask_prompt=cfg.mask_prompt,
                                     max_seq_length=cfg.max_seq_length)
        splits.append(SplitData(name, path, rows, lines, ds))
    kd = setup_kd(cfg, student, tok, info.spec, splits, base_iterate=tdata.iterate_batches,
                  group=mx.distributed.init(), loader=loader, echo=lambda _: None)
    if lora:
        from mlx_lm.tuner.utils import linear_to_lora_layers

        mx.random.seed(0)
        student.freeze()
        linear_to_lora_layers(student, 2, {"rank": 4, "scale": 20.0, "dropout": 0.0})
    return kd, student, splits[0].dataset


def first_batch(kd: Any, dataset: Any, max_seq_length: int = 2048) -> tuple[Any, ...]:
    return next(kd.iterate_batches(dataset=dataset, batch_size=4, max_seq_length=max_seq_length))


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# -- alignment ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_prompt,max_len", [(True, 2048), (False, 2048), (True, 46)])
def test_teacher_positions_predict_the_students_answer_tokens(tmp_path: Path, tiny_model_dir: Path,
                                                              teacher_dir: Path, mask_prompt: bool,
                                                              max_len: int) -> None:
    """For every KD position p, the teacher's next token after t_pos[p] is the student's target
    tokens[p + 1], and the KD positions are exactly the answer tokens (also when truncated)."""
    cfg = kd_cfg(tmp_path, tiny_model_dir, teacher_dir, mask_prompt=mask_prompt, max_seq_length=max_len)
    kd, _, train_set = kd_parts(cfg, lora=False)
    tok = _LOADED[str(tiny_model_dir)][0]
    seen = 0
    for tokens, lengths, t_tokens, t_pos, kd_mask in kd.iterate_batches(
            dataset=train_set, batch_size=4, max_seq_length=max_len):
        tokens, t_tokens, t_pos, kd_mask = map(np.array, (tokens, t_tokens, t_pos, kd_mask))
        for j in range(tokens.shape[0]):
            ps = np.nonzero(kd_mask[j])[0]
            assert len(ps) > 0
            np.testing.assert_array_equal(t_tokens[j, t_pos[j, ps] + 1], tokens[j, ps + 1])
            # the teacher row starts with its own system prompt; the student's does not have it
            assert SYSTEM in tok.decode(t_tokens[j, : t_pos[j, ps[0]] + 1].tolist())
            assert SYSTEM not in tok.decode(tokens[j].tolist())
            answer = tok.decode(tokens[j, ps + 1].tolist())
            assert answer.startswith("def add(): return")
            assert ps[-1] + 2 == int(np.array(lengths)[j, 1])  # up to the last kept token
            seen += 1
    assert seen == 8


def test_answer_that_tokenizes_differently_fails_with_file_and_line(tmp_path: Path, tiny_model_dir: Path,
                                                                    teacher_dir: Path) -> None:
    odd = tmp_path / "odd-teacher"
    shutil.copytree(teacher_dir, odd)
    tc = json.loads((odd / "tokenizer_config.json").read_text())
    # A template that upper-cases the answer when there is a system prompt.
    tc["chat_template"] = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and "
        "messages[0]['role'] == 'system' %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (odd / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = kd_cfg(tmp_path, tiny_model_dir, odd)
    with pytest.raises(DataError) as e:
        kd_parts(cfg, lora=False)
    msg = str(e.value)
    assert "train.jsonl:1" in msg and "tokenizes differently" in msg and "--teacher-system" in msg


# -- the teacher is frozen; gradients reach only the student's trainable parameters ----------------


@pytest.mark.parametrize("top_k", [None, 8])
def test_gradients_reach_only_trainable_params(tmp_path: Path, tiny_model_dir: Path, teacher_dir: Path,
                                               top_k: int | None) -> None:
    loader = Loader()
    cfg = kd_cfg(tmp_path, tiny_model_dir, teacher_dir, kd_ratio=1.0, kd_top_k=top_k)
    kd, student, train_set = kd_parts(cfg, loader)
    batch = first_batch(kd, train_set)

    def objective(model: Any, *b: Any) -> Any:
        return kd.loss(model, *b)[0]

    value, grads = nn.value_and_grad(student, objective)(student, *batch)
    flat = dict(tree_flatten(grads))
    assert set(flat) == {k for k, _ in tree_flatten(student.trainable_parameters())}
    assert all("lora" in k for k in flat)
    # With ratio 1 the loss is the KL alone, and it moves the student.
    assert float(value) > 0
    assert max(float(mx.abs(g).max()) for k, g in flat.items() if k.endswith("lora_b")) > 0

    if top_k is None:  # the teacher runs inside the step: differentiate through it explicitly
        teacher = loader.models[str(teacher_dir)][-1]
        assert tree_flatten(teacher.trainable_parameters()) == []  # frozen
        params = teacher.parameters()

        def through_teacher(p: Any) -> Any:
            teacher.update(p)
            return kd.loss(student, *batch)[0]

        g = tree_flatten(mx.grad(through_teacher)(params))
        teacher.update(params)
        assert g and max(float(mx.abs(x).max()) for _, x in g) == 0.0  # stop_gradient: nothing flows back


def test_kd_training_run_metrics_and_frozen_teacher(tmp_path: Path, tiny_model_dir: Path,
                                                    teacher_dir: Path) -> None:
    loader = Loader()
    cfg = kd_cfg(tmp_path, tiny_model_dir, teacher_dir, kd_ratio=0.25, save_every=1)
    seen: list[Any] = []
    orig_loader = loader.__call__

    def keep_before(spec: str, *a: Any) -> Any:
        out = orig_loader(spec, *a)
        seen.append((spec, {k: np.array(v) for k, v in tree_flatten(out[0].parameters())}))
        return out

    result = train(cfg, model_loader=keep_before, progress=False, echo=lambda _: None)
    assert result.steps == 2
    recs = records(result.metrics_path)
    assert [(r["type"], r["step"]) for r in recs] == [("val", 0), ("train", 1), ("train", 2), ("val", 2)]
    for r in recs:
        assert {"ce", "kl", "acc", "loss"} <= set(r)
        assert r["kl"] > 0
        assert r["loss"] == pytest.approx(0.75 * r["ce"] + 0.25 * r["kl"], rel=1e-4)
    assert recs[-1]["ce"] < recs[0]["ce"]  # it learns

    (student_spec, student_before), (teacher_spec, teacher_before) = seen
    assert teacher_spec == str(teacher_dir)
    teacher = loader.models[str(teacher_dir)][-1]
    for k, v in tree_flatten(teacher.parameters()):
        np.testing.assert_array_equal(np.array(v), teacher_before[k], err_msg=k)  # bitwise unchanged
    student = loader.models[str(tiny_model_dir)][-1]
    after = dict(tree_flatten(student.parameters()))
    for k, v in student_before.items():  # the base weights too; only LoRA moved
        key = k.replace(".weight", ".linear.weight") if f"{k[:-7]}.linear.weight" in after else k
        np.testing.assert_array_equal(np.array(after[key]), v, err_msg=k)
    assert max(float(mx.abs(v).max()) for k, v in after.items() if k.endswith("lora_b")) > 0

    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["loss"] == "kd" and conf["kd"]["teacher"] == str(teacher_dir) and conf["kd"]["vocab"] == 49152
    # resuming under another KD setting is refused before any compute
    with pytest.raises(ConfigError, match="kd_ratio"):
        train(kd_cfg(tmp_path, tiny_model_dir, teacher_dir, kd_ratio=0.5, resume=True, iters=3),
              model_loader=loader, progress=False, echo=lambda _: None)
    with pytest.raises(ConfigError, match="loss"):
        train(TrainConfig(model=str(tiny_model_dir), data=cfg.data, adapter_path=cfg.adapter_path, iters=3,
                          batch_size=4, lora_rank=4, learning_rate=1e-3, resume=True),
              model_loader=loader, progress=False, echo=lambda _: None)


def test_same_model_same_context_has_zero_kl_and_a_system_prompt_does_not(tmp_path: Path,
                                                                           tiny_model_dir: Path) -> None:
    loader = Loader()
    same = kd_cfg(tmp_path, tiny_model_dir, tiny_model_dir, teacher_system="")
    kd, student, train_set = kd_parts(same, loader)  # LoRA b = 0: the student is still its base
    _, _, m = kd.loss(student, *first_batch(kd, train_set))
    assert abs(float(m["kl"])) < 1e-5
    ctx = kd_cfg(tmp_path, tiny_model_dir, tiny_model_dir)
    kd, student, train_set = kd_parts(ctx, loader)
    _, _, m = kd.loss(student, *first_batch(kd, train_set))
    assert float(m["kl"]) > 1e-3  # the teacher's context changes its distribution


# -- vocabulary -----------------------------------------------------------------------------------------


def test_padding_rows_are_sliced_and_other_mismatches_fail_before_compute(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    padded = write_tiny_llama(tmp_path / "padded", tiny_model_dir, seed=2, vocab_size=49152 + 128)
    kd, student, train_set = kd_parts(kd_cfg(tmp_path, tiny_model_dir, padded))
    assert kd.info["vocab"] == 49152 and kd.loss.vocab == 49152
    _, _, m = kd.loss(student, *first_batch(kd, train_set))
    assert np.isfinite(float(m["kl"])) and float(m["kl"]) > 0

    small = write_tiny_llama(tmp_path / "small", tiny_model_dir, seed=2, vocab_size=32000)
    cfg = kd_cfg(tmp_path, tiny_model_dir, small, adapter_path=str(tmp_path / "ad-small"))
    with pytest.raises(ConfigError) as e:
        train(cfg, model_loader=Loader(), progress=False, echo=lambda _: None)
    assert "32,000 output rows" in str(e.value) and "same tokenizer" in str(e.value)
    assert not (tmp_path / "ad-small" / "metrics.jsonl").exists()  # nothing computed, nothing written

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = "hello", "world"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ConfigError) as e:
        kd_parts(kd_cfg(tmp_path, tiny_model_dir, other), lora=False)
    assert f"differ at id {min(vocab[a], vocab[b])}" in str(e.value)


# -- the top-K cache --------------------------------------------------------------------------------------


def test_topk_cache_round_trips_and_matches_the_teacher(tmp_path: Path, tiny_model_dir: Path,
                                                         teacher_dir: Path) -> None:
    loader = Loader()
    cfg = kd_cfg(tmp_path, tiny_model_dir, teacher_dir, kd_top_k=8, kd_temperature=2.0)
    kd, student, train_set = kd_parts(cfg, loader)
    path = Path(kd.info["cache"]["train"])
    assert path.parent == tmp_path / "data" / "kd-cache"
    cache = load_cache(path)
    assert cache.k == 8 and cache.idx.dtype == np.int32 and cache.logp.dtype == np.float16
    # ~K x 6 bytes per token (+ 4 for the tail)
    assert cache.idx.nbytes + cache.logp.nbytes + cache.tail.nbytes == cache.tokens * (8 * 6 + 4)

    again = tmp_path / "copy.safetensors"
    save_cache(again, cache)
    back = load_cache(again)
    for name in ("idx", "logp", "tail", "offsets"):
        np.testing.assert_array_equal(getattr(back, name), getattr(cache, name))
    assert back.meta == cache.meta and back.meta["temperature"] == 2.0

    # The numbers are the teacher's tempered top-8 at each answer position.
    teacher = loader.models[str(teacher_dir)][-1]
    aligned = kd.iterate_batches.split_for(train_set).aligned
    fresh = compute_cache(teacher, aligned, k=8, temperature=2.0, vocab=49152, batch_size=3)
    np.testing.assert_array_equal(fresh.idx, cache.idx)
    a = aligned[0]
    full = log_softmax(teacher(mx.array([a.teacher_tokens]))[0], 2.0)
    p0 = a.answer_start - 1 + a.shift
    want = np.array(full[p0:p0 + a.targets])
    idx, logp, tail = cache.example(0)
    np.testing.assert_allclose(logp.astype(np.float32), np.take_along_axis(want, idx, -1), atol=2e-2, rtol=2e-3)
    mass = np.exp(logp.astype(np.float64)).sum(-1) + np.exp(tail.astype(np.float64))
    np.testing.assert_allclose(mass, 1.0, atol=1e-2)

    # The online loss, collapsed onto the cached bins, is what the cached loss computes.
    cached_batch = first_batch(kd, train_set)
    _, _, m_cached = kd.loss(student, *cached_batch)
    online, _, online_set = kd_parts(kd_cfg(tmp_path, tiny_model_dir, teacher_dir, kd_temperature=2.0), loader,
                                     lora=False)
    tokens, lengths, t_tokens, t_pos, kd_mask = first_batch(online, online_set)
    np.testing.assert_array_equal(np.array(cached_batch[0]), np.array(tokens))
    zt = np.array(online.loss.teacher_logits(t_tokens, t_pos)).astype(np.float64) / 2.0
    zs = np.array(student(tokens[:, :-1])).astype(np.float64) / 2.0
    lt = zt - np.log(np.exp(zt - zt.max(-1, keepdims=True)).sum(-1, keepdims=True)) - zt.max(-1, keepdims=True)
    ls = zs - np.log(np.exp(zs - zs.max(-1, keepdims=True)).sum(-1, keepdims=True)) - zs.max(-1, keepdims=True)
    top = np.argsort(-lt, -1)[..., :8]

    def collapse(lp: np.ndarray) -> np.ndarray:
        t = np.take_along_axis(lp, top, -1)
        return np.concatenate([t, np.log1p(-np.exp(t).sum(-1))[..., None]], -1)

    ct, cs = collapse(lt), collapse(ls)
    d = (np.exp(ct) * (ct - cs)).sum(-1) * 4.0
    mask = np.array(kd_mask)
    assert float(m_cached["kl"]) == pytest.approx((d * mask).sum() / mask.sum(), rel=1e-2)


def test_topk_cache_is_built_once_and_reused_across_runs(tmp_path: Path, tiny_model_dir: Path,
                                                         teacher_dir: Path) -> None:
    logs: list[str] = []
    cfg = kd_cfg(tmp_path, tiny_model_dir, teacher_dir, kd_top_k=4, iters=2)
    first = train(cfg, model_loader=Loader(), progress=False, echo=logs.append)
    files = sorted((tmp_path / "data" / "kd-cache").iterdir())
    assert [f.name.split("-")[0] for f in files] == ["train", "valid"]
    stamp = {f: f.stat().st_mtime_ns for f in files}
    assert sum("written" in s for s in logs) == 2

    logs.clear()
    cfg2 = kd_cfg(tmp_path, tiny_model_dir, teacher_dir, kd_top_k=4, iters=2, adapter_path=str(tmp_path / "ad2"))
    second = train(cfg2, model_loader=Loader(), progress=False, echo=logs.append)
    assert sum("reusing" in s for s in logs) == 2 and not any("written" in s for s in logs)
    assert {f: f.stat().st_mtime_ns for f in files} == stamp
    a = mx.load(str(first.adapter_path / "adapters.safetensors"))
    b = mx.load(str(second.adapter_path / "adapters.safetensors"))
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)

    # Another K is another file; the old one stays.
    logs.clear()
    train(kd_cfg(tmp_path, tiny_model_dir, teacher_dir, kd_top_k=2, iters=1, adapter_path=str(tmp_path / "ad3")),
          model_loader=Loader(), progress=False, echo=logs.append)
    assert len(list((tmp_path / "data" / "kd-cache").iterdir())) == 4
    assert all(f.exists() for f in files)


def test_prefilling_the_shared_system_prompt_once_gives_the_same_cache(tmp_path: Path, tiny_model_dir: Path,
                                                                       teacher_dir: Path) -> None:
    loader = Loader()
    cfg = kd_cfg(tmp_path, tiny_model_dir, teacher_dir, teacher_system="Answer as a careful engineer. " * 6)
    kd, _, train_set = kd_parts(cfg, loader, lora=False)
    teacher = loader.models[str(teacher_dir)][-1]
    aligned = kd.iterate_batches.split_for(train_set).aligned
    n, kv = shared_prefix(teacher, aligned)
    assert n >= 32 and n < min(a.teacher_answer_start for a in aligned)
    fast = compute_cache(teacher, aligned, k=8, temperature=1.0, vocab=49152, batch_size=3)
    slow = compute_cache(teacher, aligned, k=8, temperature=1.0, vocab=49152, batch_size=3, share_prefix=False)
    np.testing.assert_array_equal(fast.offsets, slow.offsets)
    assert (fast.idx == slow.idx).mean() > 0.99  # near-ties may swap places
    np.testing.assert_allclose(fast.logp.astype(np.float32), slow.logp.astype(np.float32), atol=2e-2)
    np.testing.assert_allclose(fast.tail, slow.tail, atol=1e-3)


def test_a_corrupt_cache_says_which_file_and_how_to_fix_it(tmp_path: Path) -> None:
    bad = tmp_path / "train-0123.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError) as e:
        load_cache(bad)
    assert str(bad) in str(e.value) and "delete it" in str(e.value)


# -- flags ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,expected", [
    (["--loss", "kd"], "needs --teacher-model"),
    (["--teacher-model", "demo"], "only apply to --loss kd"),
    (["--loss", "kd", "--teacher-model", "demo", "--kd-ratio", "1.5"], "--kd-ratio 1.5"),
    (["--loss", "kd", "--teacher-model", "demo", "--kd-temperature", "0"], "--kd-temperature 0.0"),
    (["--loss", "kd", "--teacher-model", "demo", "--kd-top-k", "0"], "--kd-top-k 0"),
    (["--loss", "kd", "--teacher-model", "demo", "--kd-kind", "sideways"], "'sideways' is not one of"),
    (["--loss", "kd", "--teacher-model", "demo", "--teacher-system", "@/nonexistent/style.md"], "no such file"),
])
def test_cli_flag_errors_before_loading(tmp_path: Path, args: list[str], expected: str) -> None:
    data = make_data(tmp_path / "data")
    out = CliRunner().invoke(cli, ["--data", str(data), "--adapter-path", str(tmp_path / "ad"), *args])
    assert out.exit_code == 2, out.output
    assert expected in out.output
    assert not (tmp_path / "ad").exists()


def test_text_records_cannot_be_distilled(tmp_path: Path, tiny_model_dir: Path, teacher_dir: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(4)))
    cfg = kd_cfg(tmp_path, tiny_model_dir, teacher_dir, mask_prompt=False)
    with pytest.raises(DataError, match="train.jsonl:1.*plain 'text' record"):
        kd_parts(cfg, lora=False)
