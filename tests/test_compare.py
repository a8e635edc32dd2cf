"""`ppl-vae compare`: paired differences of log p̂(x) on the same images."""

import math

import numpy
import pytest

from ppl_vae.compare import add_paired_differences, markdown_table


def row(name: str, per_image, images: int | None = None, binarize: str = "dynamic") -> dict:
    per_image = None if per_image is None else numpy.asarray(per_image, dtype=float)
    n = images if images is not None else len(per_image)
    mean = float(per_image.mean()) if per_image is not None else -90.0
    return {
        "run": name, "model": "m", "objective": "o", "epochs": 1, "split": "test", "images": n, "quantity": "log p(x)",
        "elbo": mean - 5, "elbo_se": 1.0, "reconstruction": -80.0, "kl": 15.0, "log_px": mean, "log_px_se": 1.0,
        "k": 10, "gap": 5.0, "bits_per_dim": None, "active_units": {"unavailable": "flow guide"},
        "train_seconds": 1.0, "device": "cpu", "log_px_minus_first": None, "log_px_minus_first_se": None,
        "_per_image_log_px": per_image, "_binarize": binarize,
    }


def test_paired_difference_is_the_mean_and_standard_error_of_per_image_differences():
    rng = numpy.random.default_rng(0)
    base = rng.normal(-90, 20, size=400)  # images differ a lot ...
    shift = 1.5 + rng.normal(0, 0.5, size=400)  # ... the variants differ little, and consistently
    rows = [row("a", base), row("b", base + shift), row("c", base[:300], images=300), row("d", None, images=400),
            row("e", base + 1, binarize="static")]
    add_paired_differences(rows)
    assert rows[1]["log_px_minus_first"] == pytest.approx(shift.mean())
    assert rows[1]["log_px_minus_first_se"] == pytest.approx(shift.std(ddof=1) / math.sqrt(400))
    # The paired s.e. is far below the unpaired one, which carries the images' spread.
    assert rows[1]["log_px_minus_first_se"] < 0.1 * base.std() / math.sqrt(400)
    for other in rows[2:]:  # other images, no per-image file, other binarization: no paired number
        assert other["log_px_minus_first"] is None
    table = markdown_table(rows)
    assert f"{shift.mean():+.2f} ± " in table
    assert "unavailable" not in table  # a reason in place of a count shows as a dash
