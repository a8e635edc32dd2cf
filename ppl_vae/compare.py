"""One table (and one figure) for several runs: ``ppl-vae compare RUN_DIR...``.

Each run contributes its configuration, its training metrics and its evaluation
(``evaluation.json`` from ``ppl-vae evaluate`` when present, else the final
``test.json`` of ``ppl-vae train``). Numbers are as measured, in nats per image
(and bits/dim for grey-level likelihoods), with standard errors over the images.

Paired differences: when two runs were evaluated by ``ppl-vae evaluate`` on the same
images (same split, same number of images, same binarization), the table also gives
log p̂(x) of each run minus that of the first, as the mean over images of the per-image
differences d_n, with standard error sd(d_n) / sqrt(N). The images' own spread cancels
in d_n, so this s.e. is several times smaller than that of either run's mean: the honest
scale for "is variant B better than A on these images".

Paired differences are only taken between runs whose evidence is of the same quantity: a run
whose model observes the labels estimates log p(x, y), a conditional one given them log p(x | y),
and neither is comparable image by image with another run's log p(x). The table has a column
for each run's quantity and a note naming the runs left unpaired, and why
(:func:`ppl_vae.evaluation_files.result_quantity` says how files older than the quantity are read).
The per-image values are read with :func:`ppl_vae.evaluation_files.read_per_datapoint`, which
refuses an npz from another evaluation than the evaluation.json beside it.

Nor are runs whose log p̂ came from different estimators (:func:`result_estimator`): importance
sampling and AIS have different biases (both are stochastic lower bounds, AIS usually the tighter),
so their difference would mix the estimators' bias into the models' difference; nor two AIS results
with different settings (steps, chains, leapfrog steps, schedule), for the same reason. The table
says which estimator each number came from; importance-sampled results with different K are still
paired, as before (K is shown).

Each result file records the epoch (and the id of the checkpoint) it was computed
from; the newer of ``evaluation.json`` and ``test.json`` is used, and the table marks a
result computed before the run's latest checkpoint (``4 (run at 6)``).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy

from . import runs
from .diagnostics import site_diagnostics
from .errors import RunDirectoryError
from .evaluation_files import read_per_datapoint, result_quantity
from .run_readers import read_result
from .model import VAEConfig
from .training.config import TrainConfig, describe_objective
from .training.run_loading import read_run_config

COLUMNS = (
    "run", "model", "objective", "epochs", "split", "images", "quantity", "elbo", "elbo_se", "reconstruction", "kl",
    "log_px", "log_px_se", "k", "estimator", "gap", "bits_per_dim", "active_units", "train_seconds", "device",
    "log_px_minus_first", "log_px_minus_first_se", "not_paired", "result_file", "run_epoch", "stale", "checkpoint",
)
UNKNOWN_QUANTITY = "?"  # shown for a result whose quantity cannot be told (evaluation_files.result_quantity)


def _result_epoch(result: dict) -> int | None:
    """The epoch a result file was computed from (files older than the ``epoch`` key of test.json: ``epochs``)."""
    epoch = result.get("epoch", result.get("epochs"))
    return epoch if isinstance(epoch, int) else None


def _current_checkpoint(run_dir: Path, metrics: list[dict], which: str = "last") -> tuple[int | None, str | None]:
    """The epoch and id of the run's latest (``which="best"``: best) checkpoint (else the last epoch in
    metrics.jsonl, no id)."""
    try:
        name = runs.BEST_CHECKPOINT_FILE if which == "best" else runs.CHECKPOINT_FILE
        checkpoint = runs.read_checkpoint(run_dir / name)
        return checkpoint.get("epoch"), checkpoint.get("id")
    except RunDirectoryError:
        return (metrics[-1]["epoch"] if metrics and which == "last" else None), None


def result_checkpoint(result: dict) -> str:
    """Which checkpoint a result file is of: "last" or "best" (files written before the key: "last")."""
    return result.get("checkpoint") or "last"


def load_run_summary(run_dir: str | Path, checkpoint: str | None = None) -> dict[str, Any]:
    """One comparison row from a run directory; a clear error if it has not been evaluated.

    ``checkpoint``: the results must be of the run's "last" or "best" checkpoint (None: best when the run kept
    one, else last). Of those in ``evaluation.json`` and ``test.json``, the one computed from the later epoch is
    used (``evaluation.json`` at the same epoch). ``stale`` says when it was computed from another checkpoint than
    the run's current one of that kind (an earlier epoch, or the same epoch trained again).
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    which = runs.which_checkpoint(run_dir, checkpoint)
    results = [(name, read_result(run_dir / name)) for name in (runs.EVALUATION_FILE, runs.TEST_FILE)
               if (run_dir / name).is_file()]
    found = [(name, result) for name, result in results if result_checkpoint(result) == which]
    if results and not found:
        raise RunDirectoryError(
            f"{run_dir} has results of its {result_checkpoint(results[0][1])} checkpoint only, none of its {which} "
            f"checkpoint: run `ppl-vae evaluate {run_dir} --checkpoint {which}`, or compare with --checkpoint "
            f"{result_checkpoint(results[0][1])}"
        )
    if not found:
        raise RunDirectoryError(
            f"{run_dir} has no evaluation.json or test.json: finish training it or run `ppl-vae evaluate {run_dir}`"
        )
    # The newest: the highest epoch, evaluation.json first among equals (max keeps the first maximum).
    name, result = max(found, key=lambda item: -1 if _result_epoch(item[1]) is None else _result_epoch(item[1]))
    metrics = runs.read_metrics(run_dir)
    run_epoch, run_checkpoint = _current_checkpoint(run_dir, metrics, which)
    epoch = _result_epoch(result)
    if epoch is None or run_epoch is None:
        stale = None
    elif epoch != run_epoch:
        stale = f"computed at epoch {epoch}, the run is at epoch {run_epoch}"
    elif result.get("checkpoint_id") and run_checkpoint and result["checkpoint_id"] != run_checkpoint:
        stale = f"computed from another checkpoint of epoch {epoch} (the run was trained again)"
    else:
        stale = None
    train_config = TrainConfig(**config["train"])
    # The built-in VAE's configuration, or (another program) the description its result recorded.
    description = VAEConfig(**config["model"]).describe() if config.get("model") is not None else result.get("model", "?")
    diagnostics = result.get("diagnostics", {})
    bpd = result.get("bits_per_dim", {}).get("log_evidence", {}).get("mean")
    return {
        "run": str(run_dir),
        "model": description,
        "objective": describe_objective(train_config),
        "epochs": epoch,
        "split": result.get("split", "test"),
        "images": result["num_datapoints"],
        "quantity": result_quantity(result, config, run_dir),
        "elbo": result["elbo"]["mean"],
        "elbo_se": result["elbo"]["stderr"],
        "reconstruction": result["reconstruction"]["mean"],
        "kl": result["kl"]["total"]["mean"],
        "log_px": result["log_evidence"]["mean"],
        "log_px_se": result["log_evidence"]["stderr"],
        "k": result["log_evidence"]["num_samples"],
        "estimator": estimator_text(result_estimator(result)),
        "gap": result["gap"]["mean"],
        "bits_per_dim": bpd,
        "active_units": _active_units(diagnostics),
        "train_seconds": metrics[-1]["train_seconds"] if metrics else None,
        "device": metrics[-1]["device"] if metrics else result.get("device"),
        "log_px_minus_first": None,
        "log_px_minus_first_se": None,
        "not_paired": None,
        "result_file": name,
        "run_epoch": run_epoch,
        "stale": stale,
        "checkpoint": which,
        # Not a table column: what the paired differences need.
        "_per_image_log_px": _per_image_log_px(run_dir, name, result),
        "_binarize": train_config.binarize,
        "_estimator": result_estimator(result),
    }


IS_DEFAULT: dict[str, Any] = {"name": "is"}  # a row without an estimator record (built by hand): importance sampled
# The settings that make two AIS results the same estimator (what is recorded besides them is derived from them).
AIS_IDENTITY = ("steps", "chains", "leapfrog_steps", "schedule", "target_accept", "pilot_steps")


def result_estimator(result: dict[str, Any]) -> dict[str, Any] | None:
    """The estimator a result's log p̂ came from: its ``estimator`` record (``{"name": "ais", ...settings}`` or
    ``{"name": "is", "num_samples": K}``); a file without one (before AIS, and train's test.json) is importance
    sampled with its K. A record that is not an estimator's (a handed-over file) is unknown: None."""
    record = result.get("estimator", result.get("log_evidence", {}).get("estimator"))
    if record is None:
        return {"name": "is", "num_samples": result.get("log_evidence", {}).get("num_samples")}
    if not isinstance(record, dict) or record.get("name") not in ("is", "ais"):
        return None
    return record


def estimator_text(estimator: dict[str, Any] | None) -> str:
    """``IS, K=5000``, ``AIS, T=100 L=5 C=8 sigmoid``, or ``?`` (an unknown record)."""
    if estimator is None:
        return UNKNOWN_QUANTITY
    if estimator["name"] == "ais":
        return (f"AIS, T={estimator.get('steps')} L={estimator.get('leapfrog_steps')} C={estimator.get('chains')} "
                f"{estimator.get('schedule')}")
    return f"IS, K={estimator.get('num_samples')}"


def _same_estimator(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two results' log p̂ came from one estimator: both IS (any K), or AIS with the same settings."""
    if a is None or b is None or a["name"] != b["name"]:
        return False
    return a["name"] == "is" or all(a.get(key) == b.get(key) for key in AIS_IDENTITY)


def _why_other_estimator(row: dict[str, Any], first: dict[str, Any]) -> str:
    def text(r: dict[str, Any]) -> str:
        if "_estimator" in r and r["_estimator"] is None:
            return "an unknown estimator (a record ppl-vae does not write)"
        return r.get("estimator") or f"IS, K={r['k']}"

    return (f"its log p̂ is from {text(row)}, the first run's from {text(first)}: a difference of different "
            "estimators (different biases); evaluate both with the same --estimator and settings")


def _per_image_log_px(run_dir: Path, result_file: str, result: dict) -> numpy.ndarray | None:
    """The per-image log p̂ of ``ppl-vae evaluate``, when saved; an npz of another evaluation is refused (one line)."""
    path = run_dir / runs.PER_DATAPOINT_FILE  # written by `ppl-vae evaluate` beside evaluation.json
    if result_file != runs.EVALUATION_FILE or not path.is_file():
        return None
    values = read_per_datapoint(run_dir, result)["log_evidence"].astype(numpy.float64)  # checked: numbers, one per image
    return values if values.shape == (result["num_datapoints"],) else None


def add_paired_differences(rows: list[dict[str, Any]]) -> None:
    """Fill ``log_px_minus_first`` (mean of per-image differences to the first run) and its s.e., where comparable.

    Runs whose evidence is of another quantity than the first run's (or of an unknown one) are not
    paired; ``not_paired`` says why.
    """
    first = rows[0]
    for row in rows[1:]:
        comparable = (
            first["_per_image_log_px"] is not None and row["_per_image_log_px"] is not None
            and (row["split"], row["images"], row["_binarize"]) == (first["split"], first["images"], first["_binarize"])
        )
        if not comparable:
            continue
        quantity, first_quantity = row.get("quantity"), first.get("quantity")
        if quantity is None or first_quantity is None or quantity != first_quantity:
            row["not_paired"] = _why_not_paired(quantity, first_quantity)
            continue
        if not _same_estimator(row.get("_estimator", IS_DEFAULT), first.get("_estimator", IS_DEFAULT)):
            row["not_paired"] = _why_other_estimator(row, first)
            continue
        row["log_px_minus_first"], row["log_px_minus_first_se"] = paired_difference(
            first["_per_image_log_px"], row["_per_image_log_px"])


def paired_difference(first: numpy.ndarray, other: numpy.ndarray) -> tuple[float, float]:
    """The mean over images of ``other - first`` and its standard error sd(d) / sqrt(N) (NaN for one image)."""
    differences = numpy.asarray(other, dtype=numpy.float64) - numpy.asarray(first, dtype=numpy.float64)
    stderr = float(differences.std(ddof=1) / math.sqrt(len(differences))) if len(differences) > 1 else math.nan
    return float(differences.mean()), stderr


def _why_not_paired(quantity: str | None, first_quantity: str | None) -> str:
    unknown = "an unknown quantity (a result file without the quantity's record, of a program given labels or --cond " \
              "arrays it may observe: run `ppl-vae evaluate` again)"
    if quantity is None or first_quantity is None:
        return f"its evidence is of {unknown if quantity is None else quantity}, the first run's of " \
               f"{unknown if first_quantity is None else first_quantity}"
    return f"its evidence is {quantity}, the first run's {first_quantity}: a difference of different quantities"


def _format(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = ("run", "model", "objective", "epochs", "evidence of", "ELBO", "reconstruction", "KL", "log p̂", "estimator",
              "minus first run (paired)", "gap", "bits/dim", "active units", "train time", "device")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = (
            Path(r["run"]).name, r["model"], r["objective"], _epochs(r), _markdown(r.get("quantity") or UNKNOWN_QUANTITY),
            f"{r['elbo']:.2f} ± {r['elbo_se']:.2f}", _format(r["reconstruction"]), _format(r["kl"]),
            f"{r['log_px']:.2f} ± {r['log_px_se']:.2f}", r.get("estimator", f"IS, K={r['k']}"), _paired(r), _format(r["gap"]),
            _format(r["bits_per_dim"], 3), _format_active_units(r["active_units"]), f"{r['train_seconds']:.0f} s" if r["train_seconds"] else "–", r["device"],
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    images = {r["images"] for r in rows}
    lines.append("")
    lines.append(
        f"Nats per image on the {', '.join(sorted({r['split'] for r in rows}))} split "
        f"({', '.join(str(i) for i in sorted(images))} images), ± standard error over images. "
        "Paired: the mean over the same images of log p̂ minus the first run's, ± its standard error "
        "(– where the runs were not evaluated on the same images by `ppl-vae evaluate`, or their evidence is "
        "of different quantities or from different estimators). Estimator: IS, importance sampling from the guide "
        "with K draws; AIS, annealed importance sampling with T steps, L leapfrog steps, C chains."
    )
    unpaired = [r for r in rows if r.get("not_paired")]
    if unpaired:
        lines.append("")
        lines.append("Not paired with the first run: " + "; ".join(
            f"{Path(r['run']).name}: {r['not_paired']}" for r in unpaired) + ".")
    stale = [r for r in rows if r.get("stale")]
    if stale:
        lines.append("")
        lines.append("Stale results, marked ⚠ under epochs (run `ppl-vae evaluate` again for the latest checkpoint): "
                     + "; ".join(f"{Path(r['run']).name}: {r['result_file']} {r['stale']}" for r in stale) + ".")
    return "\n".join(lines)


def _markdown(text: str) -> str:
    """``text`` for a Markdown table cell: its bars escaped (``log p(x | y)``)."""
    return text.replace("|", "\\|")


def _epochs(row: dict[str, Any]) -> str:
    """The epoch the row's numbers come from; marked when the run has moved on since."""
    epochs = "?" if row["epochs"] is None else str(row["epochs"])
    if row.get("checkpoint") == "best":
        epochs += " (best)"
    if row.get("stale"):
        now = row.get("run_epoch")
        return f"{epochs} ⚠ (run at {now})" if now != row["epochs"] else f"{epochs} ⚠ (other checkpoint)"
    return epochs


def _paired(row: dict[str, Any]) -> str:
    if row["log_px_minus_first"] is None:
        return "–"
    return f"{row['log_px_minus_first']:+.2f} ± {row['log_px_minus_first_se']:.2f}"


def _active_units(diagnostics: dict[str, Any]) -> Any:
    """The active-unit count of the one latent site, or "site count; ..." for several; None when not evaluated."""
    if not diagnostics:
        return None
    counts = {name: site.get("active_units") for name, site in site_diagnostics(diagnostics).items()}
    if len(counts) == 1:
        return next(iter(counts.values()))
    return "; ".join(f"{name} {_format_active_units(count)}" for name, count in counts.items())


def _format_active_units(value: Any) -> str:
    # The diagnostics give a count, or a dict saying why there is none (e.g. a flow guide has no posterior mean).
    if isinstance(value, dict):
        return "–"
    if isinstance(value, str):  # several sites, already formatted
        return value
    return _format(value)


def csv_table(rows: list[dict[str, Any]]) -> str:
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return stream.getvalue()


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path, checkpoint: str | None = None) -> tuple[str, Path]:
    """Write ``comparison.md``, ``comparison.csv`` and ``comparison.png`` into ``out_dir``; return the Markdown.
    ``checkpoint``: of each run, the results of its "last" or "best" checkpoint (None: best where kept)."""
    from .plots import plot_comparison

    rows = [load_run_summary(run_dir, checkpoint) for run_dir in run_dirs]
    add_paired_differences(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (out_dir / "comparison.md").write_text(table + "\n")
    (out_dir / "comparison.csv").write_text(csv_table(rows))
    figure = plot_comparison(rows, out_dir / "comparison.png")
    return table, figure
