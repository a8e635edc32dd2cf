"""Reproduce a row of Burda, Grosse & Salakhutdinov (2015), Table 1, within an epoch budget.

The one-layer rows (burda2015-vae-k1, ...) train the built-in VAE; the two-layer rows
(burda2015-two-layer-vae-k1, ...) the built-in program "two-layer" (`"program"` in the config).

    python experiments/reproduce.py burda2015-vae-k1 [--epochs N] [--runs-dir runs] [--k 5000] [--examples N]
                                    [--train-examples N] [--eval-examples N] [--out DIR] [--resume]
                                    [--engine auto|svi|jit] [--report-only]

Trains with experiments/configs/<name>.json (the paper's networks, batch and learning-rate
schedule), truncated to --epochs (the paper: 3,280), recording a learning curve of validation
log p(x) every --every epochs; then evaluates on the test set with K importance samples and
writes experiments/results/reproduce/<name>.md (--out: another folder) with the measured numbers beside
the published one, its learning-curve figure <name>.png, and <name>.json, the numbers that
`python experiments/update_readme.py` puts in the main README's table of all rows.
--train-examples and --eval-examples shrink the training run (for smoke tests). On a GPU,
the full budget is the same command without --epochs; --resume continues an earlier run to a
larger --epochs.
"""

import argparse
import json
import sys
from pathlib import Path

import common
from ppl_vae import runs
from ppl_vae.diagnostics import site_diagnostics
from ppl_vae.cli import main
from ppl_vae.plots import plot_learning_curve


def run(argv: list[str]) -> None:
    """``ppl-vae ARGV``; a failing command (its error already printed) stops the script before it reads stale results."""
    code = main(argv)
    if code:
        sys.exit(code)


HERE = Path(__file__).parent
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("name", help="a config in experiments/configs, e.g. burda2015-vae-k1")
parser.add_argument("--epochs", type=int, default=None, help="epoch budget (default: the config's, 3,280)")
parser.add_argument("--every", type=int, default=5, help="epochs between points of the learning curve")
parser.add_argument("--runs-dir", default="runs")
parser.add_argument("--k", type=int, default=5000, help="importance samples per test image")
parser.add_argument("--examples", type=int, default=None, help="test images (default: all 10,000)")
parser.add_argument("--train-examples", type=int, default=None, help="train on the first N training images (default: all 50,000)")
parser.add_argument("--eval-examples", type=int, default=None,
                    help="validation and test images during training (default: all; the evaluation uses --examples)")
parser.add_argument("--out", default=str(HERE / "results" / "reproduce"), help="folder for <name>.md")
parser.add_argument("--engine", choices=("auto", "svi", "jit"), default="auto",
                    help="training engine of a new run (jit: the compiled ELBO, faster, the VAE rows only, not IWAE; "
                    "auto, ppl-vae train's default: jit where it is checked equal to Trace_ELBO, svi otherwise)")
parser.add_argument("--resume", action="store_true",
                    help="continue the run in RUNS_DIR/NAME up to --epochs (its own settings otherwise) instead of starting over")
parser.add_argument("--report-only", action="store_true",
                    help="neither train nor evaluate: write <name>.md and its figure from RUNS_DIR/NAME's last evaluation")
args = parser.parse_args()

config_path = HERE / "configs" / f"{args.name}.json"
config = json.loads(config_path.read_text())
run_dir = Path(args.runs_dir) / args.name
budget = ["--epochs", str(args.epochs)] if args.epochs else []
budget += ["--train-examples", str(args.train_examples)] if args.train_examples else []
budget += ["--eval-examples", str(args.eval_examples)] if args.eval_examples else []
if args.report_only:
    if not (run_dir / "evaluation.json").is_file():
        sys.exit(f"reproduce.py: {run_dir} holds no evaluation.json to report; run without --report-only first")
elif args.resume:
    run(["train", "--run-dir", str(run_dir), "--resume", *(["--epochs", str(args.epochs)] if args.epochs else []),
         "--no-progress"])
else:
    run(["train", "--config", str(config_path), "--run-dir", str(run_dir), *budget, "--engine", args.engine,
         "--test-samples", "100",
         "--evidence-every", str(args.every), "--no-progress", "--overwrite"])
if not args.report_only:
    evaluate = ["evaluate", str(run_dir), "--num-samples", str(args.k), "--no-progress"]
    run(evaluate + (["--examples", str(args.examples)] if args.examples else []))


def surgery_rows(surgery: dict | None) -> list[str]:
    """The KL term split as in Hoffman & Johnson (2016): mutual information + marginal KL (absent: no rows)."""
    if not surgery:
        return []
    return [
        f"| … mutual information I(x; z) (at most log N = {surgery['mutual_information_bound']:.2f}) | "
        f"{surgery['mutual_information']['mean']:.2f} ± {surgery['mutual_information']['stderr']:.2f} | |",
        f"| … marginal KL(q(z) ‖ p(z)) | {surgery['marginal_kl']['mean']:.2f} ± {surgery['marginal_kl']['stderr']:.2f} | |",
    ]


def site_units(name: str, site: dict) -> str:
    """What one latent site's diagnostics say about its units: active units where defined, else units with KL above the threshold."""
    units = site.get("active_units")
    if isinstance(units, int):
        return f"{name}: {units} active"
    collapse = site.get("collapse", {})
    if "kl_per_dimension" in collapse:  # active units undefined (q(z2 | x) is a mixture over z1): the units carrying KL
        carrying = sum(kl > collapse["kl_threshold"] for kl in collapse["kl_per_dimension"])
        return f"{name}: {carrying} of {collapse['latent_dim']} with KL > {collapse['kl_threshold']:g}"
    return f"{name}: n/a"


result = runs.read_json(run_dir / "evaluation.json")
sites = site_diagnostics(result["diagnostics"])
# The KL split into mutual information and marginal KL exists for one site with a standard prior (not for two layers).
surgery = next((site["elbo_surgery"] for site in sites.values() if "average_kl" in site.get("elbo_surgery", {})), {}) \
    if len(sites) == 1 else {}
active_units = "; ".join(site_units(name, site) for name, site in sites.items()) if len(sites) > 1 else \
    next(iter(sites.values())).get("active_units")
kl_sites = result["kl"].get("sites", {}) if len(sites) > 1 else {}
metrics = runs.read_metrics(run_dir)
curve = [(m["epoch"], m["val_log_px"], m["val_log_px_stderr"]) for m in metrics if "val_log_px" in m]
published = config["_published_test_log_px"]
lines = [
    f"## {args.name}",
    "",
    f"Config `{config_path.name}` ({config['_source']}; program {config.get('program', 'vae')}), trained {metrics[-1]['epoch']} of {config['epochs']} epochs "
    f"in {metrics[-1]['train_seconds']:.0f} s on {metrics[-1]['device']}.",
    "",
    "| | measured | published |",
    "|---|---|---|",
    f"| test log p̂(x), K={result['log_evidence']['num_samples']} ({result['num_datapoints']} images) | "
    f"{result['log_evidence']['mean']:.2f} ± {result['log_evidence']['stderr']:.2f} | {published} |",
    f"| test ELBO | {result['elbo']['mean']:.2f} ± {result['elbo']['stderr']:.2f} | |",
    f"| reconstruction E_q[log p(x\\|z)] | {result['reconstruction']['mean']:.2f} ± {result['reconstruction']['stderr']:.2f} | |",
    f"| KL(q(z\\|x) ‖ p(z)) | {result['kl']['total']['mean']:.2f} ± {result['kl']['total']['stderr']:.2f} | |",
    *[f"| … KL at site {name} ({site.get('method', '')}) | {site['mean']:.2f} ± {site['stderr']:.2f} | |"
      for name, site in kl_sites.items()],
    *surgery_rows(surgery),
    f"| gap log p̂(x) − ELBO | {result['gap']['mean']:.2f} | |",
    f"| active units | {active_units} | |",
    f"| share of images with PSIS k-hat > 0.7 | {result['diagnostics']['psis'].get('unreliable_share', float('nan')):.2f} | |",
    "",
    f"Learning curve, validation log p̂(x) (K={metrics[-1].get('val_log_px_samples')}, "
    f"{metrics[-1].get('val_log_px_images')} images):",
    "",
    "| epoch | log p̂(x) |",
    "|---|---|",
    *[f"| {epoch} | {value:.2f} ± {se:.2f} |" for epoch, value, se in curve],
]
out = Path(args.out) / f"{args.name}.md"
out.parent.mkdir(parents=True, exist_ok=True)
figure = plot_learning_curve(metrics, out.with_suffix(".png"), published=published,
                             title=f"{args.name}: {metrics[-1]['epoch']} of {config['epochs']} epochs")
lines += ["", f"![learning curve]({figure.name})"]
out.write_text("\n".join(lines) + "\n")
print(out.read_text())

trained = runs.read_json(run_dir / runs.CONFIG_FILE)["train"]
summary = {
    "name": args.name,
    "config": f"experiments/configs/{config_path.name}",
    "program": config.get("program", "vae"),
    "latent_sites": list(sites),
    "published_test_log_px": published,
    "objective": trained["objective"],
    "particles": trained["particles"],
    "batch_size": trained["batch_size"],
    "engine": trained["engine"],
    "epochs": metrics[-1]["epoch"],
    "published_epochs": config["epochs"],
    "train_seconds": metrics[-1]["train_seconds"],
    "device": metrics[-1]["device"],
    "hardware": common.hardware(),  # of the machine running this script (training too, unless --report-only)
    "test": {
        "images": result["num_datapoints"],
        "num_samples": result["log_evidence"]["num_samples"],
        "log_px": result["log_evidence"]["mean"],
        "log_px_stderr": result["log_evidence"]["stderr"],
        "elbo": result["elbo"]["mean"],
        "elbo_stderr": result["elbo"]["stderr"],
        "reconstruction": result["reconstruction"]["mean"],
        "kl": result["kl"]["total"]["mean"],
        "kl_sites": {name: site["mean"] for name, site in kl_sites.items()},
        "mutual_information": surgery.get("mutual_information", {}).get("mean"),
        "marginal_kl": surgery.get("marginal_kl", {}).get("mean"),
        "gap": result["gap"]["mean"],
        "active_units": active_units,
        "khat_above_0.7_share": result["diagnostics"]["psis"].get("unreliable_share"),
    },
    "learning_curve": [{"epoch": e, "val_log_px": v, "stderr": se} for e, v, se in curve],
}
runs.write_json(out.with_suffix(".json"), summary)
