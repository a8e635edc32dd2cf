"""Datasets beyond MNIST (issue 18): every loader on small files written in the dataset's own format.

Only MNIST's real files are on the test machines; Fashion-MNIST and KMNIST are written here as
torchvision's raw IDX files, CIFAR-10 as its python pickle batches, and a user's images as a
``.npz`` file, so the loaders read exactly what a real download (or a user) puts on disk.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_vae import cli
from ppl_vae.data import DATA_RECORD_FILE, load_dataset
from ppl_vae.errors import DataNotFoundError, InvalidDataError

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (LeCun's format, as torchvision reads it): magic 0x0000 08 ndim, big-endian int32 sizes, uint8 data."""
    assert array.dtype == np.uint8
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist_like(root: Path, name: str, num_train: int = 12, num_test: int = 5, seed: int = 0) -> dict:
    """Raw IDX files of ``name`` under root/<Class>/raw; returns the arrays written."""
    rng = np.random.default_rng(seed)
    raw = root / FOLDERS[name] / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for split, count in (("train", num_train), ("test", num_test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        write_idx(raw / IDX_FILES[split][0], images)
        write_idx(raw / IDX_FILES[split][1], labels)
        arrays[split] = (images, labels)
    return arrays


def write_cifar10(root: Path, per_batch: int = 4, num_test: int = 3, seed: int = 0) -> dict:
    """cifar-10-batches-py as in the official archive: pickled dicts with 'data' uint8 [N, 3072] and 'labels'."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    arrays = {"train": [], "test": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        count = num_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=count)]
        with open(folder / name, "wb") as stream:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": [f"{i}.png" for i in range(count)]},
                        stream, protocol=2)
        arrays["test" if name == "test_batch" else "train"].append((data, labels))
    with open(folder / "batches.meta", "wb") as stream:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch}, stream, protocol=2)
    return arrays


def write_npz(path: Path, num_train: int = 40, num_test: int = 10, shape: tuple = (32, 32, 3), seed: int = 0,
              **extra) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, size=(num_train, *shape), dtype=np.uint8),
        "x_test": rng.integers(0, 256, size=(num_test, *shape), dtype=np.uint8),
        "y_train": rng.integers(0, 10, size=num_train),
        "y_test": rng.integers(0, 10, size=num_test),
        **extra,
    }
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return arrays


# --- Loaders -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fashion-mnist", "kmnist", "mnist"])
def test_mnist_family_reads_torchvision_raw_idx_files(tmp_path, name):
    written = write_mnist_like(tmp_path, name)
    data = load_dataset(name, tmp_path, binarize="none", download=False)
    images, labels = written["train"]
    # The last sixth of the training file is the validation split, as MNIST's last 10,000 of 60,000.
    assert data.train.shape == (10, 1, 28, 28) and data.val.shape == (2, 1, 28, 28) and data.test.shape == (5, 1, 28, 28)
    assert torch.equal(data.train[:, 0], torch.from_numpy(images[:10]).float() / 255)
    assert torch.equal(data.val[:, 0], torch.from_numpy(images[10:]).float() / 255)
    assert torch.equal(data.test[:, 0], torch.from_numpy(written["test"][0]).float() / 255)
    assert data.train_labels.tolist() == labels[:10].tolist() and data.labels("val").tolist() == labels[10:].tolist()
    assert data.record["dataset"] == name and data.record["images"] == {"train": 10, "val": 2, "test": 5}
    binary = load_dataset(name, tmp_path, binarize="static", download=False)
    assert torch.all((binary.train == 0) | (binary.train == 1)) and torch.all((binary.test == 0) | (binary.test == 1))


def test_cifar10_reads_the_python_pickle_batches(tmp_path):
    written = write_cifar10(tmp_path)
    data = load_dataset("cifar10", tmp_path, binarize="none", download=False)
    all_train = np.concatenate([d for d, _ in written["train"]])
    all_labels = sum((labels for _, labels in written["train"]), [])
    # 20 training images: the last tenth (2) is the validation split.
    assert data.train.shape == (18, 3, 32, 32) and data.val.shape == (2, 3, 32, 32) and data.test.shape == (3, 3, 32, 32)
    # Each row is the red, then green, then blue 32x32 plane: pixel (row 1, column 2) of the green plane.
    assert data.train[0, 1, 1, 2].item() == pytest.approx(all_train[0, 1024 + 32 + 2] / 255)
    assert torch.equal(data.val.reshape(2, -1), torch.from_numpy(all_train[18:]).float() / 255)
    assert data.train_labels.tolist() == all_labels[:18] and data.test_labels.tolist() == written["test"][0][1]
    assert data.record["images"] == {"train": 18, "val": 2, "test": 3}
    with pytest.raises(InvalidDataError, match="3 colour channels.*--binarize none"):
        load_dataset("cifar10", tmp_path, binarize="dynamic", download=False)


def test_npz_grey_with_a_validation_split_and_labels(tmp_path):
    path = tmp_path / "grey.npz"
    rng = np.random.default_rng(1)
    x_val = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    written = write_npz(path, num_train=20, shape=(28, 28), x_val=x_val, y_val=np.arange(6))
    data = load_dataset(str(path), binarize="none")
    assert data.train.shape == (20, 1, 28, 28) and data.val.shape == (6, 1, 28, 28) and data.test.shape == (10, 1, 28, 28)
    assert torch.equal(data.val[:, 0], torch.from_numpy(x_val).float() / 255)
    assert data.val_labels.tolist() == list(range(6)) and data.train_labels.tolist() == written["y_train"].tolist()
    assert data.record["path"] == str(path.resolve()) and len(data.record["sha256"]) == 64
    dynamic = load_dataset(str(path), binarize="dynamic")  # grey images can be binarized
    assert torch.all((dynamic.test == 0) | (dynamic.test == 1))


def test_npz_colour_without_validation_holds_out_a_fixed_share(tmp_path):
    path = tmp_path / "colour.npz"
    written = write_npz(path, num_train=40)
    a = load_dataset(str(path), binarize="none")
    b = load_dataset(str(path), binarize="none")
    assert a.train.shape == (36, 3, 32, 32) and a.val.shape == (4, 3, 32, 32)  # 10% of 40, channels first
    assert torch.equal(a.val, b.val) and torch.equal(a.train, b.train)  # a fixed seed: the same split every time
    # Every training image lands in exactly one of the two splits, with its label.
    images = torch.from_numpy(written["x_train"]).permute(0, 3, 1, 2).float() / 255
    both = torch.cat([a.train, a.val])
    labels = torch.cat([a.train_labels, a.val_labels])
    matches = [(images == image).flatten(1).all(1).nonzero().flatten().tolist() for image in both]
    assert sorted(m[0] for m in matches) == list(range(40))
    assert all(labels[i].item() == written["y_train"][m[0]] for i, m in enumerate(matches))
    assert a.record["val_share"] == 0.1 and "seed" in a.record["splits"]["val"]
    with pytest.raises(InvalidDataError, match="colour channels"):
        load_dataset(str(path), binarize="static")


@pytest.mark.parametrize("arrays, found, expected", [
    ({"x_train": np.zeros((4, 8, 8), np.float32)}, "x_train is float32 of shape \\[4, 8, 8\\]", "expected uint8"),
    ({"x_train": np.zeros((4, 3, 8, 8), np.uint8)}, "shape \\[4, 3, 8, 8\\], which looks channels-first", "channels last"),
    ({"x_train": np.zeros((4, 64), np.uint8)}, "x_train is uint8 of shape \\[4, 64\\]", "\\[N, H, W\\] \\(grey\\)"),
    ({"x_test": np.zeros((4, 8, 8), np.uint8)}, "lacks x_train", "expected uint8 arrays"),
    ({"x_train": np.zeros((4, 8, 8), np.uint8), "x_test": np.zeros((2, 9, 9), np.uint8)}, "different shapes", "one shape"),
    ({"x_train": np.zeros((4, 8, 8), np.uint8), "x_test": np.zeros((2, 8, 8), np.uint8), "y_train": np.zeros(3)},
     "y_train is float64 of shape \\[3\\]", "integer labels of shape \\[4\\]"),
])
def test_npz_other_layouts_and_dtypes_are_refused_saying_what_was_found(tmp_path, arrays, found, expected):
    path = tmp_path / "bad.npz"
    np.savez(path, **{"x_test": np.zeros((2, 8, 8), np.uint8), **arrays})
    with pytest.raises(InvalidDataError) as info:
        load_dataset(str(path))
    assert re.search(found, str(info.value)) and re.search(expected, str(info.value)), str(info.value)


# --- Missing files, offline ----------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """No internet: every URL torchvision opens fails, as it does on a machine without a network."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize("name, folder, files", [
    ("fashion-mnist", "FashionMNIST/raw", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    ("kmnist", "KMNIST/raw", ["train-labels-idx1-ubyte"]),
    ("cifar10", "cifar-10-batches-py", ["data_batch_1", "test_batch"]),
])
def test_named_dataset_missing_offline_fails_with_one_clear_message(tmp_path, capsys, offline, name, folder, files):
    empty = tmp_path / "data"
    binarize = "none" if name == "cifar10" else "dynamic"
    code = cli.main(["train", "--run-dir", str(tmp_path / "run"), "--dataset", name, "--data-dir", str(empty),
                     "--binarize", binarize, "--likelihood", "logistic256" if name == "cifar10" else "bernoulli",
                     "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("ppl-vae train: error: ") and "not found" in err
    assert str(empty / folder) in err and all(file in err for file in files)
    with pytest.raises(DataNotFoundError):
        load_dataset(name, empty, binarize=binarize, download=False)


# --- End to end through the CLI ------------------------------------------------------------------


def test_a_users_colour_npz_trains_and_evaluates_through_the_cli_with_bits_per_dim(tmp_path, capsys):
    path = tmp_path / "my_images.npz"
    write_npz(path, num_train=40, num_test=10)
    run_dir = tmp_path / "run"
    code = cli.main(["train", "--run-dir", str(run_dir), "--dataset", str(path), "--binarize", "none",
                     "--network", "conv", "--conv-channels", "4", "8", "--hidden-sizes", "16", "--latent-dim", "2",
                     "--likelihood", "logistic-mixture", "--likelihood-components", "2", "--epochs", "1",
                     "--batch-size", "20", "--test-samples", "3", "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((run_dir / "config.json").read_text())
    record = json.loads((run_dir / DATA_RECORD_FILE).read_text())
    assert config["model"]["image_shape"] == [3, 32, 32] and config["model"]["network"] == "conv"
    assert config["train"]["dataset"] == str(path.resolve()) and config["train"]["dataset_sha256"] == record["sha256"]
    assert record["images"] == {"train": 36, "val": 4, "test": 10} and record["image_shape"] == [3, 32, 32]
    test = json.loads((run_dir / "test.json").read_text())
    assert "bits_per_dim" in test

    code = cli.main(["evaluate", str(run_dir), "--num-samples", "4", "--elbo-samples", "2", "--device", "cpu",
                     "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["num_datapoints"] == 10 and evaluation["data"]["sha256"] == record["sha256"]
    bits = evaluation["bits_per_dim"]["log_evidence"]["mean"]
    # Random images: about 8 bits per value (uniform over 256 levels), never negative.
    assert 0 < bits < 12 and "bits/dim" in out

    assert cli.main(["plot", str(run_dir)]) == 0  # colour reconstructions, samples and interpolations
    assert (run_dir / "plots" / "reconstructions.png").is_file() and (run_dir / "plots" / "samples.png").is_file()

    # The run records its file: a changed file is refused rather than evaluated.
    write_npz(path, num_train=40, num_test=10, seed=5)
    code = cli.main(["evaluate", str(run_dir), "--num-samples", "4", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "has changed since the run was trained" in err
