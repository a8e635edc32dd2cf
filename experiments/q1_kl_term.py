"""Q1. Why the KL term? The same 2-D networks trained with KL weight 1 (a VAE) and ~0 (an autoencoder).

    python experiments/q1_kl_term.py            # about 6 minutes on 2 CPU cores

The KL weight is TrainConfig(beta=...), a poutine.scale on the latent site. It must be
positive there, so the "autoencoder" uses beta = 1e-4: the guide is still a Gaussian, but
the KL barely constrains where the codes go or how wide q(z|x) is. The evaluation ignores
beta: ELBO and log p̂(x) are those of the unweighted model p(z) p(x|z) with the trained guide.

Measured on the test set (first `code_examples` images): the codes' spread, the share of
the decoded grid that a small classifier reads as a digit with probability > `confidence`
(completeness), the share of the box's cells that hold a code (holes), and the RMS pixel
change between neighbouring grid points (continuity).
"""

import torch

import common
from ppl_vae import latent2d, plots
from ppl_vae.data import load_mnist
from ppl_vae.model import VAEConfig
from ppl_vae.train import TrainConfig

NAME = "q1_kl_term"

config, args = common.parse_args(NAME, __doc__)
figures, _ = common.output_dirs(args)
timer = common.Timer()
torch.manual_seed(config["seed"])
data = common.mnist()
x, labels = data.test[: config["code_examples"]], data.test_labels[: config["code_examples"]]
grey = load_mnist(None, "none", "cpu").flattened()
classifier = latent2d.train_digit_classifier(grey.train[: config.get("train_examples")], grey.train_labels[: config.get("train_examples")],
                                             epochs=config["classifier_epochs"], seed=config["seed"])
accuracy = (latent2d.classify(classifier, grey.test)[0] == grey.test_labels).double().mean().item()
print(f"digit classifier: test accuracy {accuracy:.4f}", flush=True)
model_config = VAEConfig(latent_dim=config["latent_dim"], hidden_sizes=tuple(config["hidden_sizes"]))

models, entries = {}, []
for name, beta in config["kl_weights"].items():
    train_config = TrainConfig(epochs=config["epochs"], beta=beta, seed=config["seed"], train_examples=config["train_examples"],
                               eval_examples=config["eval_examples"], test_samples=config["test_samples"])
    vae, test = common.train_or_load(common.Path(args.runs_dir) / "2d" / f"kl-{beta:g}", train_config, model_config, args.retrain)
    codes = latent2d.guide_means(vae, x)
    with torch.no_grad():
        scales = vae.guide_net(x).base_dist.scale
    if name == "VAE":
        low, high = [config["vae_box"][0]] * 2, [config["vae_box"][1]] * 2
    else:
        low, high = latent2d.code_range(codes)
    steps = config["score_steps"]
    decoded = latent2d.decode_grid(vae, low, high, steps)
    prediction, confidence = latent2d.classify(classifier, decoded)
    confident = confidence > config["confidence"]
    change = latent2d.neighbour_change(decoded, steps)
    torch.manual_seed(config["seed"])
    prior_images = vae.sample_prior(config["prior_draws"])
    prior_confident = (latent2d.classify(classifier, prior_images)[1] > config["confidence"]).double().mean().item()
    models[name] = {
        "kl_weight": beta,
        "test": {key: test[key] for key in ("elbo", "reconstruction", "log_evidence", "num_datapoints")} | {"kl": test["kl"]["total"]},
        "train_seconds": test["train_seconds"],
        "code_std": codes.std(0).tolist(),
        "code_abs_max": codes.abs().max(0).values.tolist(),
        "guide_scale_median": scales.median().item(),
        "box_low": [float(v) for v in low],
        "box_high": [float(v) for v in high],
        "grid_confident_share": confident.double().mean().item(),
        "grid_digits_present": sorted(set(prediction[confident].tolist())),
        "occupancy": latent2d.occupancy(codes, low, high, config["occupancy_cells"]),
        "neighbour_change_mean": change.mean().item(),
        "neighbour_change_p95": change.quantile(0.95).item(),
        "prior_draws_confident_share": prior_confident,
    }
    entries.append({"vae": vae, "codes": codes, "labels": labels, "low": low, "high": high,
                    "title": f"{name} (KL weight {beta:g})"})

figure = plots.plot_latent_spaces(entries, figures / "q1_latent_spaces.png", steps=config["figure_steps"], dpi=config.get("dpi", common.DPI))
results = {"config": config, "classifier_test_accuracy": accuracy, "models": models, "hardware": common.hardware(),
           "minutes": timer.minutes()}

n_eval, k = models["VAE"]["test"]["num_datapoints"], config["test_samples"]
evidence_rows = [[name, f"{m['kl_weight']:g}", common.fmt(m["test"]["elbo"]), common.fmt(m["test"]["reconstruction"]),
                  common.fmt(m["test"]["kl"]), common.fmt(m["test"]["log_evidence"]), f"{m['guide_scale_median']:.3g}"]
                 for name, m in models.items()]
space_rows = [[name, f"[{m['box_low'][0]:.3g}, {m['box_high'][0]:.3g}] x [{m['box_low'][1]:.3g}, {m['box_high'][1]:.3g}]",
               f"{m['code_std'][0]:.3g}, {m['code_std'][1]:.3g}", f"{m['grid_confident_share']:.1%}",
               "".join(str(d) for d in m["grid_digits_present"]), f"{m['occupancy']:.1%}",
               f"{m['neighbour_change_mean']:.3f} / {m['neighbour_change_p95']:.3f}", f"{m['prior_draws_confident_share']:.1%}"]
              for name, m in models.items()]
section = f"""
Setup: {model_config.describe()}; {config['epochs']} epochs on {'all 50,000' if not config['train_examples'] else config['train_examples']} training images (dynamic binarization), Adam 1e-3, batch 100, seed {config['seed']}.
Evidence on the first {n_eval} test images (K = {k} importance samples), nats per image, ± standard error over images; the
evaluation is of the unweighted model whatever the KL weight was in training.

{common.table(["model", "KL weight", "ELBO", "reconstruction", "KL", f"log p̂(x), K={k}", "median guide scale"], evidence_rows)}

Latent space, from the guide means of the first {len(x)} test images. "Confident": the decoded image E[x|z] at a point of a
{config['score_steps']}x{config['score_steps']} grid over the box is read as a digit with probability > {config['confidence']} by a
784-256-10 MLP classifier ({config['classifier_epochs']} epochs on the grey-level training images, test accuracy {accuracy:.1%}).
"Cells with a code": share of the box's {config['occupancy_cells']}x{config['occupancy_cells']} cells that hold at least one code.
"Neighbour change": RMS pixel difference between the decoded images of neighbouring grid points (mean / 95th percentile).
"N(0, I) draws": share of {config['prior_draws']} images decoded from z ~ N(0, I) that the classifier reads confidently.

{common.table(["model", "decoded box", "code std (z1, z2)", "confident grid points", "digits among them", "cells with a code",
               "neighbour change", "N(0, I) draws confident"], space_rows)}

![latent spaces]({common.relative(figure)})

{common.time_line(timer, sum(m['train_seconds'] for m in models.values()), results['hardware'])}
"""
common.write_results(NAME, results, section, args)
