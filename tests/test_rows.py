"""Row dicts (gvpo_trl/rows.py): stacking rows of several generation outputs (re-padded on each side), and the
group-preserving split."""

import pytest
import torch

from gvpo_trl.rows import concat_generation_outputs, regroup_batches


def test_regroup_batches_makes_whole_groups_per_slice():
    torch.manual_seed(0)
    k, groups, slices = 4, 6, 3
    ids = torch.arange(groups * k) // k
    perm = torch.randperm(ids.numel())  # what TRL's shuffle does: groups scattered over slices
    rows = {"group_id": ids[perm], "x": (ids[perm] * 100 + torch.arange(ids.numel())).float(), "n": torch.tensor(5)}
    batches = [{key: (v if v.ndim == 0 else v[i * 8 : (i + 1) * 8]) for key, v in rows.items()} for i in range(slices)]
    assert any(len(set(b["group_id"].tolist())) > 2 for b in batches)  # the shuffle did scatter them
    out = regroup_batches(batches, generator=torch.Generator().manual_seed(1))
    assert len(out) == slices
    seen = []
    for b in out:
        gid = b["group_id"].tolist()
        assert len(gid) == 8 and sorted(gid.count(g) for g in set(gid)) == [k, k]  # exactly two whole groups
        assert (b["x"] // 100).long().tolist() == gid  # other columns moved with their rows
        assert b["n"].item() == 5
        seen += sorted(set(gid))
    assert sorted(seen) == list(range(groups))  # every group once, none duplicated


def test_concatenating_generation_outputs_re_pads_each_side():
    a = {
        "prompt_ids": torch.tensor([[0, 5, 6]]),
        "prompt_mask": torch.tensor([[0, 1, 1]]),
        "completion_ids": torch.tensor([[7, 0]]),
        "completion_mask": torch.tensor([[1, 0]]),
        "old_per_token_logps": torch.tensor([[-1.0, 0.0]]),
        "tool_mask": torch.tensor([[1, 1]]),
        "advantages": torch.tensor([0.5]),
        "group_id": torch.tensor([3]),
        "num_items_in_batch": torch.tensor(1),
    }
    b = {
        "prompt_ids": torch.tensor([[5]]),
        "prompt_mask": torch.tensor([[1]]),
        "completion_ids": torch.tensor([[8, 9, 7]]),
        "completion_mask": torch.tensor([[1, 1, 1]]),
        "old_per_token_logps": torch.tensor([[-2.0, -3.0, -4.0]]),
        "tool_mask": torch.tensor([[1, 0, 1]]),
        "advantages": torch.tensor([-1.0]),
        "group_id": torch.tensor([9]),
        "num_items_in_batch": torch.tensor(3),
    }
    out = concat_generation_outputs([a, b], pad_token_id=0)
    assert out["prompt_ids"].tolist() == [[0, 5, 6], [0, 0, 5]]  # left
    assert out["prompt_mask"].tolist() == [[0, 1, 1], [0, 0, 1]]
    assert out["completion_ids"].tolist() == [[7, 0, 0], [8, 9, 7]]  # right
    assert out["completion_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert out["old_per_token_logps"].tolist() == [[-1.0, 0.0, 0.0], [-2.0, -3.0, -4.0]]
    assert out["tool_mask"].tolist() == [[1, 1, 1], [1, 0, 1]]  # TRL pads it with 1
    assert out["advantages"].tolist() == [0.5, -1.0] and out["group_id"].tolist() == [3, 9]
    with pytest.raises(ValueError, match="'pixel_values'.*padding is unknown"):
        concat_generation_outputs([dict(a, pixel_values=torch.zeros(1, 2)), dict(b, pixel_values=torch.zeros(1, 2))], 0)


def test_concat_generation_outputs_repads_prompt_completion_keys_on_both_sides():
    a = {"prompt_ids": torch.tensor([[5, 6]]), "completion_ids": torch.tensor([[7]]),
         "mm_token_type_ids": torch.tensor([[1, 2, 3]])}  # fmt: skip
    b = {"prompt_ids": torch.tensor([[5]]), "completion_ids": torch.tensor([[8, 9]]),
         "mm_token_type_ids": torch.tensor([[4, 5, 6]])}  # fmt: skip
    out = concat_generation_outputs([a, b], pad_token_id=0)
    # prompt part left-padded to 2, completion part right-padded to 2
    assert out["mm_token_type_ids"].tolist() == [[1, 2, 3, 0], [0, 4, 5, 6]]
    with pytest.raises(ValueError, match="width 2 is not prompt \\+ completion"):
        concat_generation_outputs([a, dict(b, mm_token_type_ids=torch.tensor([[4, 5]]))], 0)


def test_regroup_batches_moves_flat_image_tensors_with_their_rows():
    # 2 slices of 4 rows, groups of 2 scattered; row r has r + 1 images of 1 patch row each, valued 10·group + r
    group = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2])
    batches = []
    for rows in (range(0, 4), range(4, 8)):
        num_images = [r % 2 + 1 for r in rows]
        pixels = torch.cat([torch.full((n, 3), 10.0 * group[r] + r) for r, n in zip(rows, num_images, strict=True)])
        batches.append({"group_id": group[list(rows)], "num_images": num_images, "pixel_values": pixels,
                        "image_grid_thw": torch.ones(sum(num_images), 3, dtype=torch.long)})  # fmt: skip
    out = regroup_batches(batches, generator=torch.Generator().manual_seed(0))
    assert sum(b["pixel_values"].size(0) for b in out) == 12  # every image once
    for b in out:
        per_row = torch.split(b["pixel_values"], b["num_images"])
        for gid, rows in zip(b["group_id"].tolist(), per_row, strict=True):
            row = int(rows[0, 0].item()) % 10
            assert (rows == 10.0 * gid + row).all() and rows.size(0) == row % 2 + 1  # its own images, all of them
        assert sorted(b["group_id"].tolist()) in ([0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 3, 3], [1, 1, 2, 2],
                                                  [1, 1, 3, 3], [2, 2, 3, 3])  # fmt: skip
    with pytest.raises(ValueError, match="'extra' has 3 entries for 4 rows"):
        regroup_batches([dict(batches[0], extra=torch.zeros(3)), dict(batches[1], extra=torch.zeros(3))])
