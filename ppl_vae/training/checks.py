"""The checks of a program and its data before anything is written: the data the program is trained on, the program
run once on a training batch (structure, arity, parameters), and with ``--labels`` every split's labels.

Each failure is one line naming what was wrong and what to do; the checks run once, up front, so the training
steps carry none of them.
"""

from __future__ import annotations

import dataclasses

import torch
from pyro import poutine

from ..data import ImageData, load_dataset, load_mnist
from ..errors import InvalidDataError, ModelStructureError, PplVaeError
from ..evaluate import DEVICE_ERRORS, ProgramStructure, inspect_program
from ..programs import check_parameters_belong
from ..semisupervised import label_distribution
from .config import TrainConfig
from .engines import EngineChoice, parameters_without_gradient
from .semi import labelled_check_batch
from .steps import as_tuple


def levels_of(program: torch.nn.Module, binarize: str) -> str | None:
    """How 8-bit grey-level data meet the likelihood: ``"discrete"``, ``"dequantized"``, or None for binary data.

    A program says which with ``data_kind`` ("discrete": a mass on the 256 levels), on itself or on its
    ``likelihood``; without one, a density is assumed, evaluated at dequantized levels.
    """
    if binarize != "none":
        return None
    kind = getattr(getattr(program, "likelihood", None), "data_kind", getattr(program, "data_kind", "continuous"))
    return "discrete" if kind == "discrete" else "dequantized"


def load_data(config: TrainConfig, vae: torch.nn.Module, device: torch.device,
              given: ImageData | None = None) -> ImageData:
    """The run's data on ``device``, checked against the likelihood's support: ``given`` (tensors passed from
    Python), else the dataset of ``config`` with its ``--cond`` arrays."""
    dequantize_levels = levels_of(vae, config.binarize) == "dequantized"
    if given is not None:
        data = on_device(given, device)
    elif config.dataset == "mnist" and not config.cond:  # through the module's name load_mnist, which the tests memoize
        data = load_mnist(config.data_dir, config.binarize, device, config.train_examples, config.eval_examples,
                          dequantize_levels=dequantize_levels)
    else:
        data = load_dataset(config.dataset, config.data_dir, config.binarize, device, config.train_examples,
                            config.eval_examples, dequantize_levels=dequantize_levels,
                            expected_sha256=config.dataset_sha256, cond=config.cond)
    # One check of the whole data against the likelihood's support, instead of one per step (programs without
    # a likelihood module are checked on their first batch, by ppl_vae.evaluate, in check_first_batch).
    check = getattr(getattr(vae, "likelihood", None), "check_data", None)
    for split in ("train", "val", "test") if check is not None else ():
        check(data.split(split))
    if config.labels and data.labels("train") is None:
        raise PplVaeError(f"--labels: the dataset {config.dataset} has no labels to condition on")
    return data


def on_device(data: ImageData, device: torch.device) -> ImageData:
    """``data`` with its images, labels and conditioning arrays on ``device``."""
    import dataclasses

    def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(device)

    return dataclasses.replace(
        data, **{name: move(getattr(data, name)) for name in ("train", "val", "test", "train_labels", "val_labels",
                                                              "test_labels")},
        cond={name: {split: move(t) for split, t in splits.items()} for name, splits in data.cond.items()})


def conditioning_names(config: TrainConfig) -> tuple[str, ...]:
    """The names of the data the programs take after x, in order: ``y`` with ``--labels``, then the ``--cond``
    arrays; () for programs given x alone."""
    return (("y",) if config.labels else ()) + tuple(config.cond)


def conditioning(data: ImageData, split: str, config: TrainConfig) -> tuple[torch.Tensor, ...]:
    """The conditioning data the programs take after x for ``split``: its labels with ``labels``, then the
    ``cond`` arrays, else nothing."""
    return data.conditioning(split, conditioning_names(config))


def check_arity(program: torch.nn.Module, given: int, names: tuple[str, ...] | None = None) -> None:
    """The programs take as many data arguments as the batches give: x, then the conditioning data ``names``
    (``y`` for the labels, the ``--cond`` arrays); None: ``y`` for a second argument, as ``--labels`` gives."""
    import inspect

    names = tuple(names) if names is not None else ("y",) * (given - 1)
    batch = ", ".join(("x", *names))
    for name in ("model", "guide"):
        try:
            parameters = list(inspect.signature(getattr(program, name)).parameters.values())
        except (TypeError, ValueError):  # no signature to read: running the program will tell
            return
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = [p for p in positional if p.default is p.empty]
        varargs = any(p.kind == p.VAR_POSITIONAL for p in parameters)
        if len(required) > given:
            wanted = ", ".join(p.name for p in required)
            raise PplVaeError(f"the program's {name}({wanted}) takes {len(required)} data arguments, but the training "
                              f"batches give {given} ({batch}): train with --labels to pass the class labels after x, "
                              "and/or --cond NAME for arrays NAME_train, NAME_val, NAME_test of a --dataset PATH.npz; "
                              "from Python, pass tensors per split {'train': (x, *cond), ...} with "
                              "TrainConfig(cond=('NAME',)) to train(data=...) or fit (ppl_vae.data.tensor_data)")
        if not varargs and len(positional) < given:
            source = " and ".join((["--labels"] if "y" in names else []) + [f"--cond {n}" for n in names if n != "y"])
            raise PplVaeError(f"the training batches give ({batch}) ({source or 'the data passed'}), but the "
                              f"program's {name} takes {len(positional)} data argument(s): leave them out, or add "
                              f"{', '.join(names[len(positional) - 1:])} to its arguments")


def check_batches(
    data: ImageData, config: TrainConfig, probe: torch.Generator
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
    """Two training batches for the up-front checks, drawn with ``probe`` (the run's random stream is left alone).

    The second has the first's shape and other content (the compiled graph is replayed on it): the next batch,
    topped up with rows of the first when it is smaller; None when the training set is one batch.
    """
    batches = data.train_batches(config.batch_size, generator=probe, labels=config.labels, cond=config.cond)
    first = as_tuple(next(batches))
    following = next(batches, None)
    if following is None:
        return first, None
    second = tuple(torch.cat([b, f])[: f.shape[0]] for b, f in zip(as_tuple(following), first))
    return first, second


def check_first_batch(program: torch.nn.Module, batch: tuple[torch.Tensor, ...],
                      names: tuple[str, ...] | None = None) -> ProgramStructure:
    """Run the program once on a training batch: one-line errors for programs that fail, and their structure.

    Checks the structure :mod:`ppl_vae.evaluate` needs (data plate, observed and latent sites,
    the data within the likelihood's support) and that every parameter belongs to the module. ``names``: of the
    data after x, for messages (:func:`check_arity`).
    """
    check_arity(program, len(batch), names)
    try:
        with torch.no_grad():
            structure = inspect_program(program.model, program.guide, batch)
    except PplVaeError as error:
        shapes = ", ".join(f"{list(t.shape)} {t.dtype}" for t in batch)
        raise type(error)(f"the program failed on the first training batch ({shapes}): {error}") from error
    check_parameters_belong(program, *batch)
    return structure


def check_split_labels(program: torch.nn.Module, data: ImageData, names: tuple[str, ...] = ("y",)) -> None:
    """Before training: every split has labels, within the program's ``num_classes`` where it has one, and the
    program runs on the datapoints with the smallest and the largest label of each split (two per split).

    Labels out of range only in the validation or test split would otherwise be met after an
    epoch, or after the whole training; the message names the split and the file they come from. ``names``: the
    data the programs take after x (the labels ``y`` and any ``--cond`` arrays), given to them with the labels.
    """
    from ..data.core import dequantize
    from ..user_code import describe_user_error, first_line

    classes = getattr(program, "num_classes", None)
    for split in ("train", "val", "test"):
        labels, where = data.labels(split), labels_source(data, split)
        if labels is None or labels.numel() == 0:
            raise InvalidDataError(f"--labels: the {split} split has no labels ({where}): every split needs them")
        low, high = int(labels.min()), int(labels.max())
        if isinstance(classes, int) and not 0 <= low <= high < classes:
            raise InvalidDataError(f"--labels: the {split} labels ({where}) lie in [{low}, {high}], outside the "
                                   f"program's classes 0 to {classes - 1} (num_classes={classes})")
        rows = torch.stack([labels.argmin(), labels.argmax()]).to(data.train.device)
        x = getattr(data, split)[rows]
        if split == "train" and data.binarize == "dynamic":
            x = x.round()  # one fixed draw is all a check needs
        elif split == "train" and data.dequantized:
            x = dequantize(x, torch.Generator(device=x.device).manual_seed(0))
        try:
            devices = [x.device.index or 0] if x.device.type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=devices):  # leaves the run's random streams alone
                given = tuple(t[rows.to(t.device)] for t in data.conditioning(split, names))
                guide_trace = poutine.trace(program.guide).get_trace(x, *given)
                poutine.replay(program.model, trace=guide_trace)(x, *given)
        except DEVICE_ERRORS:
            raise
        except Exception as error:  # the program's refusal of a label, in whatever words
            what = str(error) if isinstance(error, PplVaeError) else (
                describe_user_error(error) or f"{type(error).__name__}: {first_line(error)}")
            raise InvalidDataError(f"--labels: the program fails on the {split} labels ({where}, values {low} to "
                                   f"{high}): {what}") from error


def labels_source(data: ImageData, split: str) -> str:
    """Where a split's labels come from, for messages: ``y_test of FILE.npz``, or the dataset's name."""
    record = data.record
    if record.get("dataset") != "npz":
        return f"the {data.name} dataset's {split} labels"
    key = record.get("splits", {}).get(split, "")
    array = f"y_{key[2:]}" if key in ("x_train", "x_val", "x_test") else "y_train"
    return f"{array} of {record.get('path')}"


def check_semi_supervised(program: torch.nn.Module, data: ImageData, config: TrainConfig,
                          structure: ProgramStructure, first: tuple[torch.Tensor, ...]) -> None:
    """``--labelled``: the program's guide has the label site, discrete and marked for enumeration on unlabelled
    data (``structure``, traced on ``first``), and the program runs on a labelled batch ``(x, y)``. One line each."""
    site = config.label_site
    if site not in structure.enumerated:
        drawn = site in structure.latent_sites
        raise ModelStructureError(
            f"--labelled: the guide's label site {site!r} " + (
                "is not marked for enumeration, so unlabelled batches would draw it instead of summing it out: give "
                "--enumerate (or mark it infer={'enumerate': 'parallel'})" if drawn else
                f"is not among its latent sites ({', '.join(structure.latent_sites)}) when run on x alone: name the "
                "discrete label site with --label-site"))
    with torch.no_grad():
        label_distribution(program.guide, first[:1], site)
    try:
        check_first_batch(program, labelled_check_batch(data, config))
    except PplVaeError as error:
        raise type(error)(f"--labelled: labelled batches pass (x, y), as model(x, y=None) / guide(x, y=None) take "
                          f"them: {error}") from error


def unused_parameters_choice(choice: EngineChoice, config: TrainConfig, trained: torch.nn.Module,
                             program: torch.nn.Module | None, data: ImageData, first: tuple[torch.Tensor, ...],
                             max_plate_nesting: int, enumerated: bool) -> EngineChoice:
    """On several processes: ``choice`` with the parameters that get no gradient on the first training batch
    ``first`` or (``--labelled``) on the first labelled batch, and why, so DistributedDataParallel looks for unused
    parameters every step where, and only where, a step leaves some unused (it fails otherwise)."""
    steps = {"training": first} if config.labelled is None else {
        "unlabelled": first, "labelled": labelled_check_batch(data, config)}
    found = {kind: parameters_without_gradient(trained, config, batch, max_plate_nesting, enumerated, program)
             for kind, batch in steps.items()}
    unused = tuple(dict.fromkeys(name for names in found.values() for name in names))
    if not unused:
        return choice
    where = "; ".join(f"on {kind} steps {', '.join(names)}" for kind, names in found.items() if names)
    reason = (f"{choice.reason}; DDP looks for unused parameters every step, since the first-batch check found "
              f"no gradient {where}")
    return dataclasses.replace(choice, reason=reason, unused_parameters=unused)
