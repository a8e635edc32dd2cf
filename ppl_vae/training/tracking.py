"""The experiment trackers of a run (``--log tensorboard mlflow``, :mod:`ppl_vae.trackers`), as the loop drives them
on the main process: started (or continued, on ``--resume``) once every check has passed and the run directory is
written, sent every epoch's record and, every ``--log-images-every`` epochs, images of samples and reconstructions
where the program allows them, and closed at the end (``FINISHED``) or on the way out (``KILLED``).

The images are drawn from a random stream of their own (seeded from the run's seed and the epoch), so a run with
trackers trains on exactly the numbers of a run without them.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModelStructureError
from ..modes import evaluation_mode
from ..process_group import derive_seed, seeded
from ..style_grid import class_reconstructions, model_samples
from ..trackers import Tracker, check_trackers, make_trackers
from .checks import conditioning
from .setup import TrainingRun

IMAGES = 8  # samples and reconstructions per image grid


def start_trackers(run: TrainingRun, resumed: bool) -> list[Tracker]:
    """The run's trackers, started in its directory (continued when ``resumed``) with its configuration as
    parameters; none for another process than the main one, or a run held in memory."""
    if not run.config.log or not run.main or run.run_dir is None:
        return []
    check_trackers(run.config.log)
    trackers, started = make_trackers(run.config.log, run.config.tracking_uri), []
    try:
        for tracker in trackers:
            tracker.start(run.run_dir, resume_epoch=run.start_epoch if resumed else None)
            started.append(tracker)
            tracker.log_params(parameters(run.saved_config))
    except BaseException:
        close_trackers(started, finished=False)
        raise
    return trackers


def parameters(saved_config: dict[str, Any]) -> dict[str, Any]:
    """config.json's settings as flat parameters, e.g. ``train.epochs``, ``model.latent_dim``, ``engine.engine``."""
    return {f"{section}.{name}": value for section, values in saved_config.items() if isinstance(values, dict)
            for name, value in values.items()}


def log_to_trackers(run: TrainingRun, record: dict[str, Any]) -> None:
    """The epoch's record to every tracker; at the interval of --log-images-every (and the last epoch), images."""
    if not run.trackers:
        return
    epoch, every = record["epoch"], run.config.log_images_every
    for tracker in run.trackers:
        tracker.log_epoch(record, step=epoch)
    if every and (epoch % every == 0 or epoch == run.config.epochs or run.stopping["stop"]):
        for tag, images in epoch_images(run, epoch).items():
            for tracker in run.trackers:
                tracker.log_images(tag, images, step=epoch)


def epoch_images(run: TrainingRun, epoch: int) -> dict[str, torch.Tensor]:
    """The images ``ppl-vae plot`` draws, as [N, C, H, W], where the program allows them; in eval mode, from their own
    random stream.

    Samples: E[x | z], z ~ p(z) (a ``sample_prior(n)`` method), else the model run on its own
    (:func:`ppl_vae.style_grid.model_samples`: for M2 y ~ p(y), z ~ p(z); a program given data after x gets the
    validation images' data). Reconstructions of validation images (above them): E[x | E_q[z | x]] (the built-in
    VAE, or ``encode_mean`` with ``decode_mean``, given the data after x as in training), else, for a program with
    a discrete label site on x alone, through its most probable class (:func:`ppl_vae.style_grid.class_reconstructions`).
    """
    program, x = run.program, run.data.val[:IMAGES]
    cond = tuple(c[:IMAGES] for c in conditioning(run.data, "val", run.config))
    shape = tuple(x.shape[1:])
    images = {}
    with seeded(derive_seed(run.config.seed, "images", epoch)), evaluation_mode(program), torch.no_grad():
        samples = _samples(program, x, cond)
        if samples is not None:
            images["samples"] = samples.reshape(-1, *shape)
        reconstructions = _reconstructions(program, x, cond, run.config.label_site)
        if reconstructions is not None:
            reconstructions = reconstructions.reshape(-1, *shape)
            images["reconstructions"] = torch.cat([x.reshape(-1, *shape).to(reconstructions.dtype), reconstructions])
    return images


# What a program's model or guide raises when it cannot be run for a figure (a model that needs its labels, a guide
# without a label site): the images are then left out, as `ppl-vae plot` leaves the figure out with a note.
_CANNOT_DRAW = (ModelStructureError, TypeError, ValueError, RuntimeError)


def _samples(program: torch.nn.Module, x: torch.Tensor, cond: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    if callable(getattr(program, "sample_prior", None)):
        return program.sample_prior(IMAGES)
    try:
        return model_samples(program, x.shape[0] if cond else IMAGES, x, cond)
    except _CANNOT_DRAW:
        return None


def _reconstructions(program: torch.nn.Module, x: torch.Tensor, cond: tuple[torch.Tensor, ...],
                     label_site: str) -> torch.Tensor | None:
    encode = _encoder(program)
    if encode is not None and callable(getattr(program, "decode_mean", None)):
        return program.decode_mean(encode(x, *cond), *cond)
    if cond:
        return None
    try:
        return class_reconstructions(program, x, label_site)
    except _CANNOT_DRAW:
        return None


def _encoder(program: torch.nn.Module):
    """E_q[z | x] of the program: its ``encode_mean``, or the built-in VAE's guide network's mean; else None."""
    if callable(getattr(program, "encode_mean", None)):
        return program.encode_mean
    if callable(getattr(program, "guide_net", None)) and callable(getattr(program, "flatten", None)):
        from ..latent_views import guide_mean

        return lambda x: guide_mean(program.guide_net(program.flatten(x)))
    return None


def close_trackers(trackers: list[Tracker], finished: bool) -> None:
    """Close every tracker (``finished``: the run ended; else it was stopped or failed, and may be resumed)."""
    for tracker in trackers:
        tracker.close(finished=finished)
