"""Q3. How does the KL weight trade rate for distortion? A sweep of beta for the default 784-200-200-50 VAE.

    python experiments/q3_beta_sweep.py         # about 10 minutes on 2 CPU cores

Each beta trains the same model for `epochs` epochs with TrainConfig(beta=...), i.e. the
objective E_q[log p(x|z)] - beta KL. On the first `eval_examples` test images it measures
the rate (KL), the distortion (-E_q[log p(x|z)]), the ELBO and log p̂(x) of the unweighted
model (K = `test_samples`), and the active units (ppl_vae.diagnostics.active_units:
Var_x E_q[z_d|x] > 0.01). One row of samples per beta decodes the same draws z ~ N(0, I).
"""

import torch

import common
from ppl_vae import plots
from ppl_vae.diagnostics import active_units, kl_per_dimension
from ppl_vae.model import VAEConfig
from ppl_vae.train import TrainConfig

NAME = "q3_beta_sweep"

config, args = common.parse_args(NAME, __doc__)
figures, _ = common.output_dirs(args)
timer = common.Timer()
data = common.mnist()
x = data.test[: config["eval_examples"]]
model_config = VAEConfig(latent_dim=config["latent_dim"], hidden_sizes=tuple(config["hidden_sizes"]))
z = torch.randn(config["samples_per_row"], config["latent_dim"], generator=torch.Generator().manual_seed(config["seed"]))

rows, sample_rows = [], []
for beta in config["betas"]:
    train_config = TrainConfig(epochs=config["epochs"], beta=float(beta), seed=config["seed"], train_examples=config["train_examples"],
                               eval_examples=config["eval_examples"], test_samples=config["test_samples"])
    vae, test = common.train_or_load(common.Path(args.runs_dir) / "q3" / f"beta-{beta:g}", train_config, model_config, args.retrain)
    units = active_units(vae.model, vae.guide, x)
    kl_dims = kl_per_dimension(vae.model, vae.guide, x)
    row = {"beta": beta, "active_units": units["num_active"], "informative_units": int((kl_dims > config["informative_kl"]).sum()),
           "kl_per_dimension": kl_dims.tolist(), "train_seconds": test["train_seconds"]}
    for key, value in (("elbo", test["elbo"]), ("reconstruction", test["reconstruction"]), ("kl", test["kl"]["total"]),
                       ("log_px", test["log_evidence"])):
        row[key], row[f"{key}_se"] = value["mean"], value["stderr"]
    rows.append(row)
    sample_rows.append((f"β = {beta:g}", vae.decode_mean(z)))
    print(f"beta {beta:g}: KL {row['kl']:.2f}, reconstruction {row['reconstruction']:.2f}, ELBO {row['elbo']:.2f}, "
          f"log p(x) {row['log_px']:.2f}, active units {row['active_units']}, units with KL > {config['informative_kl']}: {row['informative_units']}", flush=True)

sweep = plots.plot_sweep(rows, figures / "q3_rate_distortion.png", parameter="beta", label="KL weight β", dpi=common.DPI)
samples = plots.plot_sample_rows(sample_rows, figures / "q3_samples.png", dpi=common.DPI)
results = {"config": config, "rows": rows, "hardware": common.hardware(), "minutes": timer.minutes()}
k = config["test_samples"]
table_rows = [[f"{r['beta']:g}", f"{r['kl']:.2f} ± {r['kl_se']:.2f}", f"{-r['reconstruction']:.2f} ± {r['reconstruction_se']:.2f}",
               f"{r['elbo']:.2f} ± {r['elbo_se']:.2f}", f"{r['log_px']:.2f} ± {r['log_px_se']:.2f}",
               f"{r['active_units']} / {config['latent_dim']}", f"{r['informative_units']} / {config['latent_dim']}"] for r in rows]
section = f"""
Setup: {model_config.describe()}; for each β, {config['epochs']} epochs on {'all 50,000' if not config['train_examples'] else config['train_examples']} training images
(dynamic binarization), Adam 1e-3, batch 100, seed {config['seed']}, objective E_q[log p(x|z)] - β KL. Measured on the first
{len(x)} test images; ELBO and log p̂(x) (K = {k}) are those of the unweighted model; nats per image ± standard error over images.

"Active units": Var_x E_q[z_d|x] > 0.01 (Burda et al. 2015, ppl_vae.diagnostics.active_units); "units with KL > {config['informative_kl']}":
dimensions whose average KL(q(z_d|x) || p(z_d)) exceeds {config['informative_kl']} nats (ppl_vae.diagnostics.kl_per_dimension).

{common.table(["β", "rate: KL", "distortion: -E_q[log p(x|z)]", "ELBO", f"log p̂(x), K={k}", "active units",
               f"units with KL > {config['informative_kl']}"], table_rows)}

![rate-distortion]({common.relative(sweep)})

Samples E[x|z] for the same {config['samples_per_row']} draws z ~ N(0, I), one row per β:

![samples per beta]({common.relative(samples)})

{common.time_line(timer, sum(r['train_seconds'] for r in rows), results['hardware'])}
"""
common.write_results(NAME, results, section, args)
