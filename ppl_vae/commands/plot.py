"""``ppl-vae plot``: a run's training curves, reconstructions, samples and interpolations, as PNGs in its plots folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    """Draw the figures of ``args.run_dir`` under the run's figures lock, the program in evaluation mode."""
    from .. import runs
    from ..modes import evaluation_mode
    from ..train import load_run

    run_dir = Path(args.run_dir)
    runs.RunFolder(run_dir, runs.PLOTS_FOLDER)  # a linked plots/ is refused before the run is loaded
    vae, config = load_run(run_dir, device="cpu", trust_program=args.trust_program, checkpoint=args.checkpoint)
    print(f"figures of {run_dir} at epoch {config['epoch']} ({config['checkpoint']} checkpoint)", flush=True)
    # No evaluation, other plot or train --overwrite writes there meanwhile; the program's own figure methods
    # (sample_prior, decode_mean, ...) run in eval mode without gradients, as every evaluation does.
    with runs.RunLock(run_dir, "figures"), evaluation_mode(vae):
        return plot(args, run_dir, vae, config)


def plot(args: argparse.Namespace, run_dir: Path, vae, config) -> int:
    """The figures of the loaded run (``vae``, its ``config``): the built-in VAE's all, another program's those its
    methods allow; the whole latent space of a 2-D VAE."""
    import pyro

    from .. import plots, runs
    from ..data import load_run_data
    from ..model import VAE
    from ..train import levels_of

    pyro.set_rng_seed(args.seed)
    out = runs.RunFolder(run_dir, runs.PLOTS_FOLDER)  # each figure recorded in the manifest, never through a link
    written = [plots.plot_training_curves(runs.read_metrics(run_dir), out / "training_curves.png")]
    train_config = config["train"]
    data = load_run_data(train_config, args.data_dir, eval_examples=20,
                         dequantize_levels=levels_of(vae, train_config["binarize"]) == "dequantized")
    if not isinstance(vae, VAE):  # another program: the figures its methods allow, a note for the others
        written += plot_program(vae, data, out, cond=data.conditioning("test", tuple(train_config.get("cond") or ())),
                                label_site=train_config.get("label_site", "y"))
        written += plot_style_grid(vae, data, out, train_config.get("label_site", "y"))
    else:
        written.append(plots.plot_reconstructions(vae, data.test[:10], out / "reconstructions.png"))
        written.append(plots.plot_samples(vae, out / "samples.png"))
        written.append(plots.plot_interpolations(vae, data.test[:10], out / "interpolations.png"))
    if isinstance(vae, VAE) and vae.config.latent_dim == 2:  # a 2-D latent space can be drawn whole
        codes = load_run_data(train_config, args.data_dir, eval_examples=2000,
                              dequantize_levels=levels_of(vae, train_config["binarize"]) == "dequantized")
        if codes.test_labels is not None:  # the codes are coloured by label; a .npz file may have none
            written.append(plots.plot_latent_space(vae, codes.test, codes.test_labels, out / "latent_space.png"))
    for path in written:
        print(path)
    return 0


def plot_program(program, data, out: Path, cond: tuple = (), label_site: str = "y") -> list[Path]:
    """Image figures of a program other than the built-in VAE, from the methods it has; a one-line note for each it lacks.

    ``sample_prior(n)``: samples E[x | z], z ~ p(z) (without it, any program given x alone: its model run on its
    own, :func:`ppl_vae.style_grid.model_samples`); ``encode_mean(x)`` with ``decode_mean(z)``: reconstructions
    (without them, a program with a discrete ``label_site`` on x alone, as M2: through q(y | x) and q(z | x, y),
    :func:`ppl_vae.style_grid.class_reconstructions`); ``sample_digits(labels)``: one row of samples per class (a
    conditional program). ``cond``: the run's ``--cond`` arrays of the test images, passed after x and z as in
    training (``encode_mean(x, c)``, ``decode_mean(z, c)``).
    """
    import torch

    from .. import plots

    shape = tuple(data.record["image_shape"])
    written = []
    if callable(getattr(program, "sample_prior", None)):
        written.append(plots.plot_image_grid(program.sample_prior(64), out / "samples.png", nrow=8,
                                             title="E[x|z] for z ~ p(z)", image_shape=shape))
    else:
        written += plot_model_samples(program, data, out, cond)
    if callable(getattr(program, "encode_mean", None)) and callable(getattr(program, "decode_mean", None)):
        x = data.test[:10]
        given = tuple(c[:10] for c in cond)
        images = torch.cat([x.reshape(10, -1), program.decode_mean(program.encode_mean(x, *given), *given).reshape(10, -1)])
        written.append(plots.plot_image_grid(images, out / "reconstructions.png", nrow=10,
                                             title="test images (top) and E[x | E_q[z|x]] (bottom)", image_shape=shape))
    else:
        written += plot_class_reconstructions(program, data, out, cond, label_site)
    if callable(getattr(program, "sample_digits", None)):
        classes = getattr(program, "num_classes", 10)
        labels = torch.arange(classes).repeat_interleave(8)
        written.append(plots.plot_image_grid(program.sample_digits(labels), out / "samples_by_class.png", nrow=8,
                                             title="E[x|z,y], z ~ p(z): one row per class y", image_shape=shape))
    return written


def plot_model_samples(program, data, out: Path, cond: tuple = ()) -> list[Path]:
    """``samples.png`` of a program without ``sample_prior``: its model run on its own (every latent from the prior,
    :func:`ppl_vae.style_grid.model_samples`), given the test images' ``cond`` arrays (``--cond``: one sample per
    test image, with its c); a one-line note where that does not apply."""
    from .. import plots
    from ..errors import ModelStructureError
    from ..style_grid import model_samples

    # With conditioning data, one sample per test image, given that image's c as in training.
    count = min(64, *(len(c) for c in cond)) if cond else 64
    given, why = tuple(c[:count] for c in cond), None
    try:
        images = model_samples(program, count, data.test, given)
    except ModelStructureError as error:
        why = f"the program has no sample_prior(n) method, and {str(error).splitlines()[0]}"
    except (TypeError, ValueError, RuntimeError) as error:  # e.g. a model(x, y) that needs its labels
        why = (f"the program has no sample_prior(n) method, and its model given x{' and c' if cond else ''} alone "
               f"failed: {type(error).__name__}: {str(error).splitlines()[0]}")
    if why is not None:
        print(f"samples: skipped ({why})")
        return []
    title = ("E[x | latents, c], latents from the prior, c of the first test images" if cond
             else "E[x | latents], latents from the prior")
    return [plots.plot_image_grid(images, out / "samples.png", nrow=8, title=title,
                                  image_shape=tuple(data.record["image_shape"]))]


def plot_class_reconstructions(program, data, out: Path, cond: tuple = (), label_site: str = "y") -> list[Path]:
    """``reconstructions.png`` of a program without ``encode_mean``/``decode_mean`` but with a discrete label site on x
    alone (M2): through the classifier's class and q(z | x, y) (:func:`ppl_vae.style_grid.class_reconstructions`);
    a one-line note where that does not apply."""
    import torch

    from .. import plots
    from ..errors import ModelStructureError
    from ..style_grid import class_reconstructions

    lacking = "the program has no encode_mean(x) and decode_mean(z) methods"
    if cond:
        print(f"reconstructions: skipped ({lacking})")
        return []
    x = data.test[:10]
    try:
        images = class_reconstructions(program, x, label_site)
    except (ModelStructureError, TypeError, ValueError, RuntimeError) as error:
        print(f"reconstructions: skipped ({lacking}, nor a discrete label site {label_site!r} to reconstruct through: "
              f"{str(error).splitlines()[0]})")
        return []
    images = torch.cat([x.reshape(x.shape[0], -1).to(images.dtype), images])
    return [plots.plot_image_grid(images, out / "reconstructions.png", nrow=x.shape[0], image_shape=tuple(
        data.record["image_shape"]), title=f"test images (top), E[x | E_q[z|x,{label_site}], {label_site}] at the "
                                           f"most probable {label_site} under q({label_site}|x) (bottom)")]


STYLE_ROWS = 10  # test images, one style z each: the rows of the style/class grid


def plot_style_grid(program, data, out: Path, label_site: str = "y", dpi: int | None = None) -> list[Path]:
    """Kingma et al.'s (2014) style/class grid (:mod:`ppl_vae.style_grid`) of a program with a class label: each row
    a test image and its style z = E_q[z | x, y] decoded with every class (``style_grid.png``), and the same with
    each row's z drawn from the prior (``style_grid_prior.png``); a one-line note where it does not apply.
    ``dpi``: pixels per inch of the PNGs (default :data:`ppl_vae.plots.DPI`; 50 draws each image at about its 28 pixels)."""
    from .. import plots
    from ..errors import ModelStructureError
    from ..style_grid import style_grid

    x, labels = data.test[:STYLE_ROWS], data.labels("test")
    labels = None if labels is None else labels[:STYLE_ROWS]
    shape = tuple(data.record["image_shape"])
    written = []
    for prior, name in ((False, "style_grid.png"), (True, "style_grid_prior.png")):
        try:
            grid = style_grid(program, x, labels, label_site, prior=prior)
        except ModelStructureError as error:
            print(f"style/class grid: skipped ({str(error).splitlines()[0]})")
            return written
        except (TypeError, ValueError, RuntimeError) as error:  # e.g. a program that takes no labels, guide(x) only
            print(f"style/class grid: skipped (the program run as guide(x, {label_site}) and model(x, {label_site}) "
                  f"failed: {type(error).__name__}: {str(error).splitlines()[0]})")
            return written
        rows, columns = grid.images.shape[:2]
        z, y = grid.style_site, label_site
        title = (f"E[x | {z}, {y}] for {y} = 0..{columns - 1}, one {z} from the prior per row" if prior else
                 f"test image x, then E[x | {z}, {y}] for {y} = 0..{columns - 2}, {z} = E_q[{z} | x, {y}(x)]")
        written.append(plots.plot_image_grid(grid.images.reshape(rows * columns, -1), out / name, nrow=columns,
                                             title=title, image_shape=shape, dpi=dpi or plots.DPI))
    return written
