"""KD loss math against a float64 numpy reference: forward/reverse KL, JSD, temperature,
masking, top-K with tail mass, the CE/KL mix, vocabulary slicing and the gradient."""

from __future__ import annotations

import math

import mlx.core as mx  # conftest imported mlx_distill first (OpenBLAS)
import numpy as np
import pytest

from mlx_distill.training.kd import (
    KDLoss,
    divergence,
    log_softmax,
    student_topk,
    teacher_topk,
)
from mlx_distill.training.losses import lm_loss

RNG = np.random.default_rng(0)


# -- the reference ----------------------------------------------------------------------------------


def np_log_softmax(z: np.ndarray, tau: float = 1.0) -> np.ndarray:
    z = z.astype(np.float64) / tau
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_div(lt: np.ndarray, ls: np.ndarray, kind: str) -> np.ndarray:
    pt, ps = np.exp(lt), np.exp(ls)
    if kind == "forward":
        return (pt * (lt - ls)).sum(-1)
    if kind == "reverse":
        return (ps * (ls - lt)).sum(-1)
    m = 0.5 * (pt + ps)
    return 0.5 * (pt * (lt - np.log(m))).sum(-1) + 0.5 * (ps * (ls - np.log(m))).sum(-1)


def np_collapse(lp: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """log-probs on idx plus log(1 - their mass), in float64."""
    top = np.take_along_axis(lp, idx, -1)
    tail = np.log1p(-np.exp(top).sum(-1))
    return np.concatenate([top, tail[..., None]], -1)


def np_topk(lp: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-lp, axis=-1, kind="stable")[..., :k]


def logits(shape: tuple[int, ...], scale: float = 3.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


class Fixed:
    """A 'model' that returns fixed logits (the loss only calls model(inputs))."""

    def __init__(self, z: np.ndarray):
        self.z = mx.array(z)
        self.calls = 0

    def __call__(self, inputs: mx.array) -> mx.array:
        self.calls += 1
        assert inputs.shape[:2] == self.z.shape[:2], (inputs.shape, self.z.shape)
        return self.z


# -- divergences ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_divergence_matches_numpy(kind: str, tau: float) -> None:
    zt, zs = logits((3, 5, 40)), logits((3, 5, 40))
    got = divergence(log_softmax(mx.array(zt), tau), log_softmax(mx.array(zs), tau), kind)
    want = np_div(np_log_softmax(zt, tau), np_log_softmax(zs, tau), kind)
    np.testing.assert_allclose(np.array(got), want, rtol=2e-4, atol=2e-6)
    assert (want > 0).all()
    if kind == "jsd":
        assert (want <= math.log(2) + 1e-9).all()
    # and 0 against itself
    same = divergence(log_softmax(mx.array(zs), tau), log_softmax(mx.array(zs), tau), kind)
    assert float(mx.abs(same).max()) < 1e-5


def test_forward_and_reverse_differ_and_temperature_softens() -> None:
    zt, zs = logits((1, 4, 30), 4.0), logits((1, 4, 30), 4.0)
    lt, ls = np_log_softmax(zt), np_log_softmax(zs)
    assert not np.allclose(np_div(lt, ls, "forward"), np_div(lt, ls, "reverse"))
    # a higher temperature flattens both sides, so the raw divergence shrinks
    hot = np_div(np_log_softmax(zt, 4.0), np_log_softmax(zs, 4.0), "forward")
    assert (hot < np_div(lt, ls, "forward")).all()


def test_jsd_survives_underflowing_probabilities() -> None:
    # logits 200 apart: exp underflows to 0 in fp32 on both sides for most tokens
    zt = np.full((1, 1, 50), -100.0, np.float32)
    zs = np.full((1, 1, 50), -100.0, np.float32)
    zt[..., 0], zs[..., 1] = 100.0, 100.0
    got = float(divergence(log_softmax(mx.array(zt)), log_softmax(mx.array(zs)), "jsd")[0, 0])
    assert got == pytest.approx(math.log(2), rel=1e-4)  # disjoint supports: the maximum


# -- top-K with tail mass ------------------------------------------------------------------------------


def test_teacher_topk_indices_values_and_tail() -> None:
    z = logits((2, 6, 64))
    lp = np_log_softmax(z)
    idx, vals, tail = teacher_topk(log_softmax(mx.array(z)), 8)
    want_idx = np_topk(lp, 8)
    np.testing.assert_array_equal(np.array(idx), want_idx)  # sorted by descending probability
    np.testing.assert_allclose(np.array(vals), np.take_along_axis(lp, want_idx, -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(tail), np_collapse(lp, want_idx)[..., -1], rtol=1e-4, atol=1e-5)
    # the K + 1 bins hold all the mass
    mass = np.exp(np.array(vals)).sum(-1) + np.exp(np.array(tail))
    np.testing.assert_allclose(mass, 1.0, rtol=1e-5)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_student_topk_matches_numpy(tau: float) -> None:
    zs = logits((2, 5, 64))
    idx = np_topk(np_log_softmax(logits((2, 5, 64))), 6)
    got = student_topk(mx.array(zs), mx.array(idx.astype(np.int32)), tau)
    np.testing.assert_allclose(np.array(got), np_collapse(np_log_softmax(zs, tau), idx), rtol=1e-4, atol=1e-5)


def test_student_tail_is_exact_when_the_top_k_hold_nearly_all_the_mass() -> None:
    # tail mass ~3e-9: 1 - sum(top K) in fp32 would be 0 or 1.2e-7, off by a factor of 40
    zs = np.zeros((1, 1, 32), np.float32)
    zs[..., :4] = 25.0
    idx = np.arange(4, dtype=np.int32).reshape(1, 1, 4)
    got = np.array(student_topk(mx.array(zs), mx.array(idx)))[0, 0, -1]
    want = np_collapse(np_log_softmax(zs), idx)[0, 0, -1]
    assert got == pytest.approx(want, rel=1e-5)
    assert math.exp(want) < 1e-8


def test_topk_kl_is_a_lower_bound_and_exact_at_k_v_minus_1() -> None:
    zt, zs = logits((2, 4, 48)), logits((2, 4, 48))
    lt, ls = np_log_softmax(zt), np_log_softmax(zs)
    full = np_div(lt, ls, "forward")
    for k in (1, 4, 16):
        idx = np_topk(lt, k)
        collapsed = np_div(np_collapse(lt, idx), np_collapse(ls, idx), "forward")
        assert (collapsed <= full + 1e-12).all()
    idx = np_topk(lt, 47)  # K = V - 1: the tail bin is the one remaining token
    np.testing.assert_allclose(np_div(np_collapse(lt, idx), np_collapse(ls, idx), "forward"), full, rtol=1e-6)


# -- the loss: CE + KL, masks, ratio, vocabulary slicing, gradient -----------------------------------


def batch(b: int = 2, w: int = 9, v: int = 40) -> dict[str, np.ndarray]:
    tokens = RNG.integers(0, v, (b, w)).astype(np.int32)
    lengths = np.array([[3, 9], [2, 6]][:b], np.int32)  # (offset, length): answer targets 3..8 and 2..5
    kd_mask = np.zeros((b, w - 1), np.float32)
    for j, (o, n) in enumerate(lengths):
        kd_mask[j, o - 1:n - 1] = 1.0
    return {"tokens": tokens, "lengths": lengths, "kd_mask": kd_mask}


def np_ce(zs: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> tuple[float, int]:
    ls = np_log_softmax(zs)
    targets = tokens[:, 1:]
    total, n = 0.0, 0
    for j, (o, length) in enumerate(lengths):
        for p in range(max(o, 1) - 1, length - 1):
            total -= ls[j, p, targets[j, p]]
            n += 1
    return total / n, n


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_online_loss_matches_numpy_with_masks_and_positions(kind: str, tau: float) -> None:
    b = batch()
    w, v, wt = 9, 40, 14
    zs = logits((2, w - 1, v))
    zt_rows = logits((2, wt, v))
    # garbage the teacher may return outside the answer: must not matter
    zt_rows[:, :4] += 50.0
    t_pos = np.zeros((2, w - 1), np.int32)
    t_pos[b["kd_mask"] > 0] = (np.nonzero(b["kd_mask"])[1] + 5).astype(np.int32)  # a context shift of 5
    loss = KDLoss(ratio=0.3, temperature=tau, kind=kind, teacher=Fixed(zt_rows))
    value, ntoks, metrics = loss(Fixed(zs), mx.array(b["tokens"]), mx.array(b["lengths"]),
                                 mx.array(np.zeros((2, wt), np.int32)), mx.array(t_pos), mx.array(b["kd_mask"]))

    ce, n = np_ce(zs, b["tokens"], b["lengths"])
    zt = np.take_along_axis(zt_rows, t_pos[..., None], 1)
    d = np_div(np_log_softmax(zt, tau), np_log_softmax(zs, tau), kind) * tau * tau
    kl = (d * b["kd_mask"]).sum() / b["kd_mask"].sum()
    assert int(ntoks) == n == 10
    assert float(metrics["ce"]) == pytest.approx(ce, rel=1e-4)
    assert float(metrics["kl"]) == pytest.approx(kl, rel=2e-4)
    assert float(value) == pytest.approx(0.7 * ce + 0.3 * kl, rel=2e-4)


def test_masked_positions_do_not_count() -> None:
    b = batch()
    zs, zt = logits((2, 8, 40)), logits((2, 8, 40))
    t_pos = np.tile(np.arange(8, dtype=np.int32), (2, 1))
    args = (mx.array(b["tokens"]), mx.array(b["lengths"]), mx.array(np.zeros((2, 8), np.int32)), mx.array(t_pos))
    base = KDLoss(ratio=1.0, teacher=Fixed(zt))(Fixed(zs), *args, mx.array(b["kd_mask"]))[2]["kl"]
    zs2, zt2 = zs.copy(), zt.copy()
    zs2[b["kd_mask"] == 0] = 77.0  # change everything outside the mask
    zt2[b["kd_mask"] == 0] = -33.0
    again = KDLoss(ratio=1.0, teacher=Fixed(zt2))(Fixed(zs2), *args, mx.array(b["kd_mask"]))[2]["kl"]
    assert float(again) == pytest.approx(float(base), rel=1e-6)
    # an empty mask (a rank that got only filler rows) is 0, not nan
    empty = KDLoss(ratio=1.0, teacher=Fixed(zt))(Fixed(zs), *args, mx.zeros((2, 8)))
    assert float(empty[0]) == 0.0


def test_ratio_zero_is_the_sft_loss() -> None:
    b = batch()
    zs, zt = logits((2, 8, 40)), logits((2, 8, 40))
    model = Fixed(zs)
    sft_value, sft_n, sft_m = lm_loss(model, mx.array(b["tokens"]), mx.array(b["lengths"]))
    kd_value, kd_n, kd_m = KDLoss(ratio=0.0, teacher=Fixed(zt))(
        model, mx.array(b["tokens"]), mx.array(b["lengths"]), mx.zeros((2, 8), mx.int32),
        mx.zeros((2, 8), mx.int32), mx.array(b["kd_mask"]))
    assert float(kd_value) == pytest.approx(float(sft_value), rel=1e-5)
    assert int(kd_n) == int(sft_n)
    assert float(kd_m["acc"]) == pytest.approx(float(sft_m["acc"]))
    assert float(kd_m["kl"]) > 0  # still measured, just not in the loss


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_cached_topk_loss_matches_numpy(kind: str) -> None:
    b = batch()
    zs, zt = logits((2, 8, 40)), logits((2, 8, 40))
    tau, k = 2.0, 5
    lt = np_log_softmax(zt, tau)
    idx = np_topk(lt, k).astype(np.int32)
    coll_t = np_collapse(lt, idx)
    value, _, metrics = KDLoss(ratio=0.5, temperature=tau, kind=kind)(
        Fixed(zs), mx.array(b["tokens"]), mx.array(b["lengths"]), mx.array(idx),
        mx.array(coll_t[..., :k].astype(np.float16)), mx.array(coll_t[..., k].astype(np.float32)),
        mx.array(b["kd_mask"]))
    d = np_div(np_collapse(lt, idx), np_collapse(np_log_softmax(zs, tau), idx), kind) * tau * tau
    kl = (d * b["kd_mask"]).sum() / b["kd_mask"].sum()
    assert float(metrics["kl"]) == pytest.approx(kl, rel=5e-3)  # teacher log-probs stored as fp16
    ce, _ = np_ce(zs, b["tokens"], b["lengths"])
    assert float(value) == pytest.approx(0.5 * ce + 0.5 * float(metrics["kl"]), rel=1e-5)


def test_padding_rows_are_sliced_off() -> None:
    b = batch()
    zs = logits((2, 8, 40))
    zt_pad = np.concatenate([logits((2, 8, 40)), np.full((2, 8, 8), 30.0, np.float32)], -1)  # 8 padding rows
    t_pos = np.tile(np.arange(8, dtype=np.int32), (2, 1))
    args = (mx.array(b["tokens"]), mx.array(b["lengths"]), mx.zeros((2, 8), mx.int32), mx.array(t_pos),
            mx.array(b["kd_mask"]))
    sliced = KDLoss(ratio=1.0, vocab=40, teacher=Fixed(zt_pad))(Fixed(zs), *args)[2]["kl"]
    plain = KDLoss(ratio=1.0, teacher=Fixed(zt_pad[..., :40]))(Fixed(zs), *args)[2]["kl"]
    assert float(sliced) == pytest.approx(float(plain), rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_gradient_is_tau_times_p_student_minus_p_teacher(tau: float) -> None:
    """d(tau^2 KL(p_t||p_s))/dz_s = tau (p_s - p_t) per position, / the KD token count."""
    b = batch()
    zs, zt = logits((2, 8, 40)), logits((2, 8, 40))
    t_pos = np.tile(np.arange(8, dtype=np.int32), (2, 1))
    loss = KDLoss(ratio=1.0, temperature=tau, teacher=Fixed(zt))
    rest = (mx.array(b["tokens"]), mx.array(b["lengths"]), mx.zeros((2, 8), mx.int32), mx.array(t_pos),
            mx.array(b["kd_mask"]))

    def f(z: mx.array) -> mx.array:
        return loss(lambda _: z, *rest)[0]

    g = np.array(mx.grad(f)(mx.array(zs)))
    want = tau * (np.exp(np_log_softmax(zs, tau)) - np.exp(np_log_softmax(zt, tau)))
    want = want * b["kd_mask"][..., None] / b["kd_mask"].sum()
    np.testing.assert_allclose(g, want, atol=2e-6, rtol=1e-3)


def test_wrong_extra_arrays_say_what_is_expected() -> None:
    b = batch()
    with pytest.raises(ValueError, match="expected 4"):
        KDLoss()(Fixed(logits((2, 8, 40))), mx.array(b["tokens"]), mx.array(b["lengths"]))
    with pytest.raises(ValueError, match="kd kind"):
        KDLoss(kind="sideways")


# -- the fused ops' hand-written gradients against autodiff of the plain formulas ---------------------


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("topk", [False, True])
def test_fused_ops_match_autodiff_of_the_plain_formulas(kind: str, topk: bool) -> None:
    from mlx_distill.training.kd import collapse_topk, softmax_parts
    from mlx_distill.training.kd_ops import kd_full, kd_topk

    zs = mx.array(logits((2, 5, 64)))
    zs_peaked = zs.at[:, :, :3].add(12.0)  # most of the mass on 3 tokens: a tiny tail bin
    lt = log_softmax(mx.array(logits((2, 5, 64))))
    idx, top, tail = teacher_topk(lt, 6)
    bins_t = mx.concatenate([top, tail[..., None]], axis=-1)
    weights = mx.array(RNG.random((2, 5)).astype(np.float32))  # a cotangent that is not all ones

    for z in (zs, zs_peaked):
        if topk:
            def fused(x: mx.array) -> mx.array:
                return (kd_topk(x, idx, bins_t, kind) * weights).sum()

            def plain(x: mx.array) -> mx.array:
                return (divergence(bins_t, collapse_topk(*softmax_parts(x), idx), kind) * weights).sum()
        else:
            def fused(x: mx.array) -> mx.array:
                return (kd_full(x, lt, kind) * weights).sum()

            def plain(x: mx.array) -> mx.array:
                return (divergence(lt, log_softmax(x), kind) * weights).sum()

        v1, g1 = mx.value_and_grad(fused)(z)
        v2, g2 = mx.value_and_grad(plain)(z)
        assert float(v1) == pytest.approx(float(v2), rel=1e-4)
        scale = float(mx.abs(g2).max())
        assert scale > 0
        np.testing.assert_allclose(np.array(g1), np.array(g2), atol=2e-4 * scale, rtol=1e-3)
        # compiled, as inside the training step
        v3, g3 = mx.compile(mx.value_and_grad(fused))(z)
        np.testing.assert_allclose(np.array(g3), np.array(g1), atol=1e-5 * scale, rtol=1e-4)
