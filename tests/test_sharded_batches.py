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


# --- --labelled on several processes: labelled (x, y) and unlabelled (x,) batches, sharded like any ------------------

LABELLED = 20  # 2 of each of the 10 classes of label(index)


def labelled_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"batch_size": 8, "labelled": LABELLED, "seed": 5, "engine": "svi", **overrides})


def test_labelled_batches_are_sharded_like_unlabelled_ones_and_an_epoch_covers_every_image_once():
    from ppl_vae.data.labelled import choose_labelled

    data = indexed_data("dynamic", ())
    kept = set(choose_labelled(data.train_labels, LABELLED, 5).tolist())
    per_rank = shares_of_an_epoch(data, labelled_config())
    assert len(per_rank[0]) == len(per_rank[1])
    labelled, unlabelled = [], []
    for step in zip(*per_rank):
        assert len({len(share) for share, _ in step}) == 1  # every process takes the same kind of step
        for share, weight in step:
            index = index_of(share[0])
            if len(share) == 2:  # y observed: the kept label of that very image
                assert torch.equal(share[1], label(index)) and set(index.tolist()) <= kept
            if weight:
                (labelled if len(share) == 2 else unlabelled).append(index)
    assert sorted(torch.cat(labelled).tolist()) == sorted(kept)
    assert sorted(torch.cat(unlabelled).tolist()) == sorted(set(range(N)) - kept)


@pytest.fixture
def fixed_draws(monkeypatch):
    """Every datapoint's standard-normal draw the same, whatever the batch it is in (tests/distributed_workers.py)."""
    from distributed_workers import fixed_noise

    monkeypatch.setattr(torch.distributions.normal, "_standard_normal", fixed_noise)


@pytest.mark.parametrize("alpha", [None, 0.0])
def test_the_ranks_weighted_labelled_and_unlabelled_losses_sum_to_the_one_process_objective(fixed_draws, alpha):
    """What DDP applies, the mean over ranks of grad(W * weight_r * L(B_r)), is grad L(B) for every step of an
    epoch, labelled and unlabelled, and sum_r weight_r L(B_r) = L(B): the classifier term alpha / N_l sum log q(y|x)
    and the labelled batches' scale are sums over the rows, so every rank keeps the one-process weights."""
    from ppl_vae.models.m2 import M2
    from ppl_vae.objectives import make_loss_module
    from ppl_vae.programs import Weighted
    from ppl_vae.training.semi import trained_program

    torch.manual_seed(0)
    data = indexed_data("dynamic", ())
    config = labelled_config(alpha=alpha, labelled_batches=4)  # cycled: labelled batches scaled below 1
    program = M2(data_dim=BITS, latent_dim=2, hidden_sizes=(8,))
    loss = make_loss_module(Weighted(trained_program(program, data, config)), max_plate_nesting=1, enumerated=True)
    params = [p for p in loss.parameters() if p.requires_grad]
    strategy = ProcessGroupStrategy(0, WORLD, 0, torch.device("cpu"), "gloo")
    kinds = set()
    for batch in strategy.epoch_batches(data, config, epoch=1):
        kinds.add(len(batch))
        whole = loss(*batch)
        expected_grads = torch.autograd.grad(whole, params, allow_unused=True)
        total, grads = 0.0, [torch.zeros_like(p) for p in params]
        for rank in range(WORLD):
            share, weight = shard_batch(batch, rank, WORLD)
            local = loss(*share)
            total += float(local.detach()) * weight
            for g, p in zip(grads, torch.autograd.grad(local * WORLD * weight, params, allow_unused=True)):
                if p is not None:
                    g += p / WORLD  # DDP's average over the processes
        assert total == pytest.approx(float(whole.detach()), rel=1e-5, abs=1e-4)
        for g, e in zip(grads, expected_grads):
            assert torch.allclose(g, torch.zeros_like(g) if e is None else e, rtol=1e-4, atol=1e-5)
    assert kinds == {1, 2}  # unlabelled (x,) and labelled (x, y) steps both checked


def test_semi_supervised_training_is_accepted_on_several_processes():
    from ppl_vae.distributed import check_trainable_on_processes

    check_trainable_on_processes(TrainConfig(labelled=20))


# --- Evaluation on several processes: blocks of consecutive datapoints, every tensor cut at the same rows ------------

class AlignedProgram(torch.nn.Module):
    """x ~ N(loc, I) with loc = c[:, :BITS] + (y - c[:, BITS]): loc is x itself where c and y are x's own rows, so
    every datapoint's reconstruction term is exactly -BITS/2 log(2 pi) then, and lower wherever a row is misaligned."""

    def model(self, x, y, c):
        import pyro
        import pyro.distributions as dist

        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
            loc = c[:, :BITS] + (y - c[:, BITS]).unsqueeze(-1) + 0 * z
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(self, x, y, c):
        import pyro
        import pyro.distributions as dist

        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))


def test_evaluation_blocks_keep_every_conditioning_tensor_with_its_images_on_each_rank(monkeypatch):
    """evaluate_per_datapoint as rank 0 and rank 1 of 2 would run it (their blocks, no gathering): every datapoint's
    reconstruction is that of its own labels and covariate, and the two ranks' blocks cover the datapoints once."""
    import math

    from ppl_vae import blocked_evaluation

    index = torch.arange(N)
    x, y = bits(index), label(index)
    c = torch.cat([x, y.float().unsqueeze(-1)], -1)
    exact = -BITS / 2 * math.log(2 * math.pi)
    covered = []
    for rank in range(WORLD):
        monkeypatch.setattr(blocked_evaluation, "rank_and_size", lambda rank=rank: (rank, WORLD))
        monkeypatch.setattr(blocked_evaluation, "all_gather_objects", lambda value: [value])  # this rank's blocks
        result = blocked_evaluation.evaluate_per_datapoint(
            AlignedProgram().model, AlignedProgram().guide, x, y, c, elbo_samples=2, block_size=8, seed=1)
        reconstruction = result.decomposition["reconstruction"]
        rows = [i for block in range(rank, -(-N // 8), WORLD) for i in range(8 * block, min(N, 8 * block + 8))]
        assert reconstruction.shape == (len(rows),)  # blocks 0, 2, 4 (rank 0) and 1, 3 (rank 1) of 8
        assert torch.allclose(reconstruction, torch.full_like(reconstruction, exact), atol=1e-5)
        covered += rows
    assert sorted(covered) == list(range(N))
