"""Group-stratified batches: a partition of the data, stratified, deterministic per (seed, epoch)."""

import numpy as np
import torch

from trustml.fairness.sampling import GroupBalancedBatches


class _Table:
    def __init__(self, n=1000, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.s = (torch.rand(n, generator=g) < 0.2).long()
        self.y = (torch.rand(n, generator=g) < 0.1 + 0.3 * self.s).long()
        self.x = torch.randn(n, 2, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "s": self.s[i]}


def test_each_epoch_is_a_partition_with_stratified_batches():
    data = _Table()
    sampler = GroupBalancedBatches(data, 64, seed=1, by_label=True)
    batches = list(sampler.batches(0))
    assert len(batches) == len(sampler) == 1000 // 64
    seen = torch.cat([b["x"] for b in batches])
    assert len(seen) == 1000 and torch.unique(seen, dim=0).shape[0] == 1000
    for b in batches:
        for s in (0, 1):
            for y in (0, 1):
                share = ((data.s == s) & (data.y == y)).float().mean().item() * len(b["y"])
                count = ((b["s"] == s) & (b["y"] == y)).sum().item()
                assert abs(count - share) <= 1.5, (s, y, count, share)


def test_stratified_batches_are_far_tighter_than_plain_shuffling():
    data = _Table(seed=3)
    counts = [int(b["s"].sum()) for b in GroupBalancedBatches(data, 32, seed=0).batches(0)]
    plain = [int(data.s[torch.randperm(1000)[:32]].sum()) for _ in range(100)]
    assert np.std(counts) < 0.5 * np.std(plain)


def test_order_is_a_function_of_seed_and_epoch():
    data = _Table()
    a = GroupBalancedBatches(data, 100, seed=5).order(2)
    b = GroupBalancedBatches(data, 100, seed=5).order(2)
    c = GroupBalancedBatches(data, 100, seed=5).order(3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
