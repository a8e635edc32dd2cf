"""``ppl-vae compare``: one table and one figure for several runs (:func:`ppl_vae.compare.compare_runs`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    """Print the comparison table of ``args.run_dirs`` and write it, with its figure, into ``args.out``."""
    from ..compare import compare_runs

    table, figure = compare_runs(args.run_dirs, args.out, args.checkpoint)
    print(table)
    print(f"written to {Path(args.out) / 'comparison.md'}, comparison.csv and {figure}")
    return 0
