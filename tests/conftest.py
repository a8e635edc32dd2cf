import os
import sys
from pathlib import Path

# Tiny networks run fastest on one thread, and CI has two cores: keep the test processes (and the
# subprocesses they start) from fighting over them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pyro  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))

# --dist loadgroup (setup.cfg) keeps each xdist_group on one worker again under pytest 9 (see xdist_groups.py).
from xdist_groups import pytest_collection_modifyitems  # noqa: E402, F401

REPO = Path(__file__).resolve().parent.parent


def mnist_root() -> Path:
    env = os.environ.get("PPL_VAE_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session", autouse=True)
def _signing_key_dir(tmp_path_factory):
    """The tests' own config folder, so that no test reads or makes a key in the user's (ppl_vae.trust): one per
    session (per xdist worker), so runs made by a fixture of any scope are signed with the key their tests read.
    Set in os.environ, so subprocesses inherit it."""
    previous = os.environ.get("PPL_VAE_CONFIG_DIR")
    os.environ["PPL_VAE_CONFIG_DIR"] = str(tmp_path_factory.mktemp("ppl_vae_config"))
    yield
    if previous is None:
        os.environ.pop("PPL_VAE_CONFIG_DIR", None)
    else:
        os.environ["PPL_VAE_CONFIG_DIR"] = previous


@pytest.fixture(autouse=True)
def _fresh_pyro():
    """Every test starts with an empty param store, validation on and a fixed seed."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = mnist_root()
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.fail(f"MNIST raw files not found under {root}: set PPL_VAE_DATA to the folder holding MNIST/raw")
    return root


@pytest.fixture(scope="session")
def mnist(data_root):
    from ppl_vae.data import load_mnist

    return load_mnist(data_root, binarize="dynamic")


# Images in the small copy of MNIST: the training file's 1,200 give 1,000 training and 200 validation images (its
# last sixth, as the package splits any such file); the test file's first 500 are the test split.
SMALL_MNIST_TRAIN, SMALL_MNIST_TEST = 1200, 500


def write_small_mnist(source: Path, target: Path, num_train: int, num_test: int) -> None:
    """The first images and labels of ``source``'s four raw IDX files, written as IDX files in ``target``.

    IDX: a 4-byte magic number, one big-endian uint32 per dimension (the first is the count), then the bytes;
    images have 3 dimensions (count, 28, 28), labels 1."""
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        for kind, item_bytes, header in (("images-idx3-ubyte", 28 * 28, 16), ("labels-idx1-ubyte", 1, 8)):
            name = f"{prefix}-{kind}"
            with open(source / name, "rb") as file:
                head, body = bytearray(file.read(header)), file.read(count * item_bytes)
            assert int.from_bytes(head[4:8], "big") >= count and len(body) == count * item_bytes, name
            head[4:8] = count.to_bytes(4, "big")
            (target / name).write_bytes(bytes(head) + body)


@pytest.fixture(scope="session")
def small_data_root(data_root, tmp_path_factory) -> Path:
    """A data folder holding the first images of MNIST (see SMALL_MNIST_TRAIN and SMALL_MNIST_TEST), in torchvision's
    raw IDX format: end-to-end tests that only need some real images read it in milliseconds instead of seconds,
    in their own process and in every command they start (point PPL_VAE_DATA or --data-dir at it)."""
    root = tmp_path_factory.mktemp("small_data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_small_mnist(data_root / "MNIST" / "raw", raw, SMALL_MNIST_TRAIN, SMALL_MNIST_TEST)
    return root


class Ran:
    """What a shell would see of one command: its exit status and its two streams."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _in_process_cli(capture, monkeypatch):
    """``run(*args, data_root=None)``: ``ppl-vae ARGS`` through cli.main, its output read from ``capture``."""

    def run(*args, data_root=None) -> Ran:
        from ppl_vae.cli import main

        if data_root is not None:
            monkeypatch.setenv("PPL_VAE_DATA", str(data_root))
        capture.readouterr()
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit_:
            code = exit_.code
        out = capture.readouterr()
        return Ran(code, out.out, out.err)

    return run


@pytest.fixture
def cli_main(capsys, monkeypatch):
    """``cli_main(*args, data_root=None)``: ``ppl-vae ARGS`` in this process, as a :class:`Ran`.

    An exit through argparse (status 2 for a bad option) is caught like a process's exit; any other exception
    fails the test, as a traceback on stderr would."""
    return _in_process_cli(capsys, monkeypatch)


@pytest.fixture
def cli_launch(capfd, monkeypatch):
    """As :func:`cli_main`, for commands that start processes (``--devices 2`` starts torchrun): this process is
    the launcher, and what the started processes write to the inherited stdout and stderr is read too."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return _in_process_cli(capfd, monkeypatch)
