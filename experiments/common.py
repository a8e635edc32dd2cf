"""Glue shared by the experiment scripts: configs, cached training runs, evaluation, and writing results.

Not library code: everything measured is computed by ``ppl_vae``. A script reads
``experiments/configs/<name>.json`` (``--quick`` applies its ``"quick"`` overrides for a
smoke run), trains through :func:`ppl_vae.train.train` into ``runs/experiments/``
(git-ignored; a finished run with the same configuration is loaded instead of retrained,
``--retrain`` forces training), writes its figures to ``experiments/figures/``, its numbers
to ``experiments/results/<name>.json`` and a Markdown section to
``experiments/results/<name>.md``, and puts that section into ``experiments/README.md``
between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyro
import torch

from ppl_vae import runs
from ppl_vae.bench import cpu_name
from ppl_vae.data import load_mnist
from ppl_vae.evaluate import evaluation_summary, mean_and_stderr
from ppl_vae.model import VAEConfig
from ppl_vae.train import TrainConfig, fit, fit_to_dataset, load_run, train

EXPERIMENTS = Path(__file__).resolve().parent
REPO = EXPERIMENTS.parent
FIGURES = EXPERIMENTS / "figures"
RESULTS = EXPERIMENTS / "results"
README = EXPERIMENTS / "README.md"
DPI = 80  # committed figures stay small


def parse_args(name: str, description: str) -> tuple[dict[str, Any], argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=str(EXPERIMENTS / "configs" / f"{name}.json"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: the config's 'quick' overrides, outputs in runs/")
    parser.add_argument("--retrain", action="store_true", help="train again even where a finished run exists")
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "experiments"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 by default: on a shared 2-core machine more threads spin against each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = json.loads(Path(args.config).read_text())
    quick = config.pop("quick", {})
    if args.quick:
        config.update(quick)
        args.runs_dir = str(Path(args.runs_dir) / "quick")  # smoke runs never replace the real ones
    return config, args


def output_dirs(args) -> tuple[Path, Path]:
    """Figures and results folders: the committed ones, or under runs/ for --quick."""
    if args.quick:
        base = Path(args.runs_dir) / "outputs"
        return base / "figures", base / "results"
    return FIGURES, RESULTS


def hardware() -> str:
    device = "CUDA GPU" if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({cpu_name()}), {device}; torch {torch.__version__} "
            f"with {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}, pyro {pyro.__version__}")


def train_or_load(run_dir: Path, train_config: TrainConfig, model_config: VAEConfig, retrain: bool = False):
    """Train into ``run_dir`` unless a finished run of the same configuration is there; return (vae, test result)."""
    run_dir = Path(run_dir)
    # As train() records them: with the image shape (and a .npz file's path and SHA-256) filled in from the data.
    train_config, model_config = fit_to_dataset(train_config, model_config)
    wanted = {"model": model_config.to_dict(), "train": asdict(train_config)}
    wanted = json.loads(json.dumps(wanted))  # tuples -> lists, as in config.json
    done = (run_dir / "test.json").is_file() and (run_dir / runs.CONFIG_FILE).is_file()
    if done and not retrain and _same_run(runs.read_json(run_dir / runs.CONFIG_FILE), wanted):
        print(f"loading the finished run {run_dir}", flush=True)
        result = runs.read_json(run_dir / "test.json")
        LOADED.append(str(run_dir))
    else:
        print(f"training {run_dir}: {model_config.describe()}, {train_config.epochs} epochs, beta {train_config.beta:g}", flush=True)
        result = train(run_dir, train_config, model_config, overwrite=True, progress=False)
    vae, _ = load_run(run_dir)
    return vae, result


def _same_run(saved: dict, wanted: dict) -> bool:
    """The saved run has the wanted configuration; options it predates count as their defaults."""
    defaults = {"model": json.loads(json.dumps(VAEConfig().to_dict())), "train": json.loads(json.dumps(asdict(TrainConfig())))}
    for part in ("model", "train"):
        for key, value in wanted[part].items():
            if key == "image_shape" and saved.get(part, {}).get(key) is None:
                continue  # a run that predates recording the image shape: it was MNIST's, as data_dim says
            if part == "train" and key == "engine":
                continue  # how the steps were computed, not what was trained: every engine runs the same checked ELBO
            if saved.get(part, {}).get(key, defaults[part].get(key)) != value:
                return False
    return True


def mnist(binarize: str = "dynamic", dequantize: bool = False):
    # Flat [N, 784]: the scripts were written for MLPs on MNIST and index pixels that way.
    return load_mnist(None, binarize, "cpu", dequantize_levels=dequantize).flattened()


def summary(values: torch.Tensor) -> dict[str, float]:
    mean, stderr = mean_and_stderr(values)
    return {"mean": mean, "stderr": stderr}


def evaluate(vae, x: torch.Tensor, num_samples: int, elbo_samples: int = 10, seed: int = 0) -> dict[str, Any]:
    """ELBO, its decomposition and log p̂(x) (K = ``num_samples``) of the unweighted model on ``x``."""
    pyro.set_rng_seed(seed)
    return evaluation_summary(vae.model, vae.guide, x, num_samples=num_samples, elbo_samples=elbo_samples)


def fit_variant(vae, data, epochs: int, objective: str = "elbo", batch_size: int = 100, learning_rate: float = 1e-3,
                seed: int = 0) -> list[float]:
    """Train a VAE that :func:`ppl_vae.train.train` cannot build (a custom guide): the per-epoch objective.

    The package's one loop (:func:`ppl_vae.training.fit`, a program in memory: the same checks, engine choice,
    checked steps and per-epoch validation as ``train``, no run directory): fresh param store, seeded, one pass
    over the dynamically binarized training set per epoch, Adam. ``objective``: elbo, meanfield or iwae.
    """
    config = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                         objective=objective, device=data.train.device.type, evidence_every=0)
    return [record["train_elbo"] for record in fit(vae, data, config)]


def fmt(value: dict[str, float] | float, digits: int = 2) -> str:
    """``mean ± se`` of a summary dict, or a plain number."""
    if isinstance(value, dict):
        return f"{value['mean']:.{digits}f} ± {value['stderr']:.{digits}f}"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, results: dict[str, Any], section: str, args) -> None:
    """``results/<name>.json``, ``results/<name>.md``, and the section in the README (not for --quick)."""
    _, results_dir = output_dirs(args)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (results_dir / f"{name}.md").write_text(section.strip() + "\n")
    if not args.quick and README.is_file():
        replace_section(README, name, section)
    print(section)


def replace_section(readme: Path, name: str, section: str) -> bool:
    """Put ``section`` between the ``<!-- begin NAME -->`` and ``<!-- end NAME -->`` markers of ``readme``.

    Returns whether the markers were there (without them the file is left alone).
    """
    text = readme.read_text()
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    if begin not in text or end not in text:
        return False
    before, rest = text.split(begin, 1)
    _, after = rest.split(end, 1)
    readme.write_text(f"{before}{begin}\n{section.strip()}\n{end}{after}")
    return True


def relative(path: Path) -> str:
    """A figure's path as the README links it."""
    return os.path.relpath(path, EXPERIMENTS)


LOADED: list[str] = []  # runs this process loaded instead of training


def time_line(timer: "Timer", train_seconds: float, hardware_text: str) -> str:
    """How long the numbers took: training (from the runs' own records) and this script's run."""
    text = f"Time: training {train_seconds / 60:.1f} minutes (the runs' own records)"
    if LOADED:
        text += f"; this script's last run {timer.minutes():.1f} minutes, loading {len(LOADED)} finished run(s)"
    else:
        text += f"; the whole script {timer.minutes():.1f} minutes"
    return f"{text}; on {hardware_text}."


class Timer:
    def __init__(self):
        self.started = time.perf_counter()

    def minutes(self) -> float:
        return (time.perf_counter() - self.started) / 60
