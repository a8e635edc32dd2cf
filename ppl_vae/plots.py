"""Figures, drawn with matplotlib (image grids with torchvision's ``make_grid``).

Every function writes one PNG and returns its path; nothing is shown on screen,
so the functions work on a machine without a display.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

IMAGE_SIDE = 28


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def image_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """[N, 784] (or [N, 1, 28, 28]) values in [0, 1] -> one [H, W] grid, via ``make_grid``."""
    images = images.detach().cpu().reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE).clamp(0, 1)
    return make_grid(images, nrow=nrow, padding=2, pad_value=1.0)[0]


def plot_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 10, title: str = "") -> Path:
    figure, axis = plt.subplots(figsize=(nrow * 0.6, max(1, len(images) // nrow) * 0.6 + 0.4))
    axis.imshow(image_grid(images, nrow), cmap="gray", vmin=0, vmax=1)
    axis.set_axis_off()
    if title:
        axis.set_title(title, fontsize=9)
    return _save(figure, path)


def plot_training_curves(metrics: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """ELBO (train and validation), reconstruction and KL per epoch, in nats per image."""
    epochs = [m["epoch"] for m in metrics]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(epochs, [m["train_elbo"] for m in metrics], label="train (running, objective)")
    left.errorbar(epochs, [m["val_elbo"] for m in metrics], yerr=[m.get("val_elbo_stderr", 0) for m in metrics],
                  label="validation ELBO", capsize=2)
    left.set_xlabel("epoch")
    left.set_ylabel("nats per image")
    left.set_title("ELBO")
    left.legend()
    right.plot(epochs, [-m["val_reconstruction"] for m in metrics], label="-reconstruction E_q[log p(x|z)]")
    right.plot(epochs, [m["val_kl"] for m in metrics], label="KL(q(z|x) || p(z))")
    right.set_xlabel("epoch")
    right.set_ylabel("nats per image (validation)")
    right.set_title("decomposition")
    right.legend()
    return _save(figure, path)


def plot_comparison(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """ELBO and log p̂(x) of several runs side by side, with standard-error bars."""
    names = [Path(r["run"]).name for r in rows]
    positions = torch.arange(len(rows)).float()
    figure, axis = plt.subplots(figsize=(max(5, 1.3 * len(rows)), 3.5))
    axis.bar(positions - 0.2, [r["elbo"] for r in rows], width=0.4, yerr=[r["elbo_se"] for r in rows], label="ELBO", capsize=3)
    axis.bar(positions + 0.2, [r["log_px"] for r in rows], width=0.4, yerr=[r["log_px_se"] for r in rows],
             label="log p̂(x)", capsize=3)
    values = [v for r in rows for v in (r["elbo"], r["log_px"])]
    span = max(values) - min(values) or 1.0
    axis.set_ylim(min(values) - 0.5 * span, max(values) + 0.5 * span)
    axis.set_xticks(positions.tolist(), names, rotation=30, ha="right")
    axis.set_ylabel("nats per image (higher is better)")
    axis.legend()
    return _save(figure, path)


def guide_mean(q) -> torch.Tensor:
    """The guide's mean, or for a flow (no closed-form mean) its base mean pushed through the flow."""
    try:
        return q.mean
    except NotImplementedError:
        z = q.base_dist.mean
        for transform in q.transforms:
            z = transform(z)
        return z


@torch.no_grad()
def plot_reconstructions(vae, x: torch.Tensor, path: str | Path, use_mean: bool = False) -> Path:
    """Test images (top row) and E[x | z] for z ~ q(z | x) (bottom row)."""
    guide = vae.guide_net(vae.flatten(x))
    z = guide_mean(guide) if use_mean else guide.sample()
    reconstructions = vae.decode_mean(z)
    return plot_image_grid(torch.cat([x.reshape(len(x), -1), reconstructions]), path, nrow=len(x),
                           title="data (top) and reconstructions E[x|z], z ~ q(z|x) (bottom)")


@torch.no_grad()
def plot_samples(vae, path: str | Path, num_samples: int = 64) -> Path:
    """E[x | z] for z ~ p(z): what the generative model has learned."""
    return plot_image_grid(vae.sample_prior(num_samples), path, nrow=8, title="E[x|z] for z ~ p(z)")


@torch.no_grad()
def plot_interpolations(vae, x: torch.Tensor, path: str | Path, steps: int = 10) -> Path:
    """Linear paths between the guide means of consecutive pairs of images, decoded."""
    means = guide_mean(vae.guide_net(vae.flatten(x)))
    starts, ends = means[0::2], means[1::2]
    n = min(len(starts), len(ends))
    weights = torch.linspace(0, 1, steps, device=means.device).reshape(1, steps, 1)
    path_z = starts[:n, None] * (1 - weights) + ends[:n, None] * weights
    images = vae.decode_mean(path_z.reshape(n * steps, -1))
    return plot_image_grid(images, path, nrow=steps, title="interpolations between guide means")


def plot_khat(khat, path: str | Path, threshold: float = 0.7) -> Path:
    """Pareto k-hat of every datapoint's importance weights, with ArviZ's ``plot_khat``."""
    import arviz
    import numpy as np

    values = np.asarray(khat, dtype=float)
    # -inf marks constant weights (bounded, nothing to fit): drawn at 0; +inf (no fit) at the top.
    values = np.where(np.isneginf(values), 0.0, values)
    values = np.where(np.isposinf(values), np.nanmax(np.where(np.isfinite(values), values, threshold)) + 1, values)
    figure, axis = plt.subplots(figsize=(8, 3.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ prefers ELPDData; a plain array is what we have
        arviz.plot_khat(values, ax=axis, show_hlines=True, hlines_kwargs={"hlines": [0.5, threshold]})
    axis.set_title(f"PSIS k-hat per datapoint ({np.mean(values > threshold):.1%} above {threshold})")
    return _save(figure, path)


def plot_kl_per_dimension(kl_sorted: Sequence[float], path: str | Path, threshold: float = 0.01) -> Path:
    """KL(q(z_d|x) || p(z_d)) per latent dimension, largest first: collapsed units sit at the right, near 0."""
    figure, axis = plt.subplots(figsize=(8, 3))
    axis.bar(range(len(kl_sorted)), kl_sorted)
    axis.axhline(threshold, color="red", linewidth=0.8, label=f"collapse threshold {threshold} nats")
    axis.set_xlabel("latent dimension (sorted by KL)")
    axis.set_ylabel("KL, nats per image")
    axis.legend()
    return _save(figure, path)


def plot_elbo_surgery(surgery: dict[str, Any], path: str | Path) -> Path:
    """The average KL split into mutual information I(x; z) and marginal KL(q(z) || p(z)), with standard errors."""
    figure, axis = plt.subplots(figsize=(4.5, 3.5))
    parts = [("mutual information", surgery["mutual_information"]), ("marginal KL", surgery["marginal_kl"])]
    axis.bar([0], [parts[0][1]["mean"]], yerr=[parts[0][1]["stderr"]], label=parts[0][0], capsize=3)
    axis.bar([0], [parts[1][1]["mean"]], bottom=[parts[0][1]["mean"]], yerr=[parts[1][1]["stderr"]], label=parts[1][0],
             capsize=3)
    axis.axhline(surgery["mutual_information_bound"], color="gray", linestyle="--", linewidth=0.8, label="log N")
    axis.set_xticks([0], [f"average KL = {surgery['average_kl']['mean']:.2f}"])
    axis.set_ylabel("nats per image")
    axis.legend()
    return _save(figure, path)
