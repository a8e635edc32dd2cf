"""Reading MNIST-family files without torchvision, and drawing only the kept images (issue 25, item 7).

The raw IDX files are read by ppl_vae itself when they are there (importing torchvision costs seconds in
every process); a subset of a split is converted and binarized alone, and must hold the very images the
whole split's fixed-seed draws give.
"""

from __future__ import annotations

import sys

import pytest
import torch

from ppl_vae.data import load_dataset, load_mnist
from ppl_vae.errors import InvalidDataError


@pytest.fixture
def no_torchvision(monkeypatch):
    """Any import of torchvision in this test fails, as where it is not installed."""
    for name in ("torchvision", "torchvision.datasets"):
        monkeypatch.setitem(sys.modules, name, None)


def test_the_raw_files_are_read_without_torchvision_as_torchvision_reads_them(small_data_root, monkeypatch):
    import torchvision.datasets

    expected = {train: torchvision.datasets.MNIST(str(small_data_root), train=train, download=False) for train in (True, False)}
    for name in ("torchvision", "torchvision.datasets"):
        monkeypatch.setitem(sys.modules, name, None)
    data = load_mnist(small_data_root, binarize="none", download=False)
    train, val = expected[True].data.float()[:, None] / 255, expected[True].targets
    assert torch.equal(torch.cat([data.train, data.val]), train)
    assert torch.equal(torch.cat([data.train_labels, data.val_labels]), val) and data.train_labels.dtype == torch.int64
    assert torch.equal(data.test, expected[False].data.float()[:, None] / 255)
    assert torch.equal(data.test_labels, expected[False].targets)


@pytest.mark.parametrize("damage, what", [
    (lambda raw: raw[:3] + b"\x09" + raw[4:], "not a 3-dimensional uint8 IDX file (magic 00000809"),
    (lambda raw: raw[:-5], "bytes for sizes [1200, 28, 28]"),
    (lambda raw: raw + b"\x00", "bytes for sizes [1200, 28, 28]"),
])
def test_a_damaged_idx_file_is_one_line_naming_it(small_data_root, tmp_path, cli_main, no_torchvision, damage, what):
    root = tmp_path / "data"
    (root / "MNIST" / "raw").mkdir(parents=True)
    for source in (small_data_root / "MNIST" / "raw").iterdir():
        (root / "MNIST" / "raw" / source.name).write_bytes(source.read_bytes())
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(damage(images.read_bytes()))
    with pytest.raises(InvalidDataError, match=r"replace it with the original file"):
        load_mnist(root, download=False)
    ran = cli_main("train", "--run-dir", tmp_path / "run", "--data-dir", root, "--no-progress")
    assert ran.returncode == 2 and len(ran.stderr.strip().splitlines()) == 1, ran.stderr
    assert str(images) in ran.stderr and what in ran.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("binarize, dequantize_levels", [("static", False), ("dynamic", False), ("none", True)])
def test_the_kept_images_are_those_of_the_whole_splits_draws(small_data_root, binarize, dequantize_levels):
    whole = load_dataset("mnist", small_data_root, binarize, download=False, dequantize_levels=dequantize_levels)
    part = load_dataset("mnist", small_data_root, binarize, download=False, dequantize_levels=dequantize_levels,
                        train_examples=37, eval_examples=11)
    assert part.train.shape[0] == 37 and part.val.shape[0] == part.test.shape[0] == 11
    assert torch.equal(part.train, whole.train[:37]) and torch.equal(part.train_labels, whole.train_labels[:37])
    for split in ("val", "test"):
        assert torch.equal(part.split(split), whole.split(split)[:11])
        assert torch.equal(part.labels(split), whole.labels(split)[:11])
    # The training split as evaluated (a fixed draw of its grey levels for dynamic binarization) as well.
    assert torch.equal(part.split("train"), whole.split("train")[:37])
    assert part.record["images"] == {"train": 37, "val": 11, "test": 11}
