"""The ``ppl-vae`` command line: the parser of every command, then one line per error.

What each command does lives in :mod:`ppl_vae.commands` (one module per command, each with ``run(args)``);
this module declares the options, merges ``train --config FILE`` (the file's values become the defaults, so
options typed still win), and turns the errors the user can fix into one message (no traceback) with exit
status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

from .commands import audit, bench, compare, diagnose, evaluate, plot, train, trust
from .commands.options import (
    ConfigFileError,
    OptionTable,
    non_negative_float,
    positive_float,
    positive_int,
    read_config_file,
    seed,
)
from .errors import PplVaeError, PplVaeWarning, TrainingInterrupted

DESCRIPTION = """\
Variational autoencoders as Pyro programs: train on MNIST with SVI and Trace_ELBO,
then evaluate the ELBO, its decomposition and an importance-sampled log p(x).
All evidence numbers are in nats per image."""


def _add_scale_out_options(p: argparse.ArgumentParser, what: str, table: OptionTable | None = None) -> None:
    table = table or OptionTable()  # the train command's table records them, for its --config file
    g = p.add_argument_group(
        "scale-out",
        f"{what} on several processes with torch.distributed: one per GPU (NCCL), or CPU processes (gloo) without CUDA. "
        "Above one process, ppl-vae starts itself through torchrun (python -m torch.distributed.run); under torchrun "
        "these options are only checked against it.",
    )
    table.add(g, "--devices", type=positive_int, default=None, metavar="N",
              help="processes on this machine, one per GPU; not given: one, or what torchrun started")
    table.add(g, "--num-nodes", type=positive_int, default=1, metavar="M",
              help="machines; run the same command on every one of them, with --rdzv-endpoint")
    table.add(g, "--rdzv-endpoint", default=None, metavar="HOST:PORT",
              help="torchrun's c10d rendezvous with several machines: a free port on one of them, reachable from all")
    table.add(g, "--rdzv-id", default="ppl-vae", help="the job's rendezvous id, the same on every machine")


def _add_train_parser(subparsers, table: OptionTable) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a VAE on MNIST (or --dataset)",
        description="Train a VAE on MNIST (or another --dataset) with SVI (Trace_ELBO). Writes config.json, data.json, "
        "metrics.jsonl, "
        "a checkpoint every epoch and test.json (the final test evaluation) into the run directory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_train_options(p, table)
    p.set_defaults(handler=train.run)
    return p


def add_train_options(p: argparse.ArgumentParser, table: OptionTable) -> None:
    """Every option of ``train``, declared through ``table`` (which records them for a --config file)."""
    table.add(p, "--run-dir", default=None, help="where the run is written (default: runs/vae-DATE-TIME)")
    table.add(p, "--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    _add_trust_option(p, "--resume imports", table)
    table.add(p, "--overwrite", action="store_true",
              help="replace the ppl_vae run in --run-dir (only a folder holding a run and nothing else; deleted "
              "once every other check has passed)")
    _add_data_options(p, table)
    _add_program_options(p, table)
    _add_discrete_options(p, table)
    _add_model_options(p, table)
    _add_objective_options(p, table)
    _add_optimization_options(p, table)
    _add_evaluation_options(p, table)
    _add_monitoring_options(p, table)
    _add_tracking_options(p, table)
    table.add(p, "--no-progress", action="store_true", help="no progress bars or per-epoch lines")
    table.add(p, "--config", default=None, metavar="FILE", help="JSON file of option values, keyed by option name with underscores (e.g. experiments/configs/*.json); keys starting with '_' are notes; options given on the command line win")
    _add_scale_out_options(p, "Train", table)


def _add_data_options(p: argparse.ArgumentParser, table: OptionTable) -> None:
    from .data import BINARIZATIONS, DATASETS
    from .train import TrainConfig

    t = TrainConfig()
    data = p.add_argument_group("data")
    table.add(data, "--dataset", default=t.dataset, metavar="NAME|PATH.npz",
              help=f"{', '.join(DATASETS)} (read from --data-dir, downloaded there when missing), or a .npz file "
              "of uint8 x_train, x_test (optional x_val, y_*, and the NAME_* of --cond), [N,H,W] grey or [N,H,W,C] "
              "colour")
    table.add(data, "--data-dir", default=None, help="folder holding MNIST/raw (and the other named datasets' folders; default: $PPL_VAE_DATA, else ~/.cache/ppl_vae)")
    table.add(data, "--binarize", choices=BINARIZATIONS, default=t.binarize, help="dynamic: fresh Bernoulli draw per minibatch; static: one fixed draw; none: grey levels")
    table.add(data, "--train-examples", type=positive_int, default=None, help="use only the first N training images (quick runs)")
    table.add(data, "--eval-examples", type=positive_int, default=None, help="use only the first N validation and test images")


def _add_program_options(p: argparse.ArgumentParser, table: OptionTable) -> None:
    program = p.add_argument_group(
        "program",
        "What is trained: by default the built-in VAE of the 'model' options; --program NAME for another built-in "
        "program (two-layer: Burda et al.'s two-stochastic-layer VAE; conditional: a VAE given the labels, with "
        "--labels; m2: Kingma et al.'s semi-supervised M2, a class y summed out by enumeration and a style z, "
        "with --labelled), or FILE.py:NAME for your own: a class or function in that file that returns an nn.Module with "
        "model(x, *cond) and guide(x, *cond) methods. The run directory keeps a copy of the file (with its sha256), "
        "so evaluate, --resume, diagnose, plot and compare rebuild it without naming it again. That copy runs only "
        "when it matches its sha256 and the run is yours (signed with your key when made): see `ppl-vae trust`.",
    )
    table.add(program, "--program", default=None, metavar="NAME|FILE.py:NAME",
              help="the program to train (default: the built-in VAE)")
    table.add(program, "--program-kwargs", default=None, metavar="JSON",
              help="keyword arguments for the program, a JSON object, e.g. '{\"latent\": [64, 32]}'")
    table.add(program, "--labels", action="store_true",
              help="condition on the class labels: every batch is (x, y), passed to model and guide")
    table.add(program, "--cond", nargs="+", default=[], metavar="NAME",
              help="conditioning arrays of the --dataset .npz (NAME_train, NAME_test and, with x_val, NAME_val: "
              "numeric, one row per image), passed after x (and y) in this order to model and guide in training "
              "and every evaluation; recorded in the run")


def _add_discrete_options(p: argparse.ArgumentParser, table: OptionTable) -> None:
    discrete = p.add_argument_group(
        "discrete latents and semi-supervised training",
        "A guide site marked infer={'enumerate': 'parallel'} (or by config_enumerate) is summed out exactly: "
        "--objective elbo is then TraceEnum_ELBO (compiled by JitTraceEnum_ELBO where checked equal). With "
        "--labelled N a program with model(x, y=None) / guide(x, y=None) trains semi-supervised (Kingma et al. "
        "2014): labelled batches pass y, unlabelled ones sum it out, plus alpha * log q(y | x) on the labelled ones.",
    )
    table.add(discrete, "--enumerate", action="store_true",
              help="mark every discrete guide site of the program for parallel enumeration (recorded; re-applied "
              "wherever the run's program is rebuilt)")
    table.add(discrete, "--labelled", type=positive_int, default=None, metavar="N",
              help="keep the labels of N training images, N / C per class, chosen with --seed (recorded in "
              "data.json); the rest are unlabelled")
    table.add(discrete, "--alpha", type=non_negative_float, default=None,
              help="weight of the classifier term alpha * E_labelled[log q(y | x)] (default: 0.1 x the training "
              "images, as Kingma et al.)")
    table.add(discrete, "--label-site", default="y", help="the guide's discrete site that is the class label")
    table.add(discrete, "--labelled-batches", type=positive_int, default=None, metavar="B",
              help="labelled batches per epoch, cycling through the labelled images (each weighted so an epoch "
              "still counts every labelled image once); default: each labelled image once")


def _add_model_options(p: argparse.ArgumentParser, table: OptionTable) -> None:
    from .guides import GUIDES
    from .likelihoods import LIKELIHOODS
    from .model import VAEConfig
    from .networks import ACTIVATIONS, NETWORKS
    from .priors import PRIORS

    m = VAEConfig()
    model = p.add_argument_group("model")
    table.add(model, "--latent-dim", type=positive_int, default=m.latent_dim, help="size of z")
    table.add(model, "--hidden-sizes", type=positive_int, nargs="+", default=list(m.hidden_sizes), help="hidden layer widths of encoder and decoder")
    table.add(model, "--activation", choices=sorted(ACTIVATIONS), default=m.activation)
    table.add(model, "--prior", choices=sorted(PRIORS), default=m.prior)
    table.add(model, "--likelihood", choices=sorted(LIKELIHOODS), default=m.likelihood)
    table.add(model, "--guide", choices=sorted(GUIDES), default=m.guide)
    table.add(model, "--prior-components", type=positive_int, default=m.prior_components, help="K of the mixture prior and the VampPrior")
    table.add(model, "--num-flows", type=positive_int, default=m.num_flows, help="flow steps of the flow prior and the IAF guide")
    table.add(model, "--obs-scale", type=positive_float, default=m.obs_scale, help="fixed scale of the 'gaussian' likelihood")
    table.add(model, "--likelihood-components", type=positive_int, default=m.likelihood_components,
              help="mixture components of the 'logistic-mixture' likelihood")
    table.add(model, "--network", choices=NETWORKS, default=m.network,
              help="mlp, or conv: strided convolutions (encoder) and transposed convolutions (decoder), "
              "then/before MLPs of --hidden-sizes")
    table.add(model, "--conv-channels", type=positive_int, nargs="+", default=list(m.conv_channels),
              help="widths of the conv network's convolutions, each halving the image's height and width")


def _add_objective_options(p: argparse.ArgumentParser, table: OptionTable) -> None:
    from .objectives import OBJECTIVES
    from .train import TrainConfig

    t = TrainConfig()
    objective = p.add_argument_group("objective")
    table.add(objective, "--objective", choices=OBJECTIVES, default=t.objective, help="elbo: Trace_ELBO; meanfield: TraceMeanField_ELBO (analytic KL); iwae: importance-weighted bound")
    table.add(objective, "--particles", type=positive_int, default=t.particles, help="draws from q per image and step (K for iwae)")
    table.add(objective, "--beta", type=positive_float, default=t.beta, help="KL weight (poutine.scale on the latent site)")
    table.add(objective, "--warmup", type=int, default=t.warmup_epochs, help="epochs of linear KL warm-up from --warmup-start to --beta")
    table.add(objective, "--warmup-start", type=positive_float, default=t.warmup_start)
    table.add(objective, "--gradient", choices=("standard", "stl", "dreg"), default=t.gradient,
              help="the gradient estimator: standard (the objective's own), stl (sticking the landing, Roeder et al. "
              "2017; --objective elbo) or dreg (doubly reparameterized, Tucker et al. 2018; --objective iwae): the "
              "same loss values and expected gradients, lower variance for the guide; every guide site must be "
              "reparameterized; --engine auto then trains with svi")
    table.add(objective, "--validate", action="store_true",
              help="Pyro's validation on while training: every distribution's arguments and values are "
              "checked at every step (slower; --engine auto then chooses svi, and an explicit --engine jit validates "
              "only the first-batch checks and evaluations, its compiled graph runs without). Recorded "
              "in config.json and kept on --resume")


def _add_optimization_options(p: argparse.ArgumentParser, table: OptionTable) -> None:
    from .train import ENGINES, LR_SCHEDULES, TrainConfig

    t = TrainConfig()
    opt = p.add_argument_group("optimization")
    table.add(opt, "--epochs", type=positive_int, default=argparse.SUPPRESS,
              help=f"epochs to train (default: {t.epochs}; with --resume, the run's own number unless given)")
    table.add(opt, "--batch-size", type=positive_int, default=t.batch_size,
              help="minibatch size; with several processes, the global minibatch, split between them")
    table.add(opt, "--lr", type=positive_float, default=t.learning_rate, help="Adam learning rate")
    table.add(opt, "--lr-schedule", choices=LR_SCHEDULES, default=t.lr_schedule,
              help="the rate of each epoch, one pure function of the epoch: constant; step (x --lr-gamma after each "
              "of --lr-milestones); cosine (to --lr-final at --epochs); burda (Burda et al. 2016: 3^i epochs at "
              "--lr x 10^(-i/7)); plateau (x --plateau-factor when --monitor stops improving). The rate is in "
              "every epoch's record")
    table.add(opt, "--lr-milestones", type=positive_int, nargs="*", default=[], help="epochs after which 'step' multiplies the rate by --lr-gamma")
    table.add(opt, "--lr-gamma", type=positive_float, default=t.lr_gamma)
    table.add(opt, "--lr-final", type=positive_float, default=t.lr_final, help="the rate 'cosine' anneals to")
    table.add(opt, "--clip-norm", type=positive_float, default=t.clip_norm, help="clip the global gradient norm of every step to this; None: no clipping")
    table.add(opt, "--seed", type=seed, default=t.seed)
    table.add(opt, "--device", default=t.device, help="auto (CUDA when present, else CPU), cpu or cuda")
    table.add(opt, "--engine", choices=ENGINES, default=t.engine,
              help="how each step computes the loss of the same Pyro programs: svi (SVI with Trace_ELBO and "
              "Pyro's optimizer), jit (the ELBO compiled by Pyro's JitTrace_ELBO, one graph per batch size "
              "and KL weight, with one torch Adam: faster, see `ppl-vae bench`; --objective elbo only), or auto: "
              "jit where its loss and gradients are checked equal to Trace_ELBO's on the first batch (CPU, "
              "--objective elbo, Pyro's validation off) and its trace is faithful (reparameterized guide "
              "sites, no TracerWarning from the program, no Python state it changes, equal on a second "
              "batch), svi otherwise; jit is refused where the trace is not faithful. The run prints and "
              "records in config.json which engine ran and why")


def _add_evaluation_options(p: argparse.ArgumentParser, table: OptionTable) -> None:
    from .train import TrainConfig

    t = TrainConfig()
    ev = p.add_argument_group("evaluation")
    table.add(ev, "--val-samples", type=positive_int, default=t.val_samples, help="draws from q per image for the per-epoch validation ELBO")
    table.add(ev, "--test-samples", type=positive_int, default=t.test_samples, help="K for the final test log p(x) (use `evaluate` for K=5000)")
    table.add(ev, "--evidence-every", type=int, default=t.evidence_every, help="every N epochs (and at the end) record log p(x) on validation images in metrics.jsonl: a learning curve; 0: off")
    table.add(ev, "--evidence-examples", type=positive_int, default=t.evidence_examples, help="validation images for that learning curve")
    table.add(ev, "--evidence-samples", type=positive_int, default=t.evidence_samples, help="K for that learning curve")


def _add_monitoring_options(p: argparse.ArgumentParser, table: OptionTable) -> None:
    from .train import TrainConfig

    t = TrainConfig()
    g = p.add_argument_group(
        "early stopping and the plateau schedule",
        "Both watch one monitored quantity, measured after each epoch (higher is better); an epoch improves it "
        "when it beats the best so far by more than --min-delta. The states are in every checkpoint: --resume "
        "lowers the rate and stops at the same epochs as an uninterrupted run.")
    table.add(g, "--monitor", choices=("elbo", "evidence"), default=t.monitor,
              help="elbo: the validation ELBO (every epoch); evidence: the validation log p(x) of --evidence-every "
              "(only the epochs it is computed)")
    table.add(g, "--min-delta", type=non_negative_float, default=t.min_delta, metavar="NATS",
              help="nats/image by which the monitored value must beat its best to count as an improvement")
    table.add(g, "--early-stopping", type=positive_int, default=t.early_stopping, metavar="PATIENCE",
              help="stop after PATIENCE epochs without improvement (counted from the end of --warmup), keep the "
              "best epoch as checkpoint.best.pt and evaluate it on the test set; not given: train every epoch")
    table.add(g, "--plateau-factor", type=positive_float, default=t.plateau_factor,
              help="--lr-schedule plateau multiplies the rate by this (between 0 and 1) after --plateau-patience "
              "measured epochs without improvement")
    table.add(g, "--plateau-patience", type=int, default=t.plateau_patience, metavar="EPOCHS",
              help="measured epochs without improvement that --lr-schedule plateau tolerates (as torch's "
              "ReduceLROnPlateau)")


def _add_tracking_options(p: argparse.ArgumentParser, table: OptionTable) -> None:
    from .trackers import TRACKERS
    from .train import TrainConfig

    t = TrainConfig()
    g = p.add_argument_group(
        "experiment trackers",
        "Optional extras (pip install -e \".[tensorboard]\" or \".[mlflow]\"). Each epoch's record (ELBO, "
        "reconstruction, KL per latent site by its name, learning rate, KL weight, steps/s, log p(x) when computed) "
        "and the configuration, written inside the run directory by default (tb/; mlflow.db and mlruns/); --resume "
        "continues the same TensorBoard folder and MLflow run, without duplicated steps.")
    table.add(g, "--log", nargs="+", choices=TRACKERS, default=list(t.log), metavar="TRACKER",
              help=f"trackers to report to, one or several of: {', '.join(TRACKERS)}")
    table.add(g, "--tracking-uri", default=t.tracking_uri, metavar="URI",
              help="MLflow's tracking URI, e.g. http://host:5000; None: sqlite mlflow.db in the run directory")
    table.add(g, "--log-images-every", type=int, default=t.log_images_every, metavar="EPOCHS",
              help="every this many epochs (and the last), images of samples and reconstructions to the trackers, "
              "where the program has the methods (sample_prior; encode_mean and decode_mean); 0: none")


def _add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained run: ELBO, decomposition, log p(x)",
        description="Evaluate a run: the ELBO and its decomposition (reconstruction, KL per latent site) and the "
        "log p(x), importance sampled with K samples (or annealed importance sampling: --estimator ais), in nats per "
        "image with standard errors; then diagnostics: "
        "PSIS k-hat of the importance weights, active units, KL per dimension, ELBO surgery (mutual information "
        "and marginal KL) and total correlation. Prints two tables and writes them to RUN_DIR/evaluation.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `ppl-vae train`")
    p.add_argument("--num-samples", "-k", type=positive_int, default=5000, help="K, importance samples per image for log p(x)")
    p.add_argument("--elbo-samples", type=positive_int, default=10, help="draws from q per image for the ELBO decomposition")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--label-site", default=None, metavar="SITE",
                   help="a discrete guide site that is the class label: report the classifier's error from q(SITE | x) "
                   "on the split's labels (default: the run's --label-site where it was trained with --labelled)")
    p.add_argument("--examples", type=positive_int, default=None, help="evaluate only the first N images of the split")
    p.add_argument("--data-dir", default=None, help="folder holding MNIST/raw or the run's named dataset (default: the run's, else $PPL_VAE_DATA)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--chunk-size", type=positive_int, default=None, help="images per evaluation chunk, within blocks of 100 (default: sized from a memory budget)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the Monte Carlo draws (each block of 100 images is seeded from it and the block's index)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_checkpoint_option(p, "to evaluate")
    _add_trust_option(p, "evaluate imports")
    _add_estimator_options(p)
    _add_scale_out_options(p, "Evaluate (the images are shared between the processes; the numbers do not change)")
    p.set_defaults(handler=evaluate.run)


# AIS's command-line defaults, sized for a 2-core CPU: T L C (T - 1 + pilot) ~ 4,300 decoder forward+backward
# passes per image, about 0.15 s per image of the default VAE on one core (ppl_vae.ais's library default is T = 200).
CLI_AIS_STEPS, CLI_AIS_CHAINS, CLI_AIS_LEAPFROG_STEPS = 100, 8, 5


def _add_ais_options(g) -> None:
    """AIS's settings (``ppl-vae evaluate --estimator ais`` and ``ppl-vae audit``)."""
    from .ais import SCHEDULES

    g.add_argument("--ais-steps", type=positive_int, default=CLI_AIS_STEPS, metavar="T",
                   help="annealing steps from the guide to the posterior (the bias falls as T grows)")
    g.add_argument("--ais-chains", type=positive_int, default=CLI_AIS_CHAINS, metavar="C",
                   help="independent AIS chains per image: log p̂ = log of their mean weight, s.e. over chains")
    g.add_argument("--leapfrog-steps", type=positive_int, default=CLI_AIS_LEAPFROG_STEPS, metavar="L",
                   help="leapfrog steps of each HMC transition (step sizes adapted per image to 65%% acceptance)")
    g.add_argument("--ais-schedule", choices=SCHEDULES, default="sigmoid", help="the annealing schedule of beta")


def _add_estimator_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "estimator",
        "How log p(x) is estimated. is: importance sampling from the guide with K = --num-samples draws (fast; a "
        "stochastic lower bound whose bias grows as the guide misses the posterior; PSIS k-hat flags the images "
        "where it does). ais: annealed importance sampling (Wu et al. 2017), from the guide to the posterior in T "
        "steps of HMC on all latent sites, C chains per image: a tighter stochastic lower bound, at about "
        "T x L x C decoder forward+backward passes per image (continuous latent sites only). A progress bar shows "
        "the time left. `ppl-vae audit` compares the two and certifies AIS on simulated data (BDMC).",
    )
    g.add_argument("--estimator", choices=("is", "ais"), default="is", help="the log p(x) estimator")
    _add_ais_options(g)


def _add_audit_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "audit",
        help="check a run's log p(x): importance sampling against AIS, and the BDMC sandwich",
        description="Audit a run's evidence. (1) IS against AIS: the importance-sampled log p(x) (K = --num-samples, "
        "with PSIS k-hat) on the first --examples images of --split, and AIS on the --ais-examples of them with the "
        "highest k-hat (where IS is least reliable), highest first; IS - AIS estimates how much IS misses there. "
        "(2) BDMC (Grosse et al. 2015): --simulated images are drawn from the model, with their latents; forward AIS "
        "bounds their log p(x) from below and reverse AIS, started at the exact posterior sample, from above (both "
        "stochastically, in expectation), at each --bdmc-steps. What the gap certifies: on data from the model, AIS "
        "with these settings is within the gap of log p(x). What it does not: it is not a certificate on the real "
        "images (their posteriors can be harder than those of the model's own samples; compare IS - AIS there), nor "
        "a statement about how good the model is. Writes RUN_DIR/audit.json (estimators, settings, checkpoint) and "
        "RUN_DIR/plots/audit.png (IS - AIS against k-hat; the BDMC bracket against steps).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `ppl-vae train`")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--examples", type=positive_int, default=200, help="images of the split given IS with PSIS k-hat")
    p.add_argument("--ais-examples", type=positive_int, default=20, help="of those, the highest-k-hat images given AIS")
    p.add_argument("--num-samples", "-k", type=positive_int, default=5000, help="K, importance samples per image")
    p.add_argument("--simulated", type=positive_int, default=100, help="images simulated from the model for BDMC")
    p.add_argument("--bdmc-steps", type=positive_int, nargs="+", default=None, metavar="T",
                   help="annealing steps of each BDMC bracket (default: T/10, T/3 and T, T = --ais-steps)")
    _add_ais_options(p.add_argument_group("AIS", "The settings of AIS on the test images and of BDMC's chains."))
    p.add_argument("--data-dir", default=None, help="folder holding MNIST/raw or the run's named dataset (default: the run's, else $PPL_VAE_DATA)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--chunk-size", type=positive_int, default=None, help="images per chunk (default: sized from a memory budget)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo draws and of the simulated images")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_trust_option(p, "audit imports")
    p.set_defaults(handler=audit.run)


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
    _add_checkpoint_option(p, "of each run the results must be of (evaluation.json or test.json)")
    p.set_defaults(handler=compare.run)


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
    _add_checkpoint_option(p, "draws the images (the training curves show every epoch)")
    _add_trust_option(p, "plot imports")
    p.set_defaults(handler=plot.run)


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
    _add_checkpoint_option(p, "the evaluation must be of (evaluate --checkpoint)")
    p.set_defaults(handler=diagnose.run)


def _add_checkpoint_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--checkpoint", choices=("last", "best"), default=None,
                   help=f"which checkpoint {what}: last (the latest epoch) or best (checkpoint.best.pt, the best "
                   "epoch of a run trained with --early-stopping); default: best when the run kept one, else last. "
                   "The output says which epoch it is")


def _add_trust_option(p: argparse.ArgumentParser, what: str, table: OptionTable | None = None) -> None:
    table = table or OptionTable()
    table.add(p, "--trust-program", action="store_true",
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
    p.set_defaults(handler=trust.run)


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
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[32, 100, 256, 1024])
    p.add_argument("--repeats", type=positive_int, default=5, help="interleaved repeats; medians are reported")
    p.add_argument("--steps", type=positive_int, default=20, help="steps per repeat")
    p.add_argument("--evidence-examples", type=positive_int, default=500, help="test-sized images for the evidence benchmark")
    p.add_argument("--evidence-samples", type=positive_int, default=1000, help="K for the evidence benchmark")
    p.add_argument("--no-epoch", action="store_true",
                   help="skip the epoch timings (bare steps, and `ppl-vae train` with its defaults, over the training images)")
    p.add_argument("--epoch-examples", type=positive_int, default=None,
                   help="training images of those epochs (default: all 50,000)")
    p.add_argument("--evidence-only", action="store_true",
                   help="time only evidence estimation (against the plain reference and the decoder's matmul floor), "
                   "with --repeats interleaved repeats")
    p.add_argument("--data-dir", default=None, help="folder holding MNIST/raw, for the epoch timing")
    p.add_argument("--out", default="bench.json", help="JSON file for the results")
    _add_bench_ais_options(p)
    p.set_defaults(handler=bench.run)


def _add_bench_ais_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "AIS", "AIS (evaluate --estimator ais) on the default VAE against its floor: as many bare decoder "
        "forward+backward passes to z at the same shapes as AIS makes gradient evaluations (T L per chain, pilot "
        "included); the table gives the floor's time as a share of AIS's.")
    g.add_argument("--no-ais", action="store_true", help="skip the AIS timing")
    g.add_argument("--ais-examples", type=positive_int, default=100, help="random binary images, one chunk")
    g.add_argument("--ais-steps", type=positive_int, default=30, metavar="T", help="annealing steps")
    g.add_argument("--ais-chains", type=positive_int, default=CLI_AIS_CHAINS, metavar="C", help="chains per image")
    g.add_argument("--leapfrog-steps", type=positive_int, default=CLI_AIS_LEAPFROG_STEPS, metavar="L",
                   help="leapfrog steps per transition")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``ppl-vae`` and all its commands."""
    return _build_parsers(OptionTable())[0]


def _build_parsers(train_options: OptionTable) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parser of ``ppl-vae``, and its ``train`` parser, whose options ``train_options`` records."""
    parser = argparse.ArgumentParser(prog="ppl-vae", description=DESCRIPTION)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train_parser = _add_train_parser(subparsers, train_options)
    _add_evaluate_parser(subparsers)
    _add_audit_parser(subparsers)
    _add_compare_parser(subparsers)
    _add_plot_parser(subparsers)
    _add_diagnose_parser(subparsers)
    _add_trust_parser(subparsers)
    _add_bench_parser(subparsers)
    return parser, train_parser


def _config_file_values(argv: list[str], train_parser: argparse.ArgumentParser, options: OptionTable) -> dict[str, Any]:
    """The option values of ``train --config FILE``, checked as the command line checks them; {} without one.

    A file that cannot be used is a usage error of ``train`` (exit status 2), before anything is written.
    """
    if not argv or argv[0] != "train":
        return {}
    find = argparse.ArgumentParser(prog="ppl-vae train", add_help=False)  # only --config; the rest is parsed later
    find.add_argument("--config")
    path = find.parse_known_args(argv[1:])[0].config
    if path is None:
        return {}
    try:
        return read_config_file(path, options.actions)
    except ConfigFileError as error:
        train_parser.error(str(error))


def _typed_train_options(argv: list[str]) -> set[str]:
    """The train options typed on the command line ``argv`` (already parsed without error), by dest: those a parse
    finds when no option has a default."""
    parser = argparse.ArgumentParser(prog="ppl-vae train", add_help=False)
    add_train_options(parser, OptionTable(defaults=False))
    return set(vars(parser.parse_args(argv[1:])))


def main(argv: list[str] | None = None) -> int:
    """Run ``ppl-vae`` with the arguments ``argv`` (default: the process's); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    train_options = OptionTable()
    parser, train_parser = _build_parsers(train_options)
    from_file = _config_file_values(argv, train_parser, train_options)
    train_parser.set_defaults(**from_file)  # the command line still wins over the file
    args = parser.parse_args(argv)
    args.argv = argv  # what `--devices N` hands on to torchrun
    # The options given, typed or in the --config file: --resume refuses those that would change the run.
    args.given = _typed_train_options(argv) | set(from_file) if args.command == "train" else set()
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
