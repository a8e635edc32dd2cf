"""``ppl-vae bench``: time Pyro's SVI step and evidence estimation against plain PyTorch (:mod:`ppl_vae.bench`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def run(args: argparse.Namespace) -> int:
    """Run the benchmark of ``args``, print its table and write its JSON to ``args.out``."""
    from .. import runs
    from ..bench import format_benchmark, run_benchmark
    from ..train import resolve_device

    # Checked before minutes of measuring, not after: a folder that cannot be made fails now.
    Path(args.out).resolve().parent.mkdir(parents=True, exist_ok=True)
    result = run_benchmark(
        resolve_device(args.device), args.batch_sizes, args.repeats, args.steps, args.evidence_examples,
        args.evidence_samples, epoch=not args.no_epoch, data_dir=args.data_dir, evidence_only=args.evidence_only,
        epoch_examples=args.epoch_examples, ais=_ais_options(args),
    )
    runs.write_json(args.out, result)
    print(format_benchmark(result))
    print(f"written to {args.out}")
    return 0


def _ais_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """What ``--ais-*`` ask :func:`ppl_vae.bench.time_ais` to time (images, and the settings); None with ``--no-ais``."""
    from ..ais import AisSettings

    if args.no_ais:
        return None
    settings = AisSettings(steps=args.ais_steps, chains=args.ais_chains, leapfrog_steps=args.leapfrog_steps)
    return dict(num_examples=args.ais_examples, settings=settings)
