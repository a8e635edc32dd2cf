"""The train command's options as one table: option -> TrainConfig/VAEConfig field, the --config file merged without
argparse internals, the options given (typed or from the file) that --resume checks, and the command modules' size.

All of these stop before training starts (a refusal, or a fake run directory holding only config.json), so they take
no data and no steps.
"""

from __future__ import annotations

import argparse
import ast
import json
from dataclasses import fields
from pathlib import Path

import pytest

import ppl_vae
from ppl_vae import cli
from ppl_vae.commands import train as train_command
from ppl_vae.commands.options import SETTINGS, OptionTable, setting_value
from ppl_vae.model import VAEConfig
from ppl_vae.train import TrainConfig

FILLED_BY_TRAINING = {("train", "dataset_sha256"), ("model", "data_dim"), ("model", "image_shape")}


def main(*args) -> int:
    return cli.main([str(arg) for arg in args])


def train_actions() -> dict[str, argparse.Action]:
    table = OptionTable()
    cli.add_train_options(argparse.ArgumentParser(), table)
    return table.actions


def test_every_setting_has_one_option_and_its_default():
    """The table covers every TrainConfig and VAEConfig field a user sets, each from a train option whose default
    (shown by --help) is the field's own; every other train option is listed as applying on --resume or as no
    setting, so --resume checks every option it is given."""
    fields_of = {("train", f.name): f.default for f in fields(TrainConfig)}
    fields_of |= {("model", f.name): f.default for f in fields(VAEConfig)}
    assert sorted(SETTINGS.values()) == sorted(set(fields_of) - FILLED_BY_TRAINING)
    assert len(set(SETTINGS.values())) == len(SETTINGS)  # one option per field
    actions = train_actions()
    for option, field in SETTINGS.items():
        default = actions[option].default
        if default is argparse.SUPPRESS:  # --epochs: with --resume, the run's own number unless given
            assert option == "epochs" and f"(default: {fields_of[field]};" in actions[option].help
        else:
            assert setting_value(option, default) == fields_of[field], option
    classified = (set(SETTINGS) | set(train_command.APPLY_ON_RESUME) | set(train_command.NOT_SETTINGS)
                  | set(train_command.PROGRAM_OPTIONS))
    assert set(actions) - classified == set()


def test_the_configurations_are_built_from_the_table(tmp_path):
    """Each option arrives in its field (renamed ones too), lists as tuples, the data folder as an absolute path."""
    parser = argparse.ArgumentParser()
    cli.add_train_options(parser, OptionTable())
    args = parser.parse_args(["--lr", "0.02", "--warmup", "3", "--validate", "--hidden-sizes", "7", "5",
                              "--lr-milestones", "2", "4", "--data-dir", "relative", "--latent-dim", "3"])
    train = train_command.settings_of(args, "train")
    model = train_command.settings_of(args, "model")
    assert train["learning_rate"] == 0.02 and train["warmup_epochs"] == 3 and train["pyro_validation"] is True
    assert train["lr_milestones"] == (2, 4) and train["data_dir"] == str(Path("relative").resolve())
    assert "epochs" not in train  # not given: TrainConfig's default, or with --resume the run's own
    assert model["hidden_sizes"] == (7, 5) and model["latent_dim"] == 3 and "data_dim" not in model
    assert TrainConfig(**train).learning_rate == 0.02 and VAEConfig(**model).hidden_sizes == (7, 5)


def test_an_abbreviated_config_option_reads_the_file(tmp_path, capsys):
    """`--conf FILE` is --config to argparse (a unique prefix), so the file is read and checked: before, only the
    exact spelling was looked for, and an abbreviated one was parsed but its file silently never applied."""
    config = tmp_path / "options.json"
    config.write_text(json.dumps({"epochs": 0}))
    for spelling in (["--conf", config], [f"--config={config}"], ["--config", config]):
        with pytest.raises(SystemExit) as exit_:
            main("train", *spelling, "--run-dir", tmp_path / "run", "--data-dir", tmp_path / "no-data")
        assert exit_.value.code == 2
        assert "'epochs' (--epochs) must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def recorded_run(tmp_path) -> Path:
    """A run directory as far as --resume's option checks read it: config.json with the run's settings."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"train": {"learning_rate": 0.002, "batch_size": 50},
                                                     "model": {"hidden_sizes": [16]}}))
    return run_dir


def resume_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ppl-vae train: error: --resume continues"), lines
    return lines[0]


def test_resume_checks_the_options_of_a_config_file_and_those_typed_at_their_default(recorded_run, tmp_path, capsys):
    """A setting from --config counts as given; a typed value equal to the option's default too (the run's differs)."""
    config = tmp_path / "options.json"
    config.write_text(json.dumps({"batch_size": 20, "hidden_sizes": [16], "no_progress": True}))
    assert main("train", "--resume", "--run-dir", recorded_run, "--config", config, "--lr", "0.001") == 2
    line = resume_error(capsys)
    assert "--batch-size 20 (the run's: 50)" in line and "--lr 0.001 (the run's: 0.002)" in line
    assert "--hidden-sizes 16" not in line and "--no-progress True" not in line  # the run's own; one that applies
    # The command line wins over the file, and its value is the one compared.
    assert main("train", "--resume", "--run-dir", recorded_run, "--config", config, "--batch-size", "30") == 2
    line = resume_error(capsys)
    assert "--batch-size 30 (the run's: 50)" in line and "--batch-size 20" not in line


def test_program_kwargs_of_the_builtin_vae_and_its_own_option_are_not_both_taken(tmp_path, capsys):
    """--program-kwargs setting a built-in VAE setting that its option (typed, or from --config) sets too is refused."""
    kwargs = json.dumps({"latent_dim": 3})
    config = tmp_path / "options.json"
    config.write_text(json.dumps({"latent_dim": 3}))
    for extra in (["--latent-dim", "3"], ["--config", config]):
        assert main("train", "--run-dir", tmp_path / "run", "--program-kwargs", kwargs, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert err == ("ppl-vae train: error: --program-kwargs sets latent_dim of the built-in VAE, and --latent-dim "
                       "sets it too: give each setting once")
    assert not (tmp_path / "run").exists()


def test_train_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main("train", "--help")
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"minibatch size; with several processes, the global minibatch, split between them (default: " \
           f"{TrainConfig.batch_size})" in out
    assert f"epochs to train (default: {TrainConfig.epochs}; with --resume" in out and "==SUPPRESS==" not in out


def test_command_functions_fit_on_a_screen():
    """cli.py and the command modules: no function longer than 80 lines."""
    package = Path(ppl_vae.__file__).parent
    long = []
    for path in [package / "cli.py", *sorted((package / "commands").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
