"""STL and DReG (ppl_vae.gradient_estimators) on the closed-form linear-Gaussian model (tests/gaussian_models.py).

Every parameter of the test program is per datapoint (row i of the guide's loc and log-scale, and of the model's
bias, belongs to datapoint i alone) and every datapoint is the same x, so one call's gradient has N rows that are N
independent draws of the gradient estimator: means, standard errors and signal-to-noise ratios come from one call.
"""

from __future__ import annotations

import math
import types

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO

from ppl_vae.errors import ModelStructureError, PplVaeError
from ppl_vae.gradient_estimators import (
    DReGRenyi_ELBO, STLTrace_ELBO, check_gradient, check_gradient_program, check_gradient_sites,
    make_gradient_objective,
)
from tests.gaussian_models import LinearGaussian

NAMES = ("loc", "log_scale", "bias")


class PerDatapoint:
    """The linear-Gaussian model with a diagonal Gaussian guide, every parameter one row per datapoint."""

    def __init__(self, rows: int, shift: float = 0.3, scale: float = 0.8, seed: int = 0):
        self.lg = LinearGaussian(seed=seed)
        self.x = self.lg.sample(1, seed=seed + 1).expand(rows, -1).contiguous()
        loc, _ = self.lg.posterior(self.x[:1])
        self.init = {"loc": (loc + shift).expand(rows, -1).contiguous(),
                     "log_scale": torch.full((rows, self.lg.latent_dim), math.log(scale)),
                     "bias": self.lg.b.expand(rows, -1).contiguous()}

    def param(self, name):
        return pyro.param(name, lambda: self.init[name].clone())

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(torch.zeros(self.lg.latent_dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(z @ self.lg.W.T + self.param("bias"), self.lg.noise).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("latent", dist.Normal(self.param("loc"), self.param("log_scale").exp()).to_event(1))

    def exact_elbo(self, loc, log_scale, bias):
        """The ELBO of each datapoint in closed form (Gaussian expectations), as a differentiable function."""
        W, s2, d, D = self.lg.W, self.lg.noise ** 2, self.lg.latent_dim, self.lg.data_dim
        var = (2 * log_scale).exp()
        prior = -0.5 * d * math.log(2 * math.pi) - 0.5 * (loc.square().sum(-1) + var.sum(-1))
        residual = (self.x - loc @ W.T - bias).square().sum(-1) + (var * W.square().sum(0)).sum(-1)
        likelihood = -0.5 * D * math.log(2 * math.pi * s2) - residual / (2 * s2)
        entropy = log_scale.sum(-1) + 0.5 * d * (1 + math.log(2 * math.pi))
        return prior + likelihood + entropy


def row_gradients(elbo, program: PerDatapoint, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and, per parameter, its N rows of gradient (of the loss, i.e. minus the bound) from one call."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    loss = elbo.loss_and_grads(program.model, program.guide, program.x)
    return loss, {name: pyro.param(name).unconstrained().grad.detach().clone() for name in NAMES}


def mean_and_se(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows.mean(0), rows.std(0) / math.sqrt(rows.shape[0])


def assert_same_mean(a: dict, b: dict, z: float = 4.5) -> None:
    for name in a:
        (ma, sa), (mb, sb) = mean_and_se(a[name]), mean_and_se(b[name])
        gap = (ma - mb).abs() / (sa.square() + sb.square()).sqrt().clamp_min(1e-12)
        assert (gap < z).all(), f"{name}: means differ by {gap.max():.1f} standard errors ({ma} vs {mb})"


def optimal_diagonal(program: PerDatapoint) -> PerDatapoint:
    """The guide at the best diagonal Gaussian (KL(q || p) optimum: posterior mean, variances 1 / precision_ii)."""
    lg, rows = program.lg, program.x.shape[0]
    precision = torch.eye(lg.latent_dim) + lg.W.T @ lg.W / lg.noise ** 2
    program.init["loc"] = lg.posterior(program.x[:1])[0].expand(rows, -1).contiguous()
    program.init["log_scale"] = (-0.5 * precision.diag().log()).expand(rows, -1).contiguous()
    return program


@pytest.mark.parametrize("vectorized", [False, True])
def test_loss_values_are_the_standard_ones_on_the_same_draws(vectorized):
    program, particles = PerDatapoint(rows=50), 3
    options = dict(num_particles=particles, vectorize_particles=vectorized, max_plate_nesting=1)
    pairs = ((Trace_ELBO(**options), STLTrace_ELBO(**options)),
             (RenyiELBO(alpha=0, **options), DReGRenyi_ELBO(**options)))
    for standard, ours in pairs:
        want, _ = row_gradients(standard, program, seed=5)
        got, _ = row_gradients(ours, program, seed=5)
        assert got == pytest.approx(want, rel=1e-6)
        pyro.clear_param_store()
        pyro.set_rng_seed(5)
        assert ours.loss(program.model, program.guide, program.x) == pytest.approx(want, rel=1e-6)


def test_stl_is_unbiased_and_lowers_the_encoder_variance():
    """Mean of 20,000 draws: the closed-form ELBO gradient, for Trace_ELBO and STL alike; STL's encoder variance lower.

    Measured (CPU, 20,000 draws): encoder-gradient variance ratio STL / standard 0.81 (loc) and 0.80 (log-scale)
    with the guide 0.3 off the posterior mean and scale 0.8; 0.006 and 0.003 at the best diagonal Gaussian (STL's
    variance vanishes as q approaches the posterior, the score term's does not); 0.99 for the model's bias.
    """
    program = PerDatapoint(rows=20000)
    exact = {name: program.init[name].clone().requires_grad_() for name in NAMES}
    grads = torch.autograd.grad(-program.exact_elbo(**exact).sum(), list(exact.values()))
    exact_rows = dict(zip(NAMES, grads))  # identical rows: zero standard error
    _, standard = row_gradients(Trace_ELBO(max_plate_nesting=1), program, seed=1)
    _, stl = row_gradients(STLTrace_ELBO(max_plate_nesting=1), program, seed=2)
    assert_same_mean(standard, exact_rows)
    assert_same_mean(stl, exact_rows)
    for name in ("loc", "log_scale"):
        assert stl[name].var(0).sum() < 0.9 * standard[name].var(0).sum()
    # The model's own parameter has no score term: the same estimator, the same variance (within sampling error).
    assert float(stl["bias"].var(0).sum()) == pytest.approx(float(standard["bias"].var(0).sum()), rel=0.1)

    best = optimal_diagonal(PerDatapoint(rows=20000))
    _, standard = row_gradients(Trace_ELBO(max_plate_nesting=1), best, seed=3)
    _, stl = row_gradients(STLTrace_ELBO(max_plate_nesting=1), best, seed=4)
    for name in ("loc", "log_scale"):
        assert stl[name].var(0).sum() < 0.05 * standard[name].var(0).sum()


def snr(rows: torch.Tensor) -> float:
    """The signal-to-noise ratio |E g| / sd(g) of a gradient estimator, averaged over its components."""
    return float((rows.mean(0).abs() / rows.std(0)).mean())


def test_dreg_is_unbiased_and_its_encoder_snr_does_not_decay_with_k():
    """Rainforth et al. (2018): the IWAE encoder gradient's SNR decays like 1/sqrt(K); DReG's does not.

    Measured (CPU, 2,000 draws): loc SNR standard 0.38 (K=1) -> 0.014 (K=100), DReG 0.51 -> 0.55; log-scale SNR
    standard 0.59 -> 0.054, DReG 0.67 -> 1.81.
    """
    ratios = {}
    for k in (1, 100):
        program = PerDatapoint(rows=2000)
        options = dict(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1)
        _, standard = row_gradients(RenyiELBO(alpha=0, **options), program, seed=10 + k)
        _, dreg = row_gradients(DReGRenyi_ELBO(**options), program, seed=20 + k)
        assert_same_mean(standard, dreg)
        ratios[k] = {name: (snr(standard[name]), snr(dreg[name])) for name in ("loc", "log_scale")}
    for name in ("loc", "log_scale"):
        (standard_1, dreg_1), (standard_100, dreg_100) = ratios[1][name], ratios[100][name]
        assert standard_100 < 0.3 * standard_1, (name, ratios)
        assert dreg_100 > 0.8 * dreg_1, (name, ratios)
        assert dreg_100 > 3 * standard_100, (name, ratios)


def test_svi_trains_with_them():
    program = PerDatapoint(rows=20)
    for loss in (make_gradient_objective("stl", "elbo"), make_gradient_objective("dreg", "iwae", particles=5)):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        svi = pyro.infer.SVI(program.model, program.guide, pyro.optim.Adam({"lr": 0.05}), loss)
        losses = [svi.step(program.x) for _ in range(30)]
        assert all(math.isfinite(v) for v in losses)
        assert sum(losses[-5:]) < sum(losses[:5])


def test_wrong_pairs_and_unknown_names_are_refused():
    check_gradient("standard", "meanfield")
    check_gradient("stl", "elbo")
    check_gradient("dreg", "iwae")
    for gradient, objective, words in (("stl", "iwae", "biased"), ("dreg", "elbo", "--gradient stl"),
                                       ("dreg", "meanfield", "--objective iwae only"), ("sf", "elbo", "unknown")):
        with pytest.raises(PplVaeError, match=words) as caught:
            check_gradient(gradient, objective)
        assert "\n" not in str(caught.value)


def bernoulli_program():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("switch", dist.Bernoulli(0.5 * torch.ones(x.shape[0])))
            pyro.sample("obs", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        p = pyro.param("p", torch.tensor(0.3))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("switch", dist.Bernoulli(p.expand(x.shape[0])))

    return model, guide


def dropout_program():
    encoder = torch.nn.Dropout(0.5)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0]), 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(x.shape[0]))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(encoder(loc + x), 1.0))

    return model, guide


@pytest.mark.parametrize("gradient,objective", [("stl", "elbo"), ("dreg", "iwae")])
@pytest.mark.parametrize("make,words", [(bernoulli_program, "'switch' \\(Bernoulli\\) is not reparameterized"),
                                         (dropout_program, "randomness of its own")])
def test_programs_they_cannot_train_are_refused_in_one_line(gradient, objective, make, words):
    pyro.clear_param_store()
    model, guide = make()
    loss = make_gradient_objective(gradient, objective, particles=2)
    with pytest.raises(ModelStructureError, match=words) as caught:
        loss.loss(model, guide, torch.randn(8) + 1)
    assert "\n" not in str(caught.value)


def test_up_front_check_reads_the_program_structure():
    from ppl_vae.inspection import inspect_program

    model, guide = bernoulli_program()
    pyro.clear_param_store()
    structure = inspect_program(model, guide, (torch.randn(8),))
    check_gradient_sites("standard", structure)
    with pytest.raises(ModelStructureError, match="'switch'"):
        check_gradient_sites("dreg", structure)
    enumerated = types.SimpleNamespace(enumerated={"y": "parallel"}, non_reparameterized={"y": "Categorical"})
    with pytest.raises(ModelStructureError, match="'y' is enumerated"):
        check_gradient_sites("stl", enumerated)


class ShiftedExactGuide:
    """The two-layer model's exact bottom-up guide q(z1 | x) q(z2 | z1), with per-datapoint mean shifts (zero here).

    Every importance weight is p(x), whatever z: the pathwise gradient of log w is zero on every draw, provided the
    dependence of q(z2 | z1)'s mean on the drawn z1 is kept as path (and only the parameters are held fixed).
    """

    def __init__(self, rows: int, shift: tuple[float, float] = (0.0, 0.0)):
        from tests.structured_models import TwoLayerGaussian

        self.m = TwoLayerGaussian()
        self.x = self.m.sample(1).expand(rows, -1).contiguous()
        self.init = {"shift1": torch.full((rows, self.m.z1_dim), shift[0], dtype=torch.float64),
                     "shift2": torch.full((rows, self.m.z2_dim), shift[1], dtype=torch.float64)}

    def guide(self, x):
        mu1, sigma1 = self.m.z1_posterior(x)
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.MultivariateNormal(mu1 + pyro.param("shift1", self.init["shift1"].clone), sigma1))
            mu2, sigma2 = self.m.z2_given_z1(z1)
            pyro.sample("z2", dist.MultivariateNormal(mu2 + pyro.param("shift2", self.init["shift2"].clone), sigma2))

    def gradients(self, elbo, seed: int = 0) -> torch.Tensor:
        """The rows of the gradient with respect to both shifts (one row per datapoint, an independent draw each)."""
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        elbo.loss_and_grads(self.m.model, self.guide, self.x)
        return torch.cat([pyro.param(name).unconstrained().grad for name in ("shift1", "shift2")], -1)


def test_at_the_exact_hierarchical_posterior_stl_and_dreg_gradients_vanish_on_every_draw():
    program = ShiftedExactGuide(rows=500)
    standard = program.gradients(Trace_ELBO(max_plate_nesting=1))
    assert standard.std(0).min() > 0.1  # the score term: noise, zero mean
    for elbo in (STLTrace_ELBO(max_plate_nesting=1),
                 DReGRenyi_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)):
        assert program.gradients(elbo).abs().max() < 1e-9


def test_on_a_wrong_hierarchical_guide_stl_and_dreg_keep_the_standard_mean():
    """Off the posterior (shifted means), where the gradients are not zero: the same means as Trace_ELBO's and
    RenyiELBO's over 4,000 draws -- the path through q(z2 | z1)'s dependence on z1 is counted once, not dropped."""
    program = ShiftedExactGuide(rows=4000, shift=(0.4, -0.3))

    def rows(elbo, seed):
        return {"shift": program.gradients(elbo, seed)}

    assert_same_mean(rows(Trace_ELBO(max_plate_nesting=1), 1), rows(STLTrace_ELBO(max_plate_nesting=1), 2))
    options = dict(num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    standard, dreg = rows(RenyiELBO(alpha=0, **options), 3), rows(DReGRenyi_ELBO(**options), 4)
    assert_same_mean(standard, dreg)
    assert standard["shift"].mean(0).abs().max() > 10 * standard["shift"].std(0).max() / 4000 ** 0.5  # not zero


@pytest.mark.parametrize("guide", ["diagonal", "iaf"])
def test_the_built_in_vae_trains_with_them_as_a_torch_module(guide):
    """Through ProgramLoss (Pyro's ELBOModule, the torch-optimizer path): the loss values are Trace_ELBO's / RenyiELBO's
    on the same draws, with the KL weight too, and the gradients reach every parameter. The IAF guide's density at a
    detached draw needs the flow's inverse: the check of the second run covers it."""
    from ppl_vae.model import VAE, VAEConfig
    from ppl_vae.objectives import ProgramLoss
    from ppl_vae.programs import Weighted

    vae = VAE(VAEConfig(data_dim=12, latent_dim=3, hidden_sizes=(8,), guide=guide))
    x = torch.bernoulli(torch.full((9, 12), 0.4))
    for ours, standard, beta in ((STLTrace_ELBO(max_plate_nesting=1), Trace_ELBO(max_plate_nesting=1), 0.5),
                                 (make_gradient_objective("dreg", "iwae", particles=4),
                                  RenyiELBO(alpha=0, num_particles=4, vectorize_particles=True, max_plate_nesting=1),
                                  1.0)):
        program = Weighted(vae, kl_weight=beta)  # the one KL-weight mechanism, for any program
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        want = standard.loss(program.model, program.guide, x)
        program.register_params = False  # a torch-module loss takes the parameters from the module
        loss = ProgramLoss(program, ours)
        pyro.set_rng_seed(1)
        value = loss(x)
        assert float(value.detach()) == pytest.approx(want, rel=1e-5)
        vae.zero_grad()
        value.backward()
        grads = [p.grad for p in vae.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_batchnorm_with_running_statistics_is_refused_up_front():
    program = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    check_gradient_program("standard", program)
    check_gradient_program("stl", torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3)))
    with pytest.raises(ModelStructureError, match="BatchNorm layer '1'") as caught:
        check_gradient_program("dreg", program)
    assert "\n" not in str(caught.value)
