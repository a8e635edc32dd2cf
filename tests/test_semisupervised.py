"""Semi-supervised M2 (issue 26, items 3 and 5): the built-in program, the classifier term, labelled subsets and
batches, the classifier's test error."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.optim import Adam
from torch import nn

from ppl_vae import objectives
from ppl_vae.data.labelled import choose_labelled, labelled_batch_count, labelled_record, labelled_scale, \
    semi_supervised_batches
from ppl_vae.errors import InvalidDataError, ModelStructureError
from ppl_vae.inspection import inspect_program
from ppl_vae.models.m2 import M2
from ppl_vae.programs import ProgramSpec, Weighted, build_program
from ppl_vae.summary import evaluation_summary
from ppl_vae.semisupervised import CLASSIFIER_SITE, SemiSupervised, classification_error, classifier_weight, \
    label_distribution

D, C = 12, 3


def toy(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary images of 3 classes, each class lighting its own third of the pixels (mostly)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    probs = torch.full((n, D), 0.05)
    for c in range(C):
        probs[y == c, c * D // C:(c + 1) * D // C] = 0.95
    return torch.bernoulli(probs, generator=g), y


def small_m2() -> M2:
    return build_program(ProgramSpec("m2", kwargs={"hidden_sizes": [16], "latent_dim": 2}),
                         data_info={"data_dim": D, "num_classes": C})


def test_the_builtin_m2_enumerates_y_unlabelled_and_observes_it_labelled():
    program, (x, y) = small_m2(), toy(9)
    assert isinstance(program, M2) and program.num_classes == C and program.classifier[0].in_features == D
    assert isinstance(program.classifier[1], nn.Softplus)
    unlabelled = inspect_program(program.model, program.guide, (x,))
    assert unlabelled.enumerated == {"y": "parallel"} and unlabelled.quantity == "log p(x)"
    labelled = inspect_program(program.model, program.guide, (x, y))
    assert labelled.enumerated == {} and labelled.quantity == "log p(x, y)" and labelled.latent_sites == ["z"]
    default = M2()
    assert [m.out_features for m in default.classifier if isinstance(m, nn.Linear)] == [500, 500, 10]
    assert default.latent_dim == 50


def test_the_classifier_term_is_weight_times_log_q_y_given_x_on_labelled_batches_only():
    torch.manual_seed(0)
    program, (x, y) = small_m2(), toy(9)
    weight = classifier_weight(num_labelled=30, num_train=600)
    assert weight == pytest.approx(0.1 * 600 / 30)
    trained = SemiSupervised(program, weight)
    for particles in (1, 3):
        elbo = objectives.make_objective("elbo", particles, 1, enumerated=True)
        with objectives.fixed_standard_normal():
            plain = elbo.differentiable_loss(program.model, program.guide, x, y)
            with_term = elbo.differentiable_loss(trained.model, trained.guide, x, y)
            unlabelled = elbo.differentiable_loss(trained.model, trained.guide, x)
            unlabelled_plain = elbo.differentiable_loss(program.model, program.guide, x)
        log_q = torch.log_softmax(program.classifier(x), -1).gather(1, y[:, None]).sum()
        assert torch.allclose(with_term, plain - weight * log_q, rtol=1e-5), particles
        assert torch.allclose(unlabelled, unlabelled_plain, rtol=1e-6)
    grad = torch.autograd.grad(with_term, program.classifier[0].weight)[0]
    assert grad.abs().sum() > 0
    assert torch.autograd.grad(plain, program.classifier[0].weight, allow_unused=True)[0] is None


def test_label_distribution_is_the_guides_q_y_and_a_missing_site_is_one_line():
    program, (x, _) = small_m2(), toy(5)
    q = label_distribution(program.guide, (x,), "y")
    assert torch.allclose(q.logits, torch.log_softmax(program.classifier(x), -1), atol=1e-6)
    with pytest.raises(ModelStructureError, match="the guide has no sample site 'digit' when run on x alone"):
        label_distribution(program.guide, (x,), "digit")
    assert pyro.poutine.runtime._PYRO_STACK == []


class LinearClassifier(nn.Module):
    """A program whose q(y | x) has logits x W: its predictions are known."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(weights)

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=torch.zeros(C)), obs=y)
            pyro.sample("x", dist.Normal(y.unsqueeze(-1).float().expand(*y.shape, D), 1.0).to_event(1), obs=x)

    def guide(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            if y is None:
                pyro.sample("y", dist.Categorical(logits=x @ self.w), infer={"enumerate": "parallel"})


def test_classification_error_counts_the_most_probable_class_with_its_standard_error():
    x, y = toy(30)
    program = LinearClassifier(torch.randn(D, C, generator=torch.Generator().manual_seed(3)))
    error, stderr = classification_error(program, x, y, batch_size=7)
    expected = float(((x @ program.w).argmax(-1) != y).float().mean())
    assert error == pytest.approx(expected) and stderr == pytest.approx(math.sqrt(expected * (1 - expected) / 30))
    perfect = torch.zeros(D, C)
    for c in range(C):
        perfect[c * D // C:(c + 1) * D // C, c] = 1.0
    assert classification_error(LinearClassifier(perfect), x, y)[0] < expected or expected == 0
    with pytest.raises(InvalidDataError, match="29 labels for 30 images"):
        classification_error(program, x, y[:29])


def test_m2_learns_a_classifier_from_a_few_labels_with_the_batches_and_the_term():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x, y = toy(300)
    labelled = choose_labelled(y, 15, seed=0)
    program = small_m2()
    trained = Weighted(SemiSupervised(program, classifier_weight(15, 300)))
    svi = SVI(trained.model, trained.guide, Adam({"lr": 1e-2}), objectives.make_objective("elbo", 1, 1, enumerated=True))
    before = classification_error(program, x, y)[0]
    generator = torch.Generator().manual_seed(0)
    for _ in range(15):
        for batch in semi_supervised_batches(x, y, labelled, 50, generator):
            assert math.isfinite(svi.step(*batch))
    after, stderr = classification_error(program, x, y)
    assert after < 0.2 and after < before, (before, after)


def test_labelled_subsets_are_balanced_deterministic_and_recorded():
    _, y = toy(90)
    first = choose_labelled(y, 12, seed=4)
    assert torch.equal(first, choose_labelled(y, 12, seed=4))
    assert not torch.equal(first, choose_labelled(y, 12, seed=5))
    assert torch.bincount(y[first], minlength=C).tolist() == [4, 4, 4]
    assert first.unique().numel() == 12 and torch.equal(first, first.sort().values)
    assert labelled_record(first, 4) == {"count": 12, "seed": 4, "indices": first.tolist()}


@pytest.mark.parametrize("count, message", [
    (10, "--labelled 10 is not divisible by the 3 classes"),
    (93, "the training split has only 90 images"),
    (0, "--labelled must be a positive integer"),
])
def test_a_labelled_count_that_cannot_be_balanced_is_one_line(count, message):
    _, y = toy(90)
    with pytest.raises(InvalidDataError) as refused:
        choose_labelled(y, count, seed=0)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_class_with_too_few_images_is_refused():
    y = torch.tensor([0] * 10 + [1] * 10 + [2] * 2)
    with pytest.raises(InvalidDataError, match="needs 4 images of class 2, and the training split has 2"):
        choose_labelled(y, 12, seed=0)


def test_an_epoch_of_batches_visits_every_image_once_with_labels_only_where_kept():
    x, y = toy(90)
    x = torch.cat([torch.arange(90.0)[:, None], x], 1)  # column 0: the image's index
    labelled = choose_labelled(y, 12, seed=0)
    batches = list(semi_supervised_batches(x, y, labelled, 10, torch.Generator().manual_seed(0)))
    seen_labelled = torch.cat([b[0][:, 0] for b in batches if len(b) == 2]).long()
    seen_plain = torch.cat([b[0][:, 0] for b in batches if len(b) == 1]).long()
    assert torch.equal(seen_labelled.sort().values, labelled)
    assert torch.equal(torch.cat([seen_labelled, seen_plain]).sort().values, torch.arange(90))
    assert all(torch.equal(b[1], y[b[0][:, 0].long()]) for b in batches if len(b) == 2)
    kinds = [len(b) for b in batches]
    assert len(batches) == 8 + 2 and kinds[0] == 1 and kinds[-1] == 1  # spread, not all at the start or end


def test_the_classifier_site_is_absent_from_the_program_that_is_evaluated():
    program, (x, y) = small_m2(), toy(6)
    trace = pyro.poutine.trace(SemiSupervised(program, 1.0).model).get_trace(x, y)
    assert CLASSIFIER_SITE in trace.nodes and trace.nodes[CLASSIFIER_SITE]["scale"] == 1.0
    assert CLASSIFIER_SITE not in pyro.poutine.trace(program.model).get_trace(x, y).nodes
    assert TraceEnum_ELBO  # used above


def test_m2_evaluates_with_y_summed_and_its_training_loss_compiles_where_checked_equal():
    program, (x, y) = small_m2(), toy(12)
    summary = evaluation_summary(program.model, program.guide, x, num_samples=20, elbo_samples=3)
    assert summary["quantity"] == "log p(x)" and summary["kl"]["sites"]["y"]["enumerated"] is True
    assert summary["kl"]["sites"]["y"]["method"] == "analytic" and "enumerated" not in summary["kl"]["sites"]["z"]
    assert summary["elbo"]["mean"] <= summary["log_evidence"]["mean"]
    trained = Weighted(SemiSupervised(program, 2.0))
    for batch in [(x,), (x, y)]:  # an unlabelled and a labelled batch: two compile keys
        pyro.clear_param_store()
        flipped = tuple(value.flip(0) for value in batch)
        assert objectives.compiled_loss_problem(trained, batch, 1, 1, enumerated=True, second_batch=flipped) is None


def test_cycling_the_labelled_set_weights_each_labelled_batch_so_an_epoch_counts_each_image_once():
    x, y = toy(90)
    labelled = choose_labelled(y, 12, seed=0)  # 12 labelled images, batches of 4: 3 batches visit each once
    assert labelled_scale(12, 4) == 1.0 and labelled_batch_count(12, 4) == 3
    batches = list(semi_supervised_batches(x, y, labelled, 4, torch.Generator().manual_seed(0), labelled_batches=9))
    with_labels = [b for b in batches if len(b) == 2]
    assert len(with_labels) == 9 and len(batches) == 9 + math.ceil(78 / 4)
    scale = labelled_scale(12, 4, labelled_batches=9)
    assert scale == pytest.approx(12 / 36)  # each labelled image visited 3 times per epoch
    with pytest.raises(InvalidDataError, match="labelled batches per epoch must be an integer of at least 3"):
        labelled_scale(12, 4, labelled_batches=2)
    torch.manual_seed(0)
    program, (xb, yb) = small_m2(), toy(6)
    elbo = objectives.make_objective("elbo", 1, 1, enumerated=True)
    with objectives.fixed_standard_normal():
        once = elbo.differentiable_loss(*_programs(SemiSupervised(program, 2.0)), xb, yb)
        cycled = elbo.differentiable_loss(*_programs(SemiSupervised(program, 2.0, labelled_scale=scale)), xb, yb)
        unlabelled = [elbo.differentiable_loss(*_programs(SemiSupervised(program, 2.0, labelled_scale=s)), xb)
                      for s in (1.0, scale)]
    assert torch.allclose(cycled, scale * once, rtol=1e-5)
    assert torch.allclose(unlabelled[0], unlabelled[1])  # unlabelled batches are never scaled


def _programs(wrapper):
    return wrapper.model, wrapper.guide
