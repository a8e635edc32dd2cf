"""One table (and one figure) for several runs: ``ppl-vae compare RUN_DIR...``.

Each run contributes its configuration, its training metrics and its evaluation
(``evaluation.json`` from ``ppl-vae evaluate`` when present, else the final
``test.json`` of ``ppl-vae train``). Numbers are as measured, in nats per image
(and bits/dim for grey-level likelihoods), with standard errors over the images.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from . import runs
from .errors import RunDirectoryError
from .model import VAEConfig
from .train import TrainConfig, describe_objective

COLUMNS = (
    "run", "model", "objective", "epochs", "split", "images", "elbo", "elbo_se", "reconstruction", "kl",
    "log_px", "log_px_se", "k", "gap", "bits_per_dim", "active_units", "train_seconds", "device",
)


def load_run_summary(run_dir: str | Path) -> dict[str, Any]:
    """One comparison row from a run directory; a clear error if it has not been evaluated."""
    run_dir = Path(run_dir)
    config = runs.read_json(run_dir / runs.CONFIG_FILE)
    for name in ("evaluation.json", "test.json"):
        if (run_dir / name).is_file():
            result = runs.read_json(run_dir / name)
            break
    else:
        raise RunDirectoryError(
            f"{run_dir} has no evaluation.json or test.json: finish training it or run `ppl-vae evaluate {run_dir}`"
        )
    metrics = runs.read_metrics(run_dir)
    model_config, train_config = VAEConfig(**config["model"]), TrainConfig(**config["train"])
    diagnostics = result.get("diagnostics", {})
    bpd = result.get("bits_per_dim", {}).get("log_evidence", {}).get("mean")
    return {
        "run": str(run_dir),
        "model": model_config.describe(),
        "objective": describe_objective(train_config),
        "epochs": metrics[-1]["epoch"] if metrics else 0,
        "split": result.get("split", "test"),
        "images": result["num_datapoints"],
        "elbo": result["elbo"]["mean"],
        "elbo_se": result["elbo"]["stderr"],
        "reconstruction": result["reconstruction"]["mean"],
        "kl": result["kl"]["total"]["mean"],
        "log_px": result["log_evidence"]["mean"],
        "log_px_se": result["log_evidence"]["stderr"],
        "k": result["log_evidence"]["num_samples"],
        "gap": result["gap"]["mean"],
        "bits_per_dim": bpd,
        "active_units": diagnostics.get("active_units"),
        "train_seconds": metrics[-1]["train_seconds"] if metrics else None,
        "device": metrics[-1]["device"] if metrics else result.get("device"),
    }


def _format(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = ("run", "model", "objective", "epochs", "ELBO", "reconstruction", "KL", "log p̂(x)", "K", "gap",
              "bits/dim", "active units", "train time", "device")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = (
            Path(r["run"]).name, r["model"], r["objective"], r["epochs"],
            f"{r['elbo']:.2f} ± {r['elbo_se']:.2f}", _format(r["reconstruction"]), _format(r["kl"]),
            f"{r['log_px']:.2f} ± {r['log_px_se']:.2f}", r["k"], _format(r["gap"]), _format(r["bits_per_dim"], 3),
            _format(r["active_units"]), f"{r['train_seconds']:.0f} s" if r["train_seconds"] else "–", r["device"],
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    images = {r["images"] for r in rows}
    lines.append("")
    lines.append(
        f"Nats per image on the {', '.join(sorted({r['split'] for r in rows}))} split "
        f"({', '.join(str(i) for i in sorted(images))} images), ± standard error over images."
    )
    return "\n".join(lines)


def csv_table(rows: list[dict[str, Any]]) -> str:
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return stream.getvalue()


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path) -> tuple[str, Path]:
    """Write ``comparison.md``, ``comparison.csv`` and ``comparison.png`` into ``out_dir``; return the Markdown."""
    from .plots import plot_comparison

    rows = [load_run_summary(run_dir) for run_dir in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (out_dir / "comparison.md").write_text(table + "\n")
    (out_dir / "comparison.csv").write_text(csv_table(rows))
    figure = plot_comparison(rows, out_dir / "comparison.png")
    return table, figure
