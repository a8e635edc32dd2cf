"""Benchmark of Pyro's SVI step and evidence estimation against plain PyTorch (issue: performance).

    python experiments/bench.py                      # CPU or CUDA, writes experiments/results/bench-<device>.json

A thin wrapper: the measurements live in ppl_vae.bench, the same as `ppl-vae bench`.
"""

import sys
from pathlib import Path

import torch

from ppl_vae.cli import main

device = "cuda" if torch.cuda.is_available() else "cpu"
out = Path(__file__).parent / "results" / f"bench-{device}.json"
out.parent.mkdir(exist_ok=True)
sys.exit(main(["bench", "--device", device, "--out", str(out), *sys.argv[1:]]))
