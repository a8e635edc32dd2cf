"""Every script in experiments/ runs end to end at tiny sizes (the real runs take minutes to hours).

Each script runs as the READMEs show it, ``python experiments/X.py ...``, with its working folder a
temporary one and every output pointed there: in this process (``runpy``, as ``python`` runs a script: its
folder first on sys.path, ``sys.argv``, ``__main__``; its exit status from ``SystemExit``), since the
scripts call the package in-process too and starting Python for each would cost seconds of imports. The question scripts
(q1-q5) read a copy of their real config whose ``"quick"`` block is shrunk further (tiny
networks, 200 training images, a few test images) and run with ``--quick``, which puts their
runs, figures and results under ``--runs-dir``. No test may write into the repository's
experiments/results or experiments/figures: an autouse fixture compares them before and after.
The data is a small copy of MNIST (conftest's ``small_data_root``): the scripts read it in milliseconds.
"""

import contextlib
import io
import json
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import Ran

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"
COMMITTED = (EXPERIMENTS / "results", EXPERIMENTS / "figures")

# Shared by q1 and q5: with the same settings q5 loads q1's KL-weight-1 model instead of training it.
TINY_2D = {"hidden_sizes": [8], "epochs": 1, "train_examples": 200, "eval_examples": 20, "test_samples": 3, "seed": 0}
TINY = {"latent_dim": 2, "hidden_sizes": [8], "epochs": 1, "train_examples": 200, "eval_examples": 12, "test_samples": 3}


def _snapshot() -> dict[Path, tuple[int, int]]:
    return {path: (path.stat().st_mtime_ns, path.stat().st_size)
            for folder in COMMITTED for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(autouse=True)
def committed_outputs_untouched():
    before = _snapshot()
    yield
    after = _snapshot()
    changed = sorted(str(p.relative_to(REPO)) for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not changed, f"a script wrote into the repository's committed outputs: {changed}"


def run_script(script: str, *args, cwd: Path, data_root: Path, env: dict | None = None, check: bool = True):
    """``python experiments/SCRIPT ARGS`` in ``cwd``, in this process; with ``check``, its exit status must be 0.

    Returns what a shell would see (exit status, stdout, stderr): an exit through ``sys.exit(message)`` prints the
    message and exits with 1, as Python does; any other exception fails the test, as its traceback would."""
    path = EXPERIMENTS / script
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        for name, value in {"PPL_VAE_DATA": str(data_root), "OMP_NUM_THREADS": "1", **(env or {})}.items():
            patch.setenv(name, value)
        patch.chdir(cwd)
        patch.setattr(sys, "argv", [str(path), *map(str, args)])
        patch.syspath_prepend(str(EXPERIMENTS))
        threads = torch.get_num_threads()
        try:
            runpy.run_path(str(path), run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code if exit_.code is None or isinstance(exit_.code, int) else 1
            if code == 1 and not isinstance(exit_.code, int):
                print(exit_.code, file=sys.stderr)
        finally:
            torch.set_num_threads(threads)  # a script's --threads stays in its run
            if "matplotlib.pyplot" in sys.modules:
                sys.modules["matplotlib.pyplot"].close("all")  # figures a script left open
    result = Ran(code or 0, stdout.getvalue(), stderr.getvalue())
    if check:
        assert result.returncode == 0, (f"{script} exited with {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
                                        f"--- stderr\n{result.stderr[-4000:]}")
    return result


def run_question(name: str, tmp_path: Path, data_root: Path, **overrides):
    """Run experiments/NAME.py --quick on its real config with ``overrides`` added to the quick block.

    Returns (stdout, results JSON, Markdown section, figures folder).
    """
    config = json.loads((EXPERIMENTS / "configs" / f"{name}.json").read_text())
    config["quick"] = {**config.get("quick", {}), **overrides}
    config_path = tmp_path / f"{name}.json"
    config_path.write_text(json.dumps(config))
    stdout = run_script(f"{name}.py", "--config", config_path, "--quick", "--runs-dir", tmp_path / "runs",
                        cwd=tmp_path, data_root=data_root).stdout
    outputs = tmp_path / "runs" / "quick" / "outputs"
    results = json.loads((outputs / "results" / f"{name}.json").read_text())
    section = (outputs / "results" / f"{name}.md").read_text()
    assert section.strip() and section.strip() in stdout  # --quick prints the section instead of editing the README
    for key, value in overrides.items():
        assert results["config"][key] == value, key  # the tiny settings arrived
    return stdout, results, section, outputs / "figures"


def assert_figures(folder: Path, *names: str) -> None:
    for name in names:
        path = folder / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_q1_and_q5_share_the_2d_model(tmp_path, small_data_root):
    # The real configs agree on everything that decides the shared run, so q5 reuses q1's model there too.
    shared = ("latent_dim", "hidden_sizes", "epochs", "train_examples", "eval_examples", "test_samples", "seed")
    q1, q5 = (json.loads((EXPERIMENTS / "configs" / f"{n}.json").read_text()) for n in ("q1_kl_term", "q5_bayes_2d"))
    assert {k: q1[k] for k in shared} == {k: q5[k] for k in shared}
    assert {k: q1["quick"].get(k) for k in shared} == {k: q5["quick"].get(k) for k in shared}

    stdout, results, section, figures = run_question(
        "q1_kl_term", tmp_path, small_data_root, **TINY_2D, code_examples=50, figure_steps=4, score_steps=5,
        occupancy_cells=4, classifier_epochs=1, prior_draws=20, dpi=20)
    assert set(results["models"]) == {"VAE", "autoencoder"}
    for model in results["models"].values():
        assert model["test"]["num_datapoints"] == 20
        assert 0 <= model["grid_confident_share"] <= 1 and 0 < model["occupancy"] <= 1
    assert "| VAE | 1 |" in section and "| autoencoder | 0.0001 |" in section
    assert_figures(figures, "q1_latent_spaces.png")
    assert (tmp_path / "runs" / "quick" / "2d" / "kl-1" / "test.json").is_file()

    stdout, results, section, figures = run_question(
        "q5_bayes_2d", tmp_path, small_data_root, **TINY_2D, images=6, points=41, zoom_points=21,
        importance_samples=[1, 25], elbo_samples=3, aggregate_images=30, figure_points=15)
    assert "loading the finished run" in stdout and "kl-1" in stdout
    assert [row["K"] for row in results["importance_sampling"]] == [1, 25]
    assert math.isfinite(results["grid"]["log_px"]["mean"]) and math.isfinite(results["gap"]["mean"])
    # Quadrature and importance sampling estimate the same log p(x).
    assert abs(results["importance_sampling"][-1]["difference"]["mean"]) < 5
    assert set(results["chosen_images"]) == {"median gap", "largest gap", "90th percentile gap", "smallest gap"}
    assert_figures(figures, "q5_densities.png", "q5_evidence_check.png")


def test_q2_sample_vs_mean(tmp_path, small_data_root):
    stdout, results, section, figures = run_question(
        "q2_sample_vs_mean", tmp_path, small_data_root, **TINY, reconstruction_samples=2, images_per_row=3, proposal_scales=[0.3])
    assert set(results["models"]) == {"sampled", "mean-fed"}
    assert list(results["mean_fed_proposals"]) == ["0.3"]
    assert 0 <= results["part1"]["share_mean_higher"] <= 1
    assert "training the sampled model" in stdout and "training the mean-fed model" in stdout
    assert_figures(figures, "q2_jensen.png", "q2_scales.png", "q2_bounds.png", "q2_images.png")
    assert (tmp_path / "runs" / "quick" / "q2" / "mean-fed.pt").is_file()


def test_q3_beta_sweep(tmp_path, small_data_root):
    stdout, results, section, figures = run_question(
        "q3_beta_sweep", tmp_path, small_data_root, **TINY, betas=[0.5, 2], samples_per_row=3)
    assert [row["beta"] for row in results["rows"]] == [0.5, 2]
    assert all(len(row["kl_per_dimension"]) == 2 for row in results["rows"])
    assert re.search(r"^\| 0\.5 \|", section, re.M) and re.search(r"^\| 2 \|", section, re.M)
    assert_figures(figures, "q3_rate_distortion.png", "q3_samples.png")


def test_q4_collapse(tmp_path, small_data_root):
    stdout, results, section, figures = run_question(
        "q4_collapse", tmp_path, small_data_root, **TINY, obs_scales=[0.5, 3], samples_per_row=3)
    assert [row["obs_scale"] for row in results["rows"]] == [0.5, 3]
    assert len(results["eigenvalues_top10"]) == 10 and results["eigenvalues_top10"][0] > 0
    assert all(0 <= row["ppca_units"] <= 2 for row in results["rows"])
    assert "First collapsed scale:" in section
    assert_figures(figures, "q4_collapse.png", "q4_samples.png")


def test_conditional(tmp_path, small_data_root):
    stdout, results, section, figures = run_question(
        "conditional", tmp_path, small_data_root, latent_dim=2, hidden_sizes=[8], epochs=1, train_examples=200,
        eval_examples=12, examples=12, k=3)
    assert set(results["models"]) == {"unconditional", "conditional"}
    for model in results["models"].values():
        assert model["images"] == 12 and model["k"] == 3 and model["epochs"] == 1
    runs = tmp_path / "runs" / "quick" / "conditional"
    # The paired difference is compare's, from the two runs' per-image log p̂ on the same images.
    import numpy
    per_image = {name: numpy.load(runs / name / "evaluation_per_datapoint.npz")["log_evidence"] for name in results["models"]}
    differences = per_image["conditional"] - per_image["unconditional"]
    assert results["log_px_given_y_minus_log_px"]["mean"] == pytest.approx(float(differences.mean()), abs=1e-6)
    assert results["log_px_given_y_minus_log_px"]["stderr"] == pytest.approx(float(differences.std(ddof=1) / math.sqrt(12)), abs=1e-6)
    assert json.loads((runs / "conditional" / "config.json").read_text())["train"]["labels"] is True
    assert json.loads((runs / "unconditional" / "config.json").read_text())["train"]["labels"] is False
    assert "The label is worth" in section and "on the same first 12 test images" in section
    assert_figures(figures, "conditional_samples_by_class.png")
    # A second run loads both finished runs instead of training them again.
    stdout, *_ = run_question("conditional", tmp_path, small_data_root, latent_dim=2, hidden_sizes=[8], epochs=1, train_examples=200,
                              eval_examples=12, examples=12, k=3)
    assert stdout.count("loading the finished run") == 2


def test_priors(tmp_path, small_data_root):
    out = tmp_path / "comparison"
    run_script("priors.py", tmp_path / "runs", "--epochs", "1", "--train-examples", "100", "--eval-examples", "10",
               "--examples", "10", "--k", "3", "--hidden-sizes", "8", "--latent-dim", "2", "--vamp-components", "3",
               "--out", out, cwd=tmp_path, data_root=small_data_root)
    variants = ["standard", "vamp", "iaf-guide", "mixture", "flow-prior"]
    table = (out / "comparison.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == variants
    assert (out / "comparison.csv").is_file() and (out / "comparison.png").is_file()
    for name in variants:
        run_dir = tmp_path / "runs" / name
        assert json.loads((run_dir / "evaluation.json").read_text())["num_datapoints"] == 10
        config = json.loads((run_dir / "config.json").read_text())
        assert config["train"]["train_examples"] == 100 and config["train"]["eval_examples"] == 10
        assert list(config["model"]["hidden_sizes"]) == [8]
    assert json.loads((tmp_path / "runs" / "vamp" / "config.json").read_text())["model"]["prior_components"] == 3


def test_elbo_surgery(tmp_path, small_data_root):
    out = tmp_path / "surgery.md"
    stdout = run_script("elbo_surgery.py", tmp_path / "runs", "--epochs", "1", "--k", "3", "--train-examples", "100",
                        "--examples", "20", "--hidden-sizes", "8", "--out", out, cwd=tmp_path, data_root=small_data_root).stdout
    text = out.read_text()
    assert text.strip() in stdout
    assert [line.split("|")[1].strip() for line in text.splitlines() if re.match(r"\| \d", line)] == ["2", "10", "20"]
    assert "Measured on the 20 test images" in text and f"bounded by log N: {math.log(20):.2f} here" in text
    for latent_dim in (2, 10, 20):
        config = json.loads((tmp_path / "runs" / f"latent-{latent_dim}" / "config.json").read_text())
        assert config["model"]["latent_dim"] == latent_dim and list(config["model"]["hidden_sizes"]) == [8]
        assert config["train"]["train_examples"] == 100


def test_elbo_surgery_stops_when_a_command_fails(tmp_path, small_data_root):
    # A finished-looking run without a checkpoint: `ppl-vae evaluate` fails. The script must stop there, not
    # report the stale evaluation.json left beside it.
    run_dir = tmp_path / "runs" / "latent-2"
    run_dir.mkdir(parents=True)
    (run_dir / "test.json").write_text("{}")
    (run_dir / "evaluation.json").write_text(json.dumps({"stale": True}))
    result = run_script("elbo_surgery.py", tmp_path / "runs", "--out", tmp_path / "surgery.md", cwd=tmp_path,
                        data_root=small_data_root, check=False)
    assert result.returncode == 2, result.stderr
    assert "ppl-vae evaluate: error" in result.stderr
    assert not (tmp_path / "surgery.md").exists()


def test_reproduce(tmp_path, small_data_root):
    out = tmp_path / "reproduce"
    run_script("reproduce.py", "burda2015-vae-k1", "--epochs", "2", "--every", "1", "--runs-dir", tmp_path / "runs",
               "--k", "3", "--examples", "10", "--train-examples", "100", "--eval-examples", "10", "--out", out,
               "--engine", "jit", cwd=tmp_path, data_root=small_data_root)
    text = (out / "burda2015-vae-k1.md").read_text()
    assert "trained 2 of 3280 epochs" in text and "| -86.76 |" in text and "K=3 (10 images)" in text
    assert (out / "burda2015-vae-k1.png").stat().st_size > 0 and "![learning curve](burda2015-vae-k1.png)" in text
    assert "| … mutual information I(x; z)" in text and "| KL(q(z\\|x) ‖ p(z)) |" in text
    assert re.search(r"^\| 1 \| -?\d", text, re.M) and re.search(r"^\| 2 \| -?\d", text, re.M)  # the learning curve
    config = json.loads((tmp_path / "runs" / "burda2015-vae-k1" / "config.json").read_text())["train"]
    assert config["batch_size"] == 20 and config["train_examples"] == 100 and config["epochs"] == 2
    assert config["engine"] == "jit"  # and --resume continues with the run's own engine
    run_script("reproduce.py", "burda2015-vae-k1", "--epochs", "3", "--resume", "--runs-dir", tmp_path / "runs",
               "--k", "3", "--examples", "10", "--out", out, cwd=tmp_path, data_root=small_data_root)
    text = (out / "burda2015-vae-k1.md").read_text()
    assert "trained 3 of 3280 epochs" in text and re.search(r"^\| 3 \| -?\d", text, re.M)  # continued, curve kept
    config = json.loads((tmp_path / "runs" / "burda2015-vae-k1" / "config.json").read_text())["train"]
    assert config["epochs"] == 3 and config["engine"] == "jit"  # the record says how far the run was trained
    (out / "burda2015-vae-k1.md").unlink()
    run_script("reproduce.py", "burda2015-vae-k1", "--report-only", "--runs-dir", tmp_path / "runs", "--out", out,
               cwd=tmp_path, data_root=small_data_root)
    assert (out / "burda2015-vae-k1.md").read_text() == text  # the same table, from the saved evaluation

    summary = json.loads((out / "burda2015-vae-k1.json").read_text())
    assert summary["epochs"] == 3 and summary["published_epochs"] == 3280 and summary["engine"] == "jit"
    assert summary["test"]["images"] == 10 and summary["test"]["num_samples"] == 3
    assert f"{summary['test']['log_px']:.2f} ± {summary['test']['log_px_stderr']:.2f}" in text
    assert [point["epoch"] for point in summary["learning_curve"]] == [1, 2, 3]
    main_readme = tmp_path / "README.md"
    main_readme.write_text("top\n<!-- begin burda2015-table -->\nold\n<!-- end burda2015-table -->\nbottom\n")
    stdout = run_script("update_readme.py", "--results", tmp_path, "--readme", tmp_path / "experiments-README.md",
                        "--main-readme", main_readme, cwd=tmp_path, data_root=small_data_root).stdout
    assert "updated the section burda2015-table (1 rows)" in stdout
    table = main_readme.read_text()
    assert table.startswith("top\n<!-- begin burda2015-table -->\n| row |") and table.endswith("<!-- end burda2015-table -->\nbottom\n")
    row = next(line for line in table.splitlines() if line.startswith("| VAE, k=1"))
    t = summary["test"]
    assert f"| -86.76 | {t['log_px']:.2f} ± {t['log_px_stderr']:.2f} | 10 | {t['log_px'] + 86.76:+.2f} |" in row
    assert f"| {t['active_units']} |" in row and "3 of 3,280 epochs, batch 20" in row


def test_bench(tmp_path, small_data_root):
    out = tmp_path / "bench.json"
    stdout = run_script("bench.py", "--batch-sizes", "8", "--repeats", "1", "--steps", "2", "--evidence-examples", "10",
                        "--evidence-samples", "10", "--no-epoch", "--out", out, cwd=tmp_path, data_root=small_data_root).stdout
    result = json.loads(out.read_text())
    assert result["steps_per_repeat"] == 2 and [row["batch_size"] for row in result["svi_step"]][:1] == [8]
    assert f"written to {out}" in stdout


def test_plateau(tmp_path, small_data_root):
    stdout = run_script("plateau.py", "--prior", "vamp", "--prior-components", "3", "--hidden-sizes", "8", "--latent-dim", "2",
                        "--steps", "100", "--batch-size", "10", "--train-examples", "200", cwd=tmp_path, data_root=small_data_root).stdout
    assert "vamp(3) prior" in stdout
    rows = [line.split() for line in stdout.splitlines() if re.match(r"\s*\d+\s", line)]
    assert [row[0] for row in rows] == ["100"] and all(math.isfinite(float(v)) for v in rows[0][1:])


def test_update_readme_puts_each_section_between_its_markers(tmp_path, small_data_root):
    results = tmp_path / "results"
    results.mkdir()
    (results / "q1_kl_term.md").write_text("new q1 text\n")
    (results / "q9_unmarked.md").write_text("no markers for this one\n")
    (results / "elbo_surgery.md").write_text("not a q* section\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- begin q1_kl_term -->\nold q1 text\n<!-- end q1_kl_term -->\nafter\n"
                      "<!-- begin elbo_surgery -->\nkept\n<!-- end elbo_surgery -->\n")
    stdout = run_script("update_readme.py", "--results", results, "--readme", readme, cwd=tmp_path, data_root=small_data_root).stdout
    assert readme.read_text() == ("intro\n<!-- begin q1_kl_term -->\nnew q1 text\n<!-- end q1_kl_term -->\nafter\n"
                                  "<!-- begin elbo_surgery -->\nkept\n<!-- end elbo_surgery -->\n")
    assert stdout.splitlines() == ["updated the section q1_kl_term"]


def test_run_all_runs_every_question_in_order_and_stops_at_a_failure(tmp_path):
    # The real scripts are tested above; here a stand-in `python` records what run_all.sh asks for.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    stub = bin_dir / "python"
    stub.write_text('#!/usr/bin/env bash\n[ -f "$1" ] || exit 3\necho "$PWD $*" >> "$CALLS"\n'
                    '[ "$1" != "$FAIL_ON" ]\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(log), "FAIL_ON": ""}
    command = ["bash", str(EXPERIMENTS / "run_all.sh"), "--quick", "--runs-dir", str(tmp_path / "runs")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    order = ["q1_kl_term", "q5_bayes_2d", "q2_sample_vs_mean", "q3_beta_sweep", "q4_collapse"]
    assert log.read_text().splitlines() == [f"{EXPERIMENTS} {name}.py --quick --runs-dir {tmp_path / 'runs'}" for name in order]
    assert sorted(p.stem for p in EXPERIMENTS.glob("q*.py")) == sorted(order)  # no question left out

    log.unlink()
    result = subprocess.run(command, cwd=tmp_path, env={**env, "FAIL_ON": "q5_bayes_2d.py"}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert [line.split()[1] for line in log.read_text().splitlines()] == ["q1_kl_term.py", "q5_bayes_2d.py"]


@pytest.mark.parametrize("config_path", sorted((EXPERIMENTS / "configs").glob("burda2015-*.json")), ids=lambda p: p.stem)
def test_reproduction_config_trains_one_step(config_path, tmp_path, small_data_root, monkeypatch):
    """Each row's config loads as `train --config` and takes one step of its own objective and particle count."""
    from ppl_vae.cli import main

    monkeypatch.setenv("PPL_VAE_DATA", str(small_data_root))
    config = json.loads(config_path.read_text())
    run_dir = tmp_path / config_path.stem
    code = main(["train", "--config", str(config_path), "--run-dir", str(run_dir), "--epochs", "1",
                 "--train-examples", str(config["batch_size"]), "--eval-examples", "5", "--test-samples", "2",
                 "--no-progress"])
    assert code == 0
    recorded = json.loads((run_dir / "config.json").read_text())
    for key in ("objective", "particles", "batch_size", "lr_milestones", "lr_gamma", "binarize"):
        assert recorded["train"][key] == config[key], key
    assert recorded["train"]["learning_rate"] == config["lr"]
    if "program" in config:  # the two-layer rows: the program and its options, recorded to rebuild it
        program = json.loads((run_dir / "program.json").read_text())
        assert program["name"] == config["program"] == "two-layer" and program["kwargs"] == config["program_kwargs"]
        assert recorded["model"] is None
    else:
        for key in ("hidden_sizes", "activation", "latent_dim"):
            assert recorded["model"][key] == config[key], key
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1] and math.isfinite(metrics[0]["train_elbo"])
    assert metrics[0]["train_elbo"] < 0  # nats per image of a Bernoulli model: a log-probability of 784 pixels
