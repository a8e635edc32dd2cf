"""The suite's own machinery: tests of one xdist_group run on one worker, so their module fixture is made once.

setup.cfg runs the suite with ``-n 2 --dist loadgroup``; the spawned processes of test_distributed.py and the
reference run of test_reliability.py are module fixtures shared by the tests of one group. A pytest of its own
(two workers, a bare folder, no torch) runs a small file through tests/xdist_groups.py, as conftest.py loads it.
"""

import os
import subprocess
import sys
from pathlib import Path

GROUPED = '''
import os
import pytest

@pytest.fixture(scope="module")
def made_once():
    with open("setups.txt", "a") as log:
        log.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")

@pytest.mark.xdist_group("shared")
@pytest.mark.parametrize("case", range(3))
def test_grouped(made_once, case, request):
    assert request.node.nodeid.endswith("@shared")

@pytest.mark.xdist_group("shared")
def test_also_grouped(made_once):
    pass

@pytest.mark.parametrize("case", range(4))
def test_alone(case, request):
    assert "@" not in request.node.nodeid
'''


def test_the_tests_of_a_group_share_one_worker_and_one_module_fixture(tmp_path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST_", "PPL_VAE"))}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # pytest-xdist alone (-p xdist): a second, not five, per process
    command = ["-p", "xdist", "-n", "2", "--dist", "loadgroup", "-p", "xdist_groups", "-p", "no:cacheprovider"]
    ran = subprocess.run([sys.executable, "-m", "pytest", *command, "-q", "test_grouped.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "8 passed" in ran.stdout
    # Without the plugin the first two tests go to the two workers and the fixture is made on both.
    assert len((tmp_path / "setups.txt").read_text().split()) == 1
