"""ELBO surgery for VAEs with 2, 10 and 20 latent dimensions (Hoffman & Johnson 2016, Table 1).

    python experiments/elbo_surgery.py [RUNS_DIR] [--epochs N] [--k K] [--out FILE]

Trains the package's default networks (784-200-200-d tanh MLPs, Bernoulli, standard normal prior) with
d = 2, 10, 20 on dynamically binarized MNIST, runs `ppl-vae evaluate` on all 10,000 test images (the
aggregate posterior is over the whole test set, so the mutual information is bounded by log 10,000 =
9.21 nats; Hoffman & Johnson used the 60,000 training images, log N = 11.0), and writes
experiments/results/elbo_surgery.md (--out) beside their published values. --train-examples, --examples
and --hidden-sizes shrink the run (for smoke tests).
"""

import argparse
import math
import sys
from pathlib import Path

from ppl_vae import runs
from ppl_vae.diagnostics import site_diagnostics
from ppl_vae.cli import main


def run(argv: list[str]) -> None:
    """``ppl-vae ARGV``; a failing command (its error already printed) stops the script before it reads stale results."""
    code = main(argv)
    if code:
        sys.exit(code)


PUBLISHED = {  # Hoffman & Johnson (2016), Table 1: ELBO, mutual information, marginal KL, nats
    2: (-129.63, 7.20, 0.21),
    10: (-88.95, 10.82, 8.35),
    20: (-87.45, 10.67, 9.53),
}
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("runs_dir", nargs="?", default="runs/elbo-surgery")
parser.add_argument("--epochs", type=int, default=20)
parser.add_argument("--k", type=int, default=100, help="importance samples per test image (log p(x) is a side result)")
parser.add_argument("--train-examples", type=int, default=None, help="train on the first N training images (default: all 50,000)")
parser.add_argument("--examples", type=int, default=None, help="evaluate on the first N test images (default: all 10,000)")
parser.add_argument("--hidden-sizes", nargs="+", default=None, help="hidden widths of every network (default: the package's, 200 200)")
parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "elbo_surgery.md"), help="the Markdown table")
args = parser.parse_args()
shrink = ((["--train-examples", str(args.train_examples)] if args.train_examples else [])
          + (["--hidden-sizes", *args.hidden_sizes] if args.hidden_sizes else []))

rows = []
for latent_dim in PUBLISHED:
    run_dir = Path(args.runs_dir) / f"latent-{latent_dim}"
    if not (run_dir / "test.json").is_file():
        run(["train", "--run-dir", str(run_dir), "--latent-dim", str(latent_dim), "--epochs", str(args.epochs),
              "--test-samples", "10", "--no-progress", "--overwrite", *shrink])
    run(["evaluate", str(run_dir), "--num-samples", str(args.k), "--no-progress",
          *(["--examples", str(args.examples)] if args.examples else [])])
    result = runs.read_json(run_dir / "evaluation.json")
    site = site_diagnostics(result["diagnostics"])["z"]
    surgery = site["elbo_surgery"]
    elbo, mi, marginal = PUBLISHED[latent_dim]
    rows.append(
        f"| {latent_dim} | {result['elbo']['mean']:.2f} ± {result['elbo']['stderr']:.2f} ({elbo}) "
        f"| {surgery['average_kl']['mean']:.2f} ({mi + marginal:.2f}) "
        f"| {surgery['mutual_information']['mean']:.2f} ± {surgery['mutual_information']['stderr']:.2f} ({mi}) "
        f"| {surgery['marginal_kl']['mean']:.2f} ± {surgery['marginal_kl']['stderr']:.2f} ({marginal}) "
        f"| {site['active_units']} |"
    )
metrics = runs.read_metrics(Path(args.runs_dir) / "latent-20")
text = "\n".join([
    "## ELBO surgery (Hoffman & Johnson 2016, Table 1)",
    "",
    f"Measured on the {result['num_datapoints']:,} test images after {args.epochs} epochs of training ({metrics[-1]['device']}); "
    "published values in parentheses (theirs: the 60,000 training images, trained to convergence). "
    "Nats per image; ± standard error over images. The mutual information is bounded by log N: "
    f"{math.log(result['num_datapoints']):.2f} here, 11.0 for them.",
    "",
    "| latent dims | ELBO | average KL | mutual information | marginal KL(q(z) ‖ p(z)) | active units |",
    "|---|---|---|---|---|---|",
    *rows,
])
out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(text + "\n")
print(text)
