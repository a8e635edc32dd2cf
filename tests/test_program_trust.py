"""A run directory's program code runs only from the run's own checked copy, and only when this user trusts it
(issue 24, items 1-3; :mod:`ppl_vae.trust`).

The program below writes a marker file when its module is imported: the marker's absence proves that no code of
the run ran. One tiny run is trained (and evaluated) per module, with this session's key, and copied per test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from ppl_vae import cli
from ppl_vae.errors import PplVaeError, PplVaeWarning, RunDirectoryError, UntrustedProgramError
from ppl_vae.programs import ProgramSpec, build_program, load_spec, record_spec
from ppl_vae.train import load_run

TINY = ["--epochs", "1", "--train-examples", "100", "--batch-size", "50", "--eval-examples", "20",
        "--test-samples", "2", "--val-samples", "1", "--evidence-every", "0", "--device", "cpu", "--no-progress"]
EVALUATE = ["--num-samples", "3", "--examples", "10", "--elbo-samples", "1", "--device", "cpu", "--no-progress"]

PROGRAM = '''
import os

import pyro
import pyro.distributions as dist
from torch import nn

if os.environ.get("PPL_VAE_TEST_MARKER"):  # proves whether this file ran
    with open(os.environ["PPL_VAE_TEST_MARKER"], "a") as marker:
        marker.write("imported\\n")


class Tiny(nn.Module):
    def __init__(self, latent=2):
        super().__init__()
        self.latent = latent
        self.encoder = nn.Linear(784, 2 * latent)
        self.decoder = nn.Linear(latent, 784)

    def model(self, x):
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("images", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("images", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))
'''

EVIL = 'import os\nopen(os.environ["PPL_VAE_TEST_MARKER"], "a").write("evil\\n")\nTiny = None\n'


def main(*args) -> int:
    return cli.main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data_root) -> Path:
    """A run of the user program above, trained and evaluated by this user (signed with the session's key)."""
    work = tmp_path_factory.mktemp("trust")
    source = work / "user" / "my_models.py"
    source.parent.mkdir()
    source.write_text(PROGRAM)
    run_dir = work / "run"
    assert main("train", "--program", f"{source}:Tiny", "--run-dir", run_dir, "--data-dir", small_data_root, *TINY) == 0
    assert main("evaluate", run_dir, "--data-dir", small_data_root, *EVALUATE) == 0
    return run_dir


@pytest.fixture
def run(trained, tmp_path, monkeypatch) -> Path:
    """A copy of the trained run; the marker file is set for this test."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    monkeypatch.setenv("PPL_VAE_TEST_MARKER", str(tmp_path / "marker"))
    return copy


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "marker"


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "program.json").read_text())


def rewrite(run_dir: Path, **fields) -> None:
    (run_dir / "program.json").write_text(json.dumps({**record(run_dir), **fields}))


def tamper(run_dir: Path, update_sha256: bool) -> str:
    """Change the run's copy as an attacker would (a line added); with ``update_sha256``, record its new hash too."""
    copy = run_dir / record(run_dir)["source"]
    copy.write_text(copy.read_text() + "\nprint('a line added by someone else')\n")
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    if update_sha256:
        rewrite(run_dir, sha256=digest)
    return digest


def one_line_error(capsys, command: str) -> str:
    """The stderr of a refused in-process command: one line, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ppl-vae {command}: error: "), err
    return lines[0]


def test_the_users_own_run_is_trusted_and_its_copy_runs(run, marker, small_data_root, capsys):
    assert record(run)["signature"]  # signed when the run was made
    key = Path(os.environ["PPL_VAE_CONFIG_DIR"]) / "program_signing_key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert main("evaluate", run, "--data-dir", small_data_root, *EVALUATE) == 0
    assert marker.read_text() == "imported\n"  # the marker works: where it is absent, the code did not run


def test_a_modified_copy_is_refused_even_with_trust(run, marker, small_data_root, capsys):
    digest = tamper(run, update_sha256=False)
    for trust in ([], ["--trust-program"]):
        assert main("evaluate", run, "--data-dir", small_data_root, *EVALUATE, *trust) == 2
        line = one_line_error(capsys, "evaluate")
        assert f"has sha256 {digest}, not the {record(run)['sha256']} recorded" in line
    assert not marker.exists()


def test_a_copy_modified_with_its_sha256_updated_needs_trust(run, marker, small_data_root, capsys):
    digest = tamper(run, update_sha256=True)
    copy = run / "program" / "my_models.py"
    for command in (["evaluate", run, "--data-dir", small_data_root, *EVALUATE], ["plot", run, "--data-dir", small_data_root],
                    ["train", "--resume", "--run-dir", run, "--epochs", "2", "--no-progress"]):
        assert main(*command) == 2
        line = one_line_error(capsys, command[0])
        assert f"{copy} (sha256 {digest})" in line and "not trusted" in line
        assert "--trust-program" in line and f"ppl-vae trust {run}" in line
    with pytest.raises(UntrustedProgramError):
        load_run(run)
    assert not marker.exists()
    # --trust-program runs it for this command only: nothing is signed.
    assert main("evaluate", run, "--data-dir", small_data_root, *EVALUATE, "--trust-program") == 0
    assert marker.read_text() == "imported\n"
    assert main("evaluate", run, "--data-dir", small_data_root, *EVALUATE) == 2
    with pytest.warns(PplVaeWarning, match="has changed since the run started; using the copy"):
        load_run(run, trust_program=True)
    assert marker.read_text() == "imported\n" * 2
    assert main("train", "--resume", "--run-dir", run, "--epochs", "2", "--no-progress", "--trust-program") == 0
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2


def test_ppl_vae_trust_signs_the_run_after_showing_the_file(run, marker, small_data_root, capsys):
    digest = tamper(run, update_sha256=True)
    assert main("trust", run) == 0
    out = capsys.readouterr().out
    assert str(run / "program" / "my_models.py") in out and digest in out and "signed with your key" in out
    assert not marker.exists()  # trusting reads the file, never runs it
    assert main("evaluate", run, "--data-dir", small_data_root, *EVALUATE) == 0
    assert marker.read_text() == "imported\n"
    assert main("trust", run) == 0 and "already trusted" in capsys.readouterr().out


def test_a_run_signed_with_another_users_key_is_refused(run, marker, small_data_root, tmp_path, monkeypatch, capsys):
    """A run made elsewhere (a colleague's, a downloaded one whose program file is not here): untrusted, and the
    copy is not run with a note that the file is gone."""
    monkeypatch.setenv("PPL_VAE_CONFIG_DIR", str(tmp_path / "another-user"))
    rewrite(run, path=str(tmp_path / "their-machine" / "my_models.py"))
    assert main("evaluate", run, "--data-dir", small_data_root, *EVALUATE) == 2
    line = one_line_error(capsys, "evaluate")
    assert "not one made with your key" in line and "is gone" not in line
    assert main("plot", run, "--data-dir", small_data_root) == 2
    assert "not trusted" in one_line_error(capsys, "plot")
    assert not marker.exists()
    # Files only: these import no program, and read the untrusted run as any other.
    assert main("diagnose", run) == 0
    assert main("compare", run, "--out", tmp_path / "comparison") == 0
    assert "Tiny" in (tmp_path / "comparison" / "comparison.md").read_text()
    assert not marker.exists()
    assert main("trust", run) == 0  # now signed with this user's key
    assert main("evaluate", run, "--data-dir", small_data_root, *EVALUATE) == 0
    assert marker.exists()


def test_an_unsigned_run_is_refused(run, marker, small_data_root, capsys):
    rewrite(run, signature=None)
    assert main("evaluate", run, "--data-dir", small_data_root, *EVALUATE) == 2
    assert "program.json is not signed" in one_line_error(capsys, "evaluate")
    assert not marker.exists()


def outside_file(tmp_path: Path) -> tuple[Path, str]:
    evil = tmp_path / "outside" / "evil.py"
    evil.parent.mkdir()
    evil.write_text(EVIL)
    return evil, hashlib.sha256(evil.read_bytes()).hexdigest()


@pytest.mark.parametrize("source", ["absolute", "../../outside/evil.py", "program/../../outside/evil.py",
                                    "program/sub/../evil.py", "./program/my_models.py"])
def test_a_source_outside_the_run_is_never_imported(run, marker, small_data_root, tmp_path, capsys, source):
    evil, digest = outside_file(tmp_path)
    rewrite(run, source=str(evil) if source == "absolute" else source, sha256=digest)
    for trust in ([], ["--trust-program"]):  # not even when the user trusts the run
        assert main("evaluate", run, "--data-dir", small_data_root, *EVALUATE, *trust) == 2
        assert "not program/NAME.py" in one_line_error(capsys, "evaluate")
    assert main("trust", run) == 2
    one_line_error(capsys, "trust")
    assert not marker.exists()


def test_a_copy_that_is_a_link_out_of_the_run_is_never_imported(run, marker, small_data_root, tmp_path, capsys):
    evil, digest = outside_file(tmp_path)
    (run / "program" / "evil.py").symlink_to(evil)
    rewrite(run, source="program/evil.py", sha256=digest)
    assert main("evaluate", run, "--data-dir", small_data_root, *EVALUATE, "--trust-program") == 2
    assert "outside the run directory" in one_line_error(capsys, "evaluate")
    shutil.rmtree(run / "program")
    (run / "program").symlink_to(evil.parent)  # the folder itself a link out
    assert main("evaluate", run, "--data-dir", small_data_root, *EVALUATE, "--trust-program") == 2
    assert "outside the run directory" in one_line_error(capsys, "evaluate")
    assert not marker.exists()


def test_no_copy_never_falls_back_to_the_recorded_path(run, marker, small_data_root, tmp_path, capsys):
    evil, digest = outside_file(tmp_path)
    rewrite(run, source=None, path=str(evil), sha256=digest)
    for command in (["evaluate", run, "--data-dir", small_data_root, *EVALUATE, "--trust-program"],
                    ["train", "--resume", "--run-dir", run, "--epochs", "2", "--no-progress", "--trust-program"]):
        assert main(*command) == 2
        assert "never from elsewhere" in one_line_error(capsys, command[0])
    assert not marker.exists()


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "a JSON list, not an object"),
    ('{"name": "Tiny", "extra": 1}', "unknown field(s) ['extra']"),
    ('{"name": "Tiny", "path": "x.py", "kwargs": "latent=2"}', "wrong type: 'kwargs' is \"latent=2\""),
    ('{"path": "x.py"}', 'no "name"'),
    ('{"name": "Tiny", "path": "x.py", "sha256": "abc"}', "'sha256' is not 64 lowercase hex digits"),
    ('{"name": "os.system"}', "is not a built-in program"),
    ("{not json", "is not valid JSON"),
])
def test_a_malformed_program_record_is_one_line(run, marker, small_data_root, capsys, text, message):
    (run / "program.json").write_text(text)
    for command in (["evaluate", run, "--data-dir", small_data_root, *EVALUATE], ["trust", run]):
        assert main(*command) == 2
        line = one_line_error(capsys, command[0])
        assert str(run / "program.json") in line and message in line
    with pytest.raises(RunDirectoryError):
        load_run(run, trust_program=True)
    assert not marker.exists()


def test_trust_program_is_a_command_line_decision(run, tmp_path, capsys):
    config = tmp_path / "options.json"
    config.write_text(json.dumps({"trust_program": True}))
    with pytest.raises(SystemExit) as exit_:
        main("train", "--resume", "--run-dir", run, "--config", config)
    assert exit_.value.code == 2 and "--trust-program is accepted on the command line only" in capsys.readouterr().err
    assert main("train", "--run-dir", tmp_path / "new", "--trust-program", *TINY) == 2
    assert "--trust-program applies to --resume" in one_line_error(capsys, "train")


def test_a_builtin_program_needs_no_trust(tmp_path, small_data_root, monkeypatch, capsys):
    run_dir = tmp_path / "two"
    assert main("train", "--program", "two-layer", "--program-kwargs", '{"latent": [2, 2], "hidden": [[8], [8]]}',
                "--run-dir", run_dir, "--data-dir", small_data_root, *TINY) == 0
    monkeypatch.setenv("PPL_VAE_CONFIG_DIR", str(tmp_path / "another-user"))
    assert main("evaluate", run_dir, "--data-dir", small_data_root, *EVALUATE) == 0
    capsys.readouterr()
    assert main("trust", run_dir) == 0 and "no file of its own to trust" in capsys.readouterr().out


def recorded_run(tmp_path: Path) -> Path:
    """A run directory holding only the record of the program above (no training), made by record_spec."""
    source = tmp_path / "user" / "my_models.py"
    source.parent.mkdir(exist_ok=True)
    source.write_text(PROGRAM)
    run_dir = tmp_path / "recorded"
    run_dir.mkdir()
    record_spec(run_dir, ProgramSpec.parse(f"{source}:Tiny", {"latent": 3}))
    return run_dir


def test_the_key_is_made_private_once_and_checked(tmp_path, monkeypatch, marker):
    monkeypatch.setenv("PPL_VAE_TEST_MARKER", str(marker))
    monkeypatch.setenv("PPL_VAE_CONFIG_DIR", str(tmp_path / "config"))
    run_dir = recorded_run(tmp_path)
    key = tmp_path / "config" / "program_signing_key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(bytes.fromhex(key.read_text())) == 32
    assert build_program(load_spec(run_dir), run_dir).latent == 3 and marker.exists()
    marker.unlink()
    key.chmod(0o644)  # others could read it, and sign runs this user would trust
    with pytest.raises(PplVaeError, match="can be read or written by other users.*chmod 600"):
        build_program(load_spec(run_dir), run_dir)
    key.write_text("not a key")
    key.chmod(0o600)
    with pytest.raises(PplVaeError, match="is not 32 bytes in hex"):
        build_program(load_spec(run_dir), run_dir)
    assert not marker.exists()


def test_every_field_of_the_record_is_signed(tmp_path, monkeypatch, marker):
    monkeypatch.setenv("PPL_VAE_TEST_MARKER", str(marker))
    run_dir = recorded_run(tmp_path)
    assert build_program(load_spec(run_dir), run_dir).latent == 3
    for field, value in (("kwargs", {"latent": 4}), ("path", "/elsewhere/my_models.py"), ("name", "Other")):
        changed = {**record(run_dir), field: value}
        (tmp_path / "changed").mkdir(exist_ok=True)
        shutil.rmtree(tmp_path / "changed")
        shutil.copytree(run_dir, tmp_path / "changed")
        (tmp_path / "changed" / "program.json").write_text(json.dumps(changed))
        with pytest.raises(UntrustedProgramError, match="not one made with your key"):
            build_program(load_spec(tmp_path / "changed"), tmp_path / "changed")


def test_a_run_recorded_where_no_key_can_be_made_is_unsigned(tmp_path, monkeypatch, marker):
    monkeypatch.setenv("PPL_VAE_TEST_MARKER", str(marker))
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("PPL_VAE_CONFIG_DIR", str(tmp_path / "a-file" / "config"))
    with pytest.warns(PplVaeWarning, match="cannot create the program-signing key.*recorded unsigned"):
        run_dir = recorded_run(tmp_path)
    assert record(run_dir)["signature"] is None
    with pytest.raises(UntrustedProgramError, match="program.json is not signed"):
        build_program(load_spec(run_dir), run_dir)
    assert not marker.exists()
    assert build_program(load_spec(run_dir), run_dir, trust=True).latent == 3 and marker.exists()
