"""The files an evaluation leaves in a run directory, written as one and read as one; what its evidence is of.

``ppl-vae evaluate`` writes two files: ``evaluation_per_datapoint.npz`` (per-image log p̂,
its Monte Carlo s.e., ESS, PSIS k-hat) and ``evaluation.json`` (the summary, the
diagnostics). A kill (or a failed write) between the two would leave the per-image values of
one evaluation beside the summary of another, and a paired difference computed from them
would be silently wrong. So the two are committed as one (:func:`write_evaluation`):

1. the npz is written first, atomically, with a fresh random ``evaluation_id`` stored inside it;
2. ``evaluation.json`` is written last, atomically, recording that id and the npz's sha256
   under ``"per_datapoint"``.

Until step 2 the old summary stays, and it names another id: every reader
(:func:`read_per_datapoint`: ``compare``, ``diagnose``) refuses such a pair with one line,
as it refuses an npz whose bytes no longer have the recorded sha256.

**Runs evaluated before the pair was recorded** (no ``"per_datapoint"`` in evaluation.json,
no id in the npz) are accepted only when the npz's per-image log p̂ reproduce
evaluation.json's mean and standard error (to 1e-9 relative): the summary was computed
from exactly those values, and another evaluation's (another seed, checkpoint or image
count) would not reproduce them. Otherwise they are refused like a mismatched new pair.
``test.json`` (written by ``train``) has no per-datapoint companion, so nothing pairs with it.

**The quantity** (:func:`result_quantity`): every result file since this version records what
its evidence is of (``"quantity"``: ``log p(x)``, ``log p(x | y)``, ``log p(x, y)``; see
:func:`ppl_vae.inspection.evidence_quantity`). An older file without it is read as
``log p(x)`` when the run was trained without ``--labels`` (the programs were given x alone,
so every observed site observed x), and as ``log p(x | y)`` when a built-in program was given
the labels (no built-in program observes them); a user's program given labels may have
observed them, so there the quantity is unknown (None) and nothing is paired with it; so is that of a run
given ``--cond`` arrays (every such run records its quantity, e.g. ``log p(x | c)``: a file without one was
altered, and is not read as ``log p(x)``).
"""

from __future__ import annotations

import hashlib
import io
import math
import uuid
from pathlib import Path
from typing import Any

import numpy

from . import runs
from .errors import RunDirectoryError
from .npz_files import load_npz
from .run_readers import check_per_datapoint

ID_KEY = "evaluation_id"  # the id's name inside the npz, and in evaluation.json's "per_datapoint" record
RECORD_KEY = "per_datapoint"  # evaluation.json's record of its npz: file, evaluation_id, sha256
LEGACY_TOLERANCE = 1e-9  # relative: the npz's mean log p̂ against evaluation.json's, for files without an id


def write_evaluation(run_dir: str | Path, result: dict[str, Any], arrays: dict[str, numpy.ndarray]) -> None:
    """Write ``arrays`` to the npz, then ``result`` (with the npz's id and sha256 added) to evaluation.json.

    Each write is atomic (:func:`ppl_vae.runs.write_bytes`); the JSON goes last, so a kill in
    between leaves the old summary, which names another id, and readers refuse the pair.
    """
    run_dir = Path(run_dir)
    # Recorded in the run's manifest (and checked not to be links) before either is written.
    per_datapoint_path, evaluation_path = runs.record_written(run_dir, runs.PER_DATAPOINT_FILE, runs.EVALUATION_FILE)
    evaluation_id = uuid.uuid4().hex
    buffer = io.BytesIO()
    numpy.savez(buffer, **arrays, **{ID_KEY: numpy.array(evaluation_id)})
    payload = buffer.getvalue()
    runs.write_bytes(per_datapoint_path, payload)
    result[RECORD_KEY] = {"file": runs.PER_DATAPOINT_FILE, ID_KEY: evaluation_id,
                          "sha256": hashlib.sha256(payload).hexdigest()}
    runs.write_json(evaluation_path, result)


def _mismatch(run_dir: Path, detail: str) -> RunDirectoryError:
    return RunDirectoryError(
        f"{run_dir}: {runs.EVALUATION_FILE} and {runs.PER_DATAPOINT_FILE} are from different evaluations ({detail}): "
        f"run `ppl-vae evaluate {run_dir}` again"
    )


def read_per_datapoint(run_dir: str | Path, result: dict[str, Any] | None = None) -> dict[str, numpy.ndarray]:
    """The per-datapoint arrays of the run's evaluation, checked to come from the evaluation ``result`` summarizes.

    ``result`` is evaluation.json's content (read here when None). A missing or unreadable npz,
    or one from another evaluation, is a :class:`RunDirectoryError` of one line.
    """
    run_dir = Path(run_dir)
    if result is None:
        result = runs.read_json(run_dir / runs.EVALUATION_FILE)
    path = run_dir / runs.PER_DATAPOINT_FILE
    if not path.is_file():
        raise RunDirectoryError(f"{run_dir} has no {runs.PER_DATAPOINT_FILE}: run `ppl-vae evaluate {run_dir}` first")
    # Checked before NumPy allocates anything (object arrays, headers claiming more than the file holds).
    arrays = load_npz(path, f"expected the per-image arrays that `ppl-vae evaluate {run_dir}` writes", RunDirectoryError)
    payload = path.read_bytes()
    stored_id = arrays.pop(ID_KEY, None)
    if stored_id is not None:
        stored_id = str(stored_id.item()) if stored_id.size == 1 else repr(stored_id.tolist())
    record = result.get(RECORD_KEY) if isinstance(result, dict) else None
    if isinstance(record, dict):
        if stored_id is None:
            raise _mismatch(run_dir, f"the npz has no {ID_KEY}, {runs.EVALUATION_FILE} records {record.get(ID_KEY)}")
        if stored_id != record.get(ID_KEY):
            raise _mismatch(run_dir, f"{ID_KEY} {stored_id} in the npz, {record.get(ID_KEY)} in {runs.EVALUATION_FILE}")
        if hashlib.sha256(payload).hexdigest() != record.get("sha256"):
            raise RunDirectoryError(
                f"{path} was changed after `ppl-vae evaluate` wrote it (its sha256 is not the one {runs.EVALUATION_FILE} "
                f"records): run `ppl-vae evaluate {run_dir}` again"
            )
        return check_per_datapoint(path, arrays, _count(result))
    if stored_id is not None:
        raise _mismatch(run_dir, f"the npz is from evaluation {stored_id}, {runs.EVALUATION_FILE} records none")
    check_per_datapoint(path, arrays, _count(result))
    _check_legacy_pair(run_dir, result, arrays)
    return arrays


def _count(result: Any) -> int | None:
    count = result.get("num_datapoints") if isinstance(result, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _check_legacy_pair(run_dir: Path, result: dict[str, Any], arrays: dict[str, numpy.ndarray]) -> None:
    """A pair written before ids: the npz's log p̂ must reproduce the summary's mean and s.e. (module docstring)."""
    values = arrays.get("log_evidence")
    summary = result.get("log_evidence") if isinstance(result, dict) else None
    if values is None or not isinstance(summary, dict):
        raise _mismatch(run_dir, "written before evaluations recorded an id, and they cannot be matched by content")
    values = numpy.asarray(values, dtype=numpy.float64).reshape(-1)
    if values.shape != (result.get("num_datapoints"),):
        raise _mismatch(run_dir, f"{values.size} per-image values, {result.get('num_datapoints')} images in the summary")
    mean = float(values.mean())
    stderr = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan
    for name, ours, theirs in (("mean", mean, summary.get("mean")), ("standard error", stderr, summary.get("stderr"))):
        if not isinstance(theirs, (int, float)) or isinstance(theirs, bool):
            raise _mismatch(run_dir, f"the summary has no log p̂ {name} to match the npz's against")
        same = (math.isnan(ours) and math.isnan(theirs)) or math.isclose(
            ours, theirs, rel_tol=LEGACY_TOLERANCE, abs_tol=LEGACY_TOLERANCE)
        if not same:
            raise _mismatch(run_dir, f"the npz's per-image log p̂ have {name} {ours:.6f}, the summary {theirs:.6f}")


def result_quantity(result: dict[str, Any], config: dict[str, Any], run_dir: str | Path) -> str | None:
    """What ``result``'s evidence is of: its ``"quantity"``, else the rule for older files (module docstring)."""
    quantity = result.get("quantity")
    if isinstance(quantity, str):
        return quantity
    if "quantity" in result:  # present but not a quantity: not trusted
        return None
    train = config.get("train", {}) if isinstance(config, dict) else {}
    if train.get("cond"):  # given --cond arrays (a file older than its quantity, or one with it removed): unknown
        return None
    if not train.get("labels", False):
        return "log p(x)"  # the programs were given x alone: every observed site observed x
    from .programs import load_spec

    spec = load_spec(Path(run_dir))
    if spec is None or spec.is_builtin:  # no built-in program observes the labels it is given
        return "log p(x | y)"
    return None
