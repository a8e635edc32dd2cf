"""``ppl-vae audit``: how far a run's importance-sampled log p̂(x) is from AIS, and what BDMC certifies.

The work is :func:`ppl_vae.audit.audit_run` (under the run's evaluation lock); this prints its tables and
where it wrote ``audit.json`` and the figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    """Audit ``args.run_dir``'s evidence with the options given; print the tables."""
    from ..ais import AisSettings
    from ..audit import audit_run
    from ..errors import RunDirectoryError
    from ..train import resolve_device

    settings = AisSettings(steps=args.ais_steps, chains=args.ais_chains, leapfrog_steps=args.leapfrog_steps,
                           schedule=args.ais_schedule)  # a bad value is one line before anything is loaded
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():  # before the lock, which would otherwise make the folder
        raise RunDirectoryError(f"{run_dir} is not a run directory: give one written by `ppl-vae train`")
    text = audit_run(
        run_dir, device=str(resolve_device(args.device)), data_dir=args.data_dir, trust_program=args.trust_program,
        split=args.split, examples=args.examples, ais_examples=args.ais_examples, num_samples=args.num_samples,
        simulated=args.simulated, bdmc_steps=args.bdmc_steps, settings=settings, seed=args.seed,
        chunk_size=args.chunk_size, progress=not args.no_progress,
    )
    print(text)
    return 0
