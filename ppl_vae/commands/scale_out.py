"""Starting several processes for a command (``train``, ``evaluate``) through torchrun."""

from __future__ import annotations

import argparse


def launched(args: argparse.Namespace) -> int | None:
    """With several processes asked for and none started yet: start them through torchrun, return its status.

    None: this process does the work (one process, or one that torchrun started). ``args.argv`` is the command
    line handed on to every process.
    """
    from .. import distributed

    distributed.check_launch(args.devices, args.num_nodes, args.rdzv_endpoint, args.device)
    if not distributed.should_launch(args.devices, args.num_nodes):
        return None
    return distributed.launch(args.argv, args.devices or 1, args.num_nodes, args.rdzv_endpoint, args.rdzv_id)
