"""The evidence audit of a run: how far its importance-sampled log p(x) is from AIS, and what BDMC certifies.

:func:`audit_run` (``ppl-vae audit RUN``) does three things with a run's checkpoint:

* the **BDMC sandwich** (:func:`ppl_vae.ais.bdmc`) on images simulated from the model, at several numbers of
  annealing steps: forward AIS bounds log p(x) from below, reverse AIS from the exact posterior sample from
  above (both stochastically); the gap is how far AIS with those settings can be from log p(x) on data like
  the model's -- a certificate on simulated data only;
* **IS against AIS on test images**: the importance-sampled log p̂(x) (K draws from the guide, with PSIS k-hat
  per image, :func:`ppl_vae.diagnostics.evidence_with_psis`) and AIS on the images whose k-hat is highest
  (where IS is least reliable), highest first: IS - AIS estimates how much the IS bound misses per image;
* ``audit.json`` (the estimators, their settings, the checkpoint) and one figure, ``plots/audit.png``
  (per-image IS - AIS against k-hat; the BDMC bracket against steps); it returns the table as text.

:func:`ais_summary` is the table of ``ppl-vae evaluate --estimator ais``: :func:`ppl_vae.summary.evaluation_summary`
with AIS's log p(x) in place of importance sampling's, and the estimator and its settings recorded.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pyro
import torch

from . import plots, runs
from .ais import (
    AisEstimate,
    AisSettings,
    ais_log_evidence,
    bdmc,
    check_ais_applies,
    simulate,
)
from .diagnostics import evidence_with_psis
from .errors import InvalidDataError
from .estimators import EvidenceEstimate
from .inspection import check_count
from .modes import evaluation_mode
from .summary import evaluation_summary, mean_and_stderr

AUDIT_FILE = "audit.json"
AUDIT_FIGURE = "audit.png"


def ais_summary(
    model: Callable, guide: Callable, x: torch.Tensor, *cond: torch.Tensor, steps: int | None = None,
    chains: int | None = None, leapfrog_steps: int | None = None, schedule: str | None = None,
    target_accept: float | None = None, elbo_samples: int = 10, chunk_size: int | None = None, levels: str | None = None,
    decomposition: dict | None = None, progress: bool = False, settings: AisSettings | None = None,
) -> tuple[dict[str, Any], AisEstimate]:
    """:func:`~ppl_vae.summary.evaluation_summary` with log p(x) by AIS, and the AIS result itself.

    The summary has the importance-sampled one's shape: ``log_evidence`` holds AIS's mean and standard error over
    datapoints, ``mean_mc_stderr`` the mean per-datapoint standard error over chains, ``mean_ess`` the mean
    effective number of chains and ``num_samples`` the number of chains; ``estimator`` records
    ``{"name": "ais", ...its settings}`` (also in ``log_evidence``), and ``log_evidence["mean_acceptance"]``
    the mean HMC acceptance probability. AIS's settings: keywords or ``settings``, as for
    :func:`~ppl_vae.ais.ais_log_evidence`.
    """
    settings = AisSettings.of(settings, steps=steps, chains=chains, leapfrog_steps=leapfrog_steps, schedule=schedule,
                              target_accept=target_accept)
    estimate = ais_log_evidence(model, guide, x, *cond, settings=settings, chunk_size=chunk_size,
                                progress="log p(x), AIS" if progress else False)
    evidence = EvidenceEstimate(estimate.log_evidence, estimate.stderr, estimate.ess, estimate.settings["chains"])
    result = evaluation_summary(model, guide, x, *cond, elbo_samples=elbo_samples, chunk_size=chunk_size, levels=levels,
                                evidence=evidence, decomposition=decomposition, progress=progress)
    record_ais_estimator(result, estimate.settings, estimate.acceptance)
    return result, estimate


def record_ais_estimator(result: dict[str, Any], settings: dict[str, Any], acceptance: torch.Tensor) -> dict[str, Any]:
    """Record in an evaluation summary that its log p̂ is AIS's: ``estimator`` (also in ``log_evidence``) with the
    settings, and the mean HMC acceptance over datapoints. Returns ``result``."""
    record = estimator_record(settings)
    result["estimator"] = record
    result["log_evidence"].update(estimator=record, mean_acceptance=acceptance.double().mean().item())
    return result


def estimator_record(settings: dict[str, Any]) -> dict[str, Any]:
    """What an evidence number came from, for the JSON files: ``{"name": "ais" | "is", ...settings}``."""
    return {"name": settings.get("estimator", "is"), **{k: v for k, v in settings.items() if k != "estimator"}}


def _stat(values: torch.Tensor) -> dict[str, float]:
    mean, stderr = mean_and_stderr(values)
    return {"mean": mean, "stderr": stderr}


def _bracket(model: Callable, guide: Callable, cond: tuple, data_like: torch.Tensor, simulated: int,
             bdmc_steps: list[int], settings: AisSettings, options: dict[str, Any]) -> list[dict[str, Any]]:
    """BDMC at each number of steps on the same simulated images: the mean lower and upper bounds and the gap."""
    rows = []
    seed = int(torch.randint(2**31, ()))
    for steps in bdmc_steps:
        pyro.set_rng_seed(seed)  # the same simulated images at every number of steps: the brackets are comparable
        result = bdmc(model, guide, simulated, *(c[:simulated] for c in cond), data_like=data_like,
                      settings=replace(settings, steps=steps), **options)
        rows.append({"steps": steps, "lower": _stat(result.lower.log_evidence), "upper": _stat(result.upper.log_evidence),
                     "gap": _stat(result.gap), "mean_acceptance": result.lower.acceptance.mean().item()})
    return rows


def _compare_on_hardest(model: Callable, guide: Callable, x: torch.Tensor, cond: tuple, num_samples: int,
                        ais_examples: int, settings: AisSettings, progress: bool | str,
                        chunk_size: int | None) -> list[dict[str, Any]]:
    """IS with PSIS k-hat on every image of x, then AIS on the ``ais_examples`` with the highest k-hat, highest first."""
    evidence, psis = evidence_with_psis(model, guide, x, *cond, num_samples=num_samples, chunk_size=chunk_size)
    khat = torch.nan_to_num(psis["khat"], nan=float("inf"))
    order = torch.argsort(khat, descending=True)[:ais_examples]
    ais = ais_log_evidence(model, guide, x[order], *(c[order] for c in cond), chunk_size=chunk_size, settings=settings,
                           progress=progress)
    return [{"image": int(i), "khat": float(psis["khat"][i]), "is": float(evidence.log_evidence[i]),
             "is_stderr": float(evidence.stderr[i]), "ais": float(ais.log_evidence[j]), "ais_stderr": float(ais.stderr[j]),
             "is_minus_ais": float(evidence.log_evidence[i] - ais.log_evidence[j])}
            for j, i in enumerate(order.tolist())]


def _check_applies(model: Callable, guide: Callable, x: torch.Tensor, cond: tuple) -> None:
    """Refuse in one line, before minutes of importance sampling, a program AIS or BDMC cannot run on
    (enumerated or discrete latents, moving supports, a model that does not observe x itself...)."""
    check_ais_applies(model, guide, x, *cond)
    with evaluation_mode(model, guide), pyro.validation_enabled(False):
        simulate(model, guide, 1, *(c[:1] for c in cond), data_like=x[:1])


def audit_run(
    run_dir: str | Path, *, device: str = "cpu", data_dir: str | None = None, trust_program: bool = False,
    split: str = "test", examples: int = 200, ais_examples: int = 20, num_samples: int = 5000, simulated: int = 100,
    steps: int | None = None, bdmc_steps: list[int] | None = None, chains: int | None = None,
    leapfrog_steps: int | None = None, schedule: str | None = None, seed: int = 0,
    chunk_size: int | None = None, progress: bool = False, settings: AisSettings | None = None,
) -> str:
    """Audit a run's evidence (module docstring): write ``audit.json`` and ``plots/audit.png``; return the table.

    IS uses K = ``num_samples`` draws on the first ``examples`` images of ``split``; AIS (``steps``, ``chains``,
    ``leapfrog_steps``, ``schedule``, or one ``settings``, as for :func:`~ppl_vae.ais.ais_log_evidence`) runs on the
    ``ais_examples`` of them with the highest k-hat; BDMC runs on ``simulated`` images from the model at each of
    ``bdmc_steps`` (default: T/10, T/3 and T, T = ``steps``), its other settings the same.
    The run's evaluation lock is held throughout (no evaluation or ``train --overwrite`` meanwhile).
    """
    from .data import load_run_data, run_conditioning
    from .train import levels_of, load_run, resolve_device

    for value, name in ((examples, "examples"), (ais_examples, "ais_examples"), (num_samples, "num_samples"),
                        (simulated, "simulated")):
        check_count(value, name)
    settings = AisSettings.of(settings, steps=steps, chains=chains, leapfrog_steps=leapfrog_steps, schedule=schedule)
    steps = settings.steps
    bdmc_steps = sorted({max(1, steps // 10), max(1, steps // 3), steps} if bdmc_steps is None
                        else {check_count(s, "bdmc_steps") for s in bdmc_steps})
    run_dir = Path(run_dir)
    started = time.perf_counter()
    with runs.RunLock(run_dir, "evaluate"):
        vae, config = load_run(run_dir, resolve_device(device), trust_program=trust_program)
        train_config = config["train"]
        levels = levels_of(vae, train_config["binarize"])
        data = load_run_data(train_config, data_dir, resolve_device(device), dequantize_levels=levels == "dequantized")
        x = data.split(split)[:examples]
        cond = tuple(c[:examples] for c in data.conditioning(split, run_conditioning(train_config)))
        if simulated > x.shape[0] and cond:
            raise InvalidDataError(f"simulated={simulated}: a conditional run simulates images for the labels of "
                                   f"{x.shape[0]} {split} images; ask for at most that many (or more examples)")
        _check_applies(vae.model, vae.guide, x, cond)
        pyro.set_rng_seed(seed)
        with pyro.validation_enabled(False):  # as ppl-vae evaluate runs; the data were checked when loaded
            images = _compare_on_hardest(vae.model, vae.guide, x, cond, num_samples, min(ais_examples, x.shape[0]),
                                         settings, "AIS on the highest k-hat" if progress else False, chunk_size)
            bracket = _bracket(vae.model, vae.guide, cond, x[:1], simulated, bdmc_steps, settings,
                               dict(chunk_size=chunk_size, progress="BDMC" if progress else False))
        difference = torch.tensor([row["is_minus_ais"] for row in images], dtype=torch.float64)
        payload = {
            "run": str(run_dir), "model": config["description"], "epoch": config["epoch"],
            "checkpoint_id": config.get("checkpoint_id"), "split": split, "seed": seed,
            "is": {"name": "is", "num_samples": num_samples, "num_datapoints": x.shape[0]},
            "ais": {**estimator_record(settings.record()),
                    "num_datapoints": len(images), "selected": "highest PSIS k-hat first"},
            "is_minus_ais": _stat(difference) if len(images) > 1 else {"mean": difference.mean().item(), "stderr": None},
            "images": images,
            "bdmc": {"num_datapoints": simulated, "rows": bracket, "certifies": "simulated data only"},
            "seconds": time.perf_counter() - started,
        }
        runs.write_json(runs.record_written(run_dir, AUDIT_FILE)[0], payload)
        figure = plots.plot_evidence_audit([row["khat"] for row in images], difference.tolist(), bracket,
                                           runs.RunFolder(run_dir, runs.PLOTS_FOLDER) / AUDIT_FIGURE)
    return format_audit(payload) + f"\nwritten to {run_dir / AUDIT_FILE} and {figure}"


def format_audit(payload: dict[str, Any]) -> str:
    """The audit's tables: IS against AIS per image (highest k-hat first), then the BDMC bracket per steps."""
    ais, bracket = payload["ais"], payload["bdmc"]
    lines = [f"{payload['run']}: {payload['model']}, epoch {payload['epoch']} (checkpoint {payload['checkpoint_id']})",
             f"IS (K={payload['is']['num_samples']}) against AIS (T={ais['steps']}, L={ais['leapfrog_steps']}, "
             f"C={ais['chains']}, {ais['schedule']}) on the {ais['num_datapoints']} {payload['split']} images with the "
             f"highest PSIS k-hat of {payload['is']['num_datapoints']}, nats:",
             f"{'image':>6} {'k-hat':>7} {'IS':>10} {'± s.e.':>7} {'AIS':>10} {'± s.e.':>7} {'IS - AIS':>9}"]
    for row in payload["images"]:
        lines.append(f"{row['image']:>6} {row['khat']:>7.2f} {row['is']:>10.2f} {row['is_stderr']:>7.2f} "
                     f"{row['ais']:>10.2f} {row['ais_stderr']:>7.2f} {row['is_minus_ais']:>9.2f}")
    gap = payload["is_minus_ais"]
    spread = f" ± {gap['stderr']:.2f}" if gap["stderr"] is not None else ""
    lines.append(f"mean IS - AIS: {gap['mean']:.2f}{spread} nats (negative: the IS bound is looser on these images)")
    lines.append(f"BDMC on {bracket['num_datapoints']} images simulated from the model (certifies AIS on simulated "
                 "data only), mean ± s.e. over images, nats:")
    lines.append(f"{'steps':>6} {'forward (lower)':>20} {'reverse (upper)':>20} {'gap':>15} {'accept':>7}")
    for row in bracket["rows"]:
        def cell(stat: dict) -> str:
            return f"{stat['mean']:.2f} ± {stat['stderr']:.2f}"

        lines.append(f"{row['steps']:>6} {cell(row['lower']):>20} {cell(row['upper']):>20} {cell(row['gap']):>15} "
                     f"{row['mean_acceptance']:>7.2f}")
    return "\n".join(lines)
