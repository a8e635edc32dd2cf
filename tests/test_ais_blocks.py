"""AIS through the blocked per-datapoint evaluation: seeded per block, the same numbers on 2 processes as on one."""

import distributed_workers as workers
import pytest
import torch

from ppl_vae import distributed
from ppl_vae.errors import PplVaeError

AIS, OPTIONS = workers.AIS, workers.AIS_OPTIONS  # 3 blocks of 10 datapoints, dealt to 2 processes


def tiny():
    return workers.tiny_vae_and_data(10)


def test_ais_draws_of_a_datapoint_depend_on_the_seed_and_its_block_only():
    vae, x = tiny()
    whole = distributed.evaluate_per_datapoint(vae.model, vae.guide, x, **OPTIONS)
    part = distributed.evaluate_per_datapoint(vae.model, vae.guide, x[:8], **OPTIONS)
    assert torch.equal(part.evidence.log_evidence, whole.evidence.log_evidence[:8])
    assert torch.equal(part.acceptance, whole.acceptance[:8]) and whole.acceptance.shape == (10,)
    assert whole.evidence.num_samples == 3 and whole.psis is None
    other = distributed.evaluate_per_datapoint(vae.model, vae.guide, x[:8], **{**OPTIONS, "seed": 8})
    assert not torch.equal(other.evidence.log_evidence, part.evidence.log_evidence)


def test_ais_replaces_importance_sampling_and_says_so_when_both_are_asked_for():
    vae, x = tiny()
    with pytest.raises(PplVaeError, match="ais replaces importance sampling"):
        distributed.evaluate_per_datapoint(vae.model, vae.guide, x, num_samples=10, ais=AIS)


# The same numbers on 2 processes as on one: tests/test_distributed.py, test_ais_on_two_processes_equals_one_process_
# exactly (its processes are the ones spawned there once for every 2-process check).
