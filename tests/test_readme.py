"""The README's quick-check commands and its Python example run as written."""

import os
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


def test_python_example_runs(tmp_path):
    code = code_block_after("## Evaluate your own model", "python")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "log p(x)" in result.stdout
    # The hierarchy falls back to Monte Carlo KL at z1 and says why; the conditional program is evaluated.
    assert "{'z2': 'analytic', 'z1': 'monte carlo'}" in result.stdout
    assert "its model parent(s) ['z2'] are drawn after it in the guide" in result.stdout
    assert "log p(x | y)" in result.stdout


def test_quick_check_commands_run_as_written(tmp_path, data_root):
    env = {**os.environ, "PPL_VAE_DATA": str(data_root)}
    ppl_vae = Path(sys.executable).parent / "ppl-vae"
    for line in code_block_after("<!-- quick-check -->", "bash").strip().splitlines():
        words = shlex.split(line)
        assert words[0] == "ppl-vae"
        command = [str(ppl_vae)] if ppl_vae.exists() else [sys.executable, "-m", "ppl_vae"]
        result = subprocess.run([*command, *words[1:], "--no-progress"], capture_output=True, text=True,
                                cwd=tmp_path, env=env, timeout=600)
        assert result.returncode == 0, result.stderr
        assert "log p̂(x)" in result.stdout
    assert (tmp_path / "runs" / "quick" / "evaluation.json").is_file()


def test_dataset_and_network_commands_run_as_written(tmp_path, data_root):
    """The README's block of --dataset PATH.npz / --network conv / logistic-mixture commands."""
    import json

    env = {**os.environ, "PPL_VAE_DATA": str(data_root)}
    ppl_vae = Path(sys.executable).parent / "ppl-vae"
    for line in code_block_after("<!-- datasets-check -->", "bash").strip().splitlines():
        words = shlex.split(line)
        if words[0] == "python":
            command = [sys.executable, *words[1:]]
        else:
            assert words[0] == "ppl-vae"
            command = [*([str(ppl_vae)] if ppl_vae.exists() else [sys.executable, "-m", "ppl_vae"]), *words[1:],
                       "--no-progress"]
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
        assert result.returncode == 0, result.stderr
    colour = json.loads((tmp_path / "runs" / "colour" / "evaluation.json").read_text())
    assert colour["bits_per_dim"]["log_evidence"]["mean"] > 0 and colour["data"]["dataset"] == "npz"
    assert json.loads((tmp_path / "runs" / "conv-quick" / "config.json").read_text())["model"]["network"] == "conv"


def test_write_your_own_model_runs_as_written(tmp_path, data_root):
    """The README's program file, saved under its name, and its commands, run in that folder as written."""
    name = re.search(r"<!-- program-file: (\S+) -->", README).group(1)
    (tmp_path / name).write_text(code_block_after(f"<!-- program-file: {name} -->", "python"))
    env = {**os.environ, "PPL_VAE_DATA": str(data_root)}
    ppl_vae = Path(sys.executable).parent / "ppl-vae"
    outputs = []
    for line in code_block_after("<!-- program-commands -->", "bash").strip().splitlines():
        words = shlex.split(line)
        assert words[0] == "ppl-vae"
        command = [str(ppl_vae)] if ppl_vae.exists() else [sys.executable, "-m", "ppl_vae"]
        quiet = ["--no-progress"] if words[1] in ("train", "evaluate") else []
        result = subprocess.run([*command, *words[1:], *quiet], capture_output=True, text=True, cwd=tmp_path,
                                env=env, timeout=600)
        assert result.returncode == 0, (line, result.stderr)
        outputs.append(result.stdout)
    run_dir = tmp_path / "runs" / "ladder"
    assert (run_dir / "program" / name).read_text() == (tmp_path / name).read_text()
    assert "KL at site 'bottom' is Monte Carlo" in outputs[0]
    assert "site 'top':" in outputs[2] and (run_dir / "evaluation.json").is_file()
