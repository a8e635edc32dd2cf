"""Q4. Why does the reconstruction term matter? Weaken it until the posterior collapses.

    python experiments/q4_collapse.py           # about 10 minutes on 2 CPU cores

Grey-level MNIST (dequantized) with a Gaussian likelihood of fixed scale s,
VAEConfig(likelihood="gaussian", obs_scale=s): log p(x|z) = -||x - mu(z)||^2 / (2 s^2) - D log s - (D/2) log 2 pi.
A larger s makes every pixel error cheaper, so the reconstruction term pays less for
information carried by z while the KL still charges for it. (Up to a constant and a factor
s^2, this objective is the s = 1 objective with KL weight beta = s^2: the sweep is a beta sweep.)

Prediction from the linear case: a linear-Gaussian VAE is probabilistic PCA, whose maximum-likelihood
solution keeps the principal directions with variance lambda_i > s^2 and switches off the rest
(Tipping & Bishop 1999; Lucas et al. 2019 for the VAE). The script computes the lambda_i of the
training images and compares the predicted count with the active units of the trained VAEs.
Collapse: KL below `collapse_kl` nats and no active unit; then every z decodes to about the
same image, which the script compares with the mean training image.
"""

import torch

import common
from ppl_vae import plots
from ppl_vae.diagnostics import active_units, kl_per_dimension
from ppl_vae.model import VAEConfig
from ppl_vae.train import TrainConfig

NAME = "q4_collapse"

config, args = common.parse_args(NAME, __doc__)
figures, _ = common.output_dirs(args)
timer = common.Timer()
data = common.mnist("none", dequantize=True)
x = data.test[: config["eval_examples"]]
train_images = data.train[: config["train_examples"]]
mean_image = train_images.mean(0)
centred = train_images.double() - mean_image.double()
eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / len(centred)).flip(0)
z = torch.randn(config["samples_per_row"], config["latent_dim"], generator=torch.Generator().manual_seed(config["seed"]))

rows, sample_rows = [], []
for scale in config["obs_scales"]:
    model_config = VAEConfig(latent_dim=config["latent_dim"], hidden_sizes=tuple(config["hidden_sizes"]),
                             likelihood="gaussian", obs_scale=float(scale))
    train_config = TrainConfig(epochs=config["epochs"], binarize="none", seed=config["seed"], train_examples=config["train_examples"],
                               eval_examples=config["eval_examples"], test_samples=config["test_samples"])
    vae, test = common.train_or_load(common.Path(args.runs_dir) / "q4" / f"scale-{scale:g}", train_config, model_config, args.retrain)
    units = active_units(vae.model, vae.guide, x)
    kl_dims = kl_per_dimension(vae.model, vae.guide, x)
    samples = vae.sample_prior(2000)
    with torch.no_grad():
        reconstructions = vae.decode_mean(vae.guide_net(x).sample())
    row = {
        "obs_scale": scale,
        "active_units": units["num_active"], "informative_units": int((kl_dims > config["informative_kl"]).sum()),
           "kl_per_dimension": kl_dims.tolist(),
        "ppca_units": min(config["latent_dim"], int((eigenvalues > scale**2).sum())),
        "sample_rms_to_mean_image": (samples - mean_image).pow(2).mean(-1).sqrt().mean().item(),
        "sample_pixel_std": samples.std(0).mean().item(),
        "reconstruction_rms_error": (reconstructions - x).pow(2).mean(-1).sqrt().mean().item(),
        "train_seconds": test["train_seconds"],
    }
    for key, value in (("elbo", test["elbo"]), ("reconstruction", test["reconstruction"]), ("kl", test["kl"]["total"]),
                       ("log_px", test["log_evidence"])):
        row[key], row[f"{key}_se"] = value["mean"], value["stderr"]
    row["collapsed"] = row["kl"] < config["collapse_kl"] and row["active_units"] == 0
    rows.append(row)
    sample_rows.append((f"s = {scale:g}", vae.decode_mean(z)))
    print({k: row[k] for k in ("obs_scale", "kl", "active_units", "informative_units", "ppca_units", "sample_rms_to_mean_image", "sample_pixel_std")}, flush=True)

sample_rows.append(("mean training image", mean_image[None]))
sweep = plots.plot_sweep(rows, figures / "q4_collapse.png", parameter="obs_scale", label="Gaussian likelihood scale s", dpi=common.DPI)
samples_figure = plots.plot_sample_rows(sample_rows, figures / "q4_samples.png", dpi=common.DPI)
collapsed = [r["obs_scale"] for r in rows if r["collapsed"]]
results = {"config": config, "rows": rows, "eigenvalues_top10": eigenvalues[:10].tolist(), "first_collapsed_scale": min(collapsed, default=None),
           "hardware": common.hardware(), "minutes": timer.minutes()}
k = config["test_samples"]
table_rows = [[f"{r['obs_scale']:g}", f"{r['obs_scale'] ** 2:g}", f"{r['kl']:.3f} ± {r['kl_se']:.3f}",
               f"{r['active_units']}", f"{r['informative_units']}", f"{r['ppca_units']}", f"{r['reconstruction_rms_error']:.3f}",
               f"{r['sample_rms_to_mean_image']:.3f}", f"{r['sample_pixel_std']:.3f}", f"{r['log_px']:.1f} ± {r['log_px_se']:.1f}",
               "yes" if r["collapsed"] else "no"] for r in rows]
section = f"""
Setup: 784-{'-'.join(str(h) for h in config['hidden_sizes'])}-{config['latent_dim']} tanh MLP, standard prior, Gaussian likelihood N(x; sigmoid(decoder(z)), s² I) with fixed s, diagonal guide; grey levels,
uniformly dequantized; for each s, {config['epochs']} epochs on {'all 50,000' if not config['train_examples'] else config['train_examples']} training images, Adam 1e-3, batch 100, seed {config['seed']}.
Measured on the first {len(x)} test images (nats per image ± standard error; log p̂(x) with K = {k} is a density, so it is not comparable across s).
Largest variances of the training images' pixel covariance (PCA): {', '.join(f'{v:.2f}' for v in eigenvalues[:6].tolist())}, ...
"PPCA units": #{{i: λ_i > s²}} (capped at {config['latent_dim']}), the dimensions a linear VAE would keep. "RMS": root mean square pixel difference
on the [0, 1] scale: of the reconstructions E[x|z], z ~ q(z|x), from the data; of 2000 samples E[x|z], z ~ N(0, I), from the mean
training image; "sample spread": pixel standard deviation across those samples, averaged over pixels. "Active units": Var_x E_q[z_d|x] > 0.01;
"units with KL > {config['informative_kl']}": dimensions whose average KL exceeds {config['informative_kl']} nats. Collapsed: KL < {config['collapse_kl']} nats and no active unit.

{common.table(["s", "β equivalent (s²)", "KL", "active units", f"units with KL > {config['informative_kl']}", "PPCA units", "reconstruction RMS", "samples' RMS to mean image",
               "sample spread", f"log p̂(x), K={k}", "collapsed"], table_rows)}

First collapsed scale: {results['first_collapsed_scale']} (the linear prediction: √λ₁ = {eigenvalues[0].sqrt().item():.2f}).

![collapse sweep]({common.relative(sweep)})

Samples E[x|z] for the same {config['samples_per_row']} draws z ~ N(0, I), one row per s, and the mean training image:

![samples per scale]({common.relative(samples_figure)})

{common.time_line(timer, sum(r['train_seconds'] for r in rows), results['hardware'])}
"""
common.write_results(NAME, results, section, args)
