"""The README's quick-check commands and its Python example run as written.

The blocks run in this process (their code with ``exec``, their commands through ``ppl_vae.cli.main``, in the
folder a reader would be in), which checks the same words and saves starting a Python process per line; the
``ppl-vae`` console script is started as a shell starts it in tests/test_cli.py. The data folder is the small
copy of MNIST (conftest's ``small_data_root``) wherever a block's sizes fit in it, else the full files."""

import re
import shlex
import subprocess
import sys
from pathlib import Path


README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def code_block_after(marker: str, language: str) -> str:
    match = re.search(re.escape(marker) + r".*?```" + language + r"\n(.*?)```", README, re.S)  # the first such block after it
    assert match, f"no {language} block after {marker!r} in README.md"
    return match.group(1)


def test_python_example_runs(tmp_path, monkeypatch, capsys):
    code = code_block_after("## Evaluate your own model", "python")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (Evaluate your own model)", "exec"), {"__name__": "__main__"})
    stdout = capsys.readouterr().out
    assert "log p(x)" in stdout
    # The hierarchy falls back to Monte Carlo KL at z1 and says why; the conditional program is evaluated.
    assert "{'z2': 'analytic', 'z1': 'monte carlo'}" in stdout
    assert "its model parent(s) ['z2'] are drawn after it in the guide" in stdout
    assert "log p(x | y)" in stdout


def test_quick_check_commands_run_as_written(tmp_path, data_root, monkeypatch, cli_main):
    """Through ``ppl_vae.cli.main``, in the folder a reader would be in, on the full MNIST files: the console script
    ``ppl-vae`` itself is started as a shell starts it by tests/test_cli.py (its --help), and a process per line here
    would add two starts of torch and Pyro to the suite and check no more of these words."""
    monkeypatch.chdir(tmp_path)
    for line in code_block_after("<!-- quick-check -->", "bash").strip().splitlines():
        words = shlex.split(line)
        assert words[0] == "ppl-vae"
        result = cli_main(*words[1:], "--no-progress", data_root=data_root)
        assert result.returncode == 0, result.stderr
        assert "log p̂(x)" in result.stdout
    assert (tmp_path / "runs" / "quick" / "evaluation.json").is_file()


def test_dataset_and_network_commands_run_as_written(tmp_path, small_data_root, monkeypatch, cli_main):
    """The README's block of --dataset PATH.npz / --network conv / logistic-mixture commands."""
    import json

    monkeypatch.chdir(tmp_path)
    for line in code_block_after("<!-- datasets-check -->", "bash").strip().splitlines():
        words = shlex.split(line)
        if words[0] == "python":
            result = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, timeout=600)
        else:
            assert words[0] == "ppl-vae"
            result = cli_main(*words[1:], "--no-progress", data_root=small_data_root)
        assert result.returncode == 0, result.stderr
    colour = json.loads((tmp_path / "runs" / "colour" / "evaluation.json").read_text())
    assert colour["bits_per_dim"]["log_evidence"]["mean"] > 0 and colour["data"]["dataset"] == "npz"
    assert json.loads((tmp_path / "runs" / "conv-quick" / "config.json").read_text())["model"]["network"] == "conv"


def test_write_your_own_model_runs_as_written(tmp_path, small_data_root, monkeypatch, cli_main):
    """The README's program file, saved under its name, and its commands, run in that folder as written."""
    name = re.search(r"<!-- program-file: (\S+) -->", README).group(1)
    (tmp_path / name).write_text(code_block_after(f"<!-- program-file: {name} -->", "python"))
    monkeypatch.chdir(tmp_path)
    outputs = []
    for line in code_block_after("<!-- program-commands -->", "bash").strip().splitlines():
        words = shlex.split(line)
        assert words[0] == "ppl-vae"
        quiet = ["--no-progress"] if words[1] in ("train", "evaluate") else []
        result = cli_main(*words[1:], *quiet, data_root=small_data_root)
        assert result.returncode == 0, (line, result.stderr)
        outputs.append(result.stdout)
    run_dir = tmp_path / "runs" / "ladder"
    assert (run_dir / "program" / name).read_text() == (tmp_path / name).read_text()
    assert "KL at site 'bottom' is Monte Carlo" in outputs[0]
    assert "site 'top':" in outputs[2] and (run_dir / "evaluation.json").is_file()
