"""Semi-supervised training wired into the trainer, the CLI and evaluate (issue 26, items 3-4 of the wiring):
``--program m2 --labelled N`` (balanced labelled set from the seed, recorded in data.json; labelled batches observe
y, unlabelled ones sum it out; the classifier term), any user program with the ``model(x, y=None)`` convention,
exact resume, and the classifier's test error in test.json, evaluation.json and the printed table."""

import dataclasses
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ppl_vae import cli, runs
from ppl_vae.data.labelled import choose_labelled
from ppl_vae.errors import ModelStructureError, PplVaeError
from ppl_vae.semisupervised import SemiSupervised, classification_error, classifier_weight
from ppl_vae.train import TrainConfig, load_run, train
from ppl_vae.training.semi import batch_counts, semi_supervised_epoch, steps_per_epoch

M2_SMALL = '{"hidden_sizes": [16], "latent_dim": 2}'


def small_cli(small_data_root) -> list[str]:
    return ["--batch-size", "50", "--train-examples", "200", "--eval-examples", "30", "--test-samples", "2",
            "--device", "cpu", "--no-progress", "--data-dir", str(small_data_root)]


def tiny(small_data_root, **overrides) -> TrainConfig:
    settings = dict(epochs=1, batch_size=50, data_dir=str(small_data_root), train_examples=200, eval_examples=30,
                    test_samples=2, device="cpu", labelled=20, engine="svi")
    return TrainConfig(**{**settings, **overrides})


class UserM2(nn.Module):
    """A user's own semi-supervised program with the model(x, y=None) / guide(x, y=None) convention, its label site
    named ``digit`` and (unless ``mark``) not marked for enumeration."""

    def __init__(self, mark: bool = True, classes: int = 10, latent: int = 2, hidden: int = 8):
        super().__init__()
        self.mark, self.classes, self.latent = mark, classes, latent
        self.classify = nn.Linear(784, classes)
        self.encode = nn.Linear(784 + classes, 2 * latent)
        self.decode = nn.Sequential(nn.Linear(latent + classes, hidden), nn.Tanh(), nn.Linear(hidden, 784))

    def model(self, x, digit=None):
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("digit", dist.Categorical(logits=x.new_zeros(self.classes)), obs=digit)
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            onehot = F.one_hot(y, self.classes).to(x.dtype)
            shape = torch.broadcast_shapes(z.shape[:-1], onehot.shape[:-1])
            logits = self.decode(torch.cat([z.expand(*shape, -1), onehot.expand(*shape, -1)], -1))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x, digit=None):
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            if digit is None:
                infer = {"enumerate": "parallel"} if self.mark else {}
                digit = pyro.sample("digit", dist.Categorical(logits=self.classify(x)), infer=infer)
            onehot = F.one_hot(digit, self.classes).to(x.dtype)
            shape = torch.broadcast_shapes(onehot.shape[:-1], x.shape[:-1])  # enumerated values: [C, 1] by [N]
            loc, raw = self.encode(torch.cat([x.expand(*shape, -1), onehot.expand(*shape, -1)], -1)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-3).to_event(1))


def test_m2_trains_from_the_cli_with_a_balanced_recorded_labelled_set_and_reports_its_classifier(
        tmp_path, small_data_root, capsys):
    run = tmp_path / "m2"
    args = ["train", "--program", "m2", "--program-kwargs", M2_SMALL, "--labelled", "20", "--labelled-batches", "3",
            "--epochs", "1", *small_cli(small_data_root), "--run-dir", str(run)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    record = runs.read_json(run / "data.json")["labelled"]
    program, config = load_run(run)
    from ppl_vae.data import load_run_data
    data = load_run_data(config["train"], None, torch.device("cpu"))
    labels = data.labels("train")[:200]  # --train-examples 200: the first 200
    assert record["count"] == 20 and record["seed"] == 0
    assert record["indices"] == choose_labelled(labels, 20, seed=0).tolist()
    assert torch.bincount(labels[record["indices"]], minlength=10).tolist() == [2] * 10  # balanced per class
    assert config["train"]["labelled"] == 20 and config["train"]["labelled_batches"] == 3
    test = runs.read_json(run / "test.json")
    expected = classification_error(program, data.test[:30], data.labels("test")[:30])  # --eval-examples 30
    assert (test["classification_error"], test["classification_error_stderr"]) == pytest.approx(expected)
    assert test["objective"] == "TraceEnum_ELBO, 1 particle, semi-supervised: 20 labels, alpha 0.1 N"
    assert f"Classifier error from q(y | x): {100 * expected[0]:.2f}%" in out
    assert cli.main(["evaluate", str(run), "-k", "2", "--examples", "30", "--no-progress"]) == 0
    evaluated = runs.read_json(run / "evaluation.json")
    assert evaluated["classification_error"] == pytest.approx(expected[0]) and evaluated["label_site"] == "y"
    assert "Classifier error from q(y | x)" in capsys.readouterr().out


def test_an_epoch_has_labelled_batches_observing_the_kept_labels_and_unlabelled_batches_of_the_rest(mnist):
    config = TrainConfig(batch_size=50, labelled=20, labelled_batches=3, train_examples=200)
    data = dataclasses.replace(mnist, train=mnist.train[:200], train_labels=mnist.train_labels[:200])
    kept = choose_labelled(data.train_labels, 20, seed=0)
    batches = list(semi_supervised_epoch(data, config, torch.Generator().manual_seed(1)))
    labelled = [b for b in batches if len(b) == 2]
    unlabelled = [b for b in batches if len(b) == 1]
    assert len(batches) == steps_per_epoch(data, config) == 4 + 3
    assert len(labelled) == 3 and sum(b[0].shape[0] for b in unlabelled) == 180
    for x, y in labelled:
        assert set(y.tolist()) <= set(data.train_labels[kept].tolist()) and x.shape[0] == 20
    # The epoch's mean objective counts each training image once: the cycled labelled batches at their weight.
    assert sum(batch_counts(config)(b) for b in batches) == pytest.approx(200)
    for batch in batches:  # dynamic binarization: a fresh Bernoulli draw of every image
        assert ((batch[0] == 0) | (batch[0] == 1)).all()


def test_semi_supervised_training_resumes_exactly(tmp_path, small_data_root):
    config = tiny(small_data_root, epochs=2, labelled_batches=2)
    from ppl_vae.programs import ProgramSpec

    spec = ProgramSpec.parse("m2", M2_SMALL)
    train(tmp_path / "straight", config, program=spec, progress=False)
    train(tmp_path / "resumed", tiny(small_data_root, epochs=1, labelled_batches=2), program=spec, progress=False)
    train(tmp_path / "resumed", TrainConfig(epochs=2), resume=True, progress=False)
    straight = runs.load_checkpoint(tmp_path / "straight")["model"]
    resumed = runs.load_checkpoint(tmp_path / "resumed")["model"]
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert runs.read_json(tmp_path / "resumed" / "data.json")["labelled"] == \
        runs.read_json(tmp_path / "straight" / "data.json")["labelled"]


def test_a_users_program_with_the_convention_trains_the_same_way_with_the_classifier_term(tmp_path, small_data_root):
    program = UserM2()
    before = program.classify.weight.detach().clone()
    result = train(tmp_path / "run", tiny(small_data_root, label_site="digit", alpha=5.0), program=program, progress=False)
    assert result["label_site"] == "digit" and 0 <= result["classification_error"] <= 1
    assert not torch.equal(before, program.classify.weight)  # q(digit | x) trained


def test_the_trained_objective_adds_alpha_over_n_labelled_times_log_q_on_labelled_batches():
    program, x, y = UserM2(), torch.bernoulli(torch.full((4, 784), 0.2)), torch.tensor([0, 3, 3, 9])
    weight = classifier_weight(20, 200, 5.0)
    assert weight == pytest.approx(5.0 / 20)
    trained = SemiSupervised(program, weight, "digit")
    trace = pyro.poutine.trace(trained.model).get_trace(x, y)
    log_q = torch.log_softmax(program.classify(x), -1).gather(1, y[:, None]).sum()
    site = trace.nodes["_ppl_vae_classifier"]
    assert site["scale"] == pytest.approx(weight)
    assert torch.allclose(site["fn"].log_prob(y), log_q, atol=1e-5)


def test_a_label_site_that_is_drawn_is_refused_naming_enumerate_which_then_trains(tmp_path, small_data_root):
    with pytest.raises(ModelStructureError, match="label site 'digit' is not marked for enumeration.*give --enumerate"):
        train(tmp_path / "drawn", tiny(small_data_root, label_site="digit"), program=UserM2(mark=False), progress=False)
    assert not (tmp_path / "drawn").exists()
    result = train(tmp_path / "marked", tiny(small_data_root, label_site="digit", enumerate=True), program=UserM2(mark=False),
                   progress=False)
    assert math.isfinite(result["elbo"]["mean"]) and "classification_error" in result


@pytest.mark.parametrize("overrides, message", [
    (dict(label_site="label"), "label site 'label' is not among its latent sites"),
    (dict(labels=True), "--labels passes every image's label and --labelled keeps only N"),
    (dict(labelled=None, alpha=1.0), "--alpha and --labelled-batches apply to semi-supervised training"),
    (dict(labelled=25), "--labelled 25 is not divisible by the 10 classes"),
])
def test_semi_supervised_settings_that_cannot_work_are_one_line(tmp_path, small_data_root, overrides, message):
    with pytest.raises(PplVaeError, match=message) as refused:
        train(tmp_path / "run", tiny(small_data_root, **overrides), program=UserM2(), progress=False)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "run").exists()


def test_a_program_without_the_label_argument_is_refused_for_labelled_batches(tmp_path, small_data_root):
    from discrete_models import M2

    with pytest.raises(PplVaeError, match="--labelled: labelled batches pass \\(x, y\\)"):
        train(tmp_path / "run", tiny(small_data_root), program=M2(classes=10, enumerate=True), progress=False)
    assert not (tmp_path / "run").exists()


def test_train_help_names_m2_and_the_semi_supervised_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "m2: Kingma et al.'s semi-supervised M2" in text
    for option in ("--enumerate", "--labelled N", "--alpha", "--label-site", "--labelled-batches"):
        assert option in text
