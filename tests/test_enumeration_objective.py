"""Training objectives for programs with enumerated discrete guide sites (issue 26, item 1).

``--objective elbo`` is ``TraceEnum_ELBO`` for them: checked against the enumerated ELBO written out by hand,
sum_y q(y | x) [log p(x | y, z) + log p(y) + log p(z) - log q(z | x, y) - log q(y | x)], loss and gradients;
iwae and meanfield refused naming elbo; ``--enumerate`` marks the guide's discrete sites; the compiled
``JitTraceEnum_ELBO`` checked equal on a batch, as the compiled engine is.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from discrete_models import M2, SmallVAE, joined
from pyro.infer import TraceEnum_ELBO
from torch.nn import functional as F

from ppl_vae import objectives
from ppl_vae.errors import ModelStructureError
from ppl_vae.inspection import inspect_program
from ppl_vae.programs import Weighted


def batch(n: int = 6, d: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, d), 0.3), generator=torch.Generator().manual_seed(seed))


def enumerated_elbo_by_hand(program: M2, x: torch.Tensor) -> torch.Tensor:
    """sum_n sum_y q(y | x_n) [log p(x_n | y, z_y) + log p(y) + log p(z_y) - log q(z_y | x_n, y) - log q(y | x_n)],
    z_y = loc + scale * eps with the draws Normal.rsample makes for shape [C, N, L] (held fixed by the caller)."""
    classes = program.classes
    onehot = F.one_hot(torch.arange(classes), classes).to(x.dtype)[:, None, :]  # [C, 1, C]
    log_qy = torch.log_softmax(program.classifier(x), -1).T  # [C, N]
    loc, raw = program.encoder(joined(x, onehot)).chunk(2, -1)  # [C, N, L]
    q_z = dist.Normal(loc, F.softplus(raw) + 1e-3).to_event(1)
    z = q_z.rsample()
    log_px = dist.Bernoulli(logits=program.decoder(joined(z, onehot.expand(classes, x.shape[0], classes)))).to_event(1).log_prob(x)
    log_pz = dist.Normal(torch.zeros(program.latent), 1.0).to_event(1).log_prob(z)
    inner = log_px - torch.log(torch.tensor(float(classes))) + log_pz - q_z.log_prob(z) - log_qy
    return (log_qy.exp() * inner).sum()


def test_elbo_of_an_enumerated_program_is_trace_enum_elbo_and_equals_the_sum_over_y_by_hand():
    torch.manual_seed(0)
    program, x = M2(data_dim=12, enumerate=True), batch()
    objective = objectives.make_objective("elbo", 1, max_plate_nesting=1, enumerated=True)
    assert isinstance(objective, TraceEnum_ELBO) and objective.max_plate_nesting == 1
    params = list(program.parameters())
    with objectives.fixed_standard_normal():
        pyro.clear_param_store()
        loss = objective.differentiable_loss(program.model, program.guide, x)
        by_hand = -enumerated_elbo_by_hand(program, x)
    assert torch.allclose(loss, by_hand, rtol=1e-5), (float(loss), float(by_hand))
    for got, want in zip(torch.autograd.grad(loss, params, retain_graph=True), torch.autograd.grad(by_hand, params)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    # The classifier q(y | x) gets its exact gradient (no score-function term): non-zero.
    assert torch.autograd.grad(loss, program.classifier[0].weight)[0].abs().sum() > 0


def test_the_draws_of_trace_elbo_on_the_same_program_differ_from_the_enumerated_sum():
    # Without the mark the site is drawn: the plain objective is not the enumerated one (the old silent behaviour).
    torch.manual_seed(0)
    program, x = M2(data_dim=12, enumerate=True), batch()
    with objectives.fixed_standard_normal():
        plain = objectives.make_objective("elbo", 1).differentiable_loss(program.model, program.guide, x)
        summed = objectives.make_objective("elbo", 1, 1, enumerated=True).differentiable_loss(program.model, program.guide, x)
    assert not torch.allclose(plain, summed)


@pytest.mark.parametrize("objective, cannot", [("iwae", "RenyiELBO"), ("meanfield", "TraceMeanField_ELBO")])
def test_objectives_that_cannot_enumerate_are_refused_naming_elbo(objective, cannot):
    structure = inspect_program(M2(data_dim=12, enumerate=True).model, M2(data_dim=12, enumerate=True).guide, batch())
    assert structure.enumerated == {"y": "parallel"}
    for refuse in (lambda: objectives.check_objective_sites(objective, structure, trains_enumerated=True),
                   lambda: objectives.make_objective(objective, 2, 1, enumerated=True),
                   lambda: objectives.make_loss_module(Weighted(M2(data_dim=12)), objective, 2, compiled=True,
                                                       enumerated=True)):
        with pytest.raises(ModelStructureError) as refused:
            refuse()
        message = str(refused.value)
        assert f"--objective {objective} cannot sum it out ({cannot}" in message and "--objective elbo" in message
        assert "\n" not in message
    objectives.check_objective_sites("elbo", structure, trains_enumerated=True)  # accepted


def test_enumerate_marks_every_discrete_guide_site_and_refuses_a_program_without_one():
    program = M2(data_dim=12)  # no mark of its own
    x = batch()
    assert inspect_program(program.model, program.guide, x).enumerated == {}
    state = {k: v.clone() for k, v in program.state_dict().items()}
    objectives.enumerate_discrete_sites(program)
    assert inspect_program(program.model, program.guide, x).enumerated == {"y": "parallel"}
    assert program.state_dict().keys() == state.keys()
    with objectives.fixed_standard_normal():
        marked = objectives.make_objective("elbo", 1, 1, enumerated=True).differentiable_loss(program.model, program.guide, x)
        by_hand = -enumerated_elbo_by_hand(program, x)
    assert torch.allclose(marked, by_hand, rtol=1e-5)
    plain = SmallVAE(data_dim=12)
    structure = inspect_program(plain.model, objectives.enumerate_discrete_sites(plain).guide, x)
    with pytest.raises(ModelStructureError, match="--enumerate: the program's guide has no discrete sample site"):
        objectives.check_enumerate_found(structure)


def test_the_compiled_enumerated_loss_is_checked_equal_to_trace_enum_elbo_and_used_where_it_is():
    torch.manual_seed(1)
    program, x = Weighted(M2(data_dim=12, enumerate=True)), batch()
    structure = inspect_program(program.model, program.guide, x)
    assert objectives.site_kind_problem(structure) is not None  # without enumeration: not compiled
    assert objectives.site_kind_problem(structure, enumerated=True) is None
    pyro.clear_param_store()
    assert objectives.compiled_loss_problem(program, (x,), 1, 1, enumerated=True, second_batch=(batch(seed=1),)) is None
    pyro.clear_param_store()
    compiled = objectives.make_loss_module(program, "elbo", 1, compiled=True, max_plate_nesting=1, enumerated=True)
    with objectives.fixed_standard_normal():
        reference = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(program.model, program.guide, x)
    # The compiled graph draws its own noise: equal in expectation; with a very small latent noise the loss is close.
    loss = compiled(x)
    assert torch.isfinite(loss) and loss.requires_grad
    assert abs(float(loss.detach()) - float(reference.detach())) < 0.2 * abs(float(reference.detach()))


def test_a_compiled_enumerated_loss_that_differs_is_reported(monkeypatch):
    program, x = Weighted(M2(data_dim=12, enumerate=True)), batch()
    real = objectives.CompiledProgramLoss._loss
    monkeypatch.setattr(objectives.CompiledProgramLoss, "_loss", lambda self, *data, **key: 1.01 * real(self, *data, **key))
    pyro.clear_param_store()
    problem = objectives.compiled_loss_problem(program, (x,), 1, 1, enumerated=True)
    assert problem is not None and "differs from TraceEnum_ELBO's" in problem


def test_an_enumerate_marked_program_copies_with_its_mark_and_its_own_parameters():
    import copy

    program = objectives.enumerate_discrete_sites(M2(data_dim=12))
    twin = copy.deepcopy(program)
    x = batch()
    assert inspect_program(twin.model, twin.guide, x).enumerated == {"y": "parallel"}
    with torch.no_grad():
        twin.classifier[2].weight.zero_()
        twin.classifier[2].bias.zero_()
    q = pyro.poutine.trace(twin.guide).get_trace(x).nodes["y"]["fn"]
    assert torch.allclose(q.probs, torch.full_like(q.probs, 1 / 3))  # the copy's guide reads the copy's weights
    module = objectives.make_loss_module(Weighted(program), "elbo", 1, max_plate_nesting=1, enumerated=True)
    assert isinstance(module.elbo, TraceEnum_ELBO)
