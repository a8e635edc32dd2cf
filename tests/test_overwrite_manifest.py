"""What --overwrite may delete, and where the package writes (issue 24, items 4-7).

A run records every file and folder it writes in ``manifest.json`` before writing it; ``--overwrite``
deletes only those, checks everything before deleting anything, never follows a symbolic link, and
refuses a folder without a manifest. ``overwrite`` and ``resume`` are taken only from the command line.
No command writes a run's files through a symbolic link, and a lock that cannot be taken stops the command.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_run_safety import EVALUATE, TINY, main, refused, run_cli
from test_train_programs import USER_PROGRAM

from ppl_vae import runs
from ppl_vae.errors import RunDirectoryError


@pytest.fixture(autouse=True)
def data_from_env(small_data_root, monkeypatch):
    monkeypatch.setenv("PPL_VAE_DATA", str(small_data_root))


@pytest.fixture(scope="module")
def program_run(tmp_path_factory, small_data_root) -> Path:
    """A finished 1-epoch run of a user's program file (so it holds program/ and program.json), with its figures."""
    folder = tmp_path_factory.mktemp("program_run")
    source = folder / "my_models.py"
    source.write_text(USER_PROGRAM)
    run_dir = folder / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PPL_VAE_DATA", str(small_data_root))
        assert main("train", "--run-dir", run_dir, "--epochs", "1", *TINY, "--program", f"{source}:LadderVAE") == 0
        assert main("plot", run_dir) == 0
    return run_dir


@pytest.fixture
def run_copy(program_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(program_run, copy, symlinks=True)
    return copy


def snapshot(path: Path) -> dict[str, bytes | str]:
    """Every file under ``path`` (the contents) and every link (its target), lock files left out."""
    found = {}
    for item in sorted(path.rglob("*")):
        name = str(item.relative_to(path))
        if item.is_symlink():
            found[name] = "-> " + os.readlink(item)
        elif item.is_file() and not item.name.startswith(".ppl_vae"):
            found[name] = item.read_bytes()
    return found


def overwrite(run_dir: Path, *extra) -> int:
    return main("train", "--run-dir", run_dir, "--overwrite", "--epochs", "1", *TINY, *extra)


def test_the_manifest_records_every_file_and_folder_the_run_wrote(program_run):
    entries = json.loads((program_run / "manifest.json").read_text())["entries"]
    assert entries == {
        "checkpoint.pt": "file", "checkpoint.prev.pt": "file", "config.json": "file", "data.json": "file",
        "metrics.jsonl": "file", "program": "folder", "program/my_models.py": "file", "program.json": "file",
        "plots": "folder", "plots/training_curves.png": "file", "plots/samples.png": "file", "test.json": "file",
    }
    present = {str(p.relative_to(program_run)) for p in program_run.rglob("*")
               if not p.name.startswith(".ppl_vae") and p.name != "manifest.json"}
    assert present == set(entries)


# --- 4. A folder that only looks like a run ------------------------------------------------------------


def test_overwrite_refuses_a_folder_that_only_looks_like_a_run_and_deletes_nothing(tmp_path, small_data_root):
    folder = tmp_path / "my-project"
    (folder / "program").mkdir(parents=True)
    (folder / "plots").mkdir()
    (folder / "config.json").write_text(json.dumps({"model": {"latent_dim": 2}, "train": {"epochs": 3}}))
    (folder / "program" / "train_my_net.py").write_text("print('my work')\n")
    (folder / "plots" / "figure1.png").write_bytes(b"\x89PNG my figure")
    before = snapshot(folder)
    err = refused(run_cli(small_data_root, "train", "--run-dir", folder, "--overwrite", "--epochs", "1", *TINY))
    assert len(err.strip().splitlines()) == 1
    assert "manifest.json" in err and "it holds config.json, plots/, program/" in err
    assert "Nothing was deleted: delete the folder yourself" in err
    assert snapshot(folder) == before


def test_a_run_of_a_version_before_manifests_is_refused_by_overwrite(run_copy, capsys):
    (run_copy / "manifest.json").unlink()
    before = snapshot(run_copy)
    assert overwrite(run_copy) == 2
    err = capsys.readouterr().err
    assert "has none" in err and "a run of a ppl_vae version before manifests" in err and "yourself" in err
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("name", ["../victim.txt", "/tmp/victim.txt", "plots/../../victim.txt", "notes/victim.txt"])
def test_a_manifest_naming_anything_outside_the_run_is_refused(run_copy, capsys, name):
    victim = run_copy.parent / "victim.txt"
    victim.write_text("keep")
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["entries"][name] = "file"
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(run_copy)
    assert overwrite(run_copy) == 2
    err = capsys.readouterr().err
    assert "is damaged or was not written by ppl_vae" in err and repr(name) in err
    assert victim.read_text() == "keep" and snapshot(run_copy) == before


# --- 5. Links, and files of the user's inside a run's folder -----------------------------------------------


def test_overwrite_refuses_a_linked_program_folder_before_deleting_anything(run_copy, tmp_path, capsys):
    outside = tmp_path / "outside"
    shutil.move(run_copy / "program", outside)  # the user keeps the program elsewhere and links it in
    (run_copy / "program").symlink_to(outside, target_is_directory=True)
    run_before, outside_before = snapshot(run_copy), snapshot(outside)
    assert overwrite(run_copy) == 2
    err = capsys.readouterr().err
    assert "never follows a symbolic link" in err and "holds program" in err and "Nothing was deleted" in err
    assert snapshot(run_copy) == run_before and snapshot(outside) == outside_before
    assert runs.load_checkpoint(run_copy)["epoch"] == 1  # the run is whole: a second try is refused the same way
    assert overwrite(run_copy) == 2 and "never follows a symbolic link" in capsys.readouterr().err


def test_overwrite_refuses_a_linked_file_of_the_run(run_copy, tmp_path, capsys):
    precious = tmp_path / "precious.pt"
    precious.write_bytes(b"a file elsewhere")
    (run_copy / "checkpoint.prev.pt").unlink()
    (run_copy / "checkpoint.prev.pt").symlink_to(precious)
    before = snapshot(run_copy)
    assert overwrite(run_copy) == 2
    assert "holds checkpoint.prev.pt" in capsys.readouterr().err
    assert precious.read_bytes() == b"a file elsewhere" and snapshot(run_copy) == before


def test_overwrite_refuses_a_file_of_the_users_inside_a_run_folder(run_copy, capsys):
    (run_copy / "plots" / "my_figure.png").write_bytes(b"\x89PNG mine")
    (run_copy / "program" / "helpers.py").write_text("# mine\n")
    before = snapshot(run_copy)
    assert overwrite(run_copy) == 2
    err = capsys.readouterr().err
    assert "holds files ppl_vae did not write: plots/my_figure.png, program/helpers.py" in err
    assert snapshot(run_copy) == before


def test_overwrite_replaces_a_run_deleting_only_what_its_manifest_records(run_copy):
    (run_copy / "plots" / "training_curves.png").unlink()  # a recorded file already gone is no obstacle
    (run_copy / ".config.json.k1ll3d.tmp").write_text("half a config")  # left by a kill while writing config.json
    (run_copy / "plots" / ".training_curves.png.k1ll3d.tmp").write_bytes(b"half a figure")
    assert overwrite(run_copy) == 0  # the built-in VAE this time
    left = {str(p.relative_to(run_copy)) for p in run_copy.rglob("*") if not p.name.startswith(".ppl_vae")}
    assert left == {"manifest.json", "config.json", "data.json", "metrics.jsonl", "checkpoint.pt",
                    "checkpoint.prev.pt", "test.json"}
    assert set(json.loads((run_copy / "manifest.json").read_text())["entries"]) == left - {"manifest.json"}
    assert (run_copy / ".ppl_vae.lock").exists()  # lock files are not the run's files: they stay
    assert runs.read_json(run_copy / "config.json")["model"]["latent_dim"] == 4


# --- 6. Actions only from the command line ---------------------------------------------------------------


@pytest.mark.parametrize("action", ["overwrite", "resume"])
def test_a_config_file_may_not_overwrite_or_resume_a_run(run_copy, tmp_path, capsys, action):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"run_dir": str(run_copy), action: True}))
    before = snapshot(run_copy)
    with pytest.raises(SystemExit) as info:
        main("train", "--config", config, "--epochs", "1", *TINY)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"holds ['{action}']: --{action} delete or continue a run, so they are taken only from the command line" in err
    assert snapshot(run_copy) == before


def test_a_config_file_may_name_the_run_directory(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"run_dir": str(tmp_path / "from-file")}))
    assert main("train", "--config", config, "--epochs", "1", *TINY) == 0
    assert runs.read_json(tmp_path / "from-file" / "test.json")["epoch"] == 1


# --- 7. Never written through a link; a lock that cannot be taken stops the command ------------------------


def test_plot_refuses_a_linked_plots_folder_and_leaves_its_target_alone(run_copy, tmp_path, small_data_root):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "training_curves.png").write_bytes(b"someone else's figure")
    shutil.rmtree(run_copy / "plots")
    (run_copy / "plots").symlink_to(outside, target_is_directory=True)
    err = refused(run_cli(small_data_root, "plot", run_copy))
    assert len(err.strip().splitlines()) == 1 and f"{run_copy / 'plots'} is a symbolic link (to {outside})" in err
    assert snapshot(outside) == {"training_curves.png": b"someone else's figure"}


def test_plot_refuses_a_linked_figure(run_copy, tmp_path, capsys):
    outside = tmp_path / "mine.png"
    outside.write_bytes(b"mine")
    (run_copy / "plots" / "training_curves.png").unlink()
    (run_copy / "plots" / "training_curves.png").symlink_to(outside)
    assert main("plot", run_copy) == 2
    assert "training_curves.png is a symbolic link" in capsys.readouterr().err
    assert outside.read_bytes() == b"mine" and (run_copy / "plots" / "training_curves.png").is_symlink()


def test_evaluate_refuses_a_linked_result_file_before_evaluating(run_copy, tmp_path, capsys):
    outside = tmp_path / "evaluation.json"
    outside.write_text("{}")
    (run_copy / "evaluation.json").symlink_to(outside)
    assert main("evaluate", run_copy, *EVALUATE) == 2
    captured = capsys.readouterr()
    assert "evaluation.json is a symbolic link" in captured.err and "ELBO" not in captured.out  # refused up front
    assert outside.read_text() == "{}" and (run_copy / "evaluation.json").is_symlink()


@pytest.mark.parametrize("blocker", ["link", "folder"])
def test_an_evaluation_lock_that_cannot_be_taken_stops_evaluate(run_copy, tmp_path, small_data_root, blocker):
    lock = run_copy / ".ppl_vae.evaluate.lock"
    lock.unlink(missing_ok=True)
    target = tmp_path / "elsewhere.lock"
    if blocker == "link":
        target.write_text("not a lock")
        lock.symlink_to(target)
    else:
        lock.mkdir()
    result = run_cli(small_data_root, "evaluate", run_copy, *EVALUATE)
    err = refused(result)
    assert len(err.strip().splitlines()) == 1 and ".ppl_vae.evaluate.lock" in err
    assert "ELBO" not in result.stdout and not (run_copy / "evaluation.json").exists()
    if blocker == "link":
        assert "is a symbolic link" in err and target.read_text() == "not a lock"


def test_the_run_lock_refuses_a_link_in_its_place(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".ppl_vae.lock").symlink_to(target)
    with pytest.raises(RunDirectoryError, match=r"\.ppl_vae\.lock is a symbolic link"):
        runs.RunLock(run_dir).acquire()
    assert target.read_text() == "keep"
    (run_dir / ".ppl_vae.lock").unlink()
    (run_dir / ".ppl_vae.lock.json").symlink_to(target)  # the holder's record, written beside the lock
    with pytest.raises(RunDirectoryError, match=r"\.ppl_vae\.lock\.json is a symbolic link"):
        runs.RunLock(run_dir).acquire()
    assert target.read_text() == "keep"


def test_record_written_refuses_names_outside_the_run(tmp_path):
    for name in ("../x", "/etc/x", "plots/../x", "notes/x", "plots/a/b", ""):
        with pytest.raises(ValueError, match="no name of a run's file"):
            runs.record_written(tmp_path, name)


def test_the_atomic_writer_replaces_a_link_and_never_writes_through_it(tmp_path):
    """The last line of defence behind the checks: a temporary file renamed over the path replaces a link there."""
    target = tmp_path / "elsewhere.json"
    target.write_text("keep")
    link = tmp_path / "evaluation.json"
    link.symlink_to(target)
    runs.write_json(link, {"new": 1})
    assert not link.is_symlink() and runs.read_json(link) == {"new": 1} and target.read_text() == "keep"
