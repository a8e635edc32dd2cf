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
