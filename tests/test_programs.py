"""The program interface: built-in programs, programs from a user's file, the KL weight on any program."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from ppl_vae.errors import ModelStructureError, PplVaeError
from ppl_vae.evaluate import elbo_decomposition, iter_chunk_terms, log_evidence, plan_evaluation
from ppl_vae.model import VAE, VAEConfig
from ppl_vae.models import ConditionalVAE, TwoLayerVAE
from ppl_vae.programs import (
    LatentScale,
    ProgramSpec,
    Weighted,
    build_program,
    changed_source_note,
    check_parameters_belong,
    check_program,
    load_spec,
    record_spec,
)


def binary(n, d, seed=0):
    return torch.bernoulli(torch.full((n, d), 0.3), generator=torch.Generator().manual_seed(seed))


def test_two_layer_vae_decomposition_agrees_with_trace_elbo():
    program = TwoLayerVAE(data_dim=12, latent=(6, 3), hidden=((10,), (8,)))
    x = binary(20, 12)
    k = 3000
    parts = elbo_decomposition(program.model, program.guide, x, num_samples=k)
    assert parts["kl_method"] == {"z2": "analytic", "z1": "monte carlo"}  # z1's parent z2 is drawn after it
    plan = plan_evaluation(program.model, program.guide, x, num_samples=k, kl="mc")
    per_draw = torch.cat([t.log_weight.double().sum(1) for _, t in iter_chunk_terms(program.model, program.guide, x, plan)])
    stderr = per_draw.std().item() / math.sqrt(k)
    with torch.no_grad():
        trace_elbo = -Trace_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1).loss(
            program.model, program.guide, x)
    assert abs(parts["elbo"].sum().item() - trace_elbo) < 4 * math.sqrt(2) * stderr
    assert program.sample_prior(4).shape == (4, 12)


def test_conditional_vae_takes_labels_in_every_evaluation():
    program = ConditionalVAE(data_dim=12, num_classes=3, latent_dim=2, hidden_sizes=(8,))
    x, y = binary(15, 12), torch.arange(15) % 3
    values = log_evidence(program.model, program.guide, x, y, num_samples=20)
    assert values.shape == (15,) and torch.isfinite(values).all()
    with pytest.raises(PplVaeError, match="int64 labels"):
        log_evidence(program.model, program.guide, x, y.float(), num_samples=5)
    assert program.sample_digits(torch.arange(3)).shape == (3, 12)


def test_latent_scale_is_the_kl_weight_of_any_program():
    """Weighted(program, beta) scales latent sites only: the loss is -(reconstruction - beta KL), draws fixed."""
    vae = VAE(VAEConfig(data_dim=6, latent_dim=2, hidden_sizes=(4,)))
    x = binary(5, 6)
    weighted = Weighted(vae, kl_weight=0.3)
    pyro.set_rng_seed(3)
    loss = Trace_ELBO().loss(weighted.model, weighted.guide, x)
    pyro.set_rng_seed(3)  # the same draws, the terms by hand: -(log p(x|z) - 0.3 (log q(z|x) - log p(z)))
    guide_trace = pyro.poutine.trace(vae.guide).get_trace(x)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    log_q = guide_trace.nodes["z"]["fn"].log_prob(guide_trace.nodes["z"]["value"]).sum()
    log_pz = model_trace.nodes["z"]["fn"].log_prob(model_trace.nodes["z"]["value"]).sum()
    log_px = model_trace.nodes["x"]["fn"].log_prob(model_trace.nodes["x"]["value"]).sum()
    assert loss == pytest.approx(float(-(log_px - 0.3 * (log_q - log_pz)).detach()), rel=1e-5)
    pyro.set_rng_seed(3)
    assert Trace_ELBO().loss(vae.model, vae.guide, x) != pytest.approx(loss)
    with LatentScale(2.0), pyro.poutine.trace() as tracer:
        vae.model(x)
    assert tracer.trace.nodes["z"]["scale"] == 2.0 and tracer.trace.nodes["x"]["scale"] == 1.0


def test_check_program_names_what_is_missing():
    with pytest.raises(ModelStructureError, match="not a torch.nn.Module"):
        check_program(lambda x: x)
    with pytest.raises(ModelStructureError, match="has no guide method"):
        check_program(nn.Linear(2, 2).__class__.__new__(type("OnlyModel", (nn.Module,), {"model": lambda self, x: x})))


class ForeignParam(nn.Module):
    def model(self, x):
        loc = pyro.param("loc", torch.zeros(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(self, x):
        pass


def test_parameters_created_outside_the_module_are_refused():
    with pytest.raises(ModelStructureError, match=r"\['loc'\] with pyro.param outside its module"):
        check_parameters_belong(ForeignParam(), torch.zeros(3, 2))
    check_parameters_belong(TwoLayerVAE(data_dim=6, latent=(3, 2), hidden=((4,), (4,))), binary(3, 6))


PROGRAM_FILE = '''
import pyro, pyro.distributions as dist, torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self, latent=2, scale=1.0):
        super().__init__()
        self.dec = nn.Linear(latent, 4)
        self.enc = nn.Linear(4, 2 * latent)
        self.latent, self.scale = latent, scale

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            code = pyro.sample("code", dist.Normal(torch.zeros(self.latent), self.scale).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.dec(code)).to_event(1), obs=x)

    def guide(self, x):
        loc, raw = self.enc(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("code", dist.Normal(loc, torch.nn.functional.softplus(raw) + 1e-3).to_event(1))

def make(latent=2):
    return Tiny(latent)

NOT_A_MODULE = 3
'''


def test_a_program_file_is_recorded_and_rebuilt_from_its_copy(tmp_path):
    source = tmp_path / "user" / "my_models.py"
    source.parent.mkdir()
    source.write_text(PROGRAM_FILE)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = record_spec(run_dir, ProgramSpec.parse(f"{source}:Tiny", '{"latent": 3}'))
    assert load_spec(run_dir) == spec and (run_dir / spec.source).read_text() == PROGRAM_FILE
    assert changed_source_note(run_dir, spec) is None
    program = build_program(load_spec(run_dir), run_dir)
    assert program.latent == 3
    source.write_text(PROGRAM_FILE.replace("latent=2, scale=1.0", "latent=2, scale=5.0"))
    assert "has changed since the run started" in changed_source_note(run_dir, spec)
    source.unlink()
    assert "is gone" in changed_source_note(run_dir, spec)
    assert build_program(spec, run_dir).scale == 1.0  # the recorded copy, not the user's current file
    assert build_program(ProgramSpec.parse(f"{run_dir / spec.source}:make"), None).latent == 2


@pytest.mark.parametrize("text, kwargs, message", [
    ("missing.py:Tiny", None, "does not exist"),
    ("{file}:Nope", None, "has no 'Nope'; it defines Tiny, make"),
    ("{file}:NOT_A_MODULE", None, "is a int, not a class or function"),
    ("{file}:Tiny", '{"latnt": 3}', r"takes no keyword argument\(s\) latnt .*; it takes latent, scale"),
    ("{file}:Tiny", "[3]", "must be a JSON object"),
    ("{file}:Tiny", "{latent: 3}", "not valid JSON"),
    ("nonsense", None, "not a built-in program"),
])
def test_program_errors_are_one_line(tmp_path, text, kwargs, message):
    source = tmp_path / "my_models.py"
    source.write_text(PROGRAM_FILE)
    with pytest.raises(PplVaeError, match=message) as info:
        build_program(ProgramSpec.parse(text.format(file=source), kwargs))
    assert "\n" not in str(info.value)


def test_builtin_programs_are_built_by_name():
    assert isinstance(build_program(ProgramSpec.parse("two-layer"), data_info={"data_dim": 10}), TwoLayerVAE)
    conditional = build_program(ProgramSpec.parse("conditional", {"latent_dim": 3}),
                                data_info={"data_dim": 10, "num_classes": 4})
    assert conditional.num_classes == 4 and conditional.latent_dim == 3
    assert isinstance(build_program(ProgramSpec.parse("vae", {"latent_dim": 2}), data_info={"data_dim": 10}), VAE)
