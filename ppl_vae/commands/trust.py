"""``ppl-vae trust``: sign a run's program file with your key, after its sha256 is checked."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    """Trust the program file of ``args.run_dir``; print its path, sha256 and how it is called."""
    from ..programs import trust_run
    from ..trust import key_path

    spec, path, before = trust_run(args.run_dir)
    if path is None:
        what = "no program record" if spec is None else (
            f"the program {spec.name}, passed as a Python object" if spec.object else f"the built-in program {spec.name}")
        print(f"{args.run_dir} has {what}: no file of its own to trust")
        return 0
    print(f"program file: {path}")
    print(f"sha256:       {spec.sha256}")
    print(f"called as:    {spec.describe()}")
    print("already trusted (signed with your key)" if before else f"trusted: program.json signed with your key {key_path()}")
    return 0
