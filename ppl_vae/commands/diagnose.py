"""``ppl-vae diagnose``: the figures of an evaluated run's diagnostics (k-hat, KL per dimension, ELBO surgery)."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    """Draw the diagnostics of ``args.run_dir`` into its plots folder, under the run's figures lock."""
    from .. import runs
    from ..errors import RunDirectoryError

    run_dir = Path(args.run_dir)
    if not (run_dir / runs.PER_DATAPOINT_FILE).is_file():
        raise RunDirectoryError(f"{run_dir} has no {runs.PER_DATAPOINT_FILE}: run `ppl-vae evaluate {run_dir}` first")
    with runs.RunLock(run_dir, "figures"):  # reads the evaluation's files while no evaluation rewrites them
        return diagnose(run_dir, getattr(args, "checkpoint", None))


def diagnose(run_dir: Path, checkpoint: str | None = None) -> int:
    """The figures of the evaluation in ``run_dir``; a one-line note for each diagnostic it could not compute.
    ``checkpoint``: the evaluation must be of the run's "last" or "best" checkpoint (None: best where kept)."""
    from .. import plots, runs
    from ..compare import result_checkpoint
    from ..diagnostics import site_diagnostics
    from ..errors import RunDirectoryError
    from ..evaluation_files import read_per_datapoint
    from ..run_readers import read_diagnostics

    evaluation = runs.read_json(run_dir / runs.EVALUATION_FILE)
    which, theirs = runs.which_checkpoint(run_dir, checkpoint), result_checkpoint(evaluation)
    if theirs != which:
        raise RunDirectoryError(f"{run_dir / runs.EVALUATION_FILE} is of the run's {theirs} checkpoint, not its {which} "
                                f"checkpoint: run `ppl-vae evaluate {run_dir} --checkpoint {which}` first, or give "
                                f"--checkpoint {theirs}")
    print(f"diagnostics of {run_dir} at epoch {evaluation.get('epoch', '?')} ({which} checkpoint)", flush=True)
    diagnostics = read_diagnostics(run_dir / runs.EVALUATION_FILE)  # checked: a handed-over file is one line
    per_datapoint = read_per_datapoint(run_dir, evaluation)  # checked, and refused if from another evaluation
    out = runs.RunFolder(run_dir, runs.PLOTS_FOLDER)  # each figure recorded in the manifest, never through a link
    written = []
    psis = diagnostics["psis"]
    if "khat" in per_datapoint and isinstance(psis.get("khat_threshold"), (int, float)):
        written.append(plots.plot_khat(per_datapoint["khat"], out / "khat.png", psis["khat_threshold"]))
    else:
        print(f"k-hat: not available ({psis.get('unavailable', 'evaluation.json and its per-image file hold no k-hat')})")
    sites = site_diagnostics(diagnostics)
    for name, site in sites.items():
        # One latent site keeps the plain file names; several get one figure each, named by site.
        suffix, label = (f"_{name}", f"site '{name}': ") if len(sites) > 1 else ("", "")
        collapse, surgery = site.get("collapse", {}), site.get("elbo_surgery", {})
        if "unavailable" in collapse:
            print(f"{label}KL per dimension: not available ({collapse['unavailable']})")
        elif collapse:
            written.append(plots.plot_kl_per_dimension(
                collapse["kl_sorted"], out / f"kl_per_dimension{suffix}.png", collapse["kl_threshold"]))
        if "unavailable" in surgery:
            print(f"{label}ELBO surgery: not available ({surgery['unavailable']})")
        elif surgery:
            written.append(plots.plot_elbo_surgery(surgery, out / f"elbo_surgery{suffix}.png"))
    for path in written:
        print(path)
    return 0
