"""AIS through the blocked per-datapoint evaluation: seeded per block, the same numbers on 2 processes as on one."""

import distributed_workers as workers
import pyro
import pytest
import torch

from ppl_vae import distributed
from ppl_vae.errors import PplVaeError
from ppl_vae.model import VAEConfig, build_vae

AIS = {"steps": 4, "chains": 3, "leapfrog_steps": 2}
OPTIONS = {"ais": AIS, "elbo_samples": 2, "seed": 7, "block_size": 4}  # 3 blocks of 10 datapoints, dealt to 2 processes


def tiny():
    pyro.set_rng_seed(3)
    vae = build_vae(VAEConfig(**workers.TINY))
    x = torch.bernoulli(torch.full((10, workers.TINY["data_dim"]), 0.4), generator=torch.Generator().manual_seed(2))
    return vae, x


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


def test_ais_on_two_processes_equals_one_process_exactly(tmp_path):
    vae, x = tiny()
    torch.save({"state": vae.state_dict(), "x": x}, tmp_path / "model-and-data.pt")
    workers.spawn([(workers.evaluate, (tmp_path, OPTIONS))], 2)
    single = distributed.evaluate_per_datapoint(vae.model, vae.guide, x, **OPTIONS)
    for rank in range(2):
        gathered = torch.load(tmp_path / f"evaluation-rank{rank}.pt", weights_only=False)
        for key in ("log_evidence", "stderr", "ess"):
            assert torch.equal(getattr(gathered["evidence"], key), getattr(single.evidence, key)), key
        assert torch.equal(gathered["acceptance"], single.acceptance)
        assert torch.equal(gathered["decomposition"]["elbo"], single.decomposition["elbo"])
