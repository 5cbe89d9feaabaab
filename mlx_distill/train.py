"""``mlx-distill train`` / ``python -m mlx_distill.train``: LoRA, DoRA or full fine-tuning.

Built on mlx-lm's tuner (``linear_to_lora_layers``, its dataset classes,
``grad_checkpoint``, LoRA/DoRA layers; the output is read by ``load_adapters``,
``mlx_lm generate --adapter-path`` and ``mlx_lm fuse``) with a lean loop of our
own (``mlx_distill.training.loop``) that reports token accuracy per step.

Steps: ``--iters`` if given, else ``--epochs`` x ceil(train / batch):
104 examples / batch 4 = 26 steps per epoch, x 5 epochs = 130 steps. On this
2-core CPU one step of 4 x ~400 tokens on the 135M demo model takes ~20 s, so
keep demos to short sequences or a few steps.

Distributed: ``mlx.launch -n 2 --backend ring -- python -m mlx_distill.train ...``
splits each global batch of ``--batch-size`` rows over the ranks (data parallel);
only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from mlx_distill.config import click_options, opt, resolve
from mlx_distill.errors import ConfigError, DistillError, cli_errors
from mlx_distill.files import JsonlAppender, iter_jsonl
from mlx_distill.training import checkpoint as ckpt
from mlx_distill.training.loop import (
    LoopSettings,
    TrainingDiverged,
    broadcast_state,
    grad_checkpointing,
    run_loop,
)

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train", "cli"]


@dataclass
class TrainConfig:
    model: str = opt("demo", "Student model: demo, a .gguf file, an mlx-lm directory or a hub id.")
    data: str | None = opt(None, "Folder with train.jsonl (and valid.jsonl), e.g. from `mlx-distill prepare`.")
    adapter_path: str = opt("adapters", "Folder for adapters.safetensors, adapter_config.json and checkpoints.")
    metrics_path: str | None = opt(None, "metrics.jsonl to append to (default: <adapter-path>/metrics.jsonl).")
    epochs: int = opt(5, "Passes over the training set (ignored when --iters is given).")
    iters: int | None = opt(None, "Optimizer steps to run; overrides --epochs.")
    batch_size: int = opt(4, "Examples per step (global: split over distributed ranks).")
    fine_tune_type: str = opt("lora", "What to train.", choices=("lora", "dora", "full"))
    lora_rank: int = opt(8, "LoRA/DoRA rank r.")
    lora_scale: float = opt(20.0, "LoRA scale (mlx-lm's; PEFT's lora_alpha / r).")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA input.")
    lora_keys: list[str] = opt([], "Module paths to adapt inside each layer (repeatable); default: all linear layers.")
    num_layers: int | None = opt(None, "Adapt the last N transformer layers (default or -1: all).")
    learning_rate: float = opt(1e-4, "Peak learning rate.")
    lr_schedule: str = opt("constant", "Learning-rate schedule after warm-up.", choices=("constant", "cosine", "linear"))
    warmup_steps: int = opt(0, "Linear warm-up steps from 0 to --learning-rate.")
    optimizer: str = opt("adam", "Optimizer (Adam/AdamW with bias correction, as torch).", choices=("adam", "adamw", "sgd"))
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    mask_prompt: bool = opt(True, "Loss on the assistant answer only (off: on the prompt too).")
    grad_checkpoint: bool = opt(False, "Recompute activations in the backward pass: less memory, same result.")
    pack: bool = opt(False, "Pack several examples into each fixed-width row, with no attention across them.")
    max_seq_length: int = opt(2048, "Longer examples are truncated to this many tokens.")
    seed: int = opt(0, "Seed for LoRA initialisation, batch order and dropout.")
    steps_per_eval: int | None = opt(None, "Validate every N steps (default: once per epoch; 0: start and end only).")
    val_batches: int = opt(-1, "Validation batches per evaluation (-1: the whole valid set).")
    save_every: int = opt(10, "Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = opt(2, "How many checkpoints to keep.")
    resume: bool = opt(False, "Continue from the last checkpoint in --adapter-path.")
    overwrite: bool = opt(False, "Replace a previous run's files in --adapter-path.")
    dtype_policy: str = opt("auto", "auto: fp32 on CPU, as stored on a GPU.", choices=("auto", "float32", "native"))
    # Token-level distillation (mlx_distill.training.kd): loss = (1 - ratio) * CE + ratio * KL.
    loss: str = opt("sft", "sft: cross-entropy on the teacher's text; kd: plus a KL to a local teacher's "
                    "token distribution.", choices=("sft", "kd"))
    teacher_model: str | None = opt(None, "--loss kd: the frozen local teacher (demo, .gguf, dir, hub id), with "
                                    "the student's tokenizer.")
    teacher_system: str | None = opt(None, "--loss kd: the teacher's system prompt (TEXT or @file; '' for the "
                                     "student's context); default: the style prompt for `demo`, else none.")
    kd_ratio: float = opt(0.5, "--loss kd: weight of the KL (0: plain SFT, 1: KL only).")
    kd_temperature: float = opt(1.0, "--loss kd: softmax temperature of both sides (the KL is scaled by T^2).")
    kd_kind: str = opt("forward", "--loss kd: forward KL(teacher||student), reverse KL(student||teacher) or "
                       "Jensen-Shannon.", choices=("forward", "reverse", "jsd"))
    kd_top_k: int | None = opt(None, "--loss kd: cache the teacher's top-K log-probs + tail mass next to the "
                               "data (~K x 6 bytes/token), reused across epochs; default: full logits on the fly.")


@dataclass
class TrainResult:
    adapter_path: Path
    metrics_path: Path
    steps: int
    epochs: float
    train_loss: float | None
    train_acc: float | None
    val_loss: float | None
    val_acc: float | None
    tokens: int
    seconds: float
    resumed_from: int | None = None


# Options that shape the trajectory: a checkpoint only resumes under the same ones.
_TRAJECTORY = ("model", "fine_tune_type", "lora_rank", "lora_scale", "lora_dropout", "lora_keys", "num_layers",
               "learning_rate", "lr_schedule", "warmup_steps", "optimizer", "weight_decay", "batch_size",
               "mask_prompt", "max_seq_length", "seed", "pack")


def check_config(cfg: TrainConfig) -> None:
    """Flag values that cannot work, before anything is loaded."""
    if not cfg.data:
        raise ConfigError("--data is required: the folder `mlx-distill prepare --out` wrote")
    positive = {"batch_size": cfg.batch_size, "lora_rank": cfg.lora_rank, "max_seq_length": cfg.max_seq_length,
                "epochs": cfg.epochs, "learning_rate": cfg.learning_rate}
    if cfg.iters is not None:
        positive = {**positive, "iters": cfg.iters}
        positive.pop("epochs")
    for name, v in positive.items():
        if v <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} {v}: expected a positive number")
    for name in ("warmup_steps", "save_every", "keep_checkpoints", "weight_decay", "seed"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected 0 or more")
    if cfg.steps_per_eval is not None and cfg.steps_per_eval < 0:
        raise ConfigError(f"--steps-per-eval {cfg.steps_per_eval}: expected 0 (start and end only) or more")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"--lora-dropout {cfg.lora_dropout}: expected a value in [0, 1)")
    if cfg.num_layers is not None and (cfg.num_layers == 0 or cfg.num_layers < -1):
        raise ConfigError(f"--num-layers {cfg.num_layers}: expected a positive count, or -1 for all layers")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one")
    if cfg.pack and cfg.loss != "sft":
        raise ConfigError(f"--pack works with --loss sft only (got --loss {cfg.loss}); drop --pack")
    from mlx_distill.training.kd_setup import check_kd_config

    check_kd_config(cfg)


def _schedule(cfg: TrainConfig, total_steps: int) -> Any:
    import mlx.optimizers as optim

    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    main: Any = {
        "constant": lambda: cfg.learning_rate,
        "cosine": lambda: optim.cosine_decay(cfg.learning_rate, decay_steps, 0.0),
        "linear": lambda: optim.linear_schedule(cfg.learning_rate, 0.0, decay_steps),
    }[cfg.lr_schedule]()
    if cfg.warmup_steps == 0:
        return main
    if not callable(main):
        main = optim.linear_schedule(cfg.learning_rate, cfg.learning_rate, 1)
    warm = optim.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optim.join_schedules([warm, main], [cfg.warmup_steps])


def _optimizer(cfg: TrainConfig, total_steps: int) -> Any:
    import mlx.optimizers as optim

    lr = _schedule(cfg, total_steps)
    # bias_correction=True: mlx's default (False) makes the first Adam steps ~3x
    # larger than torch's (0.1*g / sqrt(0.001*g^2) = 3.16 lr on step 1).
    if cfg.optimizer == "adam":
        return optim.Adam(learning_rate=lr, bias_correction=True)
    if cfg.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay, bias_correction=True)
    return optim.SGD(learning_rate=lr)


def _fingerprint(cfg: TrainConfig, train_file: Path) -> dict[str, Any]:
    data_hash = hashlib.sha256(train_file.read_bytes()).hexdigest()[:16]
    from mlx_distill.training.kd_setup import kd_fingerprint

    return {**{k: getattr(cfg, k) for k in _TRAJECTORY}, "train_sha256": data_hash, **kd_fingerprint(cfg)}


def _setup_model(model: Any, cfg: TrainConfig, num_layers: int) -> dict[str, Any] | None:
    """Freeze the base and add LoRA/DoRA layers (or unfreeze layers for full); return lora_parameters."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(cfg.seed)  # the LoRA A matrices are random
    model.freeze()
    if cfg.fine_tune_type == "full":
        for layer in model.layers[-num_layers:]:
            layer.unfreeze()
        return None
    params: dict[str, Any] = {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout}
    if cfg.lora_keys:
        params["keys"] = list(cfg.lora_keys)
    try:
        linear_to_lora_layers(model, num_layers, params, use_dora=cfg.fine_tune_type == "dora")
    except ValueError as e:
        raise ConfigError(f"--fine-tune-type {cfg.fine_tune_type}: {e}") from None
    return params


def train(
    cfg: TrainConfig,
    *,
    loss: Callable[..., Any] | None = None,
    iterate_batches: Callable[..., Any] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    echo: Callable[[str], None] = print,
    progress: bool = True,
    model_loader: Callable[..., Any] | None = None,
) -> TrainResult:
    """Train an adapter on ``cfg.data``; write it to ``cfg.adapter_path``; return the summary.

    ``loss`` (see ``training.losses``) and ``iterate_batches`` (mlx-lm's
    signature) swap the objective and the batching; ``on_step(record)`` sees
    every train record; ``model_loader(spec, adapter_path, policy)`` replaces
    ``mlx_distill.models.load``.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_distill import models
    from mlx_distill.training import data as tdata
    from mlx_distill.training.losses import lm_loss

    if cfg.pack:  # several examples per row (training.packing); a swapped-in loss or batcher still wins
        from mlx_distill.training import packing

        loss = loss or packing.packed_lm_loss
        iterate_batches = iterate_batches or packing.iterate_packed_batches
    loss = loss or lm_loss
    iterate_batches = iterate_batches or tdata.iterate_batches
    check_config(cfg)
    group = mx.distributed.init()
    world, rank0 = group.size(), group.rank() == 0
    say = echo if rank0 else (lambda _: None)
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the {world} distributed ranks")
    adapter = Path(cfg.adapter_path)
    metrics = Path(cfg.metrics_path) if cfg.metrics_path else adapter / "metrics.jsonl"

    # Everything that can fail without the model: data files parse, outputs are safe.
    train_path, valid_path = tdata.split_paths(cfg.data)
    train_rows = tdata.read_examples(train_path, mask_prompt=cfg.mask_prompt)
    valid_rows = tdata.read_examples(valid_path, mask_prompt=cfg.mask_prompt) if valid_path else None
    fingerprint = _fingerprint(cfg, train_path)
    resume_from = None
    if rank0:  # only rank 0 writes, so only it checks (and resumes from) the adapter folder
        resume_from = ckpt.prepare_outputs(adapter, metrics, fingerprint, resume=cfg.resume,
                                           overwrite=cfg.overwrite, echo=say)

    model, tokenizer, info = (model_loader or models.load)(cfg.model, None, cfg.dtype_policy)
    n_layers = len(model.layers)
    num_layers = n_layers if cfg.num_layers in (None, -1) else cfg.num_layers
    if num_layers > n_layers:
        raise ConfigError(f"--num-layers {num_layers}: {cfg.model} has only {n_layers} layers "
                          f"(pass {n_layers} or -1 for all)")
    kw = dict(mask_prompt=cfg.mask_prompt, max_seq_length=cfg.max_seq_length)
    train_set = tdata.tokenize_examples(train_path, *train_rows, tokenizer, **kw)
    valid_set = tdata.tokenize_examples(valid_path, *valid_rows, tokenizer, **kw) if valid_rows else None
    if cfg.batch_size > len(train_set):
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training "
                          f"examples in {train_path}; lower it to at most {len(train_set)}")
    # 104 examples / batch 4 = 26 steps per epoch; 5 epochs = 130 steps.
    steps_per_epoch = (packing.packed_steps_per_epoch(train_set, cfg.batch_size, cfg.max_seq_length) if cfg.pack
                       else tdata.batches_per_epoch(len(train_set), cfg.batch_size))
    total_steps = cfg.iters if cfg.iters is not None else cfg.epochs * steps_per_epoch

    kd_info = None
    if cfg.loss == "kd":  # teacher, vocabulary and answer alignment are checked here, before any compute
        from mlx_distill.training.kd_setup import SplitData, setup_kd

        splits = [SplitData("train", train_path, *train_rows, train_set)]
        if valid_set is not None:
            splits.append(SplitData("valid", valid_path, *valid_rows, valid_set))
        kd = setup_kd(cfg, model, tokenizer, info.spec, splits, base_iterate=iterate_batches, group=group,
                      loader=model_loader or models.load, echo=say)
        loss, iterate_batches, kd_info = kd.loss, kd.iterate_batches, kd.info
    lora_parameters = _setup_model(model, cfg, num_layers)
    optimizer = _optimizer(cfg, total_steps)
    optimizer.init(model.trainable_parameters())
    start_step = 0
    if resume_from is not None:
        ckpt.restore(resume_from, model, optimizer)
        start_step = resume_from.step
    start_step = broadcast_state(model, optimizer, group, start_step)
    resumed = resume_from.state if resume_from is not None else {}

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    truncated = tdata.truncated_count(train_set, cfg.max_seq_length)
    say(f"model {info.spec} ({info.path}): {n_layers} layers; {cfg.fine_tune_type} on the last {num_layers}: "
        f"{trainable / 1e6:.3f}M trainable of {total / 1e6:.1f}M parameters ({100 * trainable / total:.2f}%)")
    say(f"train {len(train_set)} examples ({train_set.num_tokens} tokens) / batch {cfg.batch_size} = "
        f"{steps_per_epoch} steps per epoch; {total_steps} steps"
        + (f" ({cfg.epochs} epochs)" if cfg.iters is None else f" ({total_steps / steps_per_epoch:.2f} epochs)")
        + (f"; {truncated} examples truncated to {cfg.max_seq_length} tokens" if truncated else "")
        + (f"; valid {len(valid_set)}" if valid_set else "; no valid.jsonl: no validation")
        + (f"; {world} ranks" if world > 1 else ""))
    if start_step:
        say(f"resuming from step {start_step} ({resume_from.path if resume_from else 'rank 0'})")

    dtypes = sorted({str(v.dtype).replace("mlx.core.", "") for _, v in tree_flatten(model.parameters())})
    extra = {"model_path": info.path, "base_model": info.hub_id, "model_source": info.source,
             "dtype": ",".join(dtypes),
             "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "train_examples": len(train_set),
             "valid_examples": len(valid_set) if valid_set else 0, "world_size": world,
             "metrics_path": str(metrics), **({"kd": kd_info} if kd_info else {})}
    config_json = ckpt.adapter_config(asdict(cfg), num_layers=num_layers, lora_parameters=lora_parameters,
                                      extra=extra)
    if rank0:
        ckpt.write_adapter_config(adapter, config_json)

    if start_step >= total_steps:
        say(f"already trained to step {start_step} of {total_steps}; nothing to do")
        return _result_from_metrics(adapter, metrics, start_step, steps_per_epoch, resumed)

    appender = JsonlAppender(metrics) if rank0 else None

    def save(step: int, state: dict[str, Any]) -> str | None:
        if not rank0:
            return None
        where = ckpt.save_checkpoint(adapter, step, model, optimizer, {**state, "fingerprint": fingerprint},
                                     keep=max(cfg.keep_checkpoints, 1))
        return str(where)

    settings = LoopSettings(
        batch_size=cfg.batch_size, max_seq_length=cfg.max_seq_length, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        eval_every=steps_per_epoch if cfg.steps_per_eval is None else cfg.steps_per_eval,
        save_every=cfg.save_every, val_batches=cfg.val_batches, seed=cfg.seed, start_step=start_step,
        start_time_s=float(resumed.get("time_s", 0.0)), start_tokens=int(resumed.get("tokens_seen", 0)),
    )
    try:
        with grad_checkpointing(model, cfg.grad_checkpoint):
            out = run_loop(model, optimizer, train_set, valid_set, settings, loss=loss,
                           iterate_batches=iterate_batches, group=group,
                           write=appender.append if appender else (lambda _: None),
                           checkpoint=save, on_step=on_step, progress=progress, echo=say)
    finally:
        if appender:
            appender.close()
    if rank0:
        final = {"steps": out.steps, "epochs": out.steps / steps_per_epoch, "tokens": out.tokens,
                 "seconds": out.seconds, "train_loss": out.train.get("loss"), "train_acc": out.train.get("acc"),
                 "val_loss": out.val.get("loss"), "val_acc": out.val.get("acc")}
        ckpt.write_adapter_config(adapter, {**config_json, "result": final})
    say(f"adapter: {adapter / ckpt.ADAPTER_FILE} ({out.steps} steps, {out.seconds:.1f} s)")
    return TrainResult(
        adapter_path=adapter, metrics_path=metrics, steps=out.steps, epochs=out.steps / steps_per_epoch,
        train_loss=out.train.get("loss"), train_acc=out.train.get("acc"), val_loss=out.val.get("loss"),
        val_acc=out.val.get("acc"), tokens=out.tokens, seconds=out.seconds,
        resumed_from=start_step or None,
    )


def _result_from_metrics(adapter: Path, metrics: Path, step: int, steps_per_epoch: int,
                         state: dict[str, Any]) -> TrainResult:
    last: dict[str, dict[str, Any]] = {}
    if metrics.is_file():
        for _, rec in iter_jsonl(metrics, what="metrics record"):
            last[rec.get("type", "")] = rec
    tr, va = last.get("train", {}), last.get("val", {})
    return TrainResult(adapter, metrics, step, step / steps_per_epoch, tr.get("loss"), tr.get("acc"),
                       va.get("loss"), va.get("acc"), int(state.get("tokens_seen", 0)),
                       float(state.get("time_s", 0.0)), resumed_from=step)


@click.command("train")
@click_options(TrainConfig)
@click.option("--config", "config_file", type=click.Path(), help="YAML file with these options (CLI wins).")
@click.option("--progress/--no-progress", default=True, help="Show the progress bar on stderr.")
@cli_errors
def cli(config_file: str | None, progress: bool, **kwargs: Any) -> None:
    """LoRA/DoRA/full fine-tuning on mlx-lm's tuner; prints the adapter folder last."""
    cfg = resolve(TrainConfig, kwargs, config_file, section="train")
    try:
        result = train(cfg, echo=lambda s: click.echo(s, err=True), progress=progress)
    except KeyboardInterrupt:
        raise DistillError(f"interrupted; the last checkpoint in {cfg.adapter_path} is kept: rerun the same "
                           "command with --resume to continue") from None
    import mlx.core as mx

    if mx.distributed.init().rank() == 0:
        summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
        click.echo(json.dumps(summary), err=True)
        click.echo(str(result.adapter_path))


if __name__ == "__main__":
    cli()
