"""How many nats is the label worth? A conditional VAE against the unconditional VAE of the same networks.

    python experiments/conditional.py          # about 10 minutes on 2 CPU cores

Trains, with the same epochs, batch, seed and data (dynamically binarized MNIST), the
built-in conditional program (`ppl-vae train --program conditional --labels`:
p(z) p(x | z, y), q(z | x, y), y one-hot beside x and z) and the built-in VAE of the
same networks (latent_dim, hidden_sizes, activation of the config); evaluates both with
`ppl-vae evaluate --num-samples K --examples N` on the same first N test images, and
pairs them per image: log p̂(x | y) - log p̂(x), the mean over images of the per-image
differences ± its standard error (`ppl-vae compare` tables both runs, but pairs only runs
whose evidence is of the same quantity, so this difference of two quantities is taken here,
by name). The samples for each digit are
`ppl-vae plot`'s samples_by_class.png of the conditional run. Configuration is plain
data; the work is done by the `ppl-vae` commands.
"""

import csv
import json
import shutil
import sys
from pathlib import Path

import common
from ppl_vae import runs
from ppl_vae.cli import main
from ppl_vae.compare import paired_difference
from ppl_vae.evaluation_files import read_per_datapoint

NAME = "conditional"


def run(argv: list[str]) -> None:
    """``ppl-vae ARGV``; a failing command (its error already printed) stops the script before it reads stale results."""
    code = main(argv)
    if code:
        sys.exit(code)


config, args = common.parse_args(NAME, __doc__)
figures, _ = common.output_dirs(args)
timer = common.Timer()
runs_dir = Path(args.runs_dir) / NAME
kwargs = {"latent_dim": config["latent_dim"], "hidden_sizes": config["hidden_sizes"], "activation": config["activation"]}
shared = ["--epochs", str(config["epochs"]), "--batch-size", str(config["batch_size"]), "--seed", str(config["seed"]),
          "--eval-examples", str(config["eval_examples"]), "--test-samples", "10", "--evidence-every", "0", "--no-progress"]
shared += ["--train-examples", str(config["train_examples"])] if config["train_examples"] else []
programs = {
    "unconditional": ["--latent-dim", str(config["latent_dim"]), "--hidden-sizes", *map(str, config["hidden_sizes"]),
                      "--activation", config["activation"]],
    "conditional": ["--program", "conditional", "--program-kwargs", json.dumps(kwargs), "--labels"],
}
settings = {"epochs": config["epochs"], "batch_size": config["batch_size"], "seed": config["seed"],
            "train_examples": config["train_examples"]}


def same_run(run_dir: Path, name: str) -> bool:
    """A finished run in ``run_dir`` trained with this config's settings and networks."""
    if not all((run_dir / f).is_file() for f in ("test.json", runs.CONFIG_FILE)):
        return False
    saved = runs.read_json(run_dir / runs.CONFIG_FILE)
    if any(saved["train"].get(k) != v for k, v in settings.items()):
        return False
    if name == "conditional":
        return (run_dir / "program.json").is_file() and runs.read_json(run_dir / "program.json")["kwargs"] == kwargs
    return {k: saved["model"].get(k) for k in kwargs} == kwargs


for name, options in programs.items():
    run_dir = runs_dir / name
    if same_run(run_dir, name) and not args.retrain:
        print(f"loading the finished run {run_dir}", flush=True)
        common.LOADED.append(str(run_dir))
    else:
        print(f"training {run_dir}: {config['epochs']} epochs", flush=True)
        run(["train", "--run-dir", str(run_dir), *shared, *options, "--overwrite"])
    run(["evaluate", str(run_dir), "--num-samples", str(config["k"]), "--examples", str(config["examples"]), "--no-progress"])

comparison = runs_dir / "comparison"
run(["compare", str(runs_dir / "unconditional"), str(runs_dir / "conditional"), "--out", str(comparison)])
rows = {Path(row["run"]).name: row for row in csv.DictReader((comparison / "comparison.csv").open())}
assert (rows["unconditional"]["quantity"], rows["conditional"]["quantity"]) == ("log p(x)", "log p(x | y)")
# compare leaves runs of different quantities unpaired; this difference of two quantities is the question asked.
per_image = {name: read_per_datapoint(runs_dir / name)["log_evidence"] for name in programs}
run(["plot", str(runs_dir / "conditional")])
figures.mkdir(parents=True, exist_ok=True)
samples = figures / "conditional_samples_by_class.png"
shutil.copyfile(runs_dir / "conditional" / "plots" / "samples_by_class.png", samples)

mean, stderr = paired_difference(per_image["unconditional"], per_image["conditional"])
difference = {"mean": mean, "stderr": stderr}
models = {}
for name in programs:
    result = runs.read_json(runs_dir / name / runs.EVALUATION_FILE)
    metrics = runs.read_metrics(runs_dir / name)
    models[name] = {"log_px": result["log_evidence"], "elbo": result["elbo"], "reconstruction": result["reconstruction"],
                    "kl": result["kl"]["total"], "images": result["num_datapoints"], "k": result["log_evidence"]["num_samples"],
                    "model": result.get("model"), "train_seconds": metrics[-1]["train_seconds"], "epochs": metrics[-1]["epoch"]}
results = {"config": config, "models": models, "log_px_given_y_minus_log_px": difference, "hardware": common.hardware(),
           "minutes": timer.minutes()}
images, k = models["conditional"]["images"], models["conditional"]["k"]
table_rows = [[name, models[name]["model"], common.fmt(models[name]["elbo"]), common.fmt(models[name]["reconstruction"]),
               common.fmt(models[name]["kl"]), common.fmt(models[name]["log_px"])] for name in programs]
section = f"""
Setup: the built-in VAE and the conditional program (`--program conditional --labels`) with the same networks
(latent {config['latent_dim']}, hidden {config['hidden_sizes']}, {config['activation']}; the conditional one also takes
the one-hot label beside x in the guide and beside z in the decoder), each {config['epochs']} epoch(s) on
{'all 50,000' if not config['train_examples'] else config['train_examples']} training images (dynamic binarization),
Adam 1e-3, batch {config['batch_size']}, seed {config['seed']}. Both evaluated by `ppl-vae evaluate --num-samples {k}
--examples {images}` on the same first {images} test images; nats per image ± standard error over images.

{common.table(["run", "model", "ELBO", "E_q[log p(x|z)]", "KL", f"log p̂, K={k}"], table_rows)}

**The label is worth {common.fmt(difference)} nats per image**: log p̂(x | y) - log p̂(x), the mean over the {images} images
of the per-image differences ± its standard error (paired on the same images). Were p(x | y) and
p(x) = sum_y p(y) p(x | y) one joint model, the difference would be log p(y | x) - log p(y) ≤ log 10 = 2.30 nats
(uniform p(y)); here they are two separately trained models, so it also holds how much better one network fits its
data than the other, and either sign is possible at a small budget.

Samples E[x | z, y], z ~ p(z), eight per digit (one row per label 0-9, `ppl-vae plot`):

![samples by class]({common.relative(samples)})

{common.time_line(timer, sum(m['train_seconds'] for m in models.values()), results['hardware'])}
"""
common.write_results(NAME, results, section, args)
