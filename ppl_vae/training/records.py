"""What a run records each epoch: the line of ``metrics.jsonl`` (:func:`epoch_record`), the line it prints, and
the learning-curve point (log p̂(x) on validation images, :func:`validation_evidence`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..blocked_evaluation import evaluate_per_datapoint
from ..data import ImageData
from ..errors import NumericalFaultError
from ..evaluate import mean_and_stderr
from ..process_group import derive_seed
from ..trackers import kl_per_site
from .checks import conditioning
from .config import TrainConfig
from .steps import fault_message


def epoch_record(
    epoch: int, train_elbo: float, val: dict, last_good: str, *, lr: float, kl_weight: float, epoch_seconds: float,
    steps: int, train_seconds: float, device: torch.device | str,
) -> dict[str, Any]:
    """The line of ``metrics.jsonl`` for ``epoch``, from the validation ELBO decomposition ``val``.

    Raises :class:`NumericalFaultError` (naming ``last_good``, where the last good state is) when
    the validation ELBO is not finite.
    """
    val_elbo, val_elbo_se = mean_and_stderr(val["elbo"])
    if not math.isfinite(val_elbo):
        raise NumericalFaultError(fault_message(f"the validation ELBO became {val_elbo} after epoch {epoch}", last_good))
    return {
        "epoch": epoch,
        "train_elbo": train_elbo,
        "val_elbo": val_elbo,
        "val_elbo_stderr": val_elbo_se,
        "val_reconstruction": mean_and_stderr(val["reconstruction"])[0],
        "val_kl": mean_and_stderr(sum(val["kl"].values()))[0],
        "val_kl_site": kl_per_site(val["kl"]),  # nats/image by the program's own latent site names
        "learning_rate": lr,
        "kl_weight": kl_weight,
        "epoch_seconds": epoch_seconds,
        "steps_per_second": steps / epoch_seconds,
        "train_seconds": train_seconds,
        "device": str(device),
    }


def print_epoch(record: dict[str, Any], config: TrainConfig) -> None:
    """The line a run prints after each epoch."""
    print(
        f"epoch {record['epoch']}/{config.epochs}: train ELBO {record['train_elbo']:.2f}, validation ELBO "
        f"{record['val_elbo']:.2f} ± {record['val_elbo_stderr']:.2f} nats/image ({record['epoch_seconds']:.1f} s)",
        flush=True,
    )


def validation_evidence(program: torch.nn.Module, data: ImageData, config: TrainConfig, epoch: int) -> dict[str, float]:
    """log p̂(x) with K = evidence_samples on the first evidence_examples validation images: the learning curve.

    Seeded from (seed, "evidence", epoch) and shared between the processes (:func:`ppl_vae.blocked_evaluation.evaluate_per_datapoint`).
    """
    n = config.evidence_examples
    cond = tuple(c[:n] for c in conditioning(data, "val", config))
    estimate = evaluate_per_datapoint(program.model, program.guide, data.val[:n], *cond, num_samples=config.evidence_samples,
                                      seed=derive_seed(config.seed, "evidence", epoch)).evidence
    return learning_curve_point(estimate.log_evidence, config)


def learning_curve_point(log_evidence: torch.Tensor, config: TrainConfig) -> dict[str, float]:
    """The metrics.jsonl entries of one learning-curve point from per-image log p̂(x) (nats)."""
    mean, stderr = mean_and_stderr(log_evidence)
    return {"val_log_px": mean, "val_log_px_stderr": stderr, "val_log_px_images": log_evidence.shape[0],
            "val_log_px_samples": config.evidence_samples}
