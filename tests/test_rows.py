"""Row dicts: the group-preserving split."""

import torch

from gvpo_trl.rows import regroup_batches


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
