"""Diagnostics of enumerated programs are of the quantities the evaluation reports (issue 26, item 2's leftovers):
the evaluation sums the guide's enumerated discrete sites exactly, so the diagnostics do too -- a site's KL per
dimension is sum_y q(y | x) KL(q(z | x, y) || p(z)) (and sums to the site's KL term), its active units are those
of the exact mixture mean E_q[z | x] = sum_y q(y | x) E_q[z | x, y], and PSIS's k-hat is of the evaluation's
weights W_k = sum_y p(x, y, z_k^(y)) / q(z_k^(y) | x, y). Diagnostics of the mixture q(z | x) itself (ELBO surgery,
total correlation) are refused in one line naming why."""

import pytest
import torch
from test_enumeration_evaluation import Mixture, data
from torch.distributions import Normal, kl_divergence

from ppl_vae import cli, runs
from ppl_vae.diagnostics import active_units, diagnostics_summary, evidence_with_psis, kl_per_dimension
from ppl_vae.evaluate import elbo_decomposition
from ppl_vae.models.m2 import M2
from ppl_vae.modes import evaluation_mode


@pytest.fixture
def m2():
    torch.manual_seed(0)
    program = M2(hidden_sizes=(8,), latent_dim=3, num_classes=4)
    with evaluation_mode(program):
        yield program


@pytest.fixture
def x():
    return torch.bernoulli(torch.full((6, 784), 0.3, dtype=torch.float32), generator=torch.Generator().manual_seed(2))


def by_hand(program: M2, x: torch.Tensor):
    """q(y | x) [N, C], and loc, scale of q(z | x, y) for every class y: [C, N, Z] each."""
    q_y = torch.softmax(program.classifier(x), -1)
    onehots = torch.eye(program.num_classes)[:, None].expand(-1, x.shape[0], -1)
    loc, scale = program.encoder(torch.cat([x.expand(program.num_classes, -1, -1), onehots], -1))
    return q_y.detach(), loc.detach(), scale.detach()


def test_the_kl_per_dimension_takes_the_enumerated_site_exactly_and_sums_to_the_evaluations_kl_term(m2, x):
    q_y, loc, scale = by_hand(m2, x)
    kl_d = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0))  # [C, N, Z]
    expected = (q_y.T[:, :, None] * kl_d).sum(0).mean(0)  # (1/N) sum_n sum_y q(y | x_n) KL_d
    diagnosed = kl_per_dimension(m2.model, m2.guide, x, site="z")
    assert torch.allclose(diagnosed, expected.double(), rtol=1e-5, atol=1e-7)
    decomposition = elbo_decomposition(m2.model, m2.guide, x, num_samples=2)
    assert float(diagnosed.sum()) == pytest.approx(float(decomposition["kl"]["z"].mean()), rel=1e-5)


def test_active_units_are_those_of_the_exact_mixture_mean(m2, x):
    q_y, loc, _ = by_hand(m2, x)
    mean = (q_y.T[:, :, None] * loc).sum(0)  # E_q[z | x] = sum_y q(y | x) E_q[z | x, y]: [N, Z]
    result = active_units(m2.model, m2.guide, x, site="z", threshold=0.0)
    assert torch.allclose(result["activity"], mean.double().var(0), rtol=1e-5, atol=1e-9)
    assert result["num_active"] == 3


def test_the_mixtures_aggregate_diagnostics_are_refused_naming_the_enumerated_site(m2, x):
    sites = diagnostics_summary(m2.model, m2.guide, x)["sites"]
    for key in ("elbo_surgery", "total_correlation"):
        assert sites["z"][key]["unavailable"].startswith(
            "site 'z': its guide depends on the enumerated site(s) ['y'], so q(z | x) is the mixture")
    assert sites["z"]["collapse"]["total_kl"] == pytest.approx(float(kl_per_dimension(m2.model, m2.guide, x, site="z").sum()))


def test_a_discrete_site_with_an_enumerated_parent_gets_its_kl_term_exactly():
    # y2 | y1: KL(q(y2 | x, y1) || p(y2)) depends on y1, summed with q(y1 | x) as the evaluation does.
    program = Mixture((3, 2))
    x = data()
    sites = diagnostics_summary(program.model, program.guide, x)["sites"]
    decomposition = elbo_decomposition(program.model, program.guide, x, num_samples=2)
    for name in ("y1", "y2"):
        assert sites[name]["kl"]["mean"] == pytest.approx(float(decomposition["kl"][name].mean()), rel=1e-9)


@pytest.mark.parametrize("q_seed", [0, 5])
def test_psis_is_of_the_enumerated_weights(q_seed):
    # With the exact q(z | x, y) every enumerated weight W_k is p(x): constant rows (k-hat -inf, no tail), log p(x)
    # exactly, whatever q(y | x) is; weights with y drawn from q(y | x) would vary (a finite k-hat).
    x = data(n=5)
    program = Mixture((3,))
    with torch.no_grad():
        program.q_weight.copy_(5 * torch.randn(3, 3, generator=torch.Generator().manual_seed(q_seed), dtype=torch.float64))
    evidence, psis = evidence_with_psis(program.model, program.guide, x, num_samples=30)
    exact = program.log_px(x).detach()
    assert torch.allclose(psis["log_evidence"], exact, atol=1e-6) and torch.allclose(evidence.log_evidence, exact, atol=1e-6)
    assert torch.isneginf(psis["khat"]).all() and psis["unreliable_share"] == 0
    _, drawn = evidence_with_psis(program.model, Mixture((3,), mark=False).guide, x, num_samples=30)
    assert torch.isfinite(drawn["khat"]).any()


def test_evaluate_and_diagnose_of_an_enumerated_run_report_the_kl_term_the_evaluation_sums(tmp_path, data_root, capsys):
    run = tmp_path / "m2"
    assert cli.main(["train", "--program", "m2", "--program-kwargs", '{"hidden_sizes": [8], "latent_dim": 2}',
                     "--labelled", "10", "--epochs", "1", "--batch-size", "50", "--train-examples", "100",
                     "--eval-examples", "20", "--test-samples", "2", "--device", "cpu", "--no-progress",
                     "--engine", "svi", "--data-dir", str(data_root), "--run-dir", str(run)]) == 0
    assert cli.main(["evaluate", str(run), "-k", "25", "--examples", "20", "--no-progress"]) == 0
    evaluation = runs.read_json(run / "evaluation.json")
    collapse = evaluation["diagnostics"]["sites"]["z"]["collapse"]
    assert collapse["total_kl"] == pytest.approx(evaluation["kl"]["sites"]["z"]["mean"], rel=1e-5)
    capsys.readouterr()
    assert cli.main(["diagnose", str(run)]) == 0
    out = capsys.readouterr().out
    assert str(run / "plots" / "kl_per_dimension_z.png") in out and str(run / "plots" / "khat.png") in out
    assert "site 'z': ELBO surgery: not available (site 'z': its guide depends on the enumerated site(s)" in out
