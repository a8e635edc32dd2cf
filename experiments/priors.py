"""Priors and guides compared on one scale (issue: model variants, benchmark).

    python experiments/priors.py [RUNS_DIR] [--epochs N] [--examples N] [--k K]

Trains each variant below with the same networks (784-200-200-50 tanh MLPs), data
(dynamically binarized MNIST) and schedule, evaluates each with K importance samples
on the same test images, and writes one comparison table and figure to
experiments/results/priors/. Configuration is plain data; the work is done by the
`ppl-vae` commands.
"""

import argparse
from pathlib import Path

from ppl_vae.cli import main

VARIANTS = {
    "standard": [],
    "mixture": ["--prior", "mixture", "--prior-components", "10"],
    "vamp": ["--prior", "vamp"],  # --prior-components from --vamp-components
    "flow-prior": ["--prior", "flow", "--num-flows", "2"],
    "iaf-guide": ["--guide", "iaf", "--num-flows", "2"],
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("runs_dir", nargs="?", default="runs/priors")
parser.add_argument("--epochs", type=int, default=50)
parser.add_argument("--examples", type=int, default=2000, help="test images for the evaluation")
parser.add_argument("--k", type=int, default=5000, help="importance samples per test image")
parser.add_argument("--only", nargs="*", default=None, help="names of the variants to run (default: all)")
parser.add_argument("--warmup", type=int, default=0, help="epochs of linear KL warm-up for every variant "
                    "(Tomczak & Welling warm up for 100 epochs; without it the VampPrior can collapse at once)")
parser.add_argument("--vamp-components", type=int, default=500, help="pseudo-inputs of the VampPrior")
args = parser.parse_args()

run_dirs = []
for name, flags in VARIANTS.items():
    if args.only and name not in args.only:
        continue
    run_dir = Path(args.runs_dir) / name
    flags = flags + (["--prior-components", str(args.vamp_components)] if name == "vamp" else [])
    if not (run_dir / "test.json").is_file():
        main(["train", "--run-dir", str(run_dir), "--epochs", str(args.epochs), "--test-samples", "100",
              "--warmup", str(args.warmup), "--no-progress", "--overwrite", *flags])
    main(["evaluate", str(run_dir), "--num-samples", str(args.k), "--examples", str(args.examples), "--no-progress"])
    run_dirs.append(str(run_dir))
main(["compare", *run_dirs, "--out", str(Path(__file__).parent / "results" / "priors")])
