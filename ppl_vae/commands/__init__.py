"""What each ``ppl-vae`` command does, one module per command; :mod:`ppl_vae.cli` only parses and dispatches.

Each command module has ``run(args) -> int``: it takes the parsed options (an ``argparse.Namespace``) and
returns the exit status. :mod:`ppl_vae.commands.options` holds the option types, the table from train options
to the run's settings, and the checks of a ``train --config`` file.

- ``train``: a new run, or ``--resume``; the resume-option checks
- ``evaluate``: the evaluation tables and files of a run (log p(x) by importance sampling or AIS)
- ``audit``: importance sampling against AIS on a run's images, and the BDMC sandwich on simulated ones
- ``compare``, ``plot``, ``diagnose``: tables and figures of runs
- ``trust``: sign a run's program file with your key
- ``bench``: timings against plain PyTorch
- ``scale_out``: starting several processes through torchrun (train and evaluate)
"""
