"""Every figure function writes a non-empty PNG of the size its docstring gives (figsize * dpi pixels)."""

import math

import pytest
import torch
import matplotlib.pyplot as plt
from matplotlib.image import imread

from ppl_vae import plots
from ppl_vae.model import VAE, VAEConfig

DPI = 40  # small files, fast tests


@pytest.fixture
def vae():
    return VAE(VAEConfig(latent_dim=2, hidden_sizes=(16,))).eval()


@pytest.fixture
def images():
    return torch.bernoulli(torch.full((10, 784), 0.3))


def check_png(path, width_inches, height_inches, dpi=DPI):
    assert path.is_file() and path.stat().st_size > 1000
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert abs(pixels.shape[0] - height_inches * dpi) <= 1 and abs(pixels.shape[1] - width_inches * dpi) <= 1, pixels.shape
    assert pixels[..., :3].std() > 0  # not a blank canvas


def test_run_figures(tmp_path, vae, images):
    metrics = [{"epoch": e, "train_elbo": -200 + e, "val_elbo": -210 + e, "val_elbo_stderr": 1.0,
                "val_reconstruction": -190 + e, "val_kl": 10 + e} for e in range(1, 4)]
    check_png(plots.plot_training_curves(metrics, tmp_path / "curves.png"), 10, 3.5, plots.DPI)
    metrics[-1].update(val_log_px=-205.0, val_log_px_stderr=1.0, val_log_px_samples=500)
    check_png(plots.plot_learning_curve(metrics, tmp_path / "learning.png", published=-86.76, title="row"), 6, 4, plots.DPI)
    check_png(plots.plot_reconstructions(vae, images, tmp_path / "recon.png"), 6.0, 1.6, plots.DPI)
    check_png(plots.plot_samples(vae, tmp_path / "samples.png", num_samples=16), 4.8, 1.6, plots.DPI)
    check_png(plots.plot_interpolations(vae, images, tmp_path / "interp.png", steps=6), 3.6, 3.4, plots.DPI)
    check_png(plots.plot_image_grid(images, tmp_path / "grid.png", nrow=5, dpi=DPI), 3.0, 1.6)
    rows = [{"run": "runs/a", "elbo": -100.0, "elbo_se": 1.0, "log_px": -95.0, "log_px_se": 1.0},
            {"run": "runs/b", "elbo": -98.0, "elbo_se": 1.0, "log_px": -94.0, "log_px_se": 1.0}]
    check_png(plots.plot_comparison(rows, tmp_path / "cmp.png"), 5, 3.5, plots.DPI)


def test_diagnostic_figures(tmp_path):
    khat = torch.linspace(-0.2, 1.0, 50).tolist()
    check_png(plots.plot_khat(khat, tmp_path / "khat.png"), 8, 3.5, plots.DPI)
    check_png(plots.plot_kl_per_dimension([3.0, 1.0, 0.1, 0.001], tmp_path / "kl.png"), 8, 3, plots.DPI)
    surgery = {"mutual_information": {"mean": 3.0, "stderr": 0.1}, "marginal_kl": {"mean": 1.0, "stderr": 0.1},
               "mutual_information_bound": math.log(100), "average_kl": {"mean": 4.0}}
    check_png(plots.plot_elbo_surgery(surgery, tmp_path / "surgery.png"), 4.5, 3.5, plots.DPI)


def test_latent_space_figures(tmp_path, vae, images):
    labels = torch.arange(10)
    check_png(plots.plot_latent_space(vae, images, labels, tmp_path / "latent.png", steps=6, dpi=DPI), 10, 4.6)
    codes = torch.randn(10, 2)
    entries = [{"vae": vae, "codes": codes, "labels": labels, "low": [-2, -2], "high": [2, 2], "title": "VAE"},
               {"vae": vae, "codes": codes * 5, "labels": labels, "low": [-9, -8], "high": [7, 9], "title": "AE"}]
    check_png(plots.plot_latent_spaces(entries, tmp_path / "spaces.png", steps=5, dpi=DPI), 10, 9.2)
    with pytest.raises(ValueError, match="2-D"):
        plots.plot_latent_space(VAE(VAEConfig(latent_dim=3, hidden_sizes=(8,))), images, labels, tmp_path / "no.png")


def test_experiment_figures(tmp_path, images):
    rows = [("β = 0.5", images[:6]), ("β = 8", images[:4]), ("mean", images[:1])]
    check_png(plots.plot_sample_rows(rows, tmp_path / "rows.png", dpi=DPI), 1.6 + 0.55 * 6, 0.55 * 3 + 0.3)
    sweep = [{"beta": b, "kl": 30 / b, "reconstruction": -80 - 5 * b, "elbo": -100 - b, "elbo_se": 0.5, "log_px": -95 - b,
              "log_px_se": 0.5, "active_units": int(20 / b)} for b in (0.5, 1, 2, 4)]
    check_png(plots.plot_sweep(sweep, tmp_path / "sweep.png", parameter="beta", dpi=DPI), 15, 4)
    axis = torch.linspace(-3, 3, 31)
    z1, z2 = torch.meshgrid(axis, axis, indexing="ij")
    log_density = -(z1**2 + z2**2) / 2 - math.log(2 * math.pi)
    panels = [{"title": "prior", "z1": axis, "z2": axis, "log_density": log_density},
              {"title": "with contours", "z1": axis, "z2": axis, "log_density": log_density, "contour": log_density * 4,
               "contour_label": "guide", "points": torch.zeros(1, 2), "image": torch.rand(784)},
              {"title": "log scale", "z1": axis, "z2": axis, "log_density": log_density, "log_scale": True, "colorbar": True}]
    check_png(plots.plot_density_panels(panels, tmp_path / "densities.png", ncols=2, dpi=DPI), 7.2, 6.6)
    reference = torch.randn(50) - 100
    stderr = torch.full((50,), 0.1)
    check_png(plots.plot_evidence_check(reference, reference + 0.1 * torch.randn(50), stderr, tmp_path / "check.png", dpi=DPI), 10, 3.6)
    check_png(plots.plot_histograms({"a": torch.rand(100) + 0.01, "b": torch.rand(100) * 3 + 0.01}, tmp_path / "hist.png",
                                    xlabel="value", log_x=True, dpi=DPI), 6, 3.6)
    bars = {"sampled": {"ELBO": (-100.0, 1.0), "log p(x)": (-95.0, 1.0)}, "mean-fed": {"ELBO": (-120.0, 1.0), "log p(x)": (-99.0, 2.0)}}
    check_png(plots.plot_bars(bars, tmp_path / "bars.png", dpi=DPI), 7, 3.8)


def _saved_through_a_png(figure, dpi: int):
    """The pixels the figure writer wrote before it drew to Agg's buffer: savefig's PNG, decoded, then the palette."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=dpi, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        pixels = np.asarray(palette.convert("RGB"))
    plt.close(figure)
    return pixels


@pytest.mark.parametrize("dpi", [plots.DPI, 150])
def test_figures_are_written_with_the_pixels_of_savefig(tmp_path, images, dpi):
    """The figure writer draws to Agg's RGBA buffer: the same pixels as savefig's PNG, at the default and another dpi.

    Each figure is made twice, once per writer: constrained layout may move axes a little at a second drawing."""
    import numpy as np
    from PIL import Image

    def line():
        figure, axis = plots._figure(figsize=(6.1, 3.3))
        axis[0][0].plot([1, 3, 2], label="ELBO")
        axis[0][0].set_title("a line plot, in nats")
        axis[0][0].legend()
        return figure

    def grid():
        figure, axis = plots._figure(figsize=(3.0, 2.2))
        axis[0][0].imshow(plots.image_grid(images[:10], nrow=5), cmap="gray", vmin=0, vmax=1)
        return figure

    for make in (line, grid):
        expected = _saved_through_a_png(make(), dpi)
        with Image.open(plots._save(make(), tmp_path / f"{make.__name__}.png", dpi)) as written:
            assert written.mode == "P"  # the palette image, as before
            got = np.asarray(written.convert("RGB"))
        assert got.shape == expected.shape and np.array_equal(got, expected), make.__name__
