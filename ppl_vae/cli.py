"""The ``ppl-vae`` command line: ``train`` and ``evaluate``.

Errors the user can fix are printed as one message (no traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import PplVaeError, PplVaeWarning, TrainingInterrupted

PER_DATAPOINT_FILE = "evaluation_per_datapoint.npz"

DESCRIPTION = """\
Variational autoencoders as Pyro programs: train on MNIST with SVI and Trace_ELBO,
then evaluate the ELBO, its decomposition and an importance-sampled log p(x).
All evidence numbers are in nats per image."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**32 - 1 = {2**32 - 1} (NumPy's range), got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _add_scale_out_options(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group(
        "scale-out",
        f"{what} on several processes with torch.distributed: one per GPU (NCCL), or CPU processes (gloo) without CUDA. "
        "Above one process, ppl-vae starts itself through torchrun (python -m torch.distributed.run); under torchrun "
        "these options are only checked against it.",
    )
    g.add_argument("--devices", type=_positive_int, default=None, metavar="N",
                   help="processes on this machine, one per GPU; not given: one, or what torchrun started")
    g.add_argument("--num-nodes", type=_positive_int, default=1, metavar="M",
                   help="machines; run the same command on every one of them, with --rdzv-endpoint")
    g.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="torchrun's c10d rendezvous with several machines: a free port on one of them, reachable from all")
    g.add_argument("--rdzv-id", default="ppl-vae", help="the job's rendezvous id, the same on every machine")


def _add_train_parser(subparsers) -> argparse.ArgumentParser:
    from .data import BINARIZATIONS, DATASETS
    from .guides import GUIDES
    from .likelihoods import LIKELIHOODS
    from .model import VAEConfig
    from .networks import ACTIVATIONS, NETWORKS
    from .objectives import OBJECTIVES
    from .priors import PRIORS
    from .train import ENGINES, LR_SCHEDULES, TrainConfig

    t, m = TrainConfig(), VAEConfig()
    p = subparsers.add_parser(
        "train",
        help="train a VAE on MNIST (or --dataset)",
        description="Train a VAE on MNIST (or another --dataset) with SVI (Trace_ELBO). Writes config.json, data.json, "
        "metrics.jsonl, "
        "a checkpoint every epoch and test.json (the final test evaluation) into the run directory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--run-dir", default=None, help="where the run is written (default: runs/vae-DATE-TIME)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    _add_trust_option(p, "--resume imports")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the ppl_vae run in --run-dir (only a folder holding a run and nothing else; deleted "
                   "once every other check has passed)")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default=t.dataset, metavar="NAME|PATH.npz",
                      help=f"{', '.join(DATASETS)} (read from --data-dir, downloaded there when missing), or a .npz file "
                      "of uint8 x_train, x_test (optional x_val, y_*), [N,H,W] grey or [N,H,W,C] colour")
    data.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (and the other named datasets' folders; default: $PPL_VAE_DATA, else ~/.cache/ppl_vae)")
    data.add_argument("--binarize", choices=BINARIZATIONS, default=t.binarize, help="dynamic: fresh Bernoulli draw per minibatch; static: one fixed draw; none: grey levels")
    data.add_argument("--train-examples", type=_positive_int, default=None, help="use only the first N training images (quick runs)")
    data.add_argument("--eval-examples", type=_positive_int, default=None, help="use only the first N validation and test images")
    program = p.add_argument_group(
        "program",
        "What is trained: by default the built-in VAE of the 'model' options; --program NAME for another built-in "
        "program (two-layer: Burda et al.'s two-stochastic-layer VAE; conditional: a VAE given the labels, with "
        "--labels), or FILE.py:NAME for your own: a class or function in that file that returns an nn.Module with "
        "model(x, *cond) and guide(x, *cond) methods. The run directory keeps a copy of the file (with its sha256), "
        "so evaluate, --resume, diagnose, plot and compare rebuild it without naming it again. That copy runs only "
        "when it matches its sha256 and the run is yours (signed with your key when made): see `ppl-vae trust`.",
    )
    program.add_argument("--program", default=None, metavar="NAME|FILE.py:NAME",
                         help="the program to train (default: the built-in VAE)")
    program.add_argument("--program-kwargs", default=None, metavar="JSON",
                         help="keyword arguments for the program, a JSON object, e.g. '{\"latent\": [64, 32]}'")
    program.add_argument("--labels", action="store_true",
                         help="condition on the class labels: every batch is (x, y), passed to model and guide")
    model = p.add_argument_group("model")
    model.add_argument("--latent-dim", type=_positive_int, default=m.latent_dim, help="size of z")
    model.add_argument("--hidden-sizes", type=_positive_int, nargs="+", default=list(m.hidden_sizes), help="hidden layer widths of encoder and decoder")
    model.add_argument("--activation", choices=sorted(ACTIVATIONS), default=m.activation)
    model.add_argument("--prior", choices=sorted(PRIORS), default=m.prior)
    model.add_argument("--likelihood", choices=sorted(LIKELIHOODS), default=m.likelihood)
    model.add_argument("--guide", choices=sorted(GUIDES), default=m.guide)
    model.add_argument("--prior-components", type=_positive_int, default=m.prior_components, help="K of the mixture prior and the VampPrior")
    model.add_argument("--num-flows", type=_positive_int, default=m.num_flows, help="flow steps of the flow prior and the IAF guide")
    model.add_argument("--obs-scale", type=_positive_float, default=m.obs_scale, help="fixed scale of the 'gaussian' likelihood")
    model.add_argument("--likelihood-components", type=_positive_int, default=m.likelihood_components,
                       help="mixture components of the 'logistic-mixture' likelihood")
    model.add_argument("--network", choices=NETWORKS, default=m.network,
                       help="mlp, or conv: strided convolutions (encoder) and transposed convolutions (decoder), "
                       "then/before MLPs of --hidden-sizes")
    model.add_argument("--conv-channels", type=_positive_int, nargs="+", default=list(m.conv_channels),
                       help="widths of the conv network's convolutions, each halving the image's height and width")
    objective = p.add_argument_group("objective")
    objective.add_argument("--objective", choices=OBJECTIVES, default=t.objective, help="elbo: Trace_ELBO; meanfield: TraceMeanField_ELBO (analytic KL); iwae: importance-weighted bound")
    objective.add_argument("--particles", type=_positive_int, default=t.particles, help="draws from q per image and step (K for iwae)")
    objective.add_argument("--beta", type=_positive_float, default=t.beta, help="KL weight (poutine.scale on the latent site)")
    objective.add_argument("--warmup", type=int, default=t.warmup_epochs, help="epochs of linear KL warm-up from --warmup-start to --beta")
    objective.add_argument("--warmup-start", type=_positive_float, default=t.warmup_start)
    objective.add_argument("--validate", action="store_true",
                           help="Pyro's validation on while training: every distribution's arguments and values are "
                           "checked at every step (slower; --engine auto then chooses svi, and an explicit --engine jit validates "
                           "only the first-batch checks and evaluations, its compiled graph runs without). Recorded "
                           "in config.json and kept on --resume")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--epochs", type=_positive_int, default=argparse.SUPPRESS,
                     help=f"epochs to train (default: {t.epochs}; with --resume, the run's own number unless given)")
    opt.add_argument("--batch-size", type=_positive_int, default=t.batch_size,
                     help="minibatch size; with several processes, the global minibatch, split between them")
    opt.add_argument("--lr", type=_positive_float, default=t.learning_rate, help="Adam learning rate")
    opt.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=t.lr_schedule, help="per-epoch schedule")
    opt.add_argument("--lr-milestones", type=_positive_int, nargs="*", default=[], help="epochs after which 'step' multiplies the rate by --lr-gamma")
    opt.add_argument("--lr-gamma", type=_positive_float, default=t.lr_gamma)
    opt.add_argument("--lr-final", type=_positive_float, default=t.lr_final, help="the rate 'cosine' anneals to")
    opt.add_argument("--clip-norm", type=_positive_float, default=t.clip_norm, help="clip the global gradient norm of every step to this; None: no clipping")
    opt.add_argument("--seed", type=_seed, default=t.seed)
    opt.add_argument("--device", default=t.device, help="auto (CUDA when present, else CPU), cpu or cuda")
    opt.add_argument("--engine", choices=ENGINES, default=t.engine,
                     help="how each step computes the loss of the same Pyro programs: svi (SVI with Trace_ELBO and "
                     "Pyro's optimizer), jit (the ELBO compiled by Pyro's JitTrace_ELBO, one graph per batch size "
                     "and KL weight, with one torch Adam: faster, see `ppl-vae bench`; --objective elbo only), or auto: "
                     "jit where its loss and gradients are checked equal to Trace_ELBO's on the first batch (CPU, "
                     "--objective elbo, Pyro's validation off) and its trace is faithful (reparameterized guide "
                     "sites, no TracerWarning from the program, no Python state it changes, equal on a second "
                     "batch), svi otherwise; jit is refused where the trace is not faithful. The run prints and "
                     "records in config.json which engine ran and why")
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--val-samples", type=_positive_int, default=t.val_samples, help="draws from q per image for the per-epoch validation ELBO")
    ev.add_argument("--test-samples", type=_positive_int, default=t.test_samples, help="K for the final test log p(x) (use `evaluate` for K=5000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
    ev.add_argument("--evidence-every", type=int, default=t.evidence_every, help="every N epochs (and at the end) record log p(x) on validation images in metrics.jsonl: a learning curve; 0: off")
    ev.add_argument("--evidence-examples", type=_positive_int, default=t.evidence_examples, help="validation images for that learning curve")
    ev.add_argument("--evidence-samples", type=_positive_int, default=t.evidence_samples, help="K for that learning curve")
    p.add_argument("--config", default=None, metavar="FILE", help="JSON file of option values, keyed by option name with underscores (e.g. experiments/configs/*.json); keys starting with '_' are notes; options given on the command line win")
    _add_scale_out_options(p, "Train")
    p.set_defaults(handler=_run_train)
    return p


def _add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained run: ELBO, decomposition, log p(x)",
        description="Evaluate a run: the ELBO and its decomposition (reconstruction, KL per latent site) and the "
        "importance-sampled log p(x) with K samples, in nats per image with standard errors; then diagnostics: "
        "PSIS k-hat of the importance weights, active units, KL per dimension, ELBO surgery (mutual information "
        "and marginal KL) and total correlation. Prints two tables and writes them to RUN_DIR/evaluation.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `ppl-vae train`")
    p.add_argument("--num-samples", "-k", type=_positive_int, default=5000, help="K, importance samples per image for log p(x)")
    p.add_argument("--elbo-samples", type=_positive_int, default=10, help="draws from q per image for the ELBO decomposition")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--examples", type=_positive_int, default=None, help="evaluate only the first N images of the split")
    p.add_argument("--data-dir", default=None, help="folder holding MNIST/raw or the run's named dataset (default: the run's, else $PPL_VAE_DATA)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--chunk-size", type=_positive_int, default=None, help="images per evaluation chunk, within blocks of 100 (default: sized from a memory budget)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the Monte Carlo draws (each block of 100 images is seeded from it and the block's index)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_trust_option(p, "evaluate imports")
    _add_scale_out_options(p, "Evaluate (the images are shared between the processes; the numbers do not change)")
    p.set_defaults(handler=_run_evaluate)


def _add_compare_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="one table and one figure for several runs",
        description="Compare evaluated runs: model, objective, ELBO, reconstruction, KL, log p(x) with K, gap, "
        "bits/dim where it applies, active units, training time and device. Prints a Markdown table and writes "
        "comparison.md, comparison.csv and comparison.png into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run directories (evaluated, or finished training)")
    p.add_argument("--out", default="comparison", help="folder for the table and the figure")
    p.set_defaults(handler=_run_compare)


def _add_plot_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plot",
        help="training curves, reconstructions, samples and interpolations of a run",
        description="Draw a run's training curves (ELBO, reconstruction, KL per epoch), reconstructions of test "
        "images, samples from the prior and interpolations between test images, as PNGs in RUN_DIR/plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data-dir", default=None, help="folder holding MNIST/raw or the run's named dataset (default: the run's, else $PPL_VAE_DATA)")
    p.add_argument("--seed", type=int, default=0)
    _add_trust_option(p, "plot imports")
    p.set_defaults(handler=_run_plot)


def _add_diagnose_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "diagnose",
        help="figures of an evaluated run: k-hat, KL per dimension, ELBO surgery",
        description="Draw the diagnostics that `ppl-vae evaluate` computed: PSIS k-hat per datapoint (ArviZ), KL "
        "per latent dimension, and the average KL split into mutual information and marginal KL. PNGs go to "
        "RUN_DIR/plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory on which `ppl-vae evaluate` has been run")
    p.set_defaults(handler=_run_diagnose)


def _add_trust_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--trust-program", action="store_true",
                   help=f"a run trained from a program file keeps a copy of it, which {what} and runs as Python code: "
                   "only runs you made on this machine (signed with your key) are trusted; this option runs another's "
                   "copy for this command only, after you have read it (`ppl-vae trust RUN_DIR` trusts a run for good)")


def _add_trust_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "trust",
        help="trust a run's program file (a run from someone else), after reading it",
        description="A run trained from a program file (--program FILE.py:NAME) keeps a copy of it in "
        "RUN_DIR/program/, which evaluate, plot and train --resume import, running its code. Runs you make on this "
        "machine are signed with your key (kept in $PPL_VAE_CONFIG_DIR, else $XDG_CONFIG_HOME/ppl_vae or "
        "~/.config/ppl_vae) and trusted; a run from elsewhere is refused until you trust it. Read the file this "
        "command names first: it checks the copy against its recorded sha256, prints its path, sha256 and how it is "
        "called, and signs the run's program.json with your key (--trust-program on evaluate, plot or train --resume "
        "instead runs it for that one command, signing nothing).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory whose program to trust")
    p.set_defaults(handler=_run_trust)


def _run_trust(args: argparse.Namespace) -> int:
    from .programs import trust_run
    from .trust import key_path

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


def _add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time Pyro's SVI step and evidence estimation against plain PyTorch",
        description="Benchmark, in one process with interleaved runs and medians: one SVI step of the default VAE "
        "(Trace_ELBO, validation on/off, TraceMeanField_ELBO, JitTrace_ELBO, Trace_ELBO as a torch module, the compiled loss of train --engine jit) against the same "
        "networks and loss in plain PyTorch, at several batch sizes; an epoch over the 50,000 MNIST training "
        "images, of bare steps and of `ppl-vae train` with its defaults (which engine --engine auto chose, why, and "
        "its time per epoch over plain PyTorch's); evidence estimation (log-weights/s, peak CUDA memory) against a plain-PyTorch reference; "
        "achieved FLOP/s. Prints a table and writes JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[32, 100, 256, 1024])
    p.add_argument("--repeats", type=_positive_int, default=5, help="interleaved repeats; medians are reported")
    p.add_argument("--steps", type=_positive_int, default=20, help="steps per repeat")
    p.add_argument("--evidence-examples", type=_positive_int, default=500, help="test-sized images for the evidence benchmark")
    p.add_argument("--evidence-samples", type=_positive_int, default=1000, help="K for the evidence benchmark")
    p.add_argument("--no-epoch", action="store_true",
                   help="skip the epoch timings (bare steps, and `ppl-vae train` with its defaults, over the training images)")
    p.add_argument("--epoch-examples", type=_positive_int, default=None,
                   help="training images of those epochs (default: all 50,000)")
    p.add_argument("--evidence-only", action="store_true",
                   help="time only evidence estimation (against the plain reference and the decoder's matmul floor), "
                   "with --repeats interleaved repeats")
    p.add_argument("--data-dir", default=None, help="folder holding MNIST/raw, for the epoch timing")
    p.add_argument("--out", default="bench.json", help="JSON file for the results")
    p.set_defaults(handler=_run_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppl-vae", description=DESCRIPTION)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.train_parser = _add_train_parser(subparsers)
    _add_evaluate_parser(subparsers)
    _add_compare_parser(subparsers)
    _add_plot_parser(subparsers)
    _add_diagnose_parser(subparsers)
    _add_trust_parser(subparsers)
    _add_bench_parser(subparsers)
    return parser


def _launched(args: argparse.Namespace) -> int | None:
    """With several processes asked for and none started yet: start them through torchrun, return its status."""
    from . import distributed

    distributed.check_launch(args.devices, args.num_nodes, args.rdzv_endpoint, args.device)
    if not distributed.should_launch(args.devices, args.num_nodes):
        return None
    return distributed.launch(args.argv, args.devices or 1, args.num_nodes, args.rdzv_endpoint, args.rdzv_id)


def _run_train(args: argparse.Namespace) -> int:
    from . import distributed
    from .model import VAEConfig
    from .report import format_evaluation
    from .train import TrainConfig, train

    if args.resume and args.run_dir is None:
        raise PplVaeError("--resume needs --run-dir: the run to continue")
    run_dir = args.run_dir or f"runs/vae-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume:
        _check_resume_options(args, Path(run_dir))
    elif args.trust_program:
        raise PplVaeError("--trust-program applies to --resume, which imports the run's copy of its program: a new run "
                          "imports the file you name with --program")
    # With --resume, every setting but the number of epochs is the run's own, and that one only when given.
    epochs = getattr(args, "epochs", None)
    config = TrainConfig(
        epochs=epochs or TrainConfig.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_schedule=args.lr_schedule,
        lr_milestones=tuple(args.lr_milestones),
        lr_gamma=args.lr_gamma,
        lr_final=args.lr_final,
        seed=args.seed,
        device=args.device,
        binarize=args.binarize,
        data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None,
        dataset=args.dataset,
        train_examples=args.train_examples,
        eval_examples=args.eval_examples,
        val_samples=args.val_samples,
        test_samples=args.test_samples,
        evidence_every=args.evidence_every,
        evidence_examples=args.evidence_examples,
        evidence_samples=args.evidence_samples,
        objective=args.objective,
        particles=args.particles,
        beta=args.beta,
        warmup_epochs=args.warmup,
        warmup_start=args.warmup_start,
        clip_norm=args.clip_norm,
        engine=args.engine,
        labels=args.labels,
        pyro_validation=args.validate,
    )
    spec = None
    if args.program is not None or args.program_kwargs is not None:
        from .programs import ProgramSpec

        spec = ProgramSpec.parse(args.program or "vae", args.program_kwargs)
        _check_vae_kwargs_against_options(args, spec)
    model_config = VAEConfig(
        latent_dim=args.latent_dim,
        hidden_sizes=tuple(args.hidden_sizes),
        activation=args.activation,
        prior=args.prior,
        likelihood=args.likelihood,
        guide=args.guide,
        prior_components=args.prior_components,
        num_flows=args.num_flows,
        obs_scale=args.obs_scale,
        likelihood_components=args.likelihood_components,
        network=args.network,
        conv_channels=tuple(args.conv_channels),
    )
    if distributed.should_launch(args.devices, args.num_nodes):
        # Checked before any process starts, so that a usage error reads as one line, not as torchrun's failure
        # report (the run directory only where this machine holds it: one machine).
        if not args.resume:
            distributed.check_trainable_on_processes(config)
        if args.num_nodes == 1:
            from . import runs

            runs.check_run_dir(run_dir, resume=args.resume, overwrite=args.overwrite)
    code = _launched(args)
    if code is not None:
        return code
    if args.resume and epochs is None:
        config = None
    context = distributed.initialize(args.device) if distributed.launched_by_torchrun() else None
    main = context is None or context.is_main
    if main:
        print(f"run directory: {run_dir}", flush=True)
    try:
        result = train(run_dir, config, model_config, resume=args.resume, overwrite=args.overwrite,
                       progress=not args.no_progress, program=spec, processes=context, trust_program=args.trust_program)
    finally:
        distributed.shutdown()
    if main:
        print(format_evaluation(result, title=f"test evaluation of {run_dir}, {result['model']}, after {result['epochs']} "
                                              f"epochs ({result['device']})"))
    return 0


def _check_vae_kwargs_against_options(args: argparse.Namespace, spec) -> None:
    """--program-kwargs set the built-in VAE's settings: one also given as its own option is refused, not overridden."""
    if not (spec.is_builtin and spec.name == "vae"):
        return
    both = sorted(name for name in spec.kwargs if name in getattr(args, "given", ()))
    if both:
        options = ", ".join("--" + name.replace("_", "-") for name in both)
        raise PplVaeError(f"--program-kwargs sets {', '.join(both)} of the built-in VAE, and {options} sets it too: "
                          "give each setting once")


# With --resume, these options apply; every other one is the run's own and may only repeat it.
APPLY_ON_RESUME = ("epochs", "no_progress", "devices", "num_nodes", "rdzv_endpoint", "rdzv_id")
_NOT_SETTINGS = ("run_dir", "resume", "overwrite", "config", "help", "trust_program")
_CONFIG_FIELDS = {"lr": "learning_rate", "warmup": "warmup_epochs", "validate": "pyro_validation"}  # option -> TrainConfig field, where they differ


def _check_resume_options(args: argparse.Namespace, run_dir: Path) -> None:
    """Refuse options given with ``--resume`` that would change the run's settings (they cannot apply mid-run).

    An option repeating the run's own value is accepted. ``--epochs`` lower than the
    epochs already trained is refused by training, once the checkpoint is read.
    """
    from dataclasses import fields

    from . import runs
    from .errors import RunDirectoryError
    from .model import VAEConfig
    from .train import TrainConfig

    given = sorted(set(getattr(args, "given", ())) - set(APPLY_ON_RESUME) - set(_NOT_SETTINGS))
    if not given or not (run_dir / runs.CONFIG_FILE).is_file():
        return  # nothing to check, or training says what is missing
    refused = _program_changes(args, run_dir, given)
    given = [dest for dest in given if dest not in ("program", "program_kwargs")]
    saved = runs.read_json(run_dir / runs.CONFIG_FILE)
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict) or not isinstance(saved.get("model"), (dict, type(None))):
        return  # training names the unreadable configuration
    saved["model"] = saved["model"] or {}  # a program other than the VAE: its spec is recorded in program.json
    saved["train"].setdefault("program", None)
    saved["train"].setdefault("program_kwargs", None)
    defaults = {"train": {f.name: f.default for f in fields(TrainConfig)}, "model": {f.name: f.default for f in fields(VAEConfig)}}
    for dest in given:
        field = _CONFIG_FIELDS.get(dest, dest)
        section = "model" if field in defaults["model"] else "train"
        theirs = saved[section].get(field, defaults[section].get(field))
        ours = getattr(args, dest)
        if dest == "data_dir" and ours is not None:
            ours = str(Path(ours).resolve())
        if isinstance(ours, (list, tuple)) or isinstance(theirs, (list, tuple)):
            ours, theirs = list(ours or []), list(theirs or [])
        if ours != theirs:
            option = "--" + dest.replace("_", "-")
            shown = " ".join(map(str, ours)) if isinstance(ours, list) else ours
            run_value = " ".join(map(str, theirs)) if isinstance(theirs, list) else theirs
            refused.append(f"{option} {shown} (the run's: {run_value})")
    if refused:
        raise RunDirectoryError(
            f"--resume continues {run_dir} with the settings it started with, and these options would change them: "
            f"{'; '.join(refused)}. They are refused, not ignored. With --resume, --epochs (train to that many "
            "epochs), --no-progress and the scale-out options apply. Leave the others out, or start a new run with "
            "them (another --run-dir, or --overwrite)"
        )


def _program_changes(args: argparse.Namespace, run_dir: Path, given: list[str]) -> list[str]:
    """``--program`` / ``--program-kwargs`` given with ``--resume`` that differ from the run's recorded program.

    The same file is the recorded path or a file with the recorded sha256; the built-in VAE's
    kwargs are compared with its settings in config.json.
    """
    from . import runs
    from .programs import ProgramSpec, load_spec

    if "program" not in given and "program_kwargs" not in given:
        return []
    ours = ProgramSpec.parse(args.program or "vae", args.program_kwargs)
    recorded = load_spec(run_dir)
    if recorded is None or recorded.object:  # the built-in VAE: its settings are config.json's
        theirs_name = "the built-in VAE" if recorded is None else recorded.name
        same_program = recorded is None and ours.is_builtin and ours.name == "vae"
        model = (runs.read_json(run_dir / runs.CONFIG_FILE).get("model") or {}) if recorded is None else {}
        theirs_kwargs = {name: model.get(name) for name in ours.kwargs}
        ours_kwargs = {name: list(v) if isinstance(v, tuple) else v for name, v in ours.kwargs.items()}
    else:
        theirs_name = recorded.name if recorded.path is None else f"{recorded.path}:{recorded.name}"
        same_program = ours.name == recorded.name and _same_file(ours.path, recorded.path, recorded.sha256)
        theirs_kwargs, ours_kwargs = recorded.kwargs, ours.kwargs
    refused = []
    if "program" in given and not same_program:
        refused.append(f"--program {args.program} (the run's: {theirs_name})")
    if "program_kwargs" in given and ours_kwargs != theirs_kwargs:
        refused.append(f"--program-kwargs {json.dumps(ours.kwargs)} (the run's: {json.dumps(theirs_kwargs)})")
    return refused


def _same_file(given: str | None, recorded: str | None, sha256: str | None) -> bool:
    """Whether ``--program``'s file is the run's: both built-in (no file), the recorded path, or the recorded bytes."""
    from .programs import file_sha256

    if given is None or recorded is None:
        return given is None and recorded is None
    path = Path(given)
    return path.resolve() == Path(recorded) or (path.is_file() and file_sha256(path) == sha256)


def _run_evaluate(args: argparse.Namespace) -> int:
    from . import distributed

    code = _launched(args)
    if code is not None:
        return code
    context = distributed.initialize(args.device) if distributed.launched_by_torchrun() else None
    try:
        with _evaluation_lock(Path(args.run_dir), context is None or context.is_main):
            return _evaluate(args, context)
    finally:
        distributed.shutdown()


@contextmanager
def _evaluation_lock(run_dir: Path, main: bool) -> Iterator[None]:
    """Hold the run's evaluation lock (rank 0): one evaluation writes into a run at a time, and no
    ``train --overwrite`` deletes it meanwhile. A lock that cannot be taken (a folder that cannot be written,
    a link or a folder in the lock file's place) stops the evaluation now, not after minutes of computing:
    evaluating without it could mix two evaluations' files. The result files are recorded in the run's
    manifest and checked to be no links before the evaluation starts."""
    from . import runs
    from .errors import RunWriteError

    if not main or not run_dir.is_dir():
        yield  # a missing run is named by the evaluation
        return
    lock = runs.RunLock(run_dir, "evaluate")
    try:
        lock.acquire()
    except RunWriteError as error:
        raise RunWriteError(f"{error}; evaluate writes its results into the run and takes its lock first: make the "
                            "folder writable (or copy the run somewhere you can write) and run it again") from None
    try:
        runs.remove_temporaries(run_dir, runs.EVALUATION_FILES)
        runs.record_written(run_dir, PER_DATAPOINT_FILE, runs.EVALUATION_FILE)
        yield
    finally:
        lock.release()


def _evaluate(args: argparse.Namespace, context) -> int:
    """``ppl-vae evaluate`` in this process; with a process group, every process evaluates its share of the images.

    The per-image numbers come from :func:`ppl_vae.distributed.evaluate_per_datapoint`, the same with
    any number of processes; rank 0 then computes the tables and the diagnostics (which need all images
    at once: the aggregate posterior) and writes the files.
    """
    import pyro
    import torch

    from .data import load_run_data
    from .errors import RunWriteError
    from .diagnostics import MIN_PSIS_SAMPLES, diagnostics_summary
    from .distributed import EVALUATION_BLOCK_SIZE, derive_seed, evaluate_per_datapoint, load_run_everywhere, seeded
    from .evaluate import evaluation_summary
    from .evaluation_files import write_evaluation
    from .report import format_diagnostics, format_evaluation
    from .train import TrainConfig, describe_objective, levels_of, resolve_device

    run_dir = Path(args.run_dir)
    device = context.device if context is not None else resolve_device(args.device)
    vae, config = load_run_everywhere(run_dir, device, trust_program=args.trust_program)
    train_config = config["train"]
    levels = levels_of(vae, train_config["binarize"])
    data = load_run_data(train_config, args.data_dir, device, dequantize_levels=levels == "dequantized")
    x = data.split(args.split)
    cond = (data.labels(args.split),) if train_config.get("labels") else ()  # the run's conditioning data
    if args.examples is not None:
        if args.examples > x.shape[0] and (context is None or context.is_main):
            warnings.warn(f"--examples {args.examples}: the {args.split} split holds {x.shape[0]} images; all "
                          f"{x.shape[0]} are evaluated", PplVaeWarning, stacklevel=2)
        x, cond = x[: args.examples], tuple(c[: args.examples] for c in cond)
    check = getattr(getattr(vae, "likelihood", None), "check_data", None)
    if check is not None:  # other programs' data are checked against their likelihood by the evaluation itself
        check(x)
    started = time.perf_counter()
    main = context is None or context.is_main
    progress = not args.no_progress and main
    per_datapoint = evaluate_per_datapoint(
        vae.model, vae.guide, x, *cond, num_samples=args.num_samples, elbo_samples=args.elbo_samples, seed=args.seed,
        psis=args.num_samples >= MIN_PSIS_SAMPLES, chunk_size=args.chunk_size, progress=progress,
    )
    if not main:
        return 0
    evidence, psis = per_datapoint.evidence, per_datapoint.psis
    result = evaluation_summary(
        vae.model, vae.guide, x, *cond, num_samples=args.num_samples, chunk_size=args.chunk_size, levels=levels,
        evidence=evidence, decomposition=per_datapoint.decomposition,
    )
    with seeded(derive_seed(args.seed, "diagnostics")):
        result["diagnostics"] = diagnostics_summary(vae.model, vae.guide, x, *cond, psis=psis, chunk_size=args.chunk_size)
    result.update({
        "split": args.split,
        "data": data.record,
        "epoch": config["epoch"],
        "model": config["description"],
        "objective": describe_objective(TrainConfig(**train_config)),
        "epochs": config["epoch"],  # trained so far: the checkpoint's, not the run's planned number
        "epochs_planned": train_config["epochs"],
        "checkpoint_id": config.get("checkpoint_id"),
        "device": context.describe() if context is not None else str(device),
        "world_size": context.world_size if context is not None else 1,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "evaluation_seconds": time.perf_counter() - started,
        "seed": args.seed,
        "seed_block_size": EVALUATION_BLOCK_SIZE,
    })
    title = (
        f"{run_dir}: {result['model']}, epoch {result['epoch']}; {args.split} split, "
        f"{result['num_datapoints']} images, {result['device']}, {result['evaluation_seconds']:.1f} s"
    )
    # The tables first: a write that fails (disk full, no permission) then loses no result.
    print(format_evaluation(result, title=title))
    print(format_diagnostics(result["diagnostics"]), flush=True)
    arrays = {"log_evidence": evidence.log_evidence, "stderr": evidence.stderr, "ess": evidence.ess}
    if psis is not None:
        arrays.update(khat=psis["khat"], psis_log_evidence=psis["psis_log_evidence"])
    try:  # the npz, then the summary that records its id and sha256: committed as one (ppl_vae.evaluation_files)
        write_evaluation(run_dir, result, {key: value.numpy() for key, value in arrays.items()})
    except RunWriteError as error:
        raise RunWriteError(f"{error}; the tables above are the evaluation's result, printed before writing") from None
    print(f"written to {run_dir / 'evaluation.json'} and {run_dir / PER_DATAPOINT_FILE}")
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from .compare import compare_runs

    table, figure = compare_runs(args.run_dirs, args.out)
    print(table)
    print(f"written to {Path(args.out) / 'comparison.md'}, comparison.csv and {figure}")
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    from . import runs
    from .modes import evaluation_mode
    from .train import load_run

    run_dir = Path(args.run_dir)
    runs.RunFolder(run_dir, runs.PLOTS_FOLDER)  # a linked plots/ is refused before the run is loaded
    vae, config = load_run(run_dir, device="cpu", trust_program=args.trust_program)
    # No evaluation, other plot or train --overwrite writes there meanwhile; the program's own figure methods
    # (sample_prior, decode_mean, ...) run in eval mode without gradients, as every evaluation does.
    with runs.RunLock(run_dir, "figures"), evaluation_mode(vae):
        return _plot(args, run_dir, vae, config)


def _plot(args: argparse.Namespace, run_dir: Path, vae, config) -> int:
    import pyro

    from . import plots, runs
    from .data import load_run_data
    from .model import VAE
    from .train import levels_of

    pyro.set_rng_seed(args.seed)
    out = runs.RunFolder(run_dir, runs.PLOTS_FOLDER)  # each figure recorded in the manifest, never through a link
    written = [plots.plot_training_curves(runs.read_metrics(run_dir), out / "training_curves.png")]
    train_config = config["train"]
    data = load_run_data(train_config, args.data_dir, eval_examples=20,
                         dequantize_levels=levels_of(vae, train_config["binarize"]) == "dequantized")
    if not isinstance(vae, VAE):  # another program: the figures its methods allow, a note for the others
        written += _plot_program(vae, data, out)
    else:
        written.append(plots.plot_reconstructions(vae, data.test[:10], out / "reconstructions.png"))
        written.append(plots.plot_samples(vae, out / "samples.png"))
        written.append(plots.plot_interpolations(vae, data.test[:10], out / "interpolations.png"))
    if isinstance(vae, VAE) and vae.config.latent_dim == 2:  # a 2-D latent space can be drawn whole
        codes = load_run_data(train_config, args.data_dir, eval_examples=2000,
                              dequantize_levels=levels_of(vae, train_config["binarize"]) == "dequantized")
        if codes.test_labels is not None:  # the codes are coloured by label; a .npz file may have none
            written.append(plots.plot_latent_space(vae, codes.test, codes.test_labels, out / "latent_space.png"))
    for path in written:
        print(path)
    return 0


def _plot_program(program, data, out: Path) -> list[Path]:
    """Image figures of a program other than the built-in VAE, from the methods it has; a one-line note for each it lacks.

    ``sample_prior(n)``: samples E[x | z], z ~ p(z); ``encode_mean(x)`` with ``decode_mean(z)``:
    reconstructions; ``sample_digits(labels)``: one row of samples per class (a conditional program).
    """
    import torch

    from . import plots

    shape = tuple(data.record["image_shape"])
    written = []
    if callable(getattr(program, "sample_prior", None)):
        written.append(plots.plot_image_grid(program.sample_prior(64), out / "samples.png", nrow=8,
                                             title="E[x|z] for z ~ p(z)", image_shape=shape))
    else:
        print("samples: skipped (the program has no sample_prior(n) method)")
    if callable(getattr(program, "encode_mean", None)) and callable(getattr(program, "decode_mean", None)):
        x = data.test[:10]
        images = torch.cat([x.reshape(10, -1), program.decode_mean(program.encode_mean(x)).reshape(10, -1)])
        written.append(plots.plot_image_grid(images, out / "reconstructions.png", nrow=10,
                                             title="test images (top) and E[x | E_q[z|x]] (bottom)", image_shape=shape))
    else:
        print("reconstructions: skipped (the program has no encode_mean(x) and decode_mean(z) methods)")
    if callable(getattr(program, "sample_digits", None)):
        classes = getattr(program, "num_classes", 10)
        labels = torch.arange(classes).repeat_interleave(8)
        written.append(plots.plot_image_grid(program.sample_digits(labels), out / "samples_by_class.png", nrow=8,
                                             title="E[x|z,y], z ~ p(z): one row per class y", image_shape=shape))
    return written


def _run_bench(args: argparse.Namespace) -> int:
    from . import runs
    from .bench import format_benchmark, run_benchmark
    from .train import resolve_device

    # Checked before minutes of measuring, not after: a folder that cannot be made fails now.
    Path(args.out).resolve().parent.mkdir(parents=True, exist_ok=True)
    result = run_benchmark(
        resolve_device(args.device), args.batch_sizes, args.repeats, args.steps, args.evidence_examples,
        args.evidence_samples, epoch=not args.no_epoch, data_dir=args.data_dir, evidence_only=args.evidence_only,
        epoch_examples=args.epoch_examples,
    )
    runs.write_json(args.out, result)
    print(format_benchmark(result))
    print(f"written to {args.out}")
    return 0


def _run_diagnose(args: argparse.Namespace) -> int:
    from . import runs
    from .errors import RunDirectoryError

    run_dir = Path(args.run_dir)
    if not (run_dir / PER_DATAPOINT_FILE).is_file():
        raise RunDirectoryError(f"{run_dir} has no {PER_DATAPOINT_FILE}: run `ppl-vae evaluate {run_dir}` first")
    with runs.RunLock(run_dir, "figures"):  # reads the evaluation's files while no evaluation rewrites them
        return _diagnose(run_dir)


def _diagnose(run_dir: Path) -> int:
    from . import plots, runs
    from .diagnostics import site_diagnostics
    from .evaluation_files import read_per_datapoint
    from .run_readers import read_diagnostics

    evaluation = runs.read_json(run_dir / runs.EVALUATION_FILE)
    diagnostics = read_diagnostics(run_dir / runs.EVALUATION_FILE)  # checked: a handed-over file is one line
    per_datapoint = read_per_datapoint(run_dir, evaluation)  # checked, and refused if from another evaluation
    out = runs.RunFolder(run_dir, runs.PLOTS_FOLDER)  # each figure recorded in the manifest, never through a link
    written = []
    psis = diagnostics["psis"]
    if "khat" in per_datapoint and isinstance(psis.get("khat_threshold"), (int, float)):
        written.append(plots.plot_khat(per_datapoint["khat"], out / "khat.png", psis["khat_threshold"]))
    else:
        print(f"k-hat: not available ({psis.get('unavailable', 'evaluation.json and its per-image file hold no k-hat')})")
    sites = site_diagnostics(diagnostics)
    for name, site in sites.items():
        # One latent site keeps the plain file names; several get one figure each, named by site.
        suffix, label = (f"_{name}", f"site '{name}': ") if len(sites) > 1 else ("", "")
        collapse, surgery = site.get("collapse", {}), site.get("elbo_surgery", {})
        if "unavailable" in collapse:
            print(f"{label}KL per dimension: not available ({collapse['unavailable']})")
        elif collapse:
            written.append(plots.plot_kl_per_dimension(
                collapse["kl_sorted"], out / f"kl_per_dimension{suffix}.png", collapse["kl_threshold"]))
        if "unavailable" in surgery:
            print(f"{label}ELBO surgery: not available ({surgery['unavailable']})")
        elif surgery:
            written.append(plots.plot_elbo_surgery(surgery, out / f"elbo_surgery{suffix}.png"))
    for path in written:
        print(path)
    return 0


# Options that delete or continue a run: accepted only when typed, never from a --config file.
COMMAND_LINE_ONLY = ("overwrite", "resume")


def _apply_config_file(parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """Make the values of ``train --config FILE`` the defaults, so command-line options still win.

    Every value is checked as the command line checks it (type, range, choices), before anything is written;
    the option names it sets are kept in ``parser.config_options``.
    """
    parser.config_options = set()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "train" or "--config" not in " ".join(argv):
        return
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv[1:])[0].config
    if path is None:
        return
    train_parser = parser.train_parser
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        train_parser.error(f"cannot read --config {path}: {error}")
    if not isinstance(values, dict):
        train_parser.error(f"--config {path} must hold a JSON object of option values, got {type(values).__name__}")
    if "trust_program" in values:  # a decision about running code, made by whoever types the command
        train_parser.error(f"--config {path} sets 'trust_program': --trust-program is accepted on the command line only")
    actions = {action.dest: action for action in train_parser._actions if action.dest not in ("help", "config")}
    typed_only = sorted(key for key in values if key in COMMAND_LINE_ONLY)
    if typed_only:
        options = ", ".join(f"--{key.replace('_', '-')}" for key in typed_only)
        train_parser.error(f"--config {path} holds {typed_only}: {options} delete or continue a run, so they are "
                           "taken only from the command line, never from a file; remove them from the file and type "
                           "them when you mean them")
    unknown = sorted(key for key in values if not key.startswith("_") and key not in actions)
    if unknown:
        train_parser.error(f"--config {path} has unknown options {unknown}; the known ones are the options of `train --help`")
    checked = {}
    for key, value in values.items():
        if key.startswith("_"):
            continue
        try:
            checked[key] = _config_value(actions[key], value)
        except argparse.ArgumentTypeError as error:
            option = actions[key].option_strings[-1] if actions[key].option_strings else key
            train_parser.error(f"--config {path}: {key!r} ({option}) {error}")
    train_parser.set_defaults(**checked)
    parser.config_options = set(checked)


def _config_value(action: argparse.Action, value):
    """A value of a --config file for ``action``, checked and converted exactly as on the command line."""
    if action.nargs == 0:  # a flag such as --no-progress
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"must be true or false, got {json.dumps(value)}")
        return value
    if action.dest == "program_kwargs":  # a JSON string on the command line; in a file, the object itself
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise argparse.ArgumentTypeError(f"is not valid JSON ({error})") from None
        if value is not None and not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"must be a JSON object of keyword arguments, e.g. {{\"latent\": [64, 32]}}, "
                                             f"got {json.dumps(value)}")
        return None if value is None else json.dumps(value)
    many = action.nargs in ("+", "*")
    if many and not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"must be a list, e.g. [{json.dumps(value)}], got {json.dumps(value)}")
    if many and action.nargs == "+" and not value:
        raise argparse.ArgumentTypeError("must be a list of at least one value, got []")
    if not many and isinstance(value, (list, dict)):
        raise argparse.ArgumentTypeError(f"must be a single value, got {json.dumps(value)}")
    converted = []
    for item in value if many else [value]:
        if item is None and not many and action.default is None:
            converted.append(None)  # the option's own default, e.g. no clipping
            continue
        kind = action.type
        integer = kind in (int, _positive_int, _seed)
        number = kind in (float, _positive_float)
        if isinstance(item, bool) or (integer and not isinstance(item, int)) or (
            number and not isinstance(item, (int, float))
        ) or (kind is None and not isinstance(item, str)):
            wanted = "an integer" if integer else "a number" if number else "a string"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {json.dumps(item)}")
        try:
            item = kind(str(item)) if kind is not None else item
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if action.choices is not None and item not in action.choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, action.choices))}, got {item!r}")
        converted.append(item)
    return converted if many else converted[0]


def _given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The train options given on the command line or in its --config file (not left at their defaults)."""
    if not argv or argv[0] != "train":
        return set()
    train_parser = parser.train_parser
    saved = [(action, action.default) for action in train_parser._actions]
    saved_defaults = dict(train_parser._defaults)
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        train_parser._defaults.clear()
        given = set(vars(train_parser.parse_args(argv[1:])))
    finally:
        for action, default in saved:
            action.default = default
        train_parser._defaults.update(saved_defaults)
    return given | parser.config_options


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _apply_config_file(parser, argv)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `--devices N` hands on to torchrun
    args.given = _given_options(parser, args.argv)
    # Under torchrun, every process prints its own errors; those of the other ranks say which they are.
    command = args.command if os.environ.get("RANK", "0") == "0" else f"{args.command} (rank {os.environ['RANK']})"
    try:
        with _one_line_warnings(command):
            return args.handler(args)
    except PplVaeError as error:
        print(f"ppl-vae {command}: error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as interrupted:
        print(f"ppl-vae {command}: {interrupted}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        what = "the last epoch's checkpoint is kept (use --resume)" if args.command == "train" else "nothing was written"
        print(f"ppl-vae {command}: interrupted; {what}", file=sys.stderr)
        return 130


@contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """While active, a :class:`PplVaeWarning` prints as ``ppl-vae COMMAND: warning: MESSAGE``; other warnings as usual."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, PplVaeWarning):
            print(f"ppl-vae {command}: warning: {message}", file=file or sys.stderr, flush=True)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


if __name__ == "__main__":
    sys.exit(main())
