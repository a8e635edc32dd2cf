"""Bad input gets a clear error, not a silent wrong number."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.data import load_mnist
from ppl_vae.errors import DataNotFoundError, InvalidDataError, ModelStructureError
from ppl_vae.evaluate import elbo_decomposition, log_evidence


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(z.shape[:-1] + (3,)), 1.0).to_event(1), obs=x)


def guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))


def test_missing_data_folder_names_the_files_and_the_folder(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_mnist(tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message


def test_unknown_binarization_is_refused(data_root):
    with pytest.raises(InvalidDataError, match="dynamic, static, none"):
        load_mnist(data_root, binarize="sometimes")


def test_non_positive_k_is_refused():
    with pytest.raises(InvalidDataError, match="num_samples"):
        log_evidence(model, guide, torch.zeros(4, 3), num_samples=0)


def test_empty_data_is_refused():
    with pytest.raises(InvalidDataError, match="non-empty"):
        log_evidence(model, guide, torch.zeros(0, 3), num_samples=5)


def test_model_without_observed_site_is_refused():
    def unobserved(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    with pytest.raises(ModelStructureError, match="no observed"):
        elbo_decomposition(unobserved, guide, torch.zeros(4, 3))


def test_guide_missing_a_latent_site_is_refused():
    def empty_guide(x):
        pass

    with pytest.raises(ModelStructureError, match=r"no sample site for the model's latent site\(s\) \['z'\]"):
        elbo_decomposition(model, empty_guide, torch.zeros(4, 3))


def test_model_without_a_data_plate_is_refused():
    def no_plate(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(2))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(x.shape), 1.0).to_event(2), obs=x)

    def no_plate_guide(x):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(2))

    with pytest.raises(ModelStructureError, match="pyro.plate"):
        elbo_decomposition(no_plate, no_plate_guide, torch.zeros(4, 3))


def test_global_latent_is_refused_for_per_datapoint_evidence():
    def global_model(x):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(shift, 1.0).expand([x.shape[0], 3]).to_event(1), obs=x)

    def global_guide(x):
        pyro.sample("shift", dist.Normal(0.0, 1.0))

    with pytest.raises(ModelStructureError, match="not inside the data plate"):
        elbo_decomposition(global_model, global_guide, torch.zeros(4, 3))


def test_device_requests_that_this_machine_cannot_meet_are_refused(monkeypatch):
    from ppl_vae.errors import PplVaeError
    from ppl_vae.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(PplVaeError, match="torch sees no CUDA GPU: use --device cpu or auto"):
        resolve_device("cuda")
    with pytest.raises(PplVaeError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(PplVaeError, match=r"--device cuda:3 was asked for, but torch sees 1 GPU\(s\), numbered from 0"):
        resolve_device("cuda:3")
