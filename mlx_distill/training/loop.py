"""The compiled, data-parallel training step and the loop around it.

mlx-lm's ``trainer.train`` returns only (loss, ntoks) from its compiled step,
so it cannot report token accuracy or a loss's extra terms per step. This loop
keeps its structure (``mx.compile`` with the model, optimizer and random state
as inputs and outputs; gradients summed over the distributed group) and adds:
per-step metrics from the loss, token-weighted global normalisation, a NaN/inf
guard, validation with accuracy, atomic checkpoints and resume.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from mlx_distill.errors import DistillError
from mlx_distill.training.checkpoint import set_optimizer_leaves
from mlx_distill.training.cpu_levers import cpu_levers
from mlx_distill.training.headce import compile_keyed
from mlx_distill.training.losses import LossFn
from mlx_distill.training.prefix import ENV as PREFIX_ENV
from mlx_distill.training.prefix import FrozenPrefix, frozen_prefix
from mlx_distill.training.validation import compiled_eval_loss, evaluate


class TrainingDiverged(DistillError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


@dataclass
class LoopSettings:
    batch_size: int
    max_seq_length: int
    total_steps: int
    steps_per_epoch: int
    eval_every: int  # 0: only at the start and the end
    save_every: int  # 0: only at the end
    val_batches: int = -1
    seed: int = 0
    start_step: int = 0
    start_time_s: float = 0.0
    start_tokens: int = 0


@dataclass
class LoopResult:
    steps: int
    train: dict[str, float] = field(default_factory=dict)  # last step's loss/acc/...
    val: dict[str, float] = field(default_factory=dict)  # last validation
    tokens: int = 0
    seconds: float = 0.0


@contextmanager
def grad_checkpointing(model: Any, enabled: bool) -> Iterator[None]:
    """Recompute the layers' activations in the backward pass, and chunk the lm_head.

    As mlx-lm's ``grad_checkpoint``, this patches the layer *class*; it is
    undone afterwards, or every later model of that class in the process
    (the pipeline's generation stage, other tests) would keep the patched
    call. Unlike it, the recomputation runs on the MLX stream, and with the
    fast ops, of the forward call it repeats: with ``training.streams`` each
    half of the batch has its own (mlx-lm's would recompute both halves on
    the default stream, one after the other), and with the packed rows'
    segments of ``--pack`` (mlx-lm's recomputation runs after the loss has
    left ``fastops.attention_segments``, so it attended across the packed
    examples). The lm_head and cross-entropy
    run ``headce.LEAN_CHUNK_ROWS`` positions at a time (``headce.chunked_head``; on
    the CPU a lever chunks them anyway, in larger chunks): the (positions x vocab) logits, softmax
    and gradient are never whole.
    """
    if not enabled:
        yield
        return
    import mlx.core as mx

    from mlx_distill.training import fastops
    from mlx_distill.training.headce import LEAN_CHUNK_ROWS, chunked_head

    cls = type(model.layers[0])
    original = cls.__call__

    def checkpointed(layer: Any, *args: Any, **kwargs: Any) -> Any:
        stream, ops = mx.default_stream(mx.default_device()), fastops.current_stream()
        segments = fastops.packed_segments()  # --pack: gone by the time the backward pass is built

        def inner(params: Any, *args: Any, **kwargs: Any) -> Any:
            with ExitStack() as stack:
                stack.enter_context(mx.stream(stream))
                stack.enter_context(fastops.on_stream(ops))
                if segments is not None:
                    stack.enter_context(fastops.attention_segments(layer, segments))
                layer.update(params)
                return original(layer, *args, **kwargs)

        return mx.checkpoint(inner)(layer.trainable_parameters(), *args, **kwargs)

    cls.__call__ = checkpointed
    try:
        with chunked_head(LEAN_CHUNK_ROWS):
            yield
    finally:
        cls.__call__ = original


def make_step(model: Any, optimizer: Any, loss: LossFn, group: Any, prefix: FrozenPrefix | None = None) -> Any:
    """A compiled ``step(tokens, lengths, *extra) -> (loss, ntoks, metrics, tokens, grad_norm)``, all global.

    ``extra`` is whatever else the batch iterator yields (e.g. cached teacher
    log-probs for distillation); it is passed on to the loss untouched.
    With a ``prefix`` (:func:`training.prefix.frozen_prefix`), returns the
    triple ``(step, capture, replay)``: ``capture(*batch)`` also returns the
    last frozen layer's output, ``replay(*batch, hidden)`` starts from it.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.nn.utils import average_gradients
    from mlx.utils import tree_flatten, tree_map

    world = group.size()

    def objective(model: Any, *batch: Any) -> Any:
        value, ntoks, metrics = loss(model, *batch)
        return value * ntoks, (value, ntoks, metrics)

    value_and_grad = nn.value_and_grad(model, objective)

    def all_sum(x: Any) -> Any:
        return mx.distributed.all_sum(x, group=group) if world > 1 else x

    state = [model.state, optimizer.state, mx.random.state]

    def step(*batch: Any) -> Any:
        (_, (value, ntoks, metrics)), grads = value_and_grad(model, *batch)
        n = ntoks.astype(mx.float32)
        n_all = all_sum(n)
        denom = mx.maximum(n_all, 1.0)
        # average_gradients divides the summed gradient by `world`; undo that and
        # divide by the global token count instead (see losses.py).
        grads = average_gradients(grads, group=group) if world > 1 else grads
        grads = tree_map(lambda g: g * (world / denom), grads)
        optimizer.update(model, grads)
        grad_norm = mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads)))
        value_all = all_sum(value * n) / denom
        metrics_all = {k: all_sum(v * n) / denom for k, v in metrics.items()}
        real = all_sum(batch[1][:, 1].sum().astype(mx.float32))  # non-pad tokens
        return value_all, n_all, metrics_all, real, grad_norm

    return compile_keyed(partial(mx.compile, inputs=state, outputs=state), step, model, loss, prefix)


def broadcast_state(model: Any, optimizer: Any, group: Any, step: int) -> int:
    """Give every rank rank 0's trainable weights, optimizer state and start step."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    if group.size() == 1:
        return step
    rank0 = group.rank() == 0

    def bcast(x: Any) -> Any:
        dtype = x.dtype
        y = x.astype(mx.float32) if not mx.issubdtype(dtype, mx.floating) else x
        y = mx.distributed.all_sum(y if rank0 else mx.zeros_like(y), group=group)
        return y.astype(dtype)

    weights = [(k, bcast(v)) for k, v in tree_flatten(model.trainable_parameters())]
    model.update(tree_unflatten(weights))
    set_optimizer_leaves(optimizer, {k: bcast(v) for k, v in tree_flatten(optimizer.state)})
    start = bcast(mx.array(step, mx.int32))
    mx.eval(model.parameters(), optimizer.state, start)
    return int(start.item())


def run_loop(
    model: Any,
    optimizer: Any,
    train_set: Any,
    valid_set: Any,
    settings: LoopSettings,
    *,
    loss: LossFn,
    iterate_batches: Callable[..., Any],
    group: Any,
    write: Callable[[dict[str, Any]], None],
    checkpoint: Callable[[int, dict[str, Any]], str | None],
    on_step: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> LoopResult:
    """Train from ``settings.start_step`` to ``settings.total_steps``.

    ``write(record)`` receives every metrics.jsonl record (rank 0 writes it);
    ``checkpoint(step, state)`` saves and returns where (or None off rank 0).
    On the CPU the levers of ``cpu_levers`` apply for the whole loop.
    """
    with cpu_levers(model) as levers, frozen_prefix(model, settings.total_steps > settings.steps_per_epoch) as prefix:
        if levers.describe() != "none" and group.rank() == 0:
            echo(f"CPU levers: {levers.describe()}")
        if prefix is not None and group.rank() == 0:
            echo(f"frozen layers 0-{prefix.depth - 1}: each row's output of them is kept after its first "
                 f"epoch and reused in later ones (up to {prefix.budget / 1e9:g} GB, {PREFIX_ENV})")
        return _run_loop(model, optimizer, train_set, valid_set, settings, loss=loss,
                         iterate_batches=iterate_batches, group=group, write=write, checkpoint=checkpoint,
                         on_step=on_step, progress=progress, echo=echo, prefix=prefix)


def _run_loop(
    model: Any, optimizer: Any, train_set: Any, valid_set: Any, settings: LoopSettings, *, loss: LossFn,
    iterate_batches: Callable[..., Any], group: Any, write: Callable[[dict[str, Any]], None],
    checkpoint: Callable[[int, dict[str, Any]], str | None], on_step: Callable[[dict[str, Any]], None] | None,
    progress: bool, echo: Callable[[str], None], prefix: FrozenPrefix | None = None,
) -> LoopResult:
    import mlx.core as mx

    s = settings
    steps = make_step(model, optimizer, loss, group, prefix)
    step_fn, capture, replay = steps if prefix is not None else (steps, None, None)
    last_epoch = math.ceil(s.total_steps / s.steps_per_epoch)
    rank0 = group.rank() == 0
    bar = _progress(s.total_steps, s.start_step, enabled=progress and rank0)
    result = LoopResult(steps=s.start_step, tokens=s.start_tokens)
    t_start = time.perf_counter() - s.start_time_s
    last_saved: tuple[int, str | None] = (s.start_step, None)

    def elapsed() -> float:
        return round(time.perf_counter() - t_start, 3)

    eval_loss = compiled_eval_loss(model, loss, prefix)

    def validate(step: int) -> None:
        if valid_set is None:
            return
        # the validation rows' frozen-layer output is kept when another validation follows
        v = evaluate(model, valid_set, s, loss, iterate_batches, group, compiled=eval_loss, prefix=prefix,
                     again=step < s.total_steps)
        result.val = v
        write({"type": "val", "step": step, "epoch": round(step / s.steps_per_epoch, 4), **_round(v),
               "time_s": elapsed()})
        msg = f"step {step}: val loss {v['loss']:.4f}" + (f", acc {v['acc']:.3f}" if "acc" in v else "")
        bar.write(msg, file=sys.stderr) if bar is not None else (rank0 and echo(msg))

    def state(step: int) -> dict[str, Any]:
        return {"epoch": step / s.steps_per_epoch, "tokens_seen": result.tokens, "time_s": elapsed()}

    model.train()
    if s.start_step == 0:
        validate(0)
    batches = iterate_batches(dataset=train_set, batch_size=s.batch_size, max_seq_length=s.max_seq_length,
                              loop=True, seed=s.seed, comm_group=group)
    for _ in range(s.start_step):  # resume: replay the batch order without computing
        next(batches)
    try:
        for step in range(s.start_step + 1, s.total_steps + 1):
            tic = time.perf_counter()
            batch = next(batches)
            # A per-step key makes dropout the same whether or not the run was resumed.
            mx.random.seed(s.seed * 1_000_003 + step)
            again = math.ceil(step / s.steps_per_epoch) < last_epoch  # these rows come back in a later epoch
            kind, keys, hidden = prefix.plan(batch, again) if prefix is not None else ("plain", None, None)
            captured = None
            if kind == "replay":  # every row was trained before: start after the frozen layers
                value, ntoks, metrics, real, grad_norm = replay(*batch, hidden)
            elif kind == "capture":
                value, ntoks, metrics, real, grad_norm, captured = capture(*batch)
            else:
                value, ntoks, metrics, real, grad_norm = step_fn(*batch)
            mx.eval(model.state, optimizer.state, value, ntoks, metrics, real, grad_norm, captured)
            if captured is not None:
                prefix.store(keys, captured)
            dt = time.perf_counter() - tic
            loss_v, norm_v = value.item(), grad_norm.item()
            lr = float(optimizer.learning_rate.item())
            epoch = step / s.steps_per_epoch
            if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
                if last_saved[1]:
                    where = (f"the last good checkpoint is step {last_saved[0]} ({last_saved[1]}); its "
                             "weights are also in adapters.safetensors")
                    fix = "then rerun with --resume to continue from it, or with --overwrite to start over"
                else:
                    where = "no checkpoint was written yet, so there is nothing to resume from"
                    fix = "then rerun with --overwrite"
                raise TrainingDiverged(
                    f"training stopped at step {step} (epoch {epoch:.2f}): the loss is {loss_v} and the "
                    f"gradient norm {norm_v} at learning rate {lr:g}; {where}.\n  fix: lower "
                    f"--learning-rate (or --lora-scale), {fix}"
                )
            n_real = int(real.item())
            result.tokens += n_real
            record = {
                "type": "train", "step": step, "epoch": round(epoch, 4), "loss": loss_v,
                **{k: v.item() for k, v in metrics.items()},
                "lr": lr, "tokens": n_real, "tok_per_s": n_real / dt if dt > 0 else 0.0,
                "peak_mem_gb": mx.get_peak_memory() / 1e9, "time_s": elapsed(),
                "loss_tokens": int(ntoks.item()), "grad_norm": norm_v, "step_s": dt,
                **({"frozen_cached": kind == "replay"} if prefix is not None else {}),
            }
            record = _round(record)
            write(record)
            result.steps, result.train = step, record
            if on_step is not None:
                on_step(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(_postfix(record), refresh=False)
            last = step == s.total_steps
            # Validate before saving: a checkpoint at step k means "metrics up to k are written".
            if last or (s.eval_every and step % s.eval_every == 0):
                validate(step)
            if last or (s.save_every and step % s.save_every == 0):
                last_saved = (step, checkpoint(step, state(step)))
    finally:
        if bar is not None:
            bar.close()
    result.seconds = elapsed()
    return result


def _round(d: dict[str, Any]) -> dict[str, Any]:
    # 6 significant digits: keeps a 2e-7 learning rate, trims float noise.
    return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in d.items()}


def _postfix(r: dict[str, Any]) -> str:
    acc = f" acc={r['acc']:.3f}" if "acc" in r else ""
    return f"loss={r['loss']:.4f}{acc} tok/s={r['tok_per_s']:.1f}"


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, file=sys.stderr, desc="train", unit="step",
                dynamic_ncols=True, leave=True)
