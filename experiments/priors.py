"""Priors and guides compared on one scale (issue: model variants, benchmark).

    python experiments/priors.py [RUNS_DIR] [--epochs N] [--examples N] [--k K] [--out DIR]
                                 [--train-examples N] [--eval-examples N]   # smaller training runs

Trains each variant below with the same networks (by default 784-300-300-40 ReLU MLPs,
the size of Tomczak & Welling's VampPrior comparison), data (dynamically binarized
MNIST) and schedule, evaluates each with K importance samples on the same test images,
and writes one comparison table and figure to --out. Configuration is plain data; the
work is done by the `ppl-vae` commands.

Why ReLU by default: with the tanh networks of the IWAE paper and PyTorch's default
initialization, training sits on the mean-image plateau (decoder ignores z) for the
first ~500 steps, and the VampPrior, whose KL term then rewards every posterior for
matching the encoder's (input-independent) outputs at the pseudo-inputs, never leaves
it (measured: KL = 0 for 20 epochs, with or without warm-up). With ReLU networks it
leaves the plateau within ~100 steps. See experiments/results/priors/NOTES.md.
"""

import argparse
import json
import sys
from pathlib import Path

from ppl_vae.cli import main


def run(argv: list[str]) -> None:
    """``ppl-vae ARGV``; a failing command (its error already printed) stops the script before it reads stale results."""
    code = main(argv)
    if code:
        sys.exit(code)


VARIANTS = {
    "standard": [],
    "vamp": ["--prior", "vamp"],  # --prior-components from --vamp-components
    "iaf-guide": ["--guide", "iaf", "--num-flows", "2"],
    "mixture": ["--prior", "mixture", "--prior-components", "10"],
    "flow-prior": ["--prior", "flow", "--num-flows", "2"],
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("runs_dir", nargs="?", default="runs/priors")
parser.add_argument("--epochs", type=int, default=100)
parser.add_argument("--examples", type=int, default=2000, help="test images for the evaluation")
parser.add_argument("--k", type=int, default=5000, help="importance samples per test image")
parser.add_argument("--only", nargs="*", default=None, help="names of the variants to run (default: all)")
parser.add_argument("--warmup", type=int, default=0, help="epochs of linear KL warm-up for every variant "
                    "(Tomczak & Welling warm up for 100 epochs)")
parser.add_argument("--vamp-components", type=int, default=500, help="pseudo-inputs of the VampPrior")
parser.add_argument("--hidden-sizes", nargs="+", default=["300", "300"], help="hidden widths of every network")
parser.add_argument("--latent-dim", default="40")
parser.add_argument("--activation", default="relu")
parser.add_argument("--train-examples", type=int, default=None, help="train on the first N training images (default: all 50,000)")
parser.add_argument("--eval-examples", type=int, default=None,
                    help="validation and test images during training (default: all; the evaluation uses --examples)")
parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "priors"),
                    help="folder for the comparison table and figure")
args = parser.parse_args()

shrink = ((["--train-examples", str(args.train_examples)] if args.train_examples else [])
          + (["--eval-examples", str(args.eval_examples)] if args.eval_examples else []))
network = ["--hidden-sizes", *args.hidden_sizes, "--latent-dim", args.latent_dim, "--activation", args.activation]
run_dirs = []
for name, flags in VARIANTS.items():
    if args.only and name not in args.only:
        continue
    run_dir = Path(args.runs_dir) / name
    flags = flags + (["--prior-components", str(args.vamp_components)] if name == "vamp" else [])
    if (run_dir / "test.json").is_file():
        # A finished run is reused (only evaluated again), so it must be the run these options ask for.
        saved = json.loads((run_dir / "config.json").read_text())
        wanted = {"epochs": args.epochs, "latent_dim": int(args.latent_dim), "activation": args.activation,
                  "hidden_sizes": [int(h) for h in args.hidden_sizes]}
        found = {"epochs": saved["train"]["epochs"], **{k: saved["model"][k] for k in wanted if k != "epochs"}}
        found["hidden_sizes"] = list(found["hidden_sizes"])
        if found != wanted:
            sys.exit(f"{run_dir} holds a finished run with {found}, not {wanted}: choose another RUNS_DIR "
                     "or delete that run")
        print(f"reusing the finished run {run_dir} ({found['epochs']} epochs); evaluating it again")
    else:
        run(["train", "--run-dir", str(run_dir), "--epochs", str(args.epochs), "--test-samples", "100",
              "--warmup", str(args.warmup), "--no-progress", "--overwrite", *network, *flags, *shrink])
    run(["evaluate", str(run_dir), "--num-samples", str(args.k), "--examples", str(args.examples), "--no-progress"])
    run_dirs.append(str(run_dir))
run(["compare", *run_dirs, "--out", args.out])
