"""Validation: the token-weighted loss and metrics of a dataset, compiled, reusing the frozen layers' output.

The validation rows are the same at every validation of a run, so with a
:class:`~mlx_distill.training.prefix.FrozenPrefix` (LoRA on the last layers
only) the first validation keeps each row's output of the frozen layers and
later ones start from it, as later training epochs do.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from mlx_distill.training.headce import compile_keyed
from mlx_distill.training.losses import LossFn
from mlx_distill.training.prefix import FrozenPrefix


def compiled_eval_loss(model: Any, loss: LossFn, prefix: FrozenPrefix | None = None) -> Any:
    """``loss(model, *batch)`` compiled with the weights as implicit inputs (not frozen constants).

    The CPU fast ops are chains of ~20 elementwise ops that fuse into one loop
    only under ``mx.compile``; run eagerly they would be slower than ``mx.exp``.
    With a ``prefix``, returns ``(plain, capture, replay)`` as
    ``loop.make_step`` does: ``capture(*batch)`` also returns the last frozen
    layer's output, ``replay(*batch, hidden)`` starts from it.
    """
    import mlx.core as mx

    return compile_keyed(partial(mx.compile, inputs=[model.state]), partial(loss, model), model, loss, prefix)


def evaluate(
    model: Any, dataset: Any, settings: Any, loss: LossFn, iterate_batches: Callable[..., Any],
    group: Any, compiled: Any = None, prefix: FrozenPrefix | None = None, again: bool = False,
) -> dict[str, float]:
    """Token-weighted loss and metrics over the dataset (all of it unless ``settings.val_batches``).

    ``compiled``: :func:`compiled_eval_loss` of the same model and loss (and
    ``prefix``), made once per run. ``again``: another validation follows, so
    rows not yet stored are captured (within the prefix's budget); stored rows
    are replayed either way.
    """
    import mlx.core as mx

    from mlx_distill.training.headce import forward_only

    model.eval()
    plain, capture, replay = compiled if isinstance(compiled, tuple) else (compiled, None, None)
    plain = plain or partial(loss, model)
    total = mx.array(0.0)
    ntoks = mx.array(0.0)
    sums: dict[str, Any] = {}
    batches = iterate_batches(dataset=dataset, batch_size=settings.batch_size,
                              max_seq_length=settings.max_seq_length, loop=False, comm_group=group)
    for k, batch in enumerate(batches):
        if settings.val_batches >= 0 and k >= settings.val_batches:
            break
        use = prefix is not None and replay is not None
        kind, keys, hidden = prefix.plan(batch, again) if use else ("plain", None, None)  # type: ignore[union-attr]
        captured = None
        with forward_only():  # no backward pass: the chunked head makes no gradient
            if kind == "replay":
                value, n, metrics = replay(*batch, hidden)  # type: ignore[misc]
            elif kind == "capture":
                value, n, metrics, captured = capture(*batch)  # type: ignore[misc]
            else:
                value, n, metrics = plain(*batch)
        n = n.astype(mx.float32)
        total = total + value * n
        ntoks = ntoks + n
        for name, v in metrics.items():
            sums[name] = sums.get(name, mx.array(0.0)) + v * n
        mx.eval(total, ntoks, sums, captured)
        if captured is not None:
            prefix.store(keys, captured)  # type: ignore[union-attr,arg-type]
    if group.size() > 1:
        total, ntoks = mx.distributed.all_sum(total, group=group), mx.distributed.all_sum(ntoks, group=group)
        sums = {k: mx.distributed.all_sum(v, group=group) for k, v in sums.items()}
    model.train()
    denom = max(ntoks.item(), 1.0)
    return {"loss": total.item() / denom, **{k: v.item() / denom for k, v in sums.items()},
            "loss_tokens": int(ntoks.item())}
