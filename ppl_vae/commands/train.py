"""``ppl-vae train``: a new run, or ``--resume`` of one; the options given with ``--resume`` checked against it.

The run's settings are built from the parsed options through :data:`ppl_vae.commands.options.SETTINGS`, the one
table from option to TrainConfig/VAEConfig field.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import PplVaeError
from .options import SETTINGS, setting_value
from .scale_out import launched

# With --resume, these options apply; every other one is the run's own and may only repeat it.
APPLY_ON_RESUME = ("epochs", "no_progress", "devices", "num_nodes", "rdzv_endpoint", "rdzv_id")
# Options that are no setting of the run: where it is, what to do with it, where other options come from.
NOT_SETTINGS = ("run_dir", "resume", "overwrite", "config", "help", "trust_program")
PROGRAM_OPTIONS = ("program", "program_kwargs")  # recorded in program.json (or config.json for the built-in VAE)


def run(args: argparse.Namespace) -> int:
    """Train (or continue) the run of ``args``; 0 when done. ``args.given``: the options typed or from --config."""
    from .. import distributed
    from ..model import VAEConfig
    from ..train import TrainConfig

    run_dir = _run_dir(args)
    config = TrainConfig(**settings_of(args, "train"))
    spec = _program_spec(args)
    model_config = VAEConfig(**settings_of(args, "model"))
    if distributed.should_launch(args.devices, args.num_nodes):
        _check_before_launch(args, config, run_dir)
    code = launched(args)
    if code is not None:
        return code
    if args.resume and not hasattr(args, "epochs"):
        config = None  # with --resume, every setting is the run's own, and the number of epochs too unless given
    return _train(args, run_dir, config, model_config, spec)


def settings_of(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The ``section`` settings ("train": TrainConfig, "model": VAEConfig) the options of ``args`` set.

    ``--epochs`` has no default (with ``--resume`` the run's own number applies unless given): where it is not
    given, the field is left out and TrainConfig's default applies.
    """
    return {name: setting_value(option, getattr(args, option))
            for option, (where, name) in SETTINGS.items() if where == section and hasattr(args, option)}


def _run_dir(args: argparse.Namespace) -> str:
    """The run directory (a new dated one by default); the options that only apply to a new run or to --resume."""
    if args.resume and args.run_dir is None:
        raise PplVaeError("--resume needs --run-dir: the run to continue")
    run_dir = args.run_dir or f"runs/vae-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume:
        check_resume_options(args, Path(run_dir))
    elif args.trust_program:
        raise PplVaeError("--trust-program applies to --resume, which imports the run's copy of its program: a new run "
                          "imports the file you name with --program")
    return run_dir


def _program_spec(args: argparse.Namespace):
    """The program of ``--program``/``--program-kwargs`` (a ProgramSpec), or None: the built-in VAE of the options."""
    if args.program is None and args.program_kwargs is None:
        return None
    from ..programs import ProgramSpec

    spec = ProgramSpec.parse(args.program or "vae", args.program_kwargs)
    _check_vae_kwargs_against_options(args, spec)
    return spec


def _check_before_launch(args: argparse.Namespace, config, run_dir: str) -> None:
    """Checked before any process starts, so that a usage error reads as one line, not as torchrun's failure
    report (the run directory only where this machine holds it: one machine)."""
    from .. import distributed, runs

    if not args.resume:
        distributed.check_trainable_on_processes(config)
    if args.num_nodes == 1:
        runs.check_run_dir(run_dir, resume=args.resume, overwrite=args.overwrite)


def _train(args: argparse.Namespace, run_dir: str, config, model_config, spec) -> int:
    """Train in this process (one of torchrun's, or the only one), then print the test table (rank 0)."""
    from .. import distributed
    from ..report import format_evaluation
    from ..train import train

    context = distributed.initialize(args.device) if distributed.launched_by_torchrun() else None
    main = context is None or context.is_main
    if main:
        print(f"run directory: {run_dir}", flush=True)
    try:
        result = train(run_dir, config, model_config, resume=args.resume, overwrite=args.overwrite,
                       progress=not args.no_progress, program=spec, processes=context, trust_program=args.trust_program)
    finally:
        distributed.shutdown()
    if main:
        which = f"; epoch {result['epoch']}, the best checkpoint" if result.get("checkpoint") == "best" else ""
        print(format_evaluation(result, title=f"test evaluation of {run_dir}, {result['model']}, after {result['epochs']} "
                                              f"epochs{which} ({result['device']})"))
    return 0


def _check_vae_kwargs_against_options(args: argparse.Namespace, spec) -> None:
    """--program-kwargs set the built-in VAE's settings: one also given as its own option is refused, not overridden."""
    if not (spec.is_builtin and spec.name == "vae"):
        return
    both = sorted(name for name in spec.kwargs if name in getattr(args, "given", ()))
    if both:
        options = ", ".join("--" + name.replace("_", "-") for name in both)
        raise PplVaeError(f"--program-kwargs sets {', '.join(both)} of the built-in VAE, and {options} sets it too: "
                          "give each setting once")


def check_resume_options(args: argparse.Namespace, run_dir: Path) -> None:
    """Refuse options given with ``--resume`` that would change the run's settings (they cannot apply mid-run).

    An option repeating the run's own value is accepted. ``--epochs`` lower than the
    epochs already trained is refused by training, once the checkpoint is read.
    """
    from .. import runs
    from ..errors import RunDirectoryError

    given = sorted(set(getattr(args, "given", ())) - set(APPLY_ON_RESUME) - set(NOT_SETTINGS))
    if not given or not (run_dir / runs.CONFIG_FILE).is_file():
        return  # nothing to check, or training says what is missing
    refused = _program_changes(args, run_dir, given)
    saved = runs.read_json(run_dir / runs.CONFIG_FILE)
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict) or not isinstance(saved.get("model"), (dict, type(None))):
        return  # training names the unreadable configuration
    refused += _setting_changes(args, saved, [option for option in given if option not in PROGRAM_OPTIONS])
    if refused:
        raise RunDirectoryError(
            f"--resume continues {run_dir} with the settings it started with, and these options would change them: "
            f"{'; '.join(refused)}. They are refused, not ignored. With --resume, --epochs (train to that many "
            "epochs), --no-progress and the scale-out options apply. Leave the others out, or start a new run with "
            "them (another --run-dir, or --overwrite)"
        )


def _setting_changes(args: argparse.Namespace, saved: dict[str, Any], options: list[str]) -> list[str]:
    """``options`` whose value differs from the run's recorded setting (config.json ``saved``), each as
    ``--option VALUE (the run's: VALUE)``; a setting the run does not record has its default."""
    from ..model import VAEConfig
    from ..train import TrainConfig

    recorded = {"train": saved["train"], "model": saved["model"] or {}}  # no "model": a program's own settings
    defaults = {"train": {f.name: f.default for f in fields(TrainConfig)}, "model": {f.name: f.default for f in fields(VAEConfig)}}
    changes = []
    for option in options:
        section, name = SETTINGS[option]  # every train option is a setting, or listed above as applying or as none
        theirs = recorded[section].get(name, defaults[section].get(name))
        ours = setting_value(option, getattr(args, option))
        if isinstance(ours, (list, tuple)) or isinstance(theirs, (list, tuple)):
            ours, theirs = list(ours or []), list(theirs or [])
        if ours != theirs:
            shown = " ".join(map(str, ours)) if isinstance(ours, list) else ours
            run_value = " ".join(map(str, theirs)) if isinstance(theirs, list) else theirs
            changes.append(f"--{option.replace('_', '-')} {shown} (the run's: {run_value})")
    return changes


def _program_changes(args: argparse.Namespace, run_dir: Path, given: list[str]) -> list[str]:
    """``--program`` / ``--program-kwargs`` given with ``--resume`` that differ from the run's recorded program.

    The same file is the recorded path or a file with the recorded sha256; the built-in VAE's
    kwargs are compared with its settings in config.json.
    """
    from .. import runs
    from ..programs import ProgramSpec, load_spec

    if "program" not in given and "program_kwargs" not in given:
        return []
    ours = ProgramSpec.parse(args.program or "vae", args.program_kwargs)
    recorded = load_spec(run_dir)
    if recorded is None or recorded.object:  # the built-in VAE: its settings are config.json's
        theirs_name = "the built-in VAE" if recorded is None else recorded.name
        same_program = recorded is None and ours.is_builtin and ours.name == "vae"
        model = (runs.read_json(run_dir / runs.CONFIG_FILE).get("model") or {}) if recorded is None else {}
        theirs_kwargs = {name: model.get(name) for name in ours.kwargs}
        ours_kwargs = {name: list(v) if isinstance(v, tuple) else v for name, v in ours.kwargs.items()}
    else:
        theirs_name = recorded.name if recorded.path is None else f"{recorded.path}:{recorded.name}"
        same_program = ours.name == recorded.name and _same_file(ours.path, recorded.path, recorded.sha256)
        theirs_kwargs, ours_kwargs = recorded.kwargs, ours.kwargs
    refused = []
    if "program" in given and not same_program:
        refused.append(f"--program {args.program} (the run's: {theirs_name})")
    if "program_kwargs" in given and ours_kwargs != theirs_kwargs:
        refused.append(f"--program-kwargs {json.dumps(ours.kwargs)} (the run's: {json.dumps(theirs_kwargs)})")
    return refused


def _same_file(given: str | None, recorded: str | None, sha256: str | None) -> bool:
    """Whether ``--program``'s file is the run's: both built-in (no file), the recorded path, or the recorded bytes."""
    from ..programs import file_sha256

    if given is None or recorded is None:
        return given is None and recorded is None
    path = Path(given)
    return path.resolve() == Path(recorded) or (path.is_file() and file_sha256(path) == sha256)
