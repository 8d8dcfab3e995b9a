"""GPG math pinned on hand-computed float64 tensors (expected values written out, never re-derived by the code)."""

import math

import pytest
import torch

from gvpo_trl.gpg import age_alpha, gpg_advantages, gpg_loss, truncated_sequence_importance_weight
from gvpo_trl.groups import count_groups, zero_variance_groups

D = torch.float64
INF = float("inf")
NAN = float("nan")


def t(x):
    return torch.tensor(x, dtype=D)


# --- advantages ---------------------------------------------------------------------------------------------------

# two interleaved groups: id 0 = rewards [1, 0, 0, 0] (mean 0.25), id 7 = rewards [3, 1] (mean 2)
IDS = torch.tensor([0, 7, 0, 0, 7, 0])
REWARDS = t([1.0, 3.0, 0.0, 0.0, 1.0, 0.0])


def test_advantages_fnorm_one():
    # R − R̄:  group 0 → 0.75, −0.25, −0.25, −0.25;  group 7 → +1, −1
    expected = t([0.75, 1.0, -0.25, -0.25, -1.0, -0.25])
    torch.testing.assert_close(gpg_advantages(REWARDS, IDS), expected, rtol=0, atol=1e-15)


def test_advantages_std_normalised():
    # group 0: squared deviations 0.5625 + 3·0.0625 = 0.75, unbiased var 0.75/3 = 0.25, std 0.5 → F_norm 0.5001
    # group 7: squared deviations 1 + 1 = 2, unbiased var 2/1 = 2, std √2 → F_norm √2 + 1e-4 = 1.4143135623730951
    f0, f7 = 0.5001, 1.4143135623730951
    expected = t([0.75 / f0, 1.0 / f7, -0.25 / f0, -0.25 / f0, -1.0 / f7, -0.25 / f0])
    # 0.75/0.5001 = 1.49970005998800..., 1/1.41431356... = 0.70705678...
    assert expected[0].item() == pytest.approx(1.4997000599880024, rel=1e-12)
    assert expected[1].item() == pytest.approx(0.7070567847, rel=1e-9)
    torch.testing.assert_close(gpg_advantages(REWARDS, IDS, std_normalise=True), expected, rtol=1e-12, atol=0)


def test_advantages_custom_eps():
    # group 7 alone with eps = 1: F_norm = √2 + 1 = 2.414213562373095 → ±0.41421356237309503
    adv = gpg_advantages(t([3.0, 1.0]), torch.tensor([7, 7]), std_normalise=True, eps=1.0)
    torch.testing.assert_close(adv, t([0.41421356237309503, -0.41421356237309503]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("std_normalise", [False, True])
def test_advantages_nan_reward(std_normalise):
    # group 0 = [1, NaN, 0]: nanmean over {1, 0} = 0.5 → [0.5, 0 (NaN row), −0.5]; std of {1, 0} = √0.5 = 0.70710678
    # group 1 = [NaN, NaN]: no valid reward → both 0
    adv = gpg_advantages(t([1.0, NAN, 0.0, NAN, NAN]), torch.tensor([0, 0, 0, 1, 1]), std_normalise=std_normalise)
    f = (0.7071067811865476 + 1e-4) if std_normalise else 1.0
    torch.testing.assert_close(adv, t([0.5 / f, 0.0, -0.5 / f, 0.0, 0.0]), rtol=1e-12, atol=0)
    assert not torch.isnan(adv).any()


@pytest.mark.parametrize("std_normalise", [False, True])
def test_advantages_zero_variance_groups_exactly_zero(std_normalise):
    # [0.1, 0.1, 0.1]: the float mean is 0.10000000000000002, so a naive (R − R̄)/(0 + 1e-4) gives −1.4e-13, not 0.
    # [2, 2] (constant) and [5] (single member) are zero-variance too; [0, 1] is not: ±0.5 (÷ (√0.5 + 1e-4) with std).
    rewards = t([0.1, 0.1, 0.1, 2.0, 2.0, 5.0, 0.0, 1.0])
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    adv = gpg_advantages(rewards, ids, std_normalise=std_normalise)
    assert torch.equal(adv[:6], torch.zeros(6, dtype=D))
    f = (0.7071067811865476 + 1e-4) if std_normalise else 1.0
    torch.testing.assert_close(adv[6:], t([-0.5 / f, 0.5 / f]), rtol=1e-12, atol=0)


# --- alpha --------------------------------------------------------------------------------------------------------


def test_alpha_on_batch_with_zero_variance_groups():
    # 5 groups of 2: [1,0] valid, [1,1] zero, [0,0] zero, [0.5,1] valid, [0.2,0.7] valid → B = 5, M = 2, α = 5/3
    rewards = t([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 1.0, 0.2, 0.7])
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    zv_rows = zero_variance_groups(rewards, ids)
    num_zero = count_groups(ids[zv_rows])
    assert (count_groups(ids), num_zero) == (5, 2)
    assert age_alpha(count_groups(ids), num_zero) == pytest.approx(1.6666666666666667, rel=1e-15)


def test_alpha_values():
    assert age_alpha(4, 0) == 1.0
    assert age_alpha(10, 5) == 2.0
    assert age_alpha(8, 6) == 4.0
    assert age_alpha(torch.tensor(8), torch.tensor(7)) == 8.0


def test_alpha_all_groups_zero_variance():
    assert age_alpha(4, 4) == 1.0
    assert age_alpha(0, 0) == 1.0


def test_alpha_invalid_counts():
    with pytest.raises(ValueError):
        age_alpha(3, 4)
    with pytest.raises(ValueError):
        age_alpha(3, -1)


# --- loss ---------------------------------------------------------------------------------------------------------

# row 0: 2 tokens (padding holds −inf, which must not leak), row 1: 3 tokens
LOGPS = [[-1.0, -2.0, -INF], [-0.5, -1.0, -1.5]]
MASK = t([[1, 1, 0], [1, 1, 1]])
ADV = t([0.5, -1.0])


def test_loss_value_by_hand():
    # Σ −logπ·Â: row 0 = (1 + 2)·0.5 = 1.5; row 1 = (0.5 + 1 + 1.5)·(−1) = −3 → −1.5; Σmask = 5; α = 2 → −0.6
    loss = gpg_loss(t(LOGPS), ADV, MASK, alpha=2.0)
    assert loss.item() == pytest.approx(-0.6, abs=1e-15)


def test_loss_with_importance_weights_and_normaliser():
    w = t([2.0, 0.5])
    # row 0: 1.5·2 = 3; row 1: −3·0.5 = −1.5 → 1.5 / 5 · 2 = 0.6
    assert gpg_loss(t(LOGPS), ADV, MASK, alpha=2.0, importance_weights=w).item() == pytest.approx(0.6, abs=1e-15)
    # global normaliser 10 instead of the local 5: −1.5 / 10 · 2 = −0.3
    assert gpg_loss(t(LOGPS), ADV, MASK, alpha=2.0, token_normaliser=10).item() == pytest.approx(-0.3, abs=1e-15)
    assert gpg_loss(t(LOGPS), ADV, MASK, 2.0, token_normaliser=t(10.0)).item() == pytest.approx(-0.3, abs=1e-15)


def test_loss_gradient_per_token():
    logps = t(LOGPS).requires_grad_(True)
    w = t([2.0, 0.5]).requires_grad_(True)
    gpg_loss(logps, ADV, MASK, alpha=2.0, importance_weights=w).backward()
    # −α·Â·w/Σmask: row 0 = −2·0.5·2/5 = −0.4; row 1 = −2·(−1)·0.5/5 = 0.2; padding 0
    expected = t([[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]])
    torch.testing.assert_close(logps.grad, expected, rtol=0, atol=1e-15)
    assert w.grad is None  # the importance weight is detached


def test_loss_gradient_with_token_normaliser():
    logps = t(LOGPS).requires_grad_(True)
    gpg_loss(logps, ADV, MASK, alpha=3.0, token_normaliser=12.0).backward()
    # −α·Â/12: row 0 = −3·0.5/12 = −0.125; row 1 = −3·(−1)/12 = 0.25
    torch.testing.assert_close(logps.grad, t([[-0.125, -0.125, 0.0], [0.25, 0.25, 0.25]]), rtol=0, atol=1e-15)


def test_loss_empty_completions():
    # the whole batch empty: 0, zero gradient, no NaN (a plain Σ/Σmask would be 0/0)
    logps = t([[-1.0, -2.0], [-INF, -3.0]]).requires_grad_(True)
    loss = gpg_loss(logps, t([1.0, -1.0]), t([[0, 0], [0, 0]]), alpha=2.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logps.grad, torch.zeros(2, 2, dtype=D))
    assert gpg_loss(t([[-1.0]]), t([1.0]), t([[0]]), alpha=1.0, token_normaliser=0).item() == 0.0
    # one empty row among others: it adds neither loss nor tokens. Row 1: −(−2)·1 = 2 over 1 token, α = 1 → 2
    logps = t([[-5.0, -5.0], [-2.0, -INF]]).requires_grad_(True)
    loss = gpg_loss(logps, t([3.0, 1.0]), t([[0, 0], [1, 0]]), alpha=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(2.0, abs=1e-15)
    torch.testing.assert_close(logps.grad, t([[0.0, 0.0], [-1.0, 0.0]]), rtol=0, atol=0)


# --- truncated sequence importance weight -------------------------------------------------------------------------


def test_importance_weight_values_and_cap():
    logps = t([[-1.0, -1.0], [-2.0, 0.0], [-0.3, 7.0]])
    behaviour = t([[-1.5, -1.5], [-1.0, -1.0], [-0.1, 123.0]])
    mask = t([[1, 1], [1, 1], [1, 0]])
    # row 0: Σ = 0.5 + 0.5 = 1 → e = 2.718281828459045; row 1: Σ = −1 + 1 = 0 → 1; row 2: Σ = −0.2 → 0.8187307530779818
    w = truncated_sequence_importance_weight(logps, behaviour, mask, cap=5.0)
    torch.testing.assert_close(w, t([2.718281828459045, 1.0, 0.8187307530779818]), rtol=1e-12, atol=0)
    # cap 2: row 0 capped to 2, the others unchanged
    w = truncated_sequence_importance_weight(logps, behaviour, mask, cap=2.0)
    torch.testing.assert_close(w, t([2.0, 1.0, 0.8187307530779818]), rtol=1e-12, atol=0)
    # cap 0.5 caps even the on-policy row; an empty row weighs min(1, cap)
    w = truncated_sequence_importance_weight(logps, behaviour, t([[1, 1], [1, 1], [0, 0]]), cap=0.5)
    torch.testing.assert_close(w, t([0.5, 0.5, 0.5]), rtol=0, atol=0)


def test_importance_weight_detached():
    logps = t([[-1.0, -1.0]]).requires_grad_(True)
    w = truncated_sequence_importance_weight(logps, t([[-1.2, -1.2]]), t([[1, 1]]), cap=10.0)
    assert not w.requires_grad
    assert w.item() == pytest.approx(math.exp(0.4), rel=1e-12)  # Σ = 0.2 + 0.2 = 0.4 → e^0.4 = 1.4918246976412703


def test_importance_weight_extreme_log_ratios():
    # +1e4 per token (Σ = +2e4: exp would overflow) → cap; −1e4 per token → 0; inf/NaN in padding ignored
    logps = t([[1e4, 1e4, NAN], [-1e4, -1e4, INF]])
    behaviour = t([[0.0, 0.0, 0.0], [0.0, 0.0, -INF]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    w = truncated_sequence_importance_weight(logps, behaviour, mask, cap=3.0)
    torch.testing.assert_close(w, t([3.0, 0.0]), rtol=1e-12, atol=0)
    w = truncated_sequence_importance_weight(logps, behaviour, mask, cap=INF)
    assert torch.isfinite(w).all()
    assert w[0].item() > 1e300 and w[1].item() == 0.0
    w32 = truncated_sequence_importance_weight(logps.float(), behaviour.float(), mask.float(), cap=INF)
    assert torch.isfinite(w32).all() and w32[0].item() > 1e37  # fp32 max is 3.4e38: no overflow from rounding
    with pytest.raises(ValueError):
        truncated_sequence_importance_weight(logps, behaviour, mask, cap=0.0)
