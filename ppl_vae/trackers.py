"""Experiment trackers: every epoch's record, the configuration and images, sent to TensorBoard or MLflow.

Both are optional extras (``pip install -e ".[tensorboard]"``, ``".[mlflow]"``); a missing one is refused in one line
by :func:`check_trackers` before training writes anything. Both write inside the run directory by default:

* TensorBoard: event files in ``tb/`` (``torch.utils.tensorboard.SummaryWriter``). A resumed run continues the same
  folder with ``purge_step`` set to the first epoch it trains again, so TensorBoard drops the events a killed run
  wrote after its last checkpoint: no step appears twice.
* MLflow: a SQLite store ``mlflow.db`` and artifacts in ``mlruns/`` (MLflow 3 refuses its file store), or a tracking
  URI (a server). The run's id is saved in ``mlflow_run.json``; a resumed run continues that MLflow run. MLflow cannot
  delete logged points, so a resumed run skips the steps that run already logged (tag ``ppl_vae.last_step``, written
  with each epoch's metrics): with exact resume those epochs are the same ones again, their timings aside.

An epoch's record is logged with :func:`scalars`: every number of it (not ``epoch``, the step), and the numbers of a
nested dict under ``key/name`` -- so ``record["val_kl_site"] = kl_per_site(val["kl"])`` logs the KL of each latent
site by the program's own site names (``val_kl_site/z``).
"""

from __future__ import annotations

import importlib.util
import logging
import numbers
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from . import runs
from .errors import PplVaeError, RunDirectoryError

TRACKERS = ("tensorboard", "mlflow")
TENSORBOARD_FOLDER = "tb"
MLFLOW_DATABASE = "mlflow.db"
MLFLOW_ARTIFACTS = "mlruns"
MLFLOW_RUN_FILE = "mlflow_run.json"
MLFLOW_EXPERIMENT = "ppl-vae"
_LAST_STEP_TAG = "ppl_vae.last_step"
_NEEDS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # tracker -> the module its extra installs


@runtime_checkable
class Tracker(Protocol):
    """Where a training run reports to. The loop calls, on the main process only:

    ``start(run_dir, resume_epoch)`` once before the first epoch (``resume_epoch``: the checkpoint's epoch a resumed
    run continues from, None for a new run); ``log_params(config)`` once (a tracker ignores it on resume: the run has
    them); ``log_epoch(record, step=epoch)`` after each epoch's record is written to metrics.jsonl;
    ``log_images(tag, images, step=epoch)`` at the chosen interval; ``close(finished)`` at the end or on the way out.
    """

    def start(self, run_dir: Path, resume_epoch: int | None = None) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_epoch(self, record: Mapping[str, Any], step: int) -> None: ...

    def log_images(self, tag: str, images: torch.Tensor, step: int) -> None: ...

    def close(self, finished: bool = True) -> None: ...


def check_trackers(names: Sequence[str]) -> None:
    """Refuse an unknown tracker, or one whose optional package is not installed (one line, with the install command)."""
    for name in names:
        if name not in TRACKERS:
            raise PplVaeError(f"unknown tracker {name!r} for --log: choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(_NEEDS[name]) is None:
            raise PplVaeError(f"--log {name} needs the {_NEEDS[name]} package, which is not installed: run "
                              f"pip install -e \".[{name}]\" (or pip install {_NEEDS[name]})")


def make_trackers(names: Sequence[str], tracking_uri: str | None = None) -> list[Tracker]:
    """The trackers named (``--log``), each once; ``tracking_uri`` is MLflow's (default: the run directory)."""
    check_trackers(names)
    made: dict[str, Tracker] = {}
    for name in names:
        if name not in made:
            made[name] = TensorBoardTracker() if name == "tensorboard" else MLflowTracker(tracking_uri)
    return list(made.values())


def kl_per_site(kl: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The mean KL term of each latent site (nats per datapoint), keyed by the program's site names."""
    return {site: float(torch.as_tensor(values, dtype=torch.float64).mean()) for site, values in kl.items()}


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of an epoch's record by name (``epoch`` excluded: it is the step); nested dicts as ``key/name``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "epoch":
            continue
        if isinstance(value, Mapping):
            out.update({f"{key}/{name}": float(v) for name, v in value.items() if _is_number(v)})
        elif _is_number(value):
            out[key] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _image_grid(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) or (N, H, W) images in [0, 1] as one (C, H', W') grid."""
    from torchvision.utils import make_grid

    images = images.detach().float().cpu()
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return make_grid(images.clamp(0, 1), nrow=min(10, images.shape[0]), pad_value=1.0)


class TensorBoardTracker:
    """Event files in ``run_dir/tb`` through ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self) -> None:
        self.writer = None
        self.resumed = False

    def start(self, run_dir: Path, resume_epoch: int | None = None) -> None:
        check_trackers(["tensorboard"])
        from torch.utils.tensorboard import SummaryWriter

        self.resumed = resume_epoch is not None
        # purge_step: TensorBoard discards the earlier files' events from this step on (those a killed run wrote
        # after its last checkpoint, which the resumed run writes again).
        purge = resume_epoch + 1 if self.resumed else None
        runs.record_written(run_dir, TENSORBOARD_FOLDER)  # a tree of the manifest: --overwrite deletes it whole
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_FOLDER), purge_step=purge)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.resumed:
            return
        rows = "\n".join(f"| {key} | {value} |" for key, value in params.items())
        self.writer.add_text("config", "| parameter | value |\n|---|---|\n" + rows, global_step=0)

    def log_epoch(self, record: Mapping[str, Any], step: int) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def log_images(self, tag: str, images: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, _image_grid(images), global_step=step)
        self.writer.flush()

    def close(self, finished: bool = True) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# MLflow allows these characters in metric names; a site name with others is logged with "_" in their place.
_MLFLOW_NAME = re.compile(r"[^0-9A-Za-z_\-. /]")


class MLflowTracker:
    """One MLflow run per training run, continued on resume; a SQLite store in the run directory by default."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.client = None
        self.run_id: str | None = None
        self.logged_through = 0  # steps up to this one were logged before a resume (skipped when trained again)
        self.resumed = False

    def start(self, run_dir: Path, resume_epoch: int | None = None) -> None:
        check_trackers(["mlflow"])
        from mlflow import MlflowClient

        run_dir = Path(run_dir)
        saved_file = run_dir / MLFLOW_RUN_FILE
        saved = runs.read_json(saved_file) if resume_epoch is not None and saved_file.exists() else None
        default_uri = f"sqlite:///{(run_dir / MLFLOW_DATABASE).resolve()}"
        if saved and self.tracking_uri is not None and self.tracking_uri != saved["tracking_uri"]:
            raise RunDirectoryError(
                f"{run_dir} logs to the MLflow store {saved['tracking_uri']}, not {self.tracking_uri}: resume it "
                "without --tracking-uri (or with that one)")
        uri = saved["tracking_uri"] if saved else (self.tracking_uri or default_uri)
        # The run's manifest lists the store's file and its artifacts folder (a tree): --overwrite deletes them.
        runs.record_written(run_dir, MLFLOW_RUN_FILE,
                            *([MLFLOW_DATABASE, MLFLOW_ARTIFACTS] if uri == default_uri else []))
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables..." on stderr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # SQLAlchemy's, inside MLflow: nothing to act on
            self.client = MlflowClient(tracking_uri=uri)
        if saved:
            self.run_id, self.resumed = saved["run_id"], True
            run = self.client.get_run(self.run_id)
            self.logged_through = int(run.data.tags.get(_LAST_STEP_TAG, 0))
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        artifacts = (run_dir / MLFLOW_ARTIFACTS).resolve().as_uri() if uri == default_uri else None
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            MLFLOW_EXPERIMENT, artifact_location=artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        runs.write_json(saved_file, {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": self.run_id})

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.resumed:
            return
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(key, str(value)[:6000]) for key, value in params.items()])

    def log_epoch(self, record: Mapping[str, Any], step: int) -> None:
        if step <= self.logged_through:
            return
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_NAME.sub("_", key), value, now, step) for key, value in scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics, tags=[RunTag(_LAST_STEP_TAG, str(step))])

    def log_images(self, tag: str, images: torch.Tensor, step: int) -> None:
        if step <= self.logged_through:
            return
        grid = (_image_grid(images).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        self.client.log_image(self.run_id, grid, key=_MLFLOW_NAME.sub("_", tag), step=step)

    def close(self, finished: bool = True) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")
            self.client = None
