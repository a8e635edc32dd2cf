"""Conditioning data and semi-supervised batches on several processes (issue 26), checked without spawning any.

On a process group every process builds the same global minibatch (:meth:`ProcessGroupStrategy.epoch_batches`, the
data stream seeded from (seed, epoch)) and keeps its share of it (:func:`ppl_vae.training.engines.shard_batch`). The
functions are called here for rank 0 and rank 1 of a world of 2, in this process, on data whose x encodes each
row's index (its bits, which a Bernoulli draw keeps) and whose labels and conditioning arrays are functions of the
index: every share must keep row i of every tensor together, and the shares of an epoch must cover every row once.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ppl_vae.data import tensor_data
from ppl_vae.training.config import TrainConfig
from ppl_vae.training.engines import shard_batch
from ppl_vae.training.strategy import ProcessGroupStrategy

N, BITS, WORLD = 37, 6, 2  # 37 rows: uneven batches and uneven shares


def bits(index: torch.Tensor) -> torch.Tensor:
    """Row ``index`` of x: the bits of the index, 0.0 or 1.0 (a dynamic binarization draws them unchanged)."""
    return ((index[:, None] >> torch.arange(BITS)) & 1).float()


def index_of(x: torch.Tensor) -> torch.Tensor:
    return (x * 2 ** torch.arange(BITS)).sum(-1).round().long()


def covariate(index: torch.Tensor) -> torch.Tensor:
    """c = f(index), float [n, 3]."""
    i = index.float()
    return torch.stack([2 * i + 1, -i, i * i], -1)


def count(index: torch.Tensor) -> torch.Tensor:
    """d = g(index), int64 [n]: a second conditioning array of another shape and dtype."""
    return index * 7 % 5


def label(index: torch.Tensor) -> torch.Tensor:
    return index * 3 % 10


def indexed_data(binarize: str, cond: tuple[str, ...]):
    """Every split the same N rows: x the bits of the row's index, the labels and arrays functions of it."""
    index = torch.arange(N)
    arrays = {"c": covariate(index), "d": count(index)}
    split = (bits(index), *(arrays[name] for name in cond))
    data = tensor_data(split, split, split, cond=cond, binarize=binarize)
    return dataclasses.replace(data, train_labels=label(index), val_labels=label(index), test_labels=label(index))


def expected(name: str, index: torch.Tensor) -> torch.Tensor:
    return {"y": label, "c": covariate, "d": count}[name](index)


def shares_of_an_epoch(data, config: TrainConfig, epoch: int = 3) -> list[list[tuple[tuple, float]]]:
    """Per rank, the (share, weight) of every step of ``epoch``, each rank's batches built by its own strategy."""
    per_rank = []
    for rank in range(WORLD):
        strategy = ProcessGroupStrategy(rank, WORLD, rank, torch.device("cpu"), "gloo")
        per_rank.append([shard_batch(batch, rank, WORLD) for batch in strategy.epoch_batches(data, config, epoch)])
    return per_rank


CASES = {"labels": (True, ()), "cond": (False, ("c",)), "both": (True, ("c", "d"))}


@pytest.mark.parametrize("binarize", ["none", "dynamic"])
@pytest.mark.parametrize("batch_size", [10, 1])  # 1: fewer rows than processes, rank 1 steps at weight 0
@pytest.mark.parametrize("case", list(CASES))
def test_every_conditioning_tensor_is_sharded_exactly_like_x(case, batch_size, binarize):
    labels, cond = CASES[case]
    names = (("y",) if labels else ()) + cond
    config = TrainConfig(batch_size=batch_size, labels=labels, cond=cond, seed=5)
    per_rank = shares_of_an_epoch(indexed_data(binarize, cond), config)
    assert len(per_rank[0]) == len(per_rank[1]) == -(-N // batch_size)  # the same steps on every process
    seen = []
    for step in zip(*per_rank):
        for (share, weight) in step:
            assert len(share) == 1 + len(names)
            index = index_of(share[0])
            for name, tensor in zip(names, share[1:]):  # row r of each tensor belongs to x[r]
                assert tensor.dtype == expected(name, index).dtype and torch.equal(tensor, expected(name, index)), name
            if weight:
                seen.append(index)
            else:  # an empty share steps on a row of the batch, counted nowhere
                assert batch_size < WORLD and share[0].shape[0] == 1
    # In rank order, the counted shares of every step are the global minibatches: each row once per epoch.
    assert sorted(torch.cat(seen).tolist()) == list(range(N))
    assert len(per_rank[0][0][0][0]) - len(per_rank[1][0][0][0]) in ((0, 1) if batch_size > 1 else (0,))


def test_the_processes_shares_come_from_one_global_minibatch_order_per_epoch():
    """Rank 0's and rank 1's shares of a step are the two halves of the same minibatch, which changes per epoch."""
    config = TrainConfig(batch_size=10, labels=True, cond=("c",), seed=5)
    data = indexed_data("dynamic", ("c",))
    first = shares_of_an_epoch(data, config, epoch=1)
    again = shares_of_an_epoch(data, config, epoch=1)
    other = shares_of_an_epoch(data, config, epoch=2)

    def order(per_rank):
        return torch.cat([index_of(share[0]) for step in zip(*per_rank) for share, _ in step]).tolist()

    assert order(first) == order(again) and order(first) != order(other)
    assert sorted(order(first)) == sorted(order(other)) == list(range(N))
