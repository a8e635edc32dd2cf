"""One frozen AisSettings shared by ais_log_evidence, bdmc, the audit, the CLI and the bench; the keywords still work."""

import dataclasses

import pyro
import pytest
import torch

from gaussian_models import LinearGaussian
from ppl_vae.errors import InvalidDataError
from ppl_vae.evaluate import AisSettings, ais_log_evidence, ais_settings, bdmc


def test_settings_are_frozen_checked_and_recorded_as_before():
    settings = AisSettings(steps=50, chains=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.steps = 10
    assert settings.pilot == 10 and settings.pilot_steps is None
    assert dataclasses.replace(settings, steps=300).pilot == 30  # the pilot's default follows the new T
    assert settings.record() == ais_settings(steps=50, chains=4)  # the old dict, unchanged
    assert settings.record()["model_gradients_per_datapoint"] == 4 * 5 * (49 + 9)
    assert AisSettings(steps=50, chains=4) == settings and hash(AisSettings(steps=50, chains=4)) == hash(settings)
    for options, message in ((dict(schedule="linear"), "schedule"), (dict(target_accept=1.0), "target_accept"),
                             (dict(steps=0), "steps"), (dict(chains=2.5), "chains"), (dict(pilot_steps=-1), "pilot")):
        with pytest.raises(InvalidDataError, match=message):
            AisSettings(**options)


def test_keywords_and_settings_give_the_same_numbers_and_not_both():
    lg = LinearGaussian(data_dim=5, latent_dim=2, noise=0.7)
    x = lg.sample(4)
    guide = lg.diagonal_guide(shift=0.3, scale=1.0)
    results = []
    for kwargs in (dict(steps=6, chains=3, leapfrog_steps=2, schedule="geometric"),
                   dict(settings=AisSettings(steps=6, chains=3, leapfrog_steps=2, schedule="geometric"))):
        pyro.set_rng_seed(0)
        results.append(ais_log_evidence(lg.model, guide, x, **kwargs))
    torch.testing.assert_close(results[0].log_weights, results[1].log_weights, rtol=0, atol=0)
    assert results[0].settings == results[1].settings == AisSettings(6, 3, 2, "geometric").record()
    with pytest.raises(InvalidDataError, match="not both.*steps"):
        ais_log_evidence(lg.model, guide, x, steps=6, settings=AisSettings())
    with pytest.raises(InvalidDataError, match="AisSettings"):
        bdmc(lg.model, guide, 2, data_like=x[:1], settings={"steps": 6})
    result = bdmc(lg.model, guide, 2, data_like=x[:1], settings=AisSettings(steps=3, chains=2, leapfrog_steps=1))
    assert result.settings == result.lower.settings == AisSettings(steps=3, chains=2, leapfrog_steps=1).record()


def test_bench_times_ais_with_the_settings_it_is_given():
    from ppl_vae.bench import BENCH_AIS, time_ais

    settings = AisSettings(steps=3, chains=2, leapfrog_steps=1)
    result = time_ais(torch.device("cpu"), num_examples=2, repeats=1, settings=settings)
    assert result["settings"] == settings.record()
    assert result["decoder_passes"] == 1 * (3 - 1 + 3 - 1) + 2
    assert time_ais(torch.device("cpu"), num_examples=2, repeats=1, steps=2, chains=1,
                    leapfrog_steps=1)["settings"]["target_accept"] == BENCH_AIS.target_accept
