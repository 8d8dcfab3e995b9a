"""GSPO math pinned on hand-computed float64 tensors (expected values written out, never re-derived by the code)."""

import math
from functools import partial

import pytest
import torch

from gvpo_trl.gspo import LOG_RATIO_BOUND, gspo_advantages, gspo_loss, sequence_log_ratio

#: GSPO-token (§4.3): the same loss function in its token-level variant
gspo_token_loss = partial(gspo_loss, token_level=True)

D = torch.float64
INF = float("inf")
NAN = float("nan")


def t(x):
    return torch.tensor(x, dtype=D)


# --- advantages ---------------------------------------------------------------------------------------------------


def test_advantages():
    # group 0 = [1, 0, 0, 0]: mean 0.25, unbiased std 0.5 → 0.75/0.5001 = 1.4997000599880024, −0.25/0.5001
    # group 1 = [1, NaN, 0]: nanmean 0.5, std √0.5 → ±0.5/0.7072067811865476 = ±0.7070068..., NaN row → 0
    # group 2 = [4]: single member, std NaN → 0
    rewards = t([1.0, 0.0, 0.0, 0.0, 1.0, NAN, 0.0, 4.0])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    adv = gspo_advantages(rewards, ids)
    f0, f1 = 0.5001, 0.7072067811865476
    expected = t([0.75 / f0, -0.25 / f0, -0.25 / f0, -0.25 / f0, 0.5 / f1, 0.0, -0.5 / f1, 0.0])
    assert expected[0].item() == pytest.approx(1.4997000599880024, rel=1e-12)
    assert expected[4].item() == pytest.approx(0.7070068, rel=1e-6)
    torch.testing.assert_close(adv, expected, rtol=1e-12, atol=0)
    # eps changes F_norm: group [3, 1] with eps = 1 → ±1/(√2 + 1) = ±0.41421356237309503
    adv = gspo_advantages(t([3.0, 1.0]), torch.tensor([5, 5]), eps=1.0)
    torch.testing.assert_close(adv, t([0.41421356237309503, -0.41421356237309503]), rtol=1e-12, atol=0)


# --- sequence log-ratio -------------------------------------------------------------------------------------------


def test_sequence_ratio_by_hand():
    logps = t([[-1.0, -2.0, -INF], [-1.0, -1.0, -1.6], [0.0, 0.0, 0.0]])
    old = t([[-1.3, -2.1, NAN], [-1.0, -1.0, -1.3], [-5.0, 1.0, 2.0]])
    mask = t([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    # row 0: (0.3 + 0.1)/2 = 0.2; row 1: (0 + 0 − 0.3)/3 = −0.1; row 2 empty → 0 (padding never leaks)
    log_s = sequence_log_ratio(logps, old, mask)
    torch.testing.assert_close(log_s, t([0.2, -0.1, 0.0]), rtol=0, atol=1e-15)
    _, stats = gspo_loss(logps, old, t([0.0, 0.0, 0.0]), mask)
    # s = e^0.2 = 1.2214027581601699, e^−0.1 = 0.9048374180359595, 1
    torch.testing.assert_close(stats["ratio"], t([1.2214027581601699, 0.9048374180359595, 1.0]), rtol=1e-12, atol=0)


def test_sequence_ratio_bound():
    logps = t([[1e4, 1e4], [-1e4, 0.0], [3.0, 0.0]])
    mask = t([[1, 1], [1, 1], [1, 1]])
    # means 1e4, −5e3, 1.5 → clamped to ±20 (default), 1.5 untouched; custom bound 1 → 1, −1, 1
    assert LOG_RATIO_BOUND == 20.0
    zeros = torch.zeros(3, 2, dtype=D)
    torch.testing.assert_close(sequence_log_ratio(logps, zeros, mask), t([20.0, -20.0, 1.5]))
    torch.testing.assert_close(sequence_log_ratio(logps, zeros, mask, bound=1.0), t([1.0, -1.0, 1.0]))


# --- loss by hand -------------------------------------------------------------------------------------------------


def _inputs_with_ratios(ratios, lengths, width):
    """Per-token log-probs (arbitrary values) and old log-probs such that each row's mean log-ratio is log(ratio)."""
    logps = torch.tensor([[-0.3 - 0.2 * j for j in range(width)] for _ in ratios], dtype=D)
    old = logps - torch.tensor([[math.log(r)] for r in ratios], dtype=D)
    mask = torch.tensor([[1.0 if j < n else 0.0 for j in range(width)] for n in lengths], dtype=D)
    return logps, old, mask


def test_loss_by_hand_with_clipping_on_each_side():
    # ε_low = 0.2, ε_high = 0.3 → clip range [0.8, 1.3]
    # a: s 1.5, Â +1 → min(1.5, 1.3) = 1.3   (high-clipped)      term −1.3
    # b: s 0.5, Â −1 → min(−0.5, −0.8) = −0.8 (low-clipped)      term +0.8
    # c: s 1.1, Â +2 → min(2.2, 2.2) = 2.2   (inside)            term −2.2
    # d: s 0.5, Â +1 → min(0.5, 0.8) = 0.5   (no clip: Â > 0)   term −0.5
    # e: s 1.5, Â −1 → min(−1.5, −1.3) = −1.5 (no clip: Â < 0)  term +1.5
    # mean over 5 sequences: (−1.3 + 0.8 − 2.2 − 0.5 + 1.5)/5 = −1.7/5 = −0.34
    logps, old, mask = _inputs_with_ratios([1.5, 0.5, 1.1, 0.5, 1.5], lengths=[1, 2, 2, 1, 3], width=3)
    adv = t([1.0, -1.0, 2.0, 1.0, -1.0])
    logps.requires_grad_(True)
    loss, stats = gspo_loss(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.3)
    assert loss.item() == pytest.approx(-0.34, abs=1e-12)
    assert stats["is_low_clipped"].tolist() == [False, True, False, False, False]
    assert stats["is_high_clipped"].tolist() == [True, False, False, False, False]
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    # d(−s·Â)/d logπ_t = −s·Â/|y| on an unclipped sequence, 0 on a clipped one; then ÷ 5 for the mean
    # c: −1.1·2/2/5 = −0.22 per token; d: −0.5·1/1/5 = −0.1; e: −1.5·(−1)/3/5 = 0.1 per token; a, b: 0
    expected = t([[0, 0, 0], [0, 0, 0], [-0.22, -0.22, 0], [-0.1, 0, 0], [0.1, 0.1, 0.1]])
    torch.testing.assert_close(logps.grad, expected, rtol=0, atol=1e-12)


def test_loss_default_epsilons():
    # defaults ε_low = 3e-4, ε_high = 4e-4 → clip range [0.9997, 1.0004]
    # s 1.001, Â +1 → 1.0004 (high-clipped), term −1.0004; s 0.999, Â −1 → −0.9997 (low-clipped), term +0.9997
    # s 1.0002, Â +1 → inside, term −1.0002; mean = (−1.0004 + 0.9997 − 1.0002)/3 = −1.0009/3 = −0.33363333...
    logps, old, mask = _inputs_with_ratios([1.001, 0.999, 1.0002], lengths=[2, 1, 3], width=3)
    loss, stats = gspo_loss(logps, old, t([1.0, -1.0, 1.0]), mask)
    assert loss.item() == pytest.approx(-0.3336333333333333, abs=1e-12)
    assert stats["is_high_clipped"].tolist() == [True, False, False]
    assert stats["is_low_clipped"].tolist() == [False, True, False]


def test_loss_empty_completion_counts_in_mean_with_zero_loss():
    # as TRL: the empty row adds 0 but counts in B. Row 0: s 1, Â 2 → −2; row 1 empty (Â 5) → 0; mean −2/2 = −1
    logps = t([[-1.0, -1.0], [-3.0, NAN]]).requires_grad_(True)
    old = t([[-1.0, -1.0], [0.0, 0.0]])
    loss, stats = gspo_loss(logps, old, t([2.0, 5.0]), t([[1, 1], [0, 0]]))
    loss.backward()
    assert loss.item() == pytest.approx(-1.0, abs=1e-15)
    assert stats["ratio"][1].item() == 1.0
    # row 0: −1·2/2 tokens/2 sequences = −0.5 per token; row 1: 0
    torch.testing.assert_close(logps.grad, t([[-0.5, -0.5], [0.0, 0.0]]), rtol=0, atol=1e-15)


def test_loss_rejects_per_token_advantages():
    with pytest.raises(ValueError):
        gspo_loss(t([[0.0]]), t([[0.0]]), t([[1.0]]), t([[1]]))


def test_sequence_mean_long_and_short_weigh_the_same():
    # s = 1 for both (old = current), Â = 1, inside the clip → each sequence contributes −1; mean = −1
    # per-sequence gradient total −1/2 whatever the length: short (1 token) −0.5, long (4 tokens) −0.125 each.
    # (a token mean over the batch would give every token −1/5 instead, weighting the long sequence 4×.)
    logps = t([[-0.7, 0.0, 0.0, 0.0], [-0.1, -0.2, -0.3, -0.4]]).requires_grad_(True)
    mask = t([[1, 0, 0, 0], [1, 1, 1, 1]])
    for fn in (gspo_loss, gspo_token_loss):
        logps.grad = None
        loss, _ = fn(logps, logps.detach().clone(), t([1.0, 1.0]), mask)
        loss.backward()
        assert loss.item() == pytest.approx(-1.0, abs=1e-15)
        expected = t([[-0.5, 0, 0, 0], [-0.125, -0.125, -0.125, -0.125]])
        torch.testing.assert_close(logps.grad, expected, rtol=0, atol=1e-15)


# --- GSPO-token ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_token_shape", [False, True])
def test_token_variant_equals_gspo_for_sequence_advantages(per_token_shape):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    logps = -torch.rand(B, T, generator=g, dtype=D) * 3
    # per-row mean log-ratios spread over both clip boundaries (ε = 0.05 / 0.08) and inside
    shift = t([0.2, -0.2, 0.01, -0.01, 0.3, 0.0]).unsqueeze(1) + 0.02 * torch.randn(B, T, generator=g, dtype=D)
    old = logps - shift
    mask = t([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    adv = t([1.0, -1.0, 0.5, -2.0, -1.5, 3.0])
    adv_in = adv.unsqueeze(1).expand(B, T).clone() if per_token_shape else adv

    a = logps.clone().requires_grad_(True)
    loss_seq, stats_seq = gspo_loss(a, old, adv, mask, epsilon_low=0.05, epsilon_high=0.08)
    loss_seq.backward()
    b = logps.clone().requires_grad_(True)
    loss_tok, stats_tok = gspo_token_loss(b, old, adv_in, mask, epsilon_low=0.05, epsilon_high=0.08)
    loss_tok.backward()

    torch.testing.assert_close(loss_tok, loss_seq, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(stats_tok["ratio"], stats_seq["ratio"], rtol=1e-12, atol=0)
    # both sides clip somewhere and some gradients are non-zero, so the comparison is not vacuous
    assert stats_seq["is_low_clipped"].any() and stats_seq["is_high_clipped"].any()
    assert (a.grad.abs() > 0).any()
    # per-token flags: every completion token of a clipped sequence, nothing on padding
    nonempty = mask.sum(-1) > 0
    for key in ("is_low_clipped", "is_high_clipped"):
        assert torch.equal(stats_tok[key], stats_seq[key].unsqueeze(1) & mask.bool())
        assert torch.equal(stats_tok[key].any(-1), stats_seq[key] & nonempty)


def test_token_variant_per_token_advantages_by_hand():
    # one 2-token sequence, ε 0.2/0.3, Â_t = [+1, −2]
    # s = 1 (old = current): token terms −min(1, 1) = −1 and −min(−2, −2) = +2 → token mean 0.5
    #   grad −s·Â_t/|y| = [−0.5, +1.0]
    logps = t([[-0.4, -1.1, 0.0]]).requires_grad_(True)
    mask = t([[1, 1, 0]])
    loss, _ = gspo_token_loss(logps, logps.detach().clone(), t([[1.0, -2.0, 7.0]]), mask, 0.2, 0.3)
    loss.backward()
    assert loss.item() == pytest.approx(0.5, abs=1e-15)
    torch.testing.assert_close(logps.grad, t([[-0.5, 1.0, 0.0]]), rtol=0, atol=1e-15)
    # s = 1.5: token 1 min(1.5, 1.3) = 1.3 high-clipped → −1.3, grad 0; token 2 min(−3, −2.6) = −3 → +3,
    #   grad −1.5·(−2)/2 = 1.5; loss (−1.3 + 3)/2 = 0.85
    logps.grad = None
    old = logps.detach() - math.log(1.5)
    loss, stats = gspo_token_loss(logps, old, t([[1.0, -2.0, 7.0]]), mask, 0.2, 0.3)
    loss.backward()
    assert loss.item() == pytest.approx(0.85, abs=1e-12)
    torch.testing.assert_close(logps.grad, t([[0.0, 1.5, 0.0]]), rtol=0, atol=1e-12)
    assert stats["is_high_clipped"].tolist() == [[True, False, False]]
    assert stats["is_low_clipped"].tolist() == [[False, False, False]]


# --- extreme log-ratios -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [gspo_loss, gspo_token_loss])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_log_ratios_are_finite(fn, dtype):
    # mean log-ratios +1e4, −1e4, +1e4, −1e4 with Â −1, +1, +1, −1; padding holds ±inf
    logps = torch.tensor([[1e4, 1e4, INF], [-1e4, -1e4, -INF], [1e4, 0.0, 0.0], [-1e4, 0.0, 0.0]], dtype=dtype)
    logps.requires_grad_(True)
    old = torch.zeros(4, 3, dtype=dtype)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]], dtype=dtype)
    adv = torch.tensor([-1.0, 1.0, 1.0, -1.0], dtype=dtype)
    loss, stats = fn(logps, old, adv, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all() and torch.isfinite(stats["ratio"]).all()
    # log s clamped to ±20: terms −min(−e^20, −1.0004) = e^20, −min(e^−20, 0.9997) = −e^−20,
    # −min(e^20, 1.0004) = −1.0004, −min(e^−20·(−1), −0.9997) = 0.9997; ÷ 4
    e20 = 485165195.4097903
    expected = (e20 - 2.061153622438558e-09 - 1.0004 + 0.9997) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # beyond the bound the ratio is held constant: no gradient anywhere
    assert torch.equal(logps.grad, torch.zeros_like(logps.grad))
