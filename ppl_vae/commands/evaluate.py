"""``ppl-vae evaluate``: the ELBO, its decomposition, log p̂(x) and the diagnostics of a run, printed and written.

The per-image numbers come from :func:`ppl_vae.distributed.evaluate_per_datapoint`, the same with any number of
processes; rank 0 then computes the tables and the diagnostics (which need all images at once: the aggregate
posterior) and writes ``evaluation.json`` with its per-image file (:mod:`ppl_vae.evaluation_files`).
"""

from __future__ import annotations

import argparse
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import PplVaeWarning
from .scale_out import launched

if TYPE_CHECKING:  # commands import their heavy modules when they run
    from ..ais import AisSettings


def run(args: argparse.Namespace) -> int:
    """Evaluate the run ``args.run_dir`` (on several processes where asked) under its evaluation lock."""
    from .. import distributed

    code = launched(args)
    if code is not None:
        return code
    context = distributed.initialize(args.device) if distributed.launched_by_torchrun() else None
    try:
        with evaluation_lock(Path(args.run_dir), context is None or context.is_main):
            return evaluate(args, context)
    finally:
        distributed.shutdown()


@contextmanager
def evaluation_lock(run_dir: Path, main: bool) -> Iterator[None]:
    """Hold the run's evaluation lock (rank 0): one evaluation writes into a run at a time, and no
    ``train --overwrite`` deletes it meanwhile. A lock that cannot be taken (a folder that cannot be written,
    a link or a folder in the lock file's place) stops the evaluation now, not after minutes of computing:
    evaluating without it could mix two evaluations' files. The result files are recorded in the run's
    manifest and checked to be no links before the evaluation starts."""
    from .. import runs
    from ..errors import RunWriteError

    if not main or not run_dir.is_dir():
        yield  # a missing run is named by the evaluation
        return
    lock = runs.RunLock(run_dir, "evaluate")
    try:
        lock.acquire()
    except RunWriteError as error:
        raise RunWriteError(f"{error}; evaluate writes its results into the run and takes its lock first: make the "
                            "folder writable (or copy the run somewhere you can write) and run it again") from None
    try:
        runs.remove_temporaries(run_dir, runs.EVALUATION_FILES)
        runs.record_written(run_dir, runs.PER_DATAPOINT_FILE, runs.EVALUATION_FILE)
        yield
    finally:
        lock.release()


@dataclass
class Evaluated:
    """What is evaluated: the run's program, its recorded configuration, the images and their conditioning data."""

    program: Any  # the run's nn.Module with model and guide
    config: dict[str, Any]  # the run's config.json, with the checkpoint's epoch
    data: Any  # the run's dataset (its record goes into the result)
    x: Any  # [N, ...] the images of the split
    cond: tuple  # the run's conditioning data for x (its labels, then its --cond arrays), or ()
    levels: str | None  # the data's grey levels, for bits/dim
    device: Any  # the torch.device evaluated on, in this process


def evaluate(args: argparse.Namespace, context) -> int:
    """``ppl-vae evaluate`` in this process; with a process group, every process evaluates its share of the images."""
    from ..diagnostics import MIN_PSIS_SAMPLES, diagnostics_summary
    from ..distributed import derive_seed, evaluate_per_datapoint, seeded
    from ..data import run_conditioning
    from ..evaluate import evaluation_summary
    from ..inspection import name_data_arguments

    main = context is None or context.is_main
    ais = ais_options(args)  # None: importance sampling
    if main:
        _warn_unused_estimator_options(args, ais is not None)
    loaded = _load(args, context)
    program, x, cond = loaded.program, loaded.x, loaded.cond
    started = time.perf_counter()
    per_datapoint = evaluate_per_datapoint(
        program.model, program.guide, x, *cond, num_samples=args.num_samples if ais is None else None,
        elbo_samples=args.elbo_samples, seed=args.seed, psis=ais is None and args.num_samples >= MIN_PSIS_SAMPLES,
        chunk_size=args.chunk_size, progress=not args.no_progress and main, ais=ais,
    )
    if not main:
        return 0
    result = name_data_arguments(evaluation_summary(
        program.model, program.guide, x, *cond, num_samples=args.num_samples, chunk_size=args.chunk_size,
        levels=loaded.levels, evidence=per_datapoint.evidence, decomposition=per_datapoint.decomposition,
    ), run_conditioning(loaded.config["train"]))  # log p(x | c) for a run given c (labels stay y)
    with seeded(derive_seed(args.seed, "diagnostics")):
        result["diagnostics"] = diagnostics_summary(program.model, program.guide, x, *cond, psis=per_datapoint.psis,
                                                    chunk_size=args.chunk_size)
    if ais is not None:
        _record_ais(result, ais, per_datapoint.acceptance)
    else:
        result["estimator"] = {"name": "is", "num_samples": args.num_samples}
    result.update(label_error(args, loaded))
    result.update(_provenance(args, context, loaded, time.perf_counter() - started, result["kl"]["sites"].values()))
    _report(args, result, per_datapoint)
    return 0


def ais_options(args: argparse.Namespace) -> AisSettings | None:
    """The AIS settings that ``--estimator ais`` and its options ask for, checked now (a bad value is one line
    before the run and its data are loaded); None for ``--estimator is``."""
    from ..ais import AisSettings

    if getattr(args, "estimator", "is") != "ais":
        return None
    return AisSettings(steps=args.ais_steps, chains=args.ais_chains, leapfrog_steps=args.leapfrog_steps,
                       schedule=args.ais_schedule)


IS_ONLY, AIS_ONLY = ("--num-samples", "-k"), ("--ais-steps", "--ais-chains", "--leapfrog-steps", "--ais-schedule")


def _typed(argv: list[str], option: str) -> bool:
    """Whether ``option`` was typed in ``argv`` (also as ``--opt=value``, a unique prefix, or ``-kVALUE``)."""
    for token in argv:
        name = token.split("=", 1)[0]
        if option.startswith("--") and len(name) > 2 and name.startswith("--") and option.startswith(name):
            return True
        if not option.startswith("--") and token.startswith(option):
            return True
    return False


def _warn_unused_estimator_options(args: argparse.Namespace, ais: bool) -> None:
    """A typed option of the other estimator changes nothing: say so, rather than let it pass as if it had."""
    unused = [o for o in (IS_ONLY if ais else AIS_ONLY) if _typed(getattr(args, "argv", []), o)]
    if unused:
        other = "ais (its chains, --ais-chains, take the place of K)" if ais else "is (give --estimator ais for AIS)"
        warnings.warn(f"{' and '.join(unused)} {'do' if len(unused) > 1 else 'does'} nothing with --estimator {other}",
                      PplVaeWarning, stacklevel=2)


def _record_ais(result: dict[str, Any], ais: AisSettings, acceptance) -> None:
    """Record AIS as the estimator of ``result``'s log p̂; PSIS k-hat (a diagnostic of importance weights) is not
    computed by an AIS evaluation, and says so."""
    from ..audit import record_ais_estimator

    record_ais_estimator(result, ais.record(), acceptance)
    result["diagnostics"]["psis"] = {"unavailable": "PSIS k-hat diagnoses importance weights; this evaluation's "
                                     "log p(x) is AIS's (run `ppl-vae evaluate --estimator is` or `ppl-vae audit`)"}


def _load(args: argparse.Namespace, context) -> Evaluated:
    """The run's program (on every process), and the images of ``args.split`` it is evaluated on, checked."""
    from ..data import load_run_data, run_conditioning
    from ..distributed import load_run_everywhere
    from ..train import levels_of, resolve_device

    device = context.device if context is not None else resolve_device(args.device)
    program, config = load_run_everywhere(Path(args.run_dir), device, trust_program=args.trust_program,
                                          checkpoint=args.checkpoint)
    train_config = config["train"]
    levels = levels_of(program, train_config["binarize"])
    data = load_run_data(train_config, args.data_dir, device, dequantize_levels=levels == "dequantized")
    x = data.split(args.split)
    levels = levels if data.grey_levels else None  # tensors from Python: no 8-bit levels, no bits/dim
    cond = data.conditioning(args.split, run_conditioning(train_config))  # the run's labels and --cond arrays
    if args.examples is not None:
        if args.examples > x.shape[0] and (context is None or context.is_main):
            warnings.warn(f"--examples {args.examples}: the {args.split} split holds {x.shape[0]} images; all "
                          f"{x.shape[0]} are evaluated", PplVaeWarning, stacklevel=2)
        x, cond = x[: args.examples], tuple(c[: args.examples] for c in cond)
    check = getattr(getattr(program, "likelihood", None), "check_data", None)
    if check is not None:  # other programs' data are checked against their likelihood by the evaluation itself
        check(x)
    return Evaluated(program, config, data, x, cond, levels, device)


def label_error(args: argparse.Namespace, loaded: Evaluated) -> dict[str, Any]:
    """The classifier's error on the split from q(y | x) at the label site: ``--label-site``, or the run's own
    (``--labelled`` runs); nothing for a run with neither. One line where the guide has no such discrete site."""
    from ..semisupervised import label_error_summary

    train_config = loaded.config["train"]
    site = getattr(args, "label_site", None) or (train_config.get("label_site", "y")
                                                 if train_config.get("labelled") is not None else None)
    if site is None:
        return {}
    labels = loaded.data.labels(args.split)
    return label_error_summary(loaded.program, loaded.x, None if labels is None else labels[: loaded.x.shape[0]], site)


def _provenance(args: argparse.Namespace, context, loaded: Evaluated, seconds: float,
                result_sites: Any = ()) -> dict[str, Any]:
    """What the result is of and how it was computed: split, data, checkpoint, objective, device, versions, seed.
    ``result_sites``: the KL sites of the result (an enumerated one says the objective was TraceEnum_ELBO)."""
    import pyro
    import torch

    from ..distributed import EVALUATION_BLOCK_SIZE
    from ..train import TrainConfig, describe_objective

    config, train_config = loaded.config, loaded.config["train"]
    enumerated = any(site.get("enumerated") for site in result_sites)  # the guide sums sites out: TraceEnum_ELBO
    return {
        "split": args.split,
        "data": loaded.data.record,
        "epoch": config["epoch"],
        "checkpoint": config["checkpoint"],  # which checkpoint of the run: last, or best (--early-stopping)
        "model": config["description"],
        "objective": describe_objective(TrainConfig(**train_config), enumerated=enumerated or None),
        "epochs": config["epoch"],  # trained so far: the checkpoint's, not the run's planned number
        "epochs_planned": train_config["epochs"],
        "checkpoint_id": config.get("checkpoint_id"),
        "device": context.describe() if context is not None else str(loaded.device),
        "world_size": context.world_size if context is not None else 1,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "evaluation_seconds": seconds,
        "seed": args.seed,
        "seed_block_size": EVALUATION_BLOCK_SIZE,
    }


def _report(args: argparse.Namespace, result: dict[str, Any], per_datapoint) -> None:
    """Print the two tables, then write evaluation.json and its per-image file (committed as one)."""
    from .. import runs
    from ..errors import RunWriteError
    from ..evaluation_files import write_evaluation
    from ..report import format_diagnostics, format_evaluation

    run_dir = Path(args.run_dir)
    title = (
        f"{run_dir}: {result['model']}, epoch {result['epoch']} ({result['checkpoint']} checkpoint); {args.split} split, "
        f"{result['num_datapoints']} images, {result['device']}, {result['evaluation_seconds']:.1f} s"
    )
    # The tables first: a write that fails (disk full, no permission) then loses no result.
    print(format_evaluation(result, title=title))
    print(format_diagnostics(result["diagnostics"]), flush=True)
    evidence, psis = per_datapoint.evidence, per_datapoint.psis
    arrays = {"log_evidence": evidence.log_evidence, "stderr": evidence.stderr, "ess": evidence.ess}
    if per_datapoint.acceptance is not None:  # AIS: its mean HMC acceptance per image
        arrays["acceptance"] = per_datapoint.acceptance
    if psis is not None:
        arrays.update(khat=psis["khat"], psis_log_evidence=psis["psis_log_evidence"])
    try:  # the npz, then the summary that records its id and sha256: committed as one (ppl_vae.evaluation_files)
        write_evaluation(run_dir, result, {key: value.numpy() for key, value in arrays.items()})
    except RunWriteError as error:
        raise RunWriteError(f"{error}; the tables above are the evaluation's result, printed before writing") from None
    print(f"written to {run_dir / runs.EVALUATION_FILE} and {run_dir / runs.PER_DATAPOINT_FILE}")
