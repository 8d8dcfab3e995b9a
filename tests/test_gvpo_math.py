"""GVPO's loss (paper Eq. 8) against hand-computed float64 values; MSE and weight forms give the same gradient."""

import pytest
import torch

from gvpo_trl.groups import sequence_sum
from gvpo_trl.gvpo import gvpo_group_statistics, gvpo_loss, gvpo_weight_loss, gvpo_weights

F64 = torch.float64

# Group A (k=3): log π_θ = [-1, -2, -3], log π_θ' = [-1.5, -2, -2] -> Δ = [0.5, 0, -1], Δ̄ = -1/6
#                R = [1, 0, 0.5], R̄ = 0.5 -> R − R̄ = [0.5, -0.5, 0]
# β = 0.5: r − r̄ = β(Δ − Δ̄) = [1/3, 1/12, -5/12];  e = (r − r̄) − (R − R̄) = [-1/6, 7/12, -5/12]
# L_A = 1/(k−1) · ½ Σ e² = ½ · ½ · (4 + 49 + 25)/144 = 13/96
# Group B (k=3): Δ = 0, all rewards 2 -> e = 0, L_B = 0.  Batch loss = (13/96 + 0) / 2 groups = 13/192.
# Gradient of the batch loss w.r.t. log π_θ(y_i) = β e_i / (k−1) / 2 groups = e_i / 8.
IDS = torch.tensor([0, 1, 0, 1, 0, 1])  # interleaved on purpose
SEQ = [-1.0, -0.5, -2.0, -0.5, -3.0, -0.5]
REF = torch.tensor([-1.5, -0.5, -2.0, -0.5, -2.0, -0.5], dtype=F64)
R = torch.tensor([1.0, 2.0, 0.0, 2.0, 0.5, 2.0], dtype=F64)
E_A = [-1 / 6, 7 / 12, -5 / 12]


def _loss(seq, ref, rewards, ids, beta):
    """The trainer's call: group statistics of whole groups, then Eq. 8 averaged over groups."""
    return gvpo_loss(seq, ref, beta=beta, **gvpo_group_statistics(seq, ref, rewards, ids))


def _seq():
    return torch.tensor(SEQ, dtype=F64, requires_grad=True)


def test_loss_value_by_hand():
    loss = _loss(_seq(), REF, R, IDS, beta=0.5)
    assert abs(loss.item() - 13 / 192) < 1e-15


def test_gradient_by_hand():
    seq = _seq()
    _loss(seq, REF, R, IDS, beta=0.5).backward()
    expected = torch.tensor([E_A[0] / 8, 0, E_A[1] / 8, 0, E_A[2] / 8, 0], dtype=F64)
    torch.testing.assert_close(seq.grad, expected, rtol=0, atol=1e-15)


def test_weights_by_hand_and_weight_form_has_the_same_gradient():
    w = gvpo_weights(_seq(), REF, R, IDS, beta=0.5)
    torch.testing.assert_close(w, torch.tensor([1 / 6, 0, -7 / 12, 0, 5 / 12, 0], dtype=F64), rtol=0, atol=1e-15)
    for beta in (0.5, 0.1, 2.0):
        a, b = _seq(), _seq()
        _loss(a, REF, R, IDS, beta).backward()
        gvpo_weight_loss(b, REF, R, IDS, beta).backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-14)
        assert a.grad.abs().sum() > 0


def test_group_mean_of_delta_is_not_dropped():
    # With Δ̄ dropped, e_A would be [0.25-0.5, 0+0.5, -0.5-0] and the gradient differs: guard against that.
    seq = _seq()
    _loss(seq, REF, R, IDS, beta=0.5).backward()
    wrong = torch.tensor([(0.25 - 0.5) / 8, 0, 0.5 / 8, 0, -0.5 / 8, 0], dtype=F64)
    assert (seq.grad - wrong).abs().max() > 1e-3


def test_on_policy_gradient_is_token_summed_reinforce_scaled_by_beta_over_k_minus_1():
    # Δ = 0 (θ' = θ): ∂loss/∂ log π_θ(token) = −β/(k−1) · (R_i − R̄) / G for every completion token, 0 on padding.
    beta, k, groups = 0.1, 4, 2
    torch.manual_seed(0)
    per_token = torch.randn(8, 5, dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]] * 2)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.2, 0.4, 0.6, 0.8], dtype=F64)
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, -0.3, -0.1, 0.1, 0.3], dtype=F64)
    seq = sequence_sum(per_token, mask)
    _loss(seq, seq.detach(), rewards, ids, beta).backward()
    expected = (-beta / (k - 1) * centred / groups).unsqueeze(1) * mask
    torch.testing.assert_close(per_token.grad, expected, rtol=0, atol=1e-15)


def test_degenerate_groups_give_no_nan():
    # all-equal rewards, an empty completion (sum over no token = 0), a NaN reward, a group of one
    per_token = torch.tensor([[-1.0, -2.0], [-0.5, 0.0], [-3.0, -1.0], [-0.2, -0.1], [-1.0, -1.0]], dtype=F64)
    per_token.requires_grad_(True)
    mask = torch.tensor([[1, 1], [0, 0], [1, 0], [1, 1], [1, 1]])
    ids = torch.tensor([0, 0, 1, 1, 2])
    rewards = torch.tensor([1.0, 1.0, float("nan"), 0.0, 5.0], dtype=F64)
    seq = sequence_sum(per_token, mask)
    ref = seq.detach() - 0.3
    loss = _loss(seq, ref, rewards, ids, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(per_token.grad).all()
    # group 0: all-equal rewards, Δ all equal -> zero loss; group 1: NaN reward centred to 0 -> R − R̄ = [0, 0];
    # group 2 (one member) is skipped. Everything is zero here.
    assert abs(loss.item()) < 1e-30
    # a group of one is skipped; the same row in a group of two is not
    one, zero = torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)
    assert gvpo_loss(one, zero, zero, zero, torch.tensor([1]), 0.1, 1).item() == 0.0
    assert gvpo_loss(one, zero, zero, zero, torch.tensor([2]), 0.1, 1).item() == pytest.approx(0.5 * 0.1**2)
