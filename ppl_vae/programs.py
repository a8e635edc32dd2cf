r"""Programs: the one interface through which training, evaluation and every command reach a model.

A *program* is a ``torch.nn.Module`` with two methods, Pyro programs over a batch:

* ``model(x, *cond)`` -- p(z) p_theta(x | z, cond), with x observed;
* ``guide(x, *cond)`` -- q_phi(z | x, cond) over the same latent sites;

the datapoints on the leading dimension, inside a vectorized ``pyro.plate`` (the data
plate), as :mod:`ppl_vae.evaluate` requires; ``cond`` are per-datapoint tensors (labels,
side information). All parameters belong to the module (``nn.Parameter`` attributes, or
submodules): they are saved and loaded with ``state_dict``. The built-in VAE
(:class:`ppl_vae.model.VAE`) is one program; a user's own class, in a file of their own, is
another (``ppl-vae train --program my_models.py:LadderVAE``).

Optional methods that some commands use where a program has them (and skip, with a note,
where it has not): ``decode_mean(z)`` and ``sample_prior(n)`` for image figures.

**KL weight.** The trainer's beta (and its warm-up) scales every latent, i.e. unobserved,
sample site of both programs by :class:`LatentScale`: the objective becomes
E_q[log p(x | z)] - beta KL(q || p) for any program, with no attribute of its own.
Evaluation never applies it: it reports the unscaled model.

**Where programs come from** (:class:`ProgramSpec`): a built-in name, or a Python file and
the name of a class or function in it that returns the module, called with keyword
arguments. The run directory keeps a copy of that file with its sha256, so the program
can be rebuilt after the user's file moved or changed (:func:`load_spec`, :func:`build_program`).
That copy is the only code a run directory ever makes run, once checked and trusted
(:mod:`ppl_vae.trust`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pyro
import torch
from pyro.poutine.messenger import Messenger
from torch import nn

from .errors import ModelStructureError, PplVaeError, RunDirectoryError

if TYPE_CHECKING:
    from .model import VAEConfig

from .runs import PROGRAM_FILE as SPEC_FILE, PROGRAM_FOLDER as SOURCE_DIR  # noqa: E402 -- the run directory's names


# --- The interface -------------------------------------------------------------------------------


def check_program(program: Any, where: str = "the program") -> nn.Module:
    """``program`` if it is an ``nn.Module`` with callable ``model`` and ``guide``; else a one-line error."""
    if not isinstance(program, nn.Module):
        raise ModelStructureError(
            f"{where} is a {type(program).__name__}, not a torch.nn.Module: a program is an nn.Module with methods "
            "model(x, *cond) and guide(x, *cond), so that its parameters are saved with state_dict"
        )
    missing = [name for name in ("model", "guide") if not callable(getattr(program, name, None))]
    if missing:
        raise ModelStructureError(
            f"{where} ({type(program).__name__}) has no {' or '.join(missing)} method: a program needs both "
            "model(x, *cond) and guide(x, *cond), Pyro programs over a batch"
        )
    return program


class LatentScale(Messenger):
    """Multiply the log-density of every latent (unobserved) sample site by ``scale``: the KL weight beta.

    Observed sites keep weight 1, so in the model p(x | z) is unscaled and p(z) is scaled,
    and in the guide q(z | x) is scaled: E_q[log p(x | z)] - beta E_q[log q(z | x) - log p(z)].
    """

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and self.scale != 1.0:
            msg["scale"] = self.scale * msg["scale"]


class Weighted(nn.Module):
    """The program the trainer optimizes: ``program`` with its latent sites scaled by ``kl_weight``.

    Its ``model`` and ``guide`` call the program's under :class:`LatentScale`. With
    ``register_params`` (for ``SVI``, which finds parameters in Pyro's param store), they
    also register the program's parameters with ``pyro.module("program", ...)``; a loss
    used as a torch module takes them from this module instead and turns it off.
    """

    def __init__(self, program: nn.Module, kl_weight: float = 1.0):
        super().__init__()
        self.program = check_program(program)
        self.kl_weight = kl_weight
        self.register_params = True
        if hasattr(program, "register_params"):  # the built-in VAE registers its pieces itself: this does it once
            program.register_params = False

    def model(self, *data: torch.Tensor) -> Any:
        if self.register_params:
            pyro.module("program", self.program)
        with LatentScale(self.kl_weight):
            return self.program.model(*data)

    def guide(self, *data: torch.Tensor) -> Any:
        if self.register_params:
            pyro.module("program", self.program)
        with LatentScale(self.kl_weight):
            return self.program.guide(*data)


def check_parameters_belong(program: nn.Module, *data: torch.Tensor) -> None:
    """Refuse parameters created outside the module with ``pyro.param``: they would not be saved with the run.

    Runs both programs once (random streams forked; in eval mode, so no running statistic moves)
    and compares every param site's tensor with the module's parameters and buffers.
    """
    from pyro import poutine

    from .modes import evaluation_mode

    owned = {id(p) for p in program.parameters()} | {id(b) for b in program.buffers()}
    with torch.random.fork_rng(devices=[]), evaluation_mode(program), poutine.trace(param_only=True) as capture:
        guide_trace = poutine.trace(program.guide).get_trace(*data)
        poutine.replay(program.model, trace=guide_trace)(*data)
    foreign = sorted({
        name for name, site in capture.trace.nodes.items()
        if site["type"] == "param" and id(_unconstrained(site["value"])) not in owned
    })
    if foreign:
        raise ModelStructureError(
            f"the program creates parameter(s) {foreign} with pyro.param outside its module: they would not be saved "
            "in the run's checkpoints. Make them attributes of the module instead (torch.nn.Parameter, or "
            "pyro.nn.PyroParam in a pyro.nn.PyroModule)"
        )


def _unconstrained(value: torch.Tensor) -> torch.Tensor:
    unconstrained = getattr(value, "unconstrained", None)
    return unconstrained() if callable(unconstrained) else value


# --- Where a program comes from ------------------------------------------------------------------


@dataclass
class ProgramSpec:
    """How to build a program, as plain data (saved as ``program.json`` in the run directory).

    * ``name`` -- a built-in program (:data:`BUILTIN_PROGRAMS`), or the name of a class or
      function in ``path`` that returns the module;
    * ``path`` -- the user's Python file (None for built-ins);
    * ``kwargs`` -- keyword arguments the class or function is called with;
    * ``source`` and ``sha256`` -- the copy of the file inside the run directory and its hash
      (set by :func:`record_spec`);
    * ``signature`` -- HMAC-SHA256 of the other fields with the key of the user who made (or
      trusted) the run: :mod:`ppl_vae.trust`.
    """

    name: str
    path: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    sha256: str | None = None
    object: bool = False  # a module passed to train() from Python: it cannot be rebuilt from the run alone
    signature: str | None = None

    @classmethod
    def for_object(cls, program: nn.Module) -> "ProgramSpec":
        """The record of a program passed as a Python object: its class, by name."""
        kind = type(program)
        return cls(name=f"{kind.__module__}.{kind.__qualname__}", object=True)

    @classmethod
    def parse(cls, text: str, kwargs: str | dict | None = None) -> "ProgramSpec":
        """``NAME`` (built-in) or ``PATH.py:NAME``, with keyword arguments as a dict or JSON text."""
        if isinstance(kwargs, str):
            try:
                kwargs = json.loads(kwargs)
            except json.JSONDecodeError as error:
                raise PplVaeError(f"--program-kwargs is not valid JSON ({error}): give an object, e.g. "
                                  "'{\"latent\": [64, 32]}'") from None
        if kwargs is not None and not isinstance(kwargs, dict):
            raise PplVaeError(f"--program-kwargs must be a JSON object of keyword arguments, got {kwargs!r}")
        if ":" in text:
            path, _, name = text.rpartition(":")
            if not path.endswith(".py") or not name.isidentifier():
                raise PplVaeError(f"--program {text!r}: give FILE.py:NAME, NAME a class or function in that file")
            return cls(name=name, path=path, kwargs=dict(kwargs or {}))
        if text not in BUILTIN_PROGRAMS:
            raise PplVaeError(f"--program {text!r}: not a built-in program ({', '.join(BUILTIN_PROGRAMS)}) and not "
                              "FILE.py:NAME")
        return cls(name=text, kwargs=dict(kwargs or {}))

    @property
    def is_builtin(self) -> bool:
        return self.path is None and not self.object

    def describe(self) -> str:
        where = self.name if self.path is None else f"{Path(self.path).name}:{self.name}"
        return where + (f"({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})" if self.kwargs else "")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def record_spec(run_dir: Path, spec: ProgramSpec) -> ProgramSpec:
    """Copy the program's file into ``run_dir/program/`` (with its sha256) and write ``program.json``."""
    if spec.path is not None:
        source = Path(spec.path)
        if not source.is_file():
            raise PplVaeError(f"--program: the file {source} does not exist")
        (run_dir / SOURCE_DIR).mkdir(exist_ok=True)
        copy = run_dir / SOURCE_DIR / source.name
        shutil.copyfile(source, copy)
        spec = ProgramSpec(spec.name, str(source.resolve()), spec.kwargs, f"{SOURCE_DIR}/{source.name}",
                           file_sha256(copy))
        from .trust import sign

        spec.signature = sign(spec)  # this user made the run: trusted here, and nowhere else without asking
    from .runs import write_json

    write_json(run_dir / SPEC_FILE, asdict(spec))
    return spec


_SPEC_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "path": (str, type(None)), "kwargs": (dict,), "source": (str, type(None)),
    "sha256": (str, type(None)), "object": (bool,), "signature": (str, type(None)),
}


def load_spec(run_dir: Path) -> ProgramSpec | None:
    """The run's recorded program, or None for runs that predate programs (the built-in VAE).

    Checked as data from elsewhere: a file that is not an object of the known fields with their
    types is one line (:class:`~ppl_vae.errors.RunDirectoryError`) naming it.
    """
    path = Path(run_dir) / SPEC_FILE
    if not path.is_file():
        return None
    from .runs import read_json

    record = read_json(path)
    problem = _spec_problem(record)
    if problem:
        raise RunDirectoryError(f"{path} is not a program record this version can read: {problem}")
    return ProgramSpec(**record)


def _spec_problem(record: Any) -> str | None:
    """What is wrong with a ``program.json`` record, or None."""
    if not isinstance(record, dict):
        return f"it holds a JSON {type(record).__name__}, not an object"
    unknown = sorted(set(record) - set(_SPEC_TYPES))
    if unknown:
        return f"unknown field(s) {unknown} (the fields are {', '.join(_SPEC_TYPES)})"
    if "name" not in record:
        return "it has no \"name\""
    wrong = [f"{key!r} is {json.dumps(value)}" for key, value in record.items() if not isinstance(value, _SPEC_TYPES[key])]
    if wrong:
        return "wrong type: " + "; ".join(wrong)
    for key in ("sha256", "signature"):
        value = record.get(key)
        if value is not None and (len(value) != 64 or value.strip("0123456789abcdef")):
            return f"{key!r} is not 64 lowercase hex digits"
    if record.get("path") is None and not record.get("object") and record["name"] not in BUILTIN_PROGRAMS:
        return f"no \"path\" and {record['name']!r} is not a built-in program ({', '.join(BUILTIN_PROGRAMS)})"
    return None


def trust_run(run_dir: str | Path) -> tuple["ProgramSpec | None", Path | None, bool]:
    """Sign ``run_dir``'s program with this user's key (``ppl-vae trust``): (its spec, its copy, whether it was
    trusted before). A built-in program (or none recorded) has nothing to sign: (spec, None, True)."""
    from .runs import write_json
    from .trust import is_signed_by_user, signature, user_key, verified_source

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirectoryError(f"{run_dir} is not a run directory")
    spec = load_spec(run_dir)
    if spec is None or spec.is_builtin or spec.object:
        return spec, None, True
    path, _ = verified_source(run_dir, spec, trust=True)  # the copy matches its record: what is signed is what runs
    if is_signed_by_user(spec):
        return spec, path, True
    spec.signature = signature(spec, user_key(create=True))
    write_json(run_dir / SPEC_FILE, asdict(spec))
    return spec, path, False


def changed_source_note(run_dir: Path, spec: ProgramSpec) -> str | None:
    """A one-line note when the user's file now differs from (or no longer is where) the recorded copy.

    Called once the copy is checked and trusted: only then is the recorded ``path`` read (to be hashed, never run).
    """
    if spec.path is None:
        return None
    original = Path(spec.path)
    if not original.is_file():
        return f"the program file {original} is gone; using the copy recorded in {Path(run_dir) / spec.source}"
    if file_sha256(original) != spec.sha256:
        return (f"the program file {original} has changed since the run started; using the copy recorded in "
                f"{Path(run_dir) / spec.source} (sha256 {spec.sha256[:12]})")
    return None


def build_program(
    spec: ProgramSpec, run_dir: Path | None = None, data_info: dict[str, Any] | None = None, trust: bool = False
) -> nn.Module:
    """The program ``spec`` describes: a built-in one, or NAME(**kwargs) from its file.

    With ``run_dir`` (``spec`` is that run's record), only the run's own copy is imported
    (never the user's current file, nor anything else the record names), so that a run is
    rebuilt as it was trained; and only once it matches its sha256 and is trusted: signed by
    this user's key, or ``trust`` (:func:`ppl_vae.trust.verified_source`). Without ``run_dir``,
    ``spec.path`` is the file the user named now. ``data_info`` (e.g. ``data_dim``,
    ``num_classes``) fills the built-in programs' data-dependent sizes.
    """
    if spec.object:
        raise PplVaeError(f"the program {spec.name} was passed to train() as a Python object and cannot be rebuilt "
                          "from the run directory: pass a fresh instance as program=")
    if spec.is_builtin:
        if spec.name not in BUILTIN_PROGRAMS:
            raise PplVaeError(f"the program {spec.name!r} is not a built-in program ({', '.join(BUILTIN_PROGRAMS)})")
        return BUILTIN_PROGRAMS[spec.name](dict(spec.kwargs), data_info or {})
    if run_dir is not None:
        from .trust import verified_source

        path, source = verified_source(Path(run_dir), spec, trust)
    else:
        path, source = Path(spec.path), None
    factory = _load_factory(path, spec.name, source)
    program = construct(factory, spec.kwargs, f"the program {path.name}:{spec.name}")
    return check_program(program, f"{path.name}:{spec.name}(...)")


def construct(factory: Callable[..., Any], kwargs: dict[str, Any], where: str,
              filled: dict[str, Any] | None = None) -> Any:
    """``factory(**filled, **kwargs)``, with any failure as one line naming ``where``, the error and the user's kwargs.

    Names the factory does not take are refused first, listing those it does (unless it takes
    ``**kwargs``); ``filled`` are the sizes the data fill in (a built-in program's ``data_dim``).
    Whatever the constructor raises -- a TypeError, a ValueError on a negative size, an error of
    its own -- is the user's input or the user's code: one line, with the file and line it came from.
    """
    from .user_code import describe_user_error, first_line

    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read: calling it will tell
        parameters = None
    if parameters is not None and not any(p.kind == p.VAR_KEYWORD for p in parameters):
        names = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise PplVaeError(f"{where} takes no keyword argument(s) {', '.join(unknown)} (--program-kwargs); it takes "
                              f"{', '.join(names) or 'none'}")
    try:
        return factory(**{**(filled or {}), **kwargs})
    except PplVaeError as error:
        raise PplVaeError(f"{where} refused the keyword arguments {kwargs}: {error}") from error
    except Exception as error:  # noqa: BLE001 -- the constructor is the user's input (or code): one line
        what = describe_user_error(error) or f"{type(error).__name__}: {first_line(error)}"
        raise PplVaeError(f"{where} could not be built with the keyword arguments {kwargs}: {what}") from error


def _load_factory(path: Path, name: str, source: bytes | None = None) -> Callable[..., Any]:
    """``name`` from the Python file ``path``, run as a module; ``source``: its bytes, already read and checked
    (they are what runs, not the file read again)."""
    if source is None:
        if not path.is_file():
            raise PplVaeError(f"--program: the file {path} does not exist")
        source = path.read_bytes()
    module_name = f"_ppl_vae_program_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(module_name, loader=None, origin=str(path)))
    module.__file__ = str(path)
    sys.modules[module_name] = module  # dataclasses and pickling look classes up by module name
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 -- the user's program, checked
    except Exception as error:  # noqa: BLE001 -- any error in the user's file, reported in one line
        raise PplVaeError(f"--program: importing {path} failed with {type(error).__name__}: {error}") from error
    factory = getattr(module, name, None)
    if factory is None:
        names = [n for n, v in vars(module).items()
                 if not n.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v)) and v.__module__ == module_name]
        raise PplVaeError(f"--program: {path} has no {name!r}; it defines {', '.join(names) or 'no class or function'}")
    if not callable(factory):
        raise PplVaeError(f"--program: {name!r} in {path} is a {type(factory).__name__}, not a class or function")
    return factory


def _builtin_vae(kwargs: dict[str, Any], data_info: dict[str, Any]) -> nn.Module:
    from .model import VAE, VAEConfig

    return VAE(vae_config_with(VAEConfig(**_data_dim(data_info)), kwargs))


def _builtin_two_layer(kwargs: dict[str, Any], data_info: dict[str, Any]) -> nn.Module:
    from .models.two_layer import TwoLayerVAE

    return construct(TwoLayerVAE, kwargs, "the program two-layer", _data_dim(data_info))


def _builtin_conditional(kwargs: dict[str, Any], data_info: dict[str, Any]) -> nn.Module:
    from .models.conditional import ConditionalVAE

    extra = {"num_classes": data_info["num_classes"]} if "num_classes" in data_info else {}
    return construct(ConditionalVAE, kwargs, "the program conditional", {**_data_dim(data_info), **extra})


def _builtin_m2(kwargs: dict[str, Any], data_info: dict[str, Any]) -> nn.Module:
    from .models.m2 import M2

    extra = {"num_classes": data_info["num_classes"]} if "num_classes" in data_info else {}
    return construct(M2, kwargs, "the program m2", {**_data_dim(data_info), **extra})


# VAEConfig fields that the dataset sets (the images' shape), not --program-kwargs.
VAE_FIELDS_FROM_DATA = ("data_dim", "image_shape")


def vae_config_with(config: "VAEConfig", kwargs: dict[str, Any]) -> "VAEConfig":
    """The built-in VAE's configuration with ``kwargs`` (``--program-kwargs``) applied as VAEConfig fields.

    A name that is not a field, a value of the wrong type, or a combination VAEConfig refuses is
    one line; the result is what config.json records, so the run keeps them.
    """
    from dataclasses import fields, replace

    from .model import VAEConfig

    settable = {f.name: f.default for f in fields(VAEConfig) if f.name not in VAE_FIELDS_FROM_DATA}
    unknown = sorted(set(kwargs) - set(settable))
    if unknown:
        raise PplVaeError(f"--program-kwargs for the built-in VAE: {', '.join(unknown)} is not among its settings "
                          f"(VAEConfig fields: {', '.join(settable)}; the data set {' and '.join(VAE_FIELDS_FROM_DATA)})")
    for name, value in kwargs.items():
        kind = _field_kind(settable[name])
        if not _is_kind(value, kind):
            raise PplVaeError(f"--program-kwargs for the built-in VAE: {name} must be {kind}, got {json.dumps(value)}")
    try:
        return replace(config, **kwargs)
    except (PplVaeError, TypeError, ValueError) as error:
        raise PplVaeError(f"--program-kwargs for the built-in VAE {kwargs}: {error}") from None


def _field_kind(default: Any) -> str:
    if isinstance(default, tuple):
        return "a list of integers"
    return {bool: "true or false", int: "an integer", float: "a number"}.get(type(default), "a string")


def _is_kind(value: Any, kind: str) -> bool:
    """Whether a JSON value is of a VAEConfig field's kind (no bool for a number, an int is a float)."""
    integer = isinstance(value, int) and not isinstance(value, bool)
    return {
        "a list of integers": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        "true or false": isinstance(value, bool),
        "an integer": integer,
        "a number": integer or isinstance(value, float),
        "a string": isinstance(value, str),
    }[kind]


def _data_dim(data_info: dict[str, Any]) -> dict[str, Any]:
    return {"data_dim": data_info["data_dim"]} if "data_dim" in data_info else {}


# name -> builder(kwargs, data_info); the VAE's own options also come from its VAEConfig flags.
BUILTIN_PROGRAMS: dict[str, Callable[[dict[str, Any], dict[str, Any]], nn.Module]] = {
    "vae": _builtin_vae,
    "two-layer": _builtin_two_layer,
    "conditional": _builtin_conditional,
    "m2": _builtin_m2,
}
