"""Figures, drawn with matplotlib (image grids with torchvision's ``make_grid``).

Every function writes one PNG and returns its path; nothing is shown on screen,
so the functions work on a machine without a display. Figures are laid out with
matplotlib's constrained layout and saved at their own size, so a PNG is exactly
``figsize * dpi`` pixels (each function's docstring gives its figure size in inches;
``dpi`` defaults to :data:`DPI`).

Besides the figures of a run (``ppl-vae plot``, ``ppl-vae diagnose``) there are the
figures of the experiments in ``experiments/``: the latent space of a 2-D model
(:func:`plot_latent_space`, :func:`plot_latent_spaces`), rows of samples per setting
(:func:`plot_sample_rows`), a sweep of a hyperparameter with its rate-distortion curve
(:func:`plot_sweep`), densities on a 2-D grid (:func:`plot_density_panels`), a check
of importance-sampled against numerically integrated log p(x) (:func:`plot_evidence_check`),
histograms (:func:`plot_histograms`) and bars with error bars (:func:`plot_bars`).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from .latent_views import code_range, decode_grid, guide_mean, guide_means  # noqa: E402
from .modes import evaluates  # noqa: E402

IMAGE_SIDE = 28
DPI = 100  # pixels per inch of every PNG unless a function is given another ``dpi``
DIGIT_COLORS = "tab10"


def _figure(ncols: int = 1, nrows: int = 1, figsize=(6.0, 4.0), **kwargs):
    return plt.subplots(nrows, ncols, figsize=figsize, layout="constrained", squeeze=False, **kwargs)


def _save(figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write the figure at its own size (figsize * dpi pixels) as a 256-colour PNG, and close it.

    The palette (an adaptive one, without dithering) keeps figures of image grids and heat maps
    small enough to commit; line plots and text do not change visibly. The file is written atomically
    (a temporary file renamed over ``path``): a kill leaves no half figure, and a link at ``path`` is
    replaced, never written through. The figure is drawn once, to Agg's RGBA buffer, which goes
    straight to the palette: the pixels ``savefig(format="png")`` would have written, without
    encoding and decoding a full-colour PNG in between (a third of the time of an image grid).
    """
    import io

    from PIL import Image

    from .runs import write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.set_dpi(dpi)  # as savefig(dpi=dpi) sets it while drawing; the figure is closed below
    rgba, size = figure.canvas.print_to_buffer()  # the Agg canvas (matplotlib.use("Agg") above)
    plt.close(figure)
    image = Image.frombuffer("RGBA", size, rgba, "raw", "RGBA", 0, 1)
    palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    png = io.BytesIO()
    palette.save(png, format="PNG", optimize=True)
    write_bytes(path, png.getvalue())
    return path


def image_grid(images: torch.Tensor, nrow: int, image_shape: Sequence[int] | None = None) -> np.ndarray:
    """[N, D] (or [N, C, H, W]) values in [0, 1] -> one grid (a NumPy array, what matplotlib takes), via ``make_grid``.

    ``image_shape`` (C, H, W) defaults to MNIST's (1, 28, 28); the grid is [H', W'] for grey
    images and [H', W', 3] for colour ones.
    """
    shape = tuple(image_shape) if image_shape is not None else (1, IMAGE_SIDE, IMAGE_SIDE)
    images = images.detach().cpu().reshape(-1, *shape).clamp(0, 1)
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    return grid[0].numpy() if shape[0] == 1 else grid.permute(1, 2, 0).numpy()


def plot_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 10, title: str = "", dpi: int = DPI,
                    image_shape: Sequence[int] | None = None) -> Path:
    """Images in rows of ``nrow``; figure (0.6 nrow) x (0.6 rows + 0.4) inches, rows = len(images) // nrow."""
    figure, axis = plt.subplots(figsize=(nrow * 0.6, max(1, len(images) // nrow) * 0.6 + 0.4), layout="constrained")
    axis.imshow(image_grid(images, nrow, image_shape), cmap="gray", vmin=0, vmax=1)
    axis.set_axis_off()
    if title:
        axis.set_title(title, fontsize=9)
    return _save(figure, path, dpi)


def plot_training_curves(metrics: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """ELBO (train and validation), reconstruction and KL per epoch, in nats per image."""
    epochs = [m["epoch"] for m in metrics]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
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


def plot_learning_curve(metrics: Sequence[dict[str, Any]], path: str | Path, published: float | None = None,
                        title: str = "") -> Path:
    """Validation ELBO per epoch and the learning curve of validation log p̂(x) (``--evidence-every``), nats per image.

    ``published``: a reference value of test log p(x), drawn as a dashed line. Figure 6 x 4 inches.
    """
    figure, axes = _figure()
    axis = axes[0, 0]
    axis.plot([m["epoch"] for m in metrics], [m["val_elbo"] for m in metrics], lw=1, color="tab:gray",
              label="validation ELBO")
    curve = [m for m in metrics if "val_log_px" in m]
    if curve:
        axis.errorbar([m["epoch"] for m in curve], [m["val_log_px"] for m in curve],
                      yerr=[m["val_log_px_stderr"] for m in curve], marker="o", ms=3, capsize=2, color="tab:blue",
                      label=f"validation log p̂(x), K={curve[-1]['val_log_px_samples']}")
    if published is not None:
        axis.axhline(published, ls="--", color="tab:red", label=f"published test log p(x) ({published})")
    axis.set_xlabel("epoch")
    axis.set_ylabel("nats per image")
    if title:
        axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    return _save(figure, path)


def plot_comparison(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """ELBO and log p̂ of several runs side by side, with standard-error bars (each run's quantity under its name
    when they differ: log p(x), log p(x | y) and log p(x, y) are not the same number)."""
    names = [Path(r["run"]).name for r in rows]
    quantities = [r.get("quantity") or "?" for r in rows]
    if len(set(quantities)) > 1:
        names = [f"{name}\n{quantity}" for name, quantity in zip(names, quantities)]
    positions = torch.arange(len(rows)).float()
    figure, axis = plt.subplots(figsize=(max(5, 1.3 * len(rows)), 3.5), layout="constrained")
    axis.bar(positions - 0.2, [r["elbo"] for r in rows], width=0.4, yerr=[r["elbo_se"] for r in rows], label="ELBO", capsize=3)
    axis.bar(positions + 0.2, [r["log_px"] for r in rows], width=0.4, yerr=[r["log_px_se"] for r in rows],
             label="log p̂(x)" if set(quantities) == {"log p(x)"} else "log p̂", capsize=3)
    values = [v for r in rows for v in (r["elbo"], r["log_px"])]
    span = max(values) - min(values) or 1.0
    axis.set_ylim(min(values) - 0.5 * span, max(values) + 0.5 * span)
    axis.set_xticks(positions.tolist(), names, rotation=30, ha="right")
    axis.set_ylabel("nats per image (higher is better)")
    axis.legend()
    return _save(figure, path)


@evaluates
def plot_reconstructions(vae, x: torch.Tensor, path: str | Path, use_mean: bool = False) -> Path:
    """Test images (top row) and E[x | z] for z ~ q(z | x) (bottom row)."""
    guide = vae.guide_net(vae.flatten(x))
    z = guide_mean(guide) if use_mean else guide.sample()
    reconstructions = vae.decode_mean(z)
    return plot_image_grid(torch.cat([x.reshape(len(x), -1), reconstructions]), path, nrow=len(x),
                           title="data (top) and reconstructions E[x|z], z ~ q(z|x) (bottom)",
                           image_shape=vae.config.image_shape)


@evaluates
def plot_samples(vae, path: str | Path, num_samples: int = 64) -> Path:
    """E[x | z] for z ~ p(z): what the generative model has learned."""
    return plot_image_grid(vae.sample_prior(num_samples), path, nrow=8, title="E[x|z] for z ~ p(z)",
                           image_shape=vae.config.image_shape)


@evaluates
def plot_interpolations(vae, x: torch.Tensor, path: str | Path, steps: int = 10) -> Path:
    """Linear paths between the guide means of consecutive pairs of images, decoded."""
    means = guide_mean(vae.guide_net(vae.flatten(x)))
    starts, ends = means[0::2], means[1::2]
    n = min(len(starts), len(ends))
    weights = torch.linspace(0, 1, steps, device=means.device).reshape(1, steps, 1)
    path_z = starts[:n, None] * (1 - weights) + ends[:n, None] * weights
    images = vae.decode_mean(path_z.reshape(n * steps, -1))
    return plot_image_grid(images, path, nrow=steps, title="interpolations between guide means",
                           image_shape=vae.config.image_shape)


def plot_khat(khat, path: str | Path, threshold: float = 0.7) -> Path:
    """Pareto k-hat of every datapoint's importance weights, with ArviZ's ``plot_khat``."""
    import arviz
    import numpy as np

    values = np.asarray(khat, dtype=float)
    # -inf marks constant weights (bounded, nothing to fit): drawn at 0; +inf (no fit) at the top.
    values = np.where(np.isneginf(values), 0.0, values)
    values = np.where(np.isposinf(values), np.nanmax(np.where(np.isfinite(values), values, threshold)) + 1, values)
    figure, axis = plt.subplots(figsize=(8, 3.5), layout="constrained")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ prefers ELPDData; a plain array is what we have
        arviz.plot_khat(values, ax=axis, show_hlines=True, hlines_kwargs={"hlines": [0.5, threshold]})
    axis.set_title(f"PSIS k-hat per datapoint ({np.mean(values > threshold):.1%} above {threshold})")
    return _save(figure, path)


def plot_kl_per_dimension(kl_sorted: Sequence[float], path: str | Path, threshold: float = 0.01) -> Path:
    """KL(q(z_d|x) || p(z_d)) per latent dimension, largest first: collapsed units sit at the right, near 0."""
    figure, axis = plt.subplots(figsize=(8, 3), layout="constrained")
    axis.bar(range(len(kl_sorted)), kl_sorted)
    axis.axhline(threshold, color="red", linewidth=0.8, label=f"collapse threshold {threshold} nats")
    axis.set_xlabel("latent dimension (sorted by KL)")
    axis.set_ylabel("KL, nats per image")
    axis.legend()
    return _save(figure, path)


def plot_elbo_surgery(surgery: dict[str, Any], path: str | Path) -> Path:
    """The average KL split into mutual information I(x; z) and marginal KL(q(z) || p(z)), with standard errors."""
    figure, axis = plt.subplots(figsize=(4.5, 3.5), layout="constrained")
    parts = [("mutual information", surgery["mutual_information"]), ("marginal KL", surgery["marginal_kl"])]
    axis.bar([0], [parts[0][1]["mean"]], yerr=[parts[0][1]["stderr"]], label=parts[0][0], capsize=3)
    axis.bar([0], [parts[1][1]["mean"]], bottom=[parts[0][1]["mean"]], yerr=[parts[1][1]["stderr"]], label=parts[1][0],
             capsize=3)
    axis.axhline(surgery["mutual_information_bound"], color="gray", linestyle="--", linewidth=0.8, label="log N")
    axis.set_xticks([0], [f"average KL = {surgery['average_kl']['mean']:.2f}"])
    axis.set_ylabel("nats per image")
    axis.legend()
    return _save(figure, path)


# --- Figures of the experiments -----------------------------------------------------------


def _box(low, high) -> tuple[list[float], list[float]]:
    low = [float(v) for v in torch.as_tensor(low, dtype=torch.float64).expand(2)]
    high = [float(v) for v in torch.as_tensor(high, dtype=torch.float64).expand(2)]
    return low, high


def _draw_codes(axis, codes: torch.Tensor, labels: torch.Tensor, low=None, high=None, legend: bool = True) -> None:
    codes, labels = codes.detach().cpu().double(), labels.detach().cpu()
    points = axis.scatter(codes[:, 0], codes[:, 1], c=labels, cmap=DIGIT_COLORS, vmin=-0.5, vmax=9.5, s=2,
                          alpha=0.6, linewidths=0, rasterized=True)
    if low is not None:
        (a1, a2), (b1, b2) = _box(low, high)
        axis.add_patch(matplotlib.patches.Rectangle((a1, a2), b1 - a1, b2 - a2, fill=False, color="black",
                                                    linewidth=0.8, linestyle="--"))
    axis.set_xlabel("z1")
    axis.set_ylabel("z2")
    if legend:
        colorbar = axis.figure.colorbar(points, ax=axis, ticks=range(10), fraction=0.05, pad=0.02)
        colorbar.set_label("digit")
        colorbar.solids.set_alpha(1)


def _draw_decoded_grid(axis, vae, low, high, steps: int) -> torch.Tensor:
    (a1, a2), (b1, b2) = _box(low, high)
    images = decode_grid(vae, [a1, a2], [b1, b2], steps)
    axis.imshow(image_grid(images, steps, vae.config.image_shape), cmap="gray", vmin=0, vmax=1, extent=(a1, b1, a2, b2),
                aspect="auto")
    axis.set_xlabel("z1")
    axis.set_ylabel("z2")
    return images


def plot_latent_spaces(entries: Sequence[dict[str, Any]], path: str | Path, steps: int = 20, dpi: int = DPI) -> Path:
    """For each 2-D model, a row: its codes (guide means) coloured by digit, and E[x | z] decoded over a box.

    Each entry is a dict with ``vae``, ``codes`` [N, 2], ``labels`` [N], ``low`` and ``high``
    (the decoded box, drawn dashed on the codes) and ``title``. Figure 10 x (4.6 rows) inches.
    """
    figure, axes = _figure(2, len(entries), figsize=(10, 4.6 * len(entries)))
    for row, entry in zip(axes, entries):
        _draw_codes(row[0], entry["codes"], entry["labels"], entry["low"], entry["high"])
        row[0].set_title(f"{entry.get('title', '')}: guide means of {len(entry['codes'])} test images", fontsize=9)
        _draw_decoded_grid(row[1], entry["vae"], entry["low"], entry["high"], steps)
        (a1, a2), (b1, b2) = _box(entry["low"], entry["high"])
        row[1].set_title(f"E[x|z] on a {steps}x{steps} grid over [{a1:.3g}, {b1:.3g}] x [{a2:.3g}, {b2:.3g}]", fontsize=9)
    return _save(figure, path, dpi)


@evaluates
def plot_latent_space(vae, x: torch.Tensor, labels: torch.Tensor, path: str | Path, low=None, high=None,
                      steps: int = 20, title: str = "", dpi: int = DPI) -> Path:
    """The latent space of a 2-D model: codes of ``x`` coloured by ``labels``, and the decoder over a box.

    The box defaults to the range the codes cover (0.5% to 99.5% quantiles per axis).
    Figure 10 x 4.6 inches.
    """
    if vae.config.latent_dim != 2:
        raise ValueError(f"plot_latent_space needs a 2-D latent space, the model has {vae.config.latent_dim} dimensions")
    codes = guide_means(vae, x)
    if low is None or high is None:
        low, high = code_range(codes)
    entry = {"vae": vae, "codes": codes, "labels": labels, "low": low, "high": high, "title": title or "model"}
    return plot_latent_spaces([entry], path, steps, dpi)


def plot_sample_rows(rows: Sequence[tuple[str, torch.Tensor]], path: str | Path, dpi: int = DPI) -> Path:
    """One row of images per setting, its label on the left: ``rows`` = [(label, images [n, 784]), ...].

    Figure (1.6 + 0.55 n) x (0.55 rows + 0.3) inches, n the images per row.
    """
    n = max(len(images) for _, images in rows)
    figure, axes = _figure(1, len(rows), figsize=(1.6 + 0.55 * n, 0.55 * len(rows) + 0.3))
    for (label, images), (axis,) in zip(rows, axes):
        images = images.detach().cpu().reshape(len(images), -1)
        if len(images) < n:  # white images keep short rows aligned to the left
            images = torch.cat([images, images.new_ones(n - len(images), images.shape[1])])
        axis.imshow(image_grid(images, n), cmap="gray", vmin=0, vmax=1)
        axis.set_xticks([])
        axis.set_yticks([])
        for spine in axis.spines.values():
            spine.set_visible(False)
        axis.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    return _save(figure, path, dpi)


def _errorbar(axis, x, rows, key, label, **kwargs):
    values = [r[key] for r in rows]
    errors = [r.get(f"{key}_se", 0.0) for r in rows]
    axis.errorbar(x, values, yerr=errors, marker="o", capsize=2, label=label, **kwargs)


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path, parameter: str = "value",
               label: str = "KL weight beta", log_x: bool = True, dpi: int = DPI) -> Path:
    """A hyperparameter sweep in three panels. Figure 15 x 4 inches.

    Each row holds ``parameter`` (the swept value) and, in nats per image, ``kl`` (rate),
    ``reconstruction`` (E_q[log p(x|z)]; distortion is its negative), ``elbo``, ``log_px``
    (each optionally with ``<key>_se``), ``active_units`` and optionally ``informative_units``
    (e.g. units whose KL exceeds 0.1 nats). Panels: the rate-distortion curve labelled by the
    value; ELBO and log p̂(x) against the value; KL and the unit counts against the value.
    """
    rows = sorted(rows, key=lambda r: r[parameter])
    x = [r[parameter] for r in rows]
    figure, ((rd, evidence, units),) = _figure(3, 1, figsize=(15, 4))
    rd.plot([r["kl"] for r in rows], [-r["reconstruction"] for r in rows], marker="o")
    for r in rows:
        rd.annotate(f"{r[parameter]:g}", (r["kl"], -r["reconstruction"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    rd.set_xlabel("rate: KL(q(z|x) || p(z)), nats per image")
    rd.set_ylabel("distortion: -E_q[log p(x|z)], nats per image")
    rd.set_title(f"rate-distortion, points labelled by {label}", fontsize=9)
    _errorbar(evidence, x, rows, "elbo", "ELBO")
    _errorbar(evidence, x, rows, "log_px", "log p̂(x), importance sampled")
    evidence.set_xlabel(label)
    evidence.set_ylabel("nats per image (higher is better)")
    evidence.legend(fontsize=8)
    evidence.set_title("evidence of the unweighted model", fontsize=9)
    units.plot(x, [r["active_units"] for r in rows], marker="s", color="C2", label="active: Var_x E_q[z_d|x] > 0.01")
    if all("informative_units" in r for r in rows):
        units.plot(x, [r["informative_units"] for r in rows], marker="^", color="C4", label="KL(q(z_d|x) || p(z_d)) > 0.1 nats")
    units.legend(fontsize=8, loc="upper right")
    units.set_xlabel(label)
    units.set_ylabel("latent units", color="C2")
    right = units.twinx()
    right.plot(x, [r["kl"] for r in rows], marker="o", color="C3", label="KL")
    right.set_ylabel("KL, nats per image", color="C3")
    units.set_title("latent units in use", fontsize=9)
    if log_x:
        for axis in (evidence, units):
            axis.set_xscale("log")
    return _save(figure, path, dpi)


def plot_density_panels(panels: Sequence[dict[str, Any]], path: str | Path, ncols: int = 3, dpi: int = DPI) -> Path:
    """Densities over 2-D boxes, one panel each. Figure (3.6 ncols) x (3.3 rows) inches.

    Each panel is a dict with ``title``, the axes ``z1`` [P] and ``z2`` [Q] and ``log_density``
    [P, Q] (indexed [z1, z2], drawn as a heat map of the density; with ``log_scale`` true, of the
    log-density itself, cut at ``log_floor`` (default 50) nats below its maximum), and optionally
    ``colorbar`` (true to draw one),
    ``contour`` (another log-density on the same grid, drawn as contour lines at 1, 2 and 3
    standard deviations' worth of a Gaussian's level, i.e. exp(-k^2/2) of its maximum),
    ``contour_label``, ``points`` [M, 2] (drawn as dots) and ``image`` (a 784-vector shown in an inset).
    """
    nrows = math.ceil(len(panels) / ncols)
    figure, axes = _figure(ncols, nrows, figsize=(3.6 * ncols, 3.3 * nrows))
    flat = [axis for row in axes for axis in row]
    for axis, panel in zip(flat, panels):
        z1, z2 = (torch.as_tensor(panel[k], dtype=torch.float64).cpu() for k in ("z1", "z2"))
        log_density = torch.as_tensor(panel["log_density"], dtype=torch.float64).cpu()
        if panel.get("log_scale"):  # the log-density itself, cut at ``log_floor`` below its maximum
            heat = log_density.clamp(min=log_density.max().item() - panel.get("log_floor", 50.0))
        else:
            heat = log_density.exp()
        mesh = axis.pcolormesh(z1, z2, heat.T, shading="auto", cmap="viridis", rasterized=True)
        if panel.get("colorbar"):
            axis.figure.colorbar(mesh, ax=axis, fraction=0.05, pad=0.02).ax.tick_params(labelsize=7)
        if panel.get("contour") is not None:
            contour = torch.as_tensor(panel["contour"], dtype=torch.float64).cpu()
            relative = (contour - contour.max()).exp().T
            levels = sorted(math.exp(-k * k / 2) for k in (1, 2, 3))
            axis.contour(z1, z2, relative, levels=levels, colors="white", linewidths=0.8)
            if panel.get("contour_label"):
                axis.plot([], [], color="white", linewidth=0.8, label=panel["contour_label"])
                legend = axis.legend(fontsize=7, loc="lower right", facecolor="gray", framealpha=0.6)
                for text in legend.get_texts():
                    text.set_color("white")
        if panel.get("points") is not None:
            points = torch.as_tensor(panel["points"]).cpu()
            axis.plot(points[:, 0], points[:, 1], "r+", markersize=6)
        if panel.get("image") is not None:
            inset = axis.inset_axes([0.0, 0.72, 0.28, 0.28])
            inset.imshow(torch.as_tensor(panel["image"]).cpu().reshape(IMAGE_SIDE, IMAGE_SIDE), cmap="gray", vmin=0, vmax=1)
            inset.set_xticks([])
            inset.set_yticks([])
        axis.set_title(panel.get("title", ""), fontsize=8)
        axis.set_xlabel("z1", fontsize=8)
        axis.set_ylabel("z2", fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in flat[len(panels):]:
        axis.set_axis_off()
    return _save(figure, path, dpi)


def plot_evidence_check(reference, estimate, stderr, path: str | Path, reference_label: str = "log p(x) by quadrature",
                        estimate_label: str = "log p̂(x), importance sampled", z_range: float = 6.0, dpi: int = DPI) -> Path:
    """An estimate of log p(x) per datapoint against a reference. Figure 10 x 3.6 inches.

    Left: estimate minus reference per datapoint (sorted), with +-2 standard errors of the
    estimate, on a symmetric-log axis (linear within +-1 nat) so that small and large
    differences both show. Right: histogram of (estimate - reference) / stderr against the
    standard normal density, over +-``z_range``; the title counts the datapoints beyond it.
    """
    import numpy as np

    reference, estimate, stderr = (np.asarray(torch.as_tensor(v, dtype=torch.float64).cpu()) for v in (reference, estimate, stderr))
    difference = estimate - reference
    order = np.argsort(difference)
    figure, ((left, right),) = _figure(2, 1, figsize=(10, 3.6))
    left.errorbar(np.arange(len(order)), difference[order], yerr=2 * stderr[order], fmt=".", markersize=3,
                  elinewidth=0.6, capsize=0)
    left.axhline(0, color="black", linewidth=0.8)
    left.set_yscale("symlog", linthresh=1.0)
    left.set_xlabel("datapoint (sorted by difference)")
    left.set_ylabel("nats (symmetric log scale)")
    left.set_title(f"{estimate_label} - {reference_label}, +-2 s.e.", fontsize=9)
    z = difference / np.where(stderr > 0, stderr, np.nan)
    z = z[np.isfinite(z)]
    inside = np.abs(z) <= z_range
    right.hist(z[inside], bins=np.linspace(-z_range, z_range, 49), density=False, alpha=0.7, label="datapoints")
    grid = np.linspace(-z_range, z_range, 200)
    bin_width = 2 * z_range / 48
    right.plot(grid, len(z) * bin_width * np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), color="black", label="N(0, 1), same count")
    right.set_xlabel("(estimate - reference) / standard error")
    right.set_ylabel("datapoints")
    right.legend(fontsize=8)
    outside_low, outside_high = int((z < -z_range).sum()), int((z > z_range).sum())
    right.set_title(f"z-scores: {inside.mean():.1%} within +-{z_range:g}; {outside_low} below, {outside_high} above"
                    if len(z) else "z-scores", fontsize=9)
    return _save(figure, path, dpi)


def plot_histograms(series: dict[str, Any], path: str | Path, xlabel: str, title: str = "", log_x: bool = False,
                    bins: int = 50, dpi: int = DPI) -> Path:
    """Overlaid histograms of several sets of values, ``series`` = {label: values}. Figure 6 x 3.6 inches."""
    import numpy as np

    arrays = {label: np.asarray(torch.as_tensor(v, dtype=torch.float64).cpu()).ravel() for label, v in series.items()}
    everything = np.concatenate(list(arrays.values()))
    if log_x:
        positive = everything[everything > 0]
        edges = np.geomspace(positive.min(), positive.max(), bins + 1) if len(positive) else bins
    else:
        edges = np.linspace(everything.min(), everything.max(), bins + 1) if everything.max() > everything.min() else bins
    figure, ((axis,),) = _figure(1, 1, figsize=(6, 3.6))
    for label, values in arrays.items():
        axis.hist(values, bins=edges, alpha=0.6, label=label)
    if log_x:
        axis.set_xscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("count")
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=9)
    return _save(figure, path, dpi)


def plot_bars(groups: dict[str, dict[str, tuple[float, float]]], path: str | Path, ylabel: str = "nats per image",
              title: str = "", dpi: int = DPI) -> Path:
    """Grouped bars with error bars: ``groups`` = {group: {bar label: (mean, stderr)}}. Figure 7 x 3.8 inches."""
    labels = list(dict.fromkeys(label for bars in groups.values() for label in bars))
    width = 0.8 / max(1, len(labels))
    figure, ((axis,),) = _figure(1, 1, figsize=(7, 3.8))
    values = []
    for i, label in enumerate(labels):
        xs, means, errors = [], [], []
        for g, bars in enumerate(groups.values()):
            if label in bars:
                xs.append(g + (i - (len(labels) - 1) / 2) * width)
                means.append(bars[label][0])
                errors.append(bars[label][1])
        values += means
        axis.bar(xs, means, width=width, yerr=errors, capsize=3, label=label)
    if values and all(v < 0 for v in values):
        span = max(values) - min(values) or abs(min(values)) * 0.1 or 1.0
        axis.set_ylim(min(values) - 0.3 * span, max(values) + 0.3 * span)
    axis.set_xticks(range(len(groups)), list(groups), fontsize=8)
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=9)
    return _save(figure, path, dpi)


def plot_evidence_audit(khat: Sequence[float], is_minus_ais: Sequence[float], bracket: Sequence[dict[str, Any]],
                        path: str | Path) -> Path:
    """The evidence audit (``ppl_vae.audit``): per-image IS - AIS against PSIS k-hat; the BDMC bracket against steps.

    ``bracket`` rows hold ``steps`` and the mean (with its standard error) over the simulated images of the
    ``gap`` between reverse and forward AIS, the bracket's width, in nats.
    """
    figure, axes = _figure(ncols=2, figsize=(10.0, 4.0))
    left, right = axes[0]
    khat_values = np.asarray(khat, dtype=float)
    left.scatter(np.where(np.isfinite(khat_values), khat_values, np.nan), np.asarray(is_minus_ais, dtype=float), s=12)
    left.axhline(0.0, color="grey", lw=0.8)
    left.axvline(0.7, color="tab:red", lw=0.8, ls="--")
    left.set_xlabel("PSIS k-hat of the image's importance weights")
    left.set_ylabel("log p(x): IS - AIS (nats)")
    left.set_title("test images")
    steps = [row["steps"] for row in bracket]
    right.errorbar(steps, [row["gap"]["mean"] for row in bracket], yerr=[row["gap"]["stderr"] for row in bracket],
                   marker="o", capsize=3)
    right.axhline(0.0, color="grey", lw=0.8)
    right.set_xscale("log")
    right.set_xticks(steps, [str(s) for s in steps])
    right.minorticks_off()
    right.set_xlabel("annealing steps T")
    right.set_ylabel("BDMC gap: reverse - forward AIS (nats)")
    right.set_title("the BDMC bracket on simulated images")
    return _save(figure, path)
