"""The student side of the KD divergence as single ops with hand-written gradients.

Autodiff through :func:`mlx_distill.training.kd.divergence` keeps ~10
full-vocabulary intermediates alive and differentiates every one of them
(through the fast exp's polynomial too): measured on (4, 287, 49,152) logits,
value + gradient took 4.6 s for the top-K KL against 2.0 s for the fast
cross-entropy. These ops take the student's (tempered) logits and the
teacher's log-probs and return D per position; their VJP is closed-form:

    lq = log-probs of the student's bins,  g_b = cot * dD/dlq_b,  G = sum_b g_b
    dD/dz_j = sum_b g_b dlq_b/dz_j

* full vocabulary (one bin per token, lq = z - lse): ``dz = g - softmax(z) * G``;
* top-K + tail (lq_k = z[idx_k] - lse, lq_tail = log(sum of e outside idx) - lse):
  ``dz_j = softmax_j * (g_tail * s / tail_sum - G)`` for j outside idx and
  ``dz_j = g_k - softmax_j * G`` for j = idx_k.

dD/dlq per kind, with p the teacher's and q the student's bin probabilities:
forward ``-p``; reverse ``q (lq - lp + 1)``; jsd ``q (lq - lm) / 2`` with
m = (p + q) / 2 (the ``log(q/m)/2`` of dJSD/dq, times q for the log-space).
Both match autodiff of the plain formulas (tests/test_kd_losses.py).
"""

from __future__ import annotations

from typing import Any

from mlx_distill.training.kd import KINDS, TINY, _exp, divergence

_OPS: dict[tuple[str, bool], Any] = {}


def _dd_dlq(kind: str, lp: Any, lq: Any) -> Any:
    """dD/dlq per bin (see the module docstring)."""
    import mlx.core as mx

    q = _exp(lq)
    if kind == "forward":
        return -_exp(lp)
    if kind == "reverse":
        return q * (lq - lp + 1.0)
    lm = mx.log(mx.maximum(0.5 * (_exp(lp) + q), TINY))
    return 0.5 * q * (lq - lm)


def _student(z: Any) -> tuple[Any, Any, Any]:
    """(e = exp(z - max), s = sum e, lse) over the last axis, kept."""
    import mlx.core as mx

    m = mx.max(z, axis=-1, keepdims=True)
    e = _exp(z - m)
    s = e.sum(axis=-1, keepdims=True)
    return e, s, m + mx.log(s)


def _topk_bins(z: Any, idx: Any) -> tuple[Any, Any, Any, Any]:
    """(lq (..., K + 1), e, s, tail_sum) of the student on the teacher's K tokens + the tail."""
    import mlx.core as mx

    e, s, lse = _student(z)
    tail_sum = mx.put_along_axis(e, idx, mx.array(0.0, dtype=e.dtype), axis=-1).sum(axis=-1, keepdims=True)
    lq = mx.concatenate([mx.take_along_axis(z, idx, axis=-1) - lse,
                         mx.log(mx.maximum(tail_sum, TINY)) - mx.log(s)], axis=-1)
    return lq, e, s, tail_sum


def _make(kind: str, topk: bool) -> Any:
    import mlx.core as mx

    if topk:
        @mx.custom_function
        def op(z: Any, idx: Any, lp: Any) -> Any:
            return divergence(lp, _topk_bins(z, idx)[0], kind)

        @op.vjp
        def op_vjp(primals: Any, cotangent: Any, output: Any) -> Any:
            z, idx, lp = primals
            lq, e, s, tail_sum = _topk_bins(z, idx)
            g = cotangent[..., None] * _dd_dlq(kind, lp, lq)
            big = g.sum(axis=-1, keepdims=True)
            pi = e * mx.reciprocal(s)
            k = idx.shape[-1]
            grad = pi * (g[..., k:] * (s * mx.reciprocal(mx.maximum(tail_sum, TINY))) - big)
            top = mx.take_along_axis(pi, idx, axis=-1)
            grad = mx.put_along_axis(grad, idx, g[..., :k] - top * big, axis=-1)
            return grad, mx.zeros_like(idx), mx.zeros_like(lp)

        return op

    @mx.custom_function
    def full(z: Any, lp: Any) -> Any:
        e, s, lse = _student(z)
        return divergence(lp, z - lse, kind, p_s=e * mx.reciprocal(s))

    @full.vjp
    def full_vjp(primals: Any, cotangent: Any, output: Any) -> Any:
        z, lp = primals
        e, s, lse = _student(z)
        g = cotangent[..., None] * _dd_dlq(kind, lp, z - lse)
        return g - e * mx.reciprocal(s) * g.sum(axis=-1, keepdims=True), mx.zeros_like(lp)

    return full


def _op(kind: str, topk: bool) -> Any:
    if kind not in KINDS:
        raise ValueError(f"kd kind {kind!r}: expected one of {', '.join(KINDS)}")
    if (kind, topk) not in _OPS:
        _OPS[(kind, topk)] = _make(kind, topk)
    return _OPS[(kind, topk)]


def kd_full(z_s: Any, logp_t: Any, kind: str = "forward") -> Any:
    """D(teacher, student) per position over the whole vocabulary; gradient to ``z_s`` only.

    ``z_s``: the student's logits / tau (fp32); ``logp_t``: the teacher's log-probs at tau.
    """
    return _op(kind, False)(z_s, logp_t)


def kd_topk(z_s: Any, idx: Any, logp_t: Any, kind: str = "forward") -> Any:
    """D per position on the teacher's K tokens + the tail bin; gradient to ``z_s`` only.

    ``idx`` (..., K) int32; ``logp_t`` (..., K + 1): the teacher's top-K log-probs, then its tail.
    """
    return _op(kind, True)(z_s, idx, logp_t)
