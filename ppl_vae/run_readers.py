"""Reading a run's result files (``evaluation.json``/``test.json``, ``evaluation_per_datapoint.npz``)
as data someone may hand you: every field a command uses is checked before use, and a file that is not what
``ppl-vae`` writes is one line naming it (never a KeyError or a pickled object).

The checks follow what the readers use: :func:`ppl_vae.compare.load_run_summary` (the summary numbers),
and ``ppl-vae diagnose`` (the diagnostics it draws). A run's ``config.json`` is read, checked against the
configuration classes, by :func:`ppl_vae.train.read_run_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import runs
from .errors import RunDirectoryError

NUMBER, INTEGER, TEXT, MAPPING = "a number", "an integer", "a string", "an object"

# The summary numbers every result file holds (compare reads them): dotted path -> kind.
RESULT_FIELDS = {
    "num_datapoints": INTEGER, "elbo.mean": NUMBER, "elbo.stderr": NUMBER, "reconstruction.mean": NUMBER,
    "kl.total.mean": NUMBER, "log_evidence.mean": NUMBER, "log_evidence.stderr": NUMBER,
    "log_evidence.num_samples": INTEGER, "gap.mean": NUMBER,
}

# What `diagnose` draws of a site's ELBO surgery (plots.plot_elbo_surgery).
SURGERY_FIELDS = {"average_kl.mean": NUMBER, "mutual_information.mean": NUMBER, "mutual_information.stderr": NUMBER,
                  "marginal_kl.mean": NUMBER, "marginal_kl.stderr": NUMBER, "mutual_information_bound": NUMBER}


def _is(value: Any, kind: str) -> bool:
    integer = isinstance(value, int) and not isinstance(value, bool)
    return {NUMBER: integer or isinstance(value, float), INTEGER: integer, TEXT: isinstance(value, str),
            MAPPING: isinstance(value, dict)}[kind]


def _get(record: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(record, dict) or key not in record:
            raise KeyError(dotted)
        record = record[key]
    return record


def _bad(path: Path, problem: str) -> RunDirectoryError:
    return RunDirectoryError(f"{path} is not a result file this version of ppl_vae wrote ({problem}): write it again "
                             "with `ppl-vae evaluate` (or train), or leave the run out")


def check_fields(record: Any, path: Path, wanted: dict[str, str]) -> None:
    """Refuse ``record`` unless every dotted field of ``wanted`` is there and of its kind."""
    if not isinstance(record, dict):
        raise _bad(path, f"it holds a JSON {type(record).__name__}, not an object")
    for dotted, kind in wanted.items():
        try:
            value = _get(record, dotted)
        except KeyError:
            raise _bad(path, f"no {dotted!r}") from None
        if not _is(value, kind):
            raise _bad(path, f"{dotted!r} is {value!r}, not {kind}")


def read_result(path: Path) -> dict[str, Any]:
    """A checked ``evaluation.json`` or ``test.json``: the summary numbers, and diagnostics (when any) as an object."""
    result = runs.read_json(path)
    check_fields(result, path, RESULT_FIELDS)
    if "diagnostics" in result and not isinstance(result["diagnostics"], dict):
        raise _bad(path, "'diagnostics' is not an object")
    return result


def read_diagnostics(path: Path) -> dict[str, Any]:
    """The checked ``diagnostics`` of an ``evaluation.json``: what ``ppl-vae diagnose`` draws from it."""
    from .diagnostics import site_diagnostics

    result = runs.read_json(path)
    check_fields(result, path, {"diagnostics": MAPPING, "diagnostics.psis": MAPPING})
    diagnostics = result["diagnostics"]
    psis = diagnostics["psis"]
    if not (_is(psis.get("khat_threshold"), NUMBER) or _is(psis.get("unavailable"), TEXT)):
        raise _bad(path, "'diagnostics.psis' has neither a number 'khat_threshold' nor an 'unavailable' reason")
    sites = diagnostics.get("sites")
    if sites is not None and not (isinstance(sites, dict) and all(isinstance(s, dict) for s in sites.values())):
        raise _bad(path, "'diagnostics.sites' is not an object of one object per latent site")
    for name, site in site_diagnostics(diagnostics).items():
        where = f"diagnostics of site {name!r}"
        for part, wanted in (("collapse", {"kl_sorted": None, "kl_threshold": NUMBER}), ("elbo_surgery", SURGERY_FIELDS)):
            section = site.get(part, {})
            if not isinstance(section, dict):
                raise _bad(path, f"{part!r} of the {where} is not an object")
            if not section or _is(section.get("unavailable"), TEXT):
                continue
            for dotted, kind in wanted.items():
                try:
                    value = _get(section, dotted)
                except KeyError:
                    raise _bad(path, f"no {part}.{dotted} in the {where}") from None
                good = (isinstance(value, list) and all(_is(v, NUMBER) for v in value)) if kind is None else _is(value, kind)
                if not good:
                    raise _bad(path, f"{part}.{dotted} of the {where} is {value!r}")
    return diagnostics


def check_per_datapoint(path: Path, arrays: dict[str, np.ndarray], count: int | None = None) -> dict[str, np.ndarray]:
    """``arrays``, the per-image arrays of ``evaluation_per_datapoint.npz`` (``path``), if numeric, one dimension and
    one value per image each, with a ``log_evidence``; else one line naming the file. Read them with
    :func:`ppl_vae.evaluation_files.read_per_datapoint`, which also checks them against evaluation.json."""
    for key, values in arrays.items():
        if values.dtype.kind not in "fiu" or values.ndim != 1 or (count is not None and values.shape[0] != count):
            wanted = f"[{count}]" if count is not None else "[N]"
            raise RunDirectoryError(f"{path}: the array {key!r} is {values.dtype} of shape {list(values.shape)}, not "
                                    f"numbers of shape {wanted}, one per image: run `ppl-vae evaluate` again")
    if len({values.shape for values in arrays.values()}) > 1:
        raise RunDirectoryError(f"{path}: its arrays have different lengths ({ {k: v.shape[0] for k, v in arrays.items()} }), "
                                "not one value per image each: run `ppl-vae evaluate` again")
    if "log_evidence" not in arrays:
        raise RunDirectoryError(f"{path} has no 'log_evidence' array: run `ppl-vae evaluate` again")
    return arrays
