"""A finished (or interrupted) run's program for the other commands: its checked configuration
(:func:`read_run_config`), its program rebuilt untrained (:func:`build_run_program`), and trained
(:func:`load_run`; :func:`load_run_everywhere` on a process group, rank 0 reading the files)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import process_group, runs
from ..data import dataset_image_shape, in_run_directory
from ..errors import PplVaeError, PplVaeWarning, RunDirectoryError
from ..model import VAEConfig, build_vae
from ..objectives import enumerate_discrete_sites
from ..programs import build_program, changed_source_note, check_program, load_spec
from .config import TrainConfig


def build_run_program(
    run_dir: str | Path, config: dict[str, Any], program: torch.nn.Module | None = None, trust_program: bool = False,
) -> tuple[torch.nn.Module, str]:
    """The program of a run directory, untrained, and its description: the VAE of its config.json, or its program.json.

    A run trained from a Python object needs that object's class again: pass a fresh instance as ``program``.
    A run's program file is imported from the run's checked copy, only if this user's key signed it or with
    ``trust_program`` (:mod:`ppl_vae.trust`).
    """
    run_dir = Path(run_dir)
    spec = load_spec(run_dir)
    if spec is None:
        try:
            model_config = VAEConfig(**config["model"])
        except (KeyError, TypeError) as error:
            raise RunDirectoryError(f"{run_dir / runs.CONFIG_FILE} holds no model configuration this version can read "
                                    f"({error})") from None
        return build_vae(model_config), model_config.describe()
    if program is not None:
        return reapply_enumeration(check_program(program), config), spec.describe()
    if spec.object:
        raise PplVaeError(f"{run_dir} was trained from a Python object ({spec.name}): load it in Python with "
                          "ppl_vae.train.load_run(run_dir, program=a_fresh_instance)")
    shape = dataset_image_shape(config["train"].get("dataset", "mnist"))
    built = build_program(spec, run_dir, {"data_dim": math.prod(shape), "image_shape": shape}, trust_program)
    if note := changed_source_note(run_dir, spec):  # once the copy is checked and trusted
        warnings.warn(note, PplVaeWarning, stacklevel=3)
    return reapply_enumeration(built, config), spec.describe()


def reapply_enumeration(program: torch.nn.Module, config: dict[str, Any]) -> torch.nn.Module:
    """The program as it was trained: with ``--enumerate`` (recorded in config.json), its discrete guide sites
    marked for enumeration again, so every evaluation sums them out as training did."""
    if config.get("train", {}).get("enumerate"):
        enumerate_discrete_sites(program)
    return program


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A run's ``config.json``, checked: ``train`` and ``model`` (or null) hold only fields this version knows.

    A run trained from tensors reads them from its own directory, wherever it now lies (:func:`ppl_vae.data.in_run_directory`)."""
    path = Path(run_dir) / runs.CONFIG_FILE
    config = runs.read_json(path)
    if not isinstance(config, dict) or not isinstance(config.get("train"), dict) or not (
            config.get("model") is None or isinstance(config.get("model"), dict)):
        raise RunDirectoryError(f"{path} is not a run configuration: it needs an object 'train' and an object (or "
                                "null) 'model', as `ppl-vae train` writes")
    for section, kind in (("train", TrainConfig), ("model", VAEConfig)):
        if config.get(section) is None:
            continue
        known = {f.name for f in dataclasses.fields(kind)}
        unknown = sorted(set(config[section]) - known)
        if unknown:
            raise RunDirectoryError(f"{path}: '{section}' has key(s) {unknown} that this version of ppl_vae does not "
                                    f"know (it knows {', '.join(sorted(known))}): was it written by another version, "
                                    "or edited?")
        try:
            kind(**config[section])
        except (PplVaeError, TypeError, ValueError) as error:
            raise RunDirectoryError(f"{path}: '{section}' is not a configuration this version can use ({error})") from None
    return {**config, "train": in_run_directory(config["train"], run_dir)}


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu", program: torch.nn.Module | None = None,
    trust_program: bool = False, checkpoint: str | None = None,
) -> tuple[torch.nn.Module, dict]:
    """The trained program of a run directory (in eval mode) and its configuration, plus ``"epoch"``,
    ``"checkpoint"`` (which: "last" or "best"), ``"checkpoint_id"`` and ``"description"``.

    ``checkpoint``: "last" (the latest), "best" (``checkpoint.best.pt``, kept with --early-stopping), or None: the
    best when the run kept one, else the last. A run with a program file of its own is refused unless this user's
    key signed it (runs made by this user are) or ``trust_program`` is given: importing the file runs its code
    (:mod:`ppl_vae.trust`)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)  # checked: a config.json handed over may hold anything
    which = runs.which_checkpoint(run_dir, checkpoint)
    state = runs.load_checkpoint(run_dir, map_location=device, which=which)
    vae, description = build_run_program(run_dir, config, program, trust_program)
    vae = vae.to(device)
    vae.load_state_dict(state["model"])
    vae.eval()
    return vae, {**config, "epoch": state["epoch"], "checkpoint": which, "checkpoint_id": state.get("id"),
                 "description": description}



def load_run_everywhere(
    run_dir: str | Path, device: torch.device, trust_program: bool = False, checkpoint: str | None = None,
) -> tuple[torch.nn.Module, dict]:
    """:func:`ppl_vae.train.load_run` with the files read by rank 0 only and sent to every process."""
    def read() -> tuple[dict, dict, int, str, str | None]:
        config = read_run_config(Path(run_dir))  # checked: a config.json handed over may hold anything
        which = runs.which_checkpoint(run_dir, checkpoint)
        state = runs.load_checkpoint(run_dir, map_location="cpu", which=which)
        return config, state["model"], state["epoch"], which, state.get("id")

    config, state, epoch, which, checkpoint_id = process_group.on_main(read)
    # The program's record (program.json and the copy of its file) is read on every process: with a program
    # other than the built-in VAE, every process needs the run directory (one machine).
    vae, description = build_run_program(run_dir, config, trust_program=trust_program)
    vae = vae.to(device)
    vae.load_state_dict(state)
    vae.eval()
    return vae, {**config, "epoch": epoch, "checkpoint": which, "checkpoint_id": checkpoint_id,
                 "description": description}
