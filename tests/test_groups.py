"""Group statistics, against hand-computed values."""

import torch

from gvpo_trl.groups import (
    aggregate_rewards,
    group_centred,
    group_mean,
    group_sizes,
    group_std,
    sequence_mean,
    sequence_sum,
    zero_variance_groups,
)

NAN = float("nan")


def test_group_mean_std_centred_with_interleaved_groups_and_nan():
    ids = torch.tensor([7, 3, 7, 3, 7, 3])
    x = torch.tensor([1.0, 10.0, 2.0, NAN, 6.0, 20.0], dtype=torch.float64)
    # group 7: {1, 2, 6} mean 3, sample std sqrt(((−2)²+(−1)²+3²)/2) = sqrt(7); group 3: {10, 20} mean 15, std sqrt(50)
    torch.testing.assert_close(group_mean(x, ids), torch.tensor([3.0, 15, 3, 15, 3, 15], dtype=torch.float64))
    expected_std = torch.tensor([7**0.5, 50**0.5] * 3, dtype=torch.float64)[[0, 1, 0, 1, 0, 1]]
    torch.testing.assert_close(group_std(x, ids), expected_std)
    torch.testing.assert_close(group_centred(x, ids), torch.tensor([-2.0, -5, -1, 0, 3, 5], dtype=torch.float64))
    assert group_sizes(ids).tolist() == [3, 3, 3, 3, 3, 3]


def test_zero_variance_groups():
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    x = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, NAN, NAN, NAN])
    # group 0 all equal; group 1 varies; group 2 has one valid value; group 3 none
    assert zero_variance_groups(x, ids).tolist() == [True, True, False, False, True, True, True, True]


def test_aggregate_rewards_weights_and_unscorable():
    per_func = torch.tensor([[1.0, 2.0], [NAN, 3.0], [NAN, NAN]])
    out = aggregate_rewards(per_func, torch.tensor([0.5, 2.0]))
    assert out[0].item() == 4.5 and out[1].item() == 6.0 and torch.isnan(out[2])


def test_sequence_sum_and_mean_mask_padding_and_empty():
    x = torch.tensor([[1.0, 2.0, float("inf")], [5.0, NAN, NAN]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert sequence_sum(x, mask).tolist() == [3.0, 0.0]
    assert sequence_mean(x, mask).tolist() == [1.5, 0.0]
