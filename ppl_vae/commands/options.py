"""The train command's options as data: their types, the one table from option to setting, the --config file.

:data:`SETTINGS` maps each train option that sets a run's setting to its field of
:class:`ppl_vae.train.TrainConfig` ("train") or :class:`ppl_vae.model.VAEConfig` ("model"). The command builds
both configurations from it (:func:`ppl_vae.commands.train.configs_from_options`), ``--resume`` compares the
options given with the run's recorded settings through it, and a ``--config`` file's keys are options of the
same command.

A ``--config`` file (:func:`read_config_file`) is a JSON object keyed by option name with underscores; each value
is checked as the command line checks that option (type, range, choices), against the ``argparse.Action`` that
``add_argument`` returned for it (recorded by :class:`OptionTable`). The command line then parses with the
file's values as defaults, so an option typed wins over the file.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def seed(text: str) -> int:
    """An argparse type: a seed NumPy accepts, 0 <= seed < 2**32."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**32 - 1 = {2**32 - 1} (NumPy's range), got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


INTEGER_TYPES = (int, positive_int, seed)
NUMBER_TYPES = (float, positive_float, non_negative_float)

# Train option (its argparse dest) -> the setting it sets: (section, field), "train" a TrainConfig field and
# "model" a VAEConfig field. The settings without an option (dataset_sha256, data_dim, image_shape) are filled in
# by training from the data.
SETTINGS: dict[str, tuple[str, str]] = {
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "learning_rate"),
    "lr_schedule": ("train", "lr_schedule"),
    "lr_milestones": ("train", "lr_milestones"),
    "lr_gamma": ("train", "lr_gamma"),
    "lr_final": ("train", "lr_final"),
    "seed": ("train", "seed"),
    "device": ("train", "device"),
    "binarize": ("train", "binarize"),
    "data_dir": ("train", "data_dir"),
    "dataset": ("train", "dataset"),
    "train_examples": ("train", "train_examples"),
    "eval_examples": ("train", "eval_examples"),
    "val_samples": ("train", "val_samples"),
    "test_samples": ("train", "test_samples"),
    "evidence_every": ("train", "evidence_every"),
    "evidence_examples": ("train", "evidence_examples"),
    "evidence_samples": ("train", "evidence_samples"),
    "objective": ("train", "objective"),
    "particles": ("train", "particles"),
    "beta": ("train", "beta"),
    "warmup": ("train", "warmup_epochs"),
    "warmup_start": ("train", "warmup_start"),
    "clip_norm": ("train", "clip_norm"),
    "engine": ("train", "engine"),
    "labels": ("train", "labels"),
    "cond": ("train", "cond"),
    # discrete latents and semi-supervised training (issue 26)
    "enumerate": ("train", "enumerate"),
    "labelled": ("train", "labelled"),
    "alpha": ("train", "alpha"),
    "label_site": ("train", "label_site"),
    "labelled_batches": ("train", "labelled_batches"),
    "validate": ("train", "pyro_validation"),
    # issue 28: early stopping and the plateau schedule
    "monitor": ("train", "monitor"),
    "min_delta": ("train", "min_delta"),
    "early_stopping": ("train", "early_stopping"),
    "plateau_factor": ("train", "plateau_factor"),
    "plateau_patience": ("train", "plateau_patience"),
    "gradient": ("train", "gradient"),
    "log": ("train", "log"),
    "tracking_uri": ("train", "tracking_uri"),
    "log_images_every": ("train", "log_images_every"),
    "latent_dim": ("model", "latent_dim"),
    "hidden_sizes": ("model", "hidden_sizes"),
    "activation": ("model", "activation"),
    "prior": ("model", "prior"),
    "likelihood": ("model", "likelihood"),
    "guide": ("model", "guide"),
    "prior_components": ("model", "prior_components"),
    "num_flows": ("model", "num_flows"),
    "obs_scale": ("model", "obs_scale"),
    "likelihood_components": ("model", "likelihood_components"),
    "network": ("model", "network"),
    "conv_channels": ("model", "conv_channels"),
}


def setting_value(option: str, value: Any) -> Any:
    """An option's parsed value as its setting holds it: lists as tuples, the data folder as an absolute path."""
    if option == "data_dir" and value is not None:
        return str(Path(value).resolve())  # a run read from another working directory finds the same folder
    return tuple(value) if isinstance(value, list) else value


@dataclass
class OptionTable:
    """The options of one command, as declared: each ``add_argument``'s Action by dest.

    Its public attributes (``option_strings``, ``type``, ``nargs``, ``choices``, ``default``) are what a --config
    value is checked against. With ``defaults=False`` every option is declared with no default
    (``argparse.SUPPRESS``): a parse then holds only the options typed.
    """

    defaults: bool = True
    actions: dict[str, argparse.Action] = field(default_factory=dict)

    def add(self, container: Any, *flags: str, **kwargs: Any) -> argparse.Action:
        """``container.add_argument(*flags, **kwargs)`` (a parser or an argument group), recorded."""
        if not self.defaults:
            kwargs["default"] = argparse.SUPPRESS
        action = container.add_argument(*flags, **kwargs)
        self.actions[action.dest] = action
        return action


# Options that delete or continue a run, or run someone's code: accepted only when typed, never from a --config file.
COMMAND_LINE_ONLY = ("overwrite", "resume")
NOT_IN_A_FILE = ("config", "help")  # a file names no other file


class ConfigFileError(ValueError):
    """A --config file that cannot be used: the message is one line, for the parser's usage error."""


def read_config_file(path: str, actions: dict[str, argparse.Action]) -> dict[str, Any]:
    """The option values of the --config file ``path``, each checked and converted as on the command line.

    ``actions`` are the command's options (:attr:`OptionTable.actions`). Keys starting with ``_`` are notes and
    skipped. Raises :class:`ConfigFileError` for an unreadable file, a key that is no option or may only be typed,
    and a value the option would refuse.
    """
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigFileError(f"cannot read --config {path}: {error}") from None
    if not isinstance(values, dict):
        raise ConfigFileError(f"--config {path} must hold a JSON object of option values, got {type(values).__name__}")
    if "trust_program" in values:  # a decision about running code, made by whoever types the command
        raise ConfigFileError(f"--config {path} sets 'trust_program': --trust-program is accepted on the command line only")
    typed_only = sorted(key for key in values if key in COMMAND_LINE_ONLY)
    if typed_only:
        options = ", ".join(f"--{key.replace('_', '-')}" for key in typed_only)
        raise ConfigFileError(f"--config {path} holds {typed_only}: {options} delete or continue a run, so they are "
                              "taken only from the command line, never from a file; remove them from the file and "
                              "type them when you mean them")
    settings = {key: value for key, value in values.items() if not key.startswith("_")}
    unknown = sorted(key for key in settings if key not in actions or key in NOT_IN_A_FILE)
    if unknown:
        raise ConfigFileError(f"--config {path} has unknown options {unknown}; the known ones are the options of "
                              "`train --help`")
    checked = {}
    for key, value in settings.items():
        action = actions[key]
        try:
            checked[key] = config_value(action, value)
        except argparse.ArgumentTypeError as error:
            option = action.option_strings[-1] if action.option_strings else key
            raise ConfigFileError(f"--config {path}: {key!r} ({option}) {error}") from None
    return checked


def config_value(action: argparse.Action, value: Any) -> Any:
    """A value of a --config file for ``action``, checked and converted exactly as on the command line."""
    if action.nargs == 0:  # a flag such as --no-progress
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"must be true or false, got {json.dumps(value)}")
        return value
    if action.dest == "program_kwargs":  # a JSON string on the command line; in a file, the object itself
        return _program_kwargs(value)
    many = action.nargs in ("+", "*")
    if many and not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"must be a list, e.g. [{json.dumps(value)}], got {json.dumps(value)}")
    if many and action.nargs == "+" and not value:
        raise argparse.ArgumentTypeError("must be a list of at least one value, got []")
    if not many and isinstance(value, (list, dict)):
        raise argparse.ArgumentTypeError(f"must be a single value, got {json.dumps(value)}")
    converted = [_config_item(action, item, many) for item in (value if many else [value])]
    return converted if many else converted[0]


def _config_item(action: argparse.Action, item: Any, many: bool) -> Any:
    """One value of a --config file's option: of the JSON type the option's type reads, then converted by it."""
    if item is None and not many and action.default is None:
        return None  # the option's own default, e.g. no clipping
    kind = action.type
    integer, number = kind in INTEGER_TYPES, kind in NUMBER_TYPES
    if isinstance(item, bool) or (integer and not isinstance(item, int)) or (
        number and not isinstance(item, (int, float))
    ) or (kind is None and not isinstance(item, str)):
        wanted = "an integer" if integer else "a number" if number else "a string"
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {json.dumps(item)}")
    try:
        item = kind(str(item)) if kind is not None else item
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if action.choices is not None and item not in action.choices:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, action.choices))}, got {item!r}")
    return item


def _program_kwargs(value: Any) -> str | None:
    """--program-kwargs from a file: a JSON object, or its text; as the JSON text the command line passes."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"is not valid JSON ({error})") from None
    if value is not None and not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of keyword arguments, e.g. {{\"latent\": [64, 32]}}, "
                                         f"got {json.dumps(value)}")
    return None if value is None else json.dumps(value)
