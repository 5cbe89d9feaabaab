"""Token-level knowledge distillation losses: a KL to a local teacher's token distribution.

The objective (``mlx-distill train --loss kd``)::

    loss = (1 - ratio) * CE(teacher's text) + ratio * tau^2 * D(teacher, student)

* ``CE`` is the usual next-token cross-entropy on the CE mask (the answer with
  ``--mask-prompt``, everything with ``--no-mask-prompt``), averaged per token.
* ``D`` is averaged over the answer tokens only (the KD mask), whatever
  ``--mask-prompt`` says: the teacher's context differs from the student's
  (context distillation), so its prompt positions are not comparable.
* ``D`` per token, on the softmax of the logits divided by the temperature tau:

  - ``forward``: KL(p_t || p_s) = sum p_t (log p_t - log p_s), mean-seeking;
    the classic Hinton KD and torchtune's ``ForwardKLLoss`` (which drops the
    teacher entropy term; that changes the value, not the gradient);
  - ``reverse``: KL(p_s || p_t), mode-seeking (MiniLLM);
  - ``jsd``: 0.5 KL(p_t || m) + 0.5 KL(p_s || m), m = (p_t + p_s) / 2; bounded
    by log 2 = 0.693 per token.

  The tau^2 factor (Hinton et al. 2015) keeps the gradient's size when tau > 1:
  softening both sides by tau scales d D / d z by 1 / tau^2. At tau = 1 it is 1.
* Top-K (``--kd-top-k K``): the teacher keeps its K most likely tokens and the
  mass of all the others (the tail), so both distributions collapse onto K + 1
  bins: the K teacher tokens and "anything else". D on the bins is a lower bound
  of D on the full vocabulary (data processing inequality); for forward KL the
  gap is p_t(tail) x KL within the tail, so it vanishes with the teacher's
  tail (K = V - 1 is exact for every kind). With K = 32 a token costs 32 x (4 + 2) + 4 = 196
  bytes in the cache instead of 49,152 x 4 = 196,608 for fp32 logits.

The metrics are ``ce`` and ``kl`` (the tau^2-scaled D as it enters the loss,
so ``loss = (1 - ratio) * ce + ratio * kl`` holds for every record) and ``acc``.
"""

from __future__ import annotations

import math
from typing import Any

KINDS = ("forward", "reverse", "jsd")
LOG2 = math.log(2.0)
# Floor for sums of probabilities that may underflow to 0 (a student tail, a JSD mixture):
# log(1e-30) = -69 instead of -inf, which would give 0 * inf = nan in the loss and its gradient.
TINY = 1e-30


def softmax_parts(logits: Any, temperature: float = 1.0) -> tuple[Any, Any, Any]:
    """(log-probs, e, s) of ``softmax(logits / temperature)`` in fp32, with p = e / s.

    One exp pass per call: ``e = exp(z - max z)`` serves the log-probs and the
    probabilities; ``mx.logsumexp`` would take another pass in its backward.
    With MLX 0.32's scalar CPU exp (~20 ns an element) a (4, 512, 49,152)
    pass costs ~2 s, hence :func:`_exp`.
    """
    import mlx.core as mx

    z = logits.astype(mx.float32)
    if temperature != 1.0:
        z = z / temperature
    m = mx.stop_gradient(z.max(axis=-1, keepdims=True))
    e = _exp(z - m)
    s = e.sum(axis=-1, keepdims=True)
    return z - m - mx.log(s), e, s


def _exp(x: Any) -> Any:
    """exp of x <= 0 (every caller here subtracts a maximum or passes log-probs).

    On the CPU: ``fastops.exp_neg``, multiplies and adds that ``mx.compile``
    fuses into one vectorised loop (3.8 ns an element, 1 ns with the native
    JIT, against 17-27 ns for MLX 0.32's scalar CPU ``exp``; relative error
    < 4e-5). Elsewhere ``mx.exp``.
    """
    import mlx.core as mx

    from mlx_distill.training import fastops

    return fastops.exp_neg(x) if fastops.use_fast_ops() else mx.exp(x)


def log_softmax(logits: Any, temperature: float = 1.0) -> Any:
    """fp32 ``log softmax(logits / temperature)`` over the last axis."""
    return softmax_parts(logits, temperature)[0]


def divergence(logp_t: Any, logp_s: Any, kind: str = "forward", p_t: Any = None, p_s: Any = None) -> Any:
    """Per-position divergence between two log-distributions over the last axis (same support).

    ``p_t``/``p_s``: the probabilities when already at hand (saves an exp pass).
    """
    import mlx.core as mx

    if kind not in KINDS:
        raise ValueError(f"kd kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind in ("forward", "jsd") and p_t is None:
        p_t = _exp(logp_t)
    if kind in ("reverse", "jsd") and p_s is None:
        p_s = _exp(logp_s)
    if kind == "forward":
        return (p_t * (logp_t - logp_s)).sum(axis=-1)
    if kind == "reverse":
        return (p_s * (logp_s - logp_t)).sum(axis=-1)
    # Both probabilities can underflow to 0 far in the tail: m is floored at TINY
    # there, where the terms are 0 * finite = 0 (log 0 would give 0 * inf = nan).
    logp_m = mx.log(mx.maximum(0.5 * (p_t + p_s), TINY))
    return 0.5 * ((p_t * (logp_t - logp_m)).sum(axis=-1) + (p_s * (logp_s - logp_m)).sum(axis=-1))


def collapse_topk(logp: Any, e: Any, s: Any, idx: Any) -> Any:
    """A distribution's log-probs on the tokens ``idx`` plus its tail bin: (..., K + 1).

    The tail is log(sum of e outside idx) - log(s), from the masked sum, not
    log(1 - sum(top K)), which loses all precision when the top K hold ~all the
    mass (1 - 0.9999999 in fp32 is 1.19e-7, off by 19%).
    """
    import mlx.core as mx

    keep = mx.put_along_axis(mx.ones(e.shape, dtype=mx.float32), idx, mx.array(0.0), axis=-1)
    tail = mx.log(mx.maximum((e * keep).sum(axis=-1, keepdims=True), TINY)) - mx.log(s)
    return mx.concatenate([mx.take_along_axis(logp, idx, axis=-1), tail], axis=-1)


def student_topk(logits: Any, idx: Any, temperature: float = 1.0) -> Any:
    """The student's log-probs on the teacher's K tokens plus its tail bin: (..., K + 1)."""
    return collapse_topk(*softmax_parts(logits, temperature), idx)


def teacher_topk(logp_t: Any, k: int) -> tuple[Any, Any, Any]:
    """(indices int32, log-probs, tail log-prob) of the top ``k`` of normalised log-probs.

    Sorted by descending probability (ties by index), so a cache is deterministic.
    """
    import mlx.core as mx

    idx = mx.argpartition(-logp_t, kth=k - 1, axis=-1)[..., :k]
    vals = mx.take_along_axis(logp_t, idx, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    idx = mx.take_along_axis(idx, order, axis=-1).astype(mx.int32)
    vals = mx.take_along_axis(vals, order, axis=-1)
    rest = mx.put_along_axis(logp_t, idx, mx.array(-math.inf, dtype=logp_t.dtype), axis=-1)
    tail = mx.logsumexp(rest, axis=-1)
    return idx, vals, tail


def masked_mean(values: Any, mask: Any) -> tuple[Any, Any]:
    """(sum(values * mask) / max(count, 1), count) in fp32."""
    import mlx.core as mx

    mask = mask.astype(mx.float32)
    n = mask.sum()
    return (values.astype(mx.float32) * mask).sum() / mx.maximum(n, 1.0), n


class KDLoss:
    """The ``--loss kd`` objective, in the loss protocol of :mod:`mlx_distill.training.losses`.

    Two ways to get the teacher's side, chosen by ``teacher``:

    * on the fly (``teacher`` is the frozen model): the batch iterator yields
      ``(tokens, lengths, t_tokens, t_pos, kd_mask)``: the teacher's own rows
      (its context + the same answer), for each student logit position the
      teacher logit position that predicts the same answer token, and the KD mask;
    * from the top-K cache (``teacher`` is None): ``(tokens, lengths, top_idx,
      top_logp, tail_logp, kd_mask)``.

    ``vocab`` slices both sides to the shared rows (padding rows past the
    tokenizer's ids differ between sizes of one family: Qwen2.5 151,936 vs 152,064).

    ``ntoks`` is the CE token count, by which the step weighs ranks (and CPU
    streams): under the default ``--mask-prompt`` the KD tokens are the same
    tokens, so N ranks give one process's loss exactly; with
    ``--no-mask-prompt`` each rank's KL mean is weighed by its CE tokens.
    """

    def __init__(self, *, ratio: float = 0.5, temperature: float = 1.0, kind: str = "forward",
                 vocab: int | None = None, teacher: Any = None):
        if kind not in KINDS:
            raise ValueError(f"kd kind {kind!r}: expected one of {', '.join(KINDS)}")
        self.ratio, self.temperature, self.kind = float(ratio), float(temperature), kind
        self.vocab, self.teacher = vocab, teacher

    def _slice(self, logits: Any) -> Any:
        return logits if self.vocab is None or logits.shape[-1] == self.vocab else logits[..., : self.vocab]

    def teacher_logits(self, t_tokens: Any, t_pos: Any) -> Any:
        """The frozen teacher's logits at ``t_pos``: (B, W - 1, V), no gradient to anything."""
        import mlx.core as mx

        logits = mx.stop_gradient(self.teacher(t_tokens))
        b, wt, v = logits.shape
        rows = (mx.arange(b)[:, None] * wt + t_pos).reshape(-1)
        return mx.take(logits.reshape(b * wt, v), rows, axis=0).reshape(b, t_pos.shape[1], v)

    def __call__(self, model: Any, tokens: Any, lengths: Any, *extra: Any) -> tuple[Any, Any, dict[str, Any]]:
        import mlx.core as mx

        from mlx_distill.training.kd_ops import kd_full, kd_topk
        from mlx_distill.training.losses import cross_entropy_and_hits, loss_mask

        expected = 3 if self.teacher is not None else 4
        if len(extra) != expected:
            raise ValueError(f"KDLoss got {len(extra)} extra batch arrays, expected {expected} "
                             "(use the batches of mlx_distill.training.kd_data.KDBatches)")
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits = model(inputs)
        mask = loss_mask(lengths, targets.shape[1])
        ce_tok, hits = cross_entropy_and_hits(logits, targets)  # the fast CPU op where it applies
        ce, ntoks = masked_mean(ce_tok, mask)
        tau = self.temperature
        z_s = self._slice(logits).astype(mx.float32)
        if tau != 1.0:
            z_s = z_s / tau
        if self.teacher is not None:
            t_tokens, t_pos, kd_mask = extra
            logp_t = mx.stop_gradient(log_softmax(self._slice(self.teacher_logits(t_tokens, t_pos)), tau))
            d = kd_full(z_s, logp_t, self.kind)
        else:
            idx, top_logp, tail_logp, kd_mask = extra
            logp_t = mx.concatenate([top_logp.astype(mx.float32), tail_logp.astype(mx.float32)[..., None]],
                                    axis=-1)
            d = kd_topk(z_s, idx, mx.stop_gradient(logp_t), self.kind)
        kl, _ = masked_mean(d * (tau * tau), kd_mask)
        correct = mx.logical_and(hits, mask).sum().astype(mx.float32)
        value = (1.0 - self.ratio) * ce + self.ratio * kl
        return value, ntoks.astype(mx.int32), {"acc": correct / mx.maximum(ntoks, 1.0), "ce": ce, "kl": kl}
