"""Q5. Which part is the prior, the posterior, the likelihood and the evidence? A 2-D VAE, where all of them can be drawn.

    python experiments/q5_bayes_2d.py           # about 3 minutes on 2 CPU cores, plus 4 to train the 2-D model if q1 has not

The model is the KL-weight-1 model of q1_kl_term.py (same configuration and run directory:
whichever script runs first trains it). On a grid of the 2-D latent space:

* the prior p(z) = N(0, I);
* the likelihood p(x|z) of one test image, as a function of z;
* the guide q(z|x) (the encoder's Gaussian) and the true posterior p(z|x) = p(x|z) p(z) / p(x),
  with p(x) integrated numerically (ppl_vae.latent2d.log_evidence_2d: a global trapezoid grid,
  a fine local grid around each image's posterior and a coarse ring around the global box; its
  error estimate is the change when every other local point is dropped plus the shares of the
  result that come from outside the local box);
* the aggregate posterior q(z) = (1/N) sum_n q(z|x_n) of `aggregate_images` test images.

Then the evidence: log p(x) by quadrature against the importance-sampled estimate
(ppl_vae.evaluate.evidence_estimate) with K = 1 ... 5000, and the ELBO's gap
log p(x) - ELBO = KL(q(z|x) || p(z|x)), exactly, per image.
"""

import time

import pyro
import torch

import common
from ppl_vae import latent2d, plots
from ppl_vae.diagnostics import evidence_with_psis
from ppl_vae.evaluate import elbo_decomposition, evidence_estimate
from ppl_vae.model import VAEConfig
from ppl_vae.train import TrainConfig

NAME = "q5_bayes_2d"

config, args = common.parse_args(NAME, __doc__)
figures, _ = common.output_dirs(args)
timer = common.Timer()
data = common.mnist()
model_config = VAEConfig(latent_dim=config["latent_dim"], hidden_sizes=tuple(config["hidden_sizes"]))
train_config = TrainConfig(epochs=config["epochs"], seed=config["seed"], train_examples=config["train_examples"],
                           eval_examples=config["eval_examples"], test_samples=config["test_samples"])
vae, _ = common.train_or_load(common.Path(args.runs_dir) / "2d" / "kl-1", train_config, model_config, args.retrain)
x = data.test[: config["images"]]
low, high = config["bounds"]

started = time.perf_counter()
grid = latent2d.log_evidence_2d(vae, x, bounds=(low, high), points=config["points"], zoom_points=config["zoom_points"])
grid_seconds = time.perf_counter() - started
global_only = latent2d.log_evidence_2d(vae, x, bounds=(low, high), points=config["points"], zoom=False)
exact = grid.log_evidence
pyro.set_rng_seed(config["seed"])
elbo = elbo_decomposition(vae.model, vae.guide, x, num_samples=config["elbo_samples"])["elbo"]
gap = exact - elbo

importance = []
for k in config["importance_samples"]:
    pyro.set_rng_seed(config["seed"])
    started = time.perf_counter()
    if k == max(config["importance_samples"]):  # the largest K also gives PSIS k-hat
        estimate, psis = evidence_with_psis(vae.model, vae.guide, x, num_samples=k)
    else:
        estimate = evidence_estimate(vae.model, vae.guide, x, num_samples=k)
    seconds = time.perf_counter() - started
    difference = estimate.log_evidence - exact
    row = {"K": k, "log_px": common.summary(estimate.log_evidence), "difference": common.summary(difference),
           "mean_stderr": estimate.stderr.mean().item(), "mean_ess": estimate.ess.mean().item(), "seconds": seconds}
    if k > 1:
        z = difference / estimate.stderr
        row["within_2_se"] = (z.abs() < 2).double().mean().item()
        row["within_3_se"] = (z.abs() < 3).double().mean().item()
        row["mean_z"] = z.mean().item()
    importance.append(row)
    last = estimate
    print(f"K={k}: log p̂(x) - log p(x) = {row['difference']['mean']:.4f} ± {row['difference']['stderr']:.4f}", flush=True)

far = gap > config["amortization_gap"]  # the guide sits away from the posterior's mass
z_last = (last.log_evidence - exact) / last.stderr
missed = {
    "count": int(far.sum()),
    "difference_far": common.summary((last.log_evidence - exact)[far]) if far.sum() > 1 else None,
    "within_3_se_far": (z_last[far].abs() < 3).double().mean().item() if far.any() else None,
    "khat_far": psis["khat"][far].tolist(),
    "within_3_se_rest": (z_last[~far].abs() < 3).double().mean().item(),
    "difference_rest": common.summary((last.log_evidence - exact)[~far]),
    "khat_above_0.7_share": (psis["khat"] > 0.7).double().mean().item(),
    "khat_above_0.7_share_far": (psis["khat"][far] > 0.7).double().mean().item() if far.any() else None,
    "khat_above_0.7_share_rest": (psis["khat"][~far] > 0.7).double().mean().item(),
}
check = plots.plot_evidence_check(exact, last.log_evidence, last.stderr, figures / "q5_evidence_check.png",
                                  estimate_label=f"log p̂(x), K={last.num_samples}", dpi=common.DPI)

# The figure of densities.
order = torch.argsort(gap)
chosen = {"median gap": order[len(order) // 2].item(), "largest gap": order[-1].item(),
          "90th percentile gap": order[int(0.9 * (len(order) - 1))].item(), "smallest gap": order[0].item()}
p = config["figure_points"]
box = config["figure_box"]
wide = latent2d.grid_points(torch.tensor([-box, -box]), torch.tensor([box, box]), p)
axis = torch.linspace(-box, box, p, dtype=torch.float64)
log_prior = latent2d.site_log_density(vae.model, x[:1], wide)[0].reshape(p, p)
aggregate = latent2d.aggregate_log_density(vae.guide, data.test[: config["aggregate_images"]], wide).reshape(p, p)
first = chosen["median gap"]
log_lik = latent2d.grid_log_joint(latent2d.vae_log_joint(vae), x[first : first + 1], -box, box, p)[0] - log_prior
codes = latent2d.guide_means(vae, x)
panels = [
    {"title": "prior p(z) = N(0, I)", "z1": axis, "z2": axis, "log_density": log_prior},
    {"title": f"aggregate posterior q(z), {config['aggregate_images']} test images", "z1": axis, "z2": axis,
     "log_density": aggregate, "contour": log_prior, "contour_label": "prior: 1, 2, 3 sd"},
    {"title": "log-likelihood log p(x|z) of image A, nats", "z1": axis, "z2": axis, "log_density": log_lik,
     "log_scale": True, "log_floor": 200.0, "colorbar": True, "image": x[first]},
]
with torch.no_grad():
    q_all = vae.guide_net(x)
peaks = {}
for i, (label, index) in enumerate(chosen.items()):
    loc, scale = q_all.base_dist.loc[index].double(), q_all.base_dist.scale[index].double()
    lo = torch.minimum(grid.low[index], loc - 4 * scale)
    hi = torch.maximum(grid.high[index], loc + 4 * scale)
    z1, z2, log_post = latent2d.grid_log_posterior(vae, x[index : index + 1], lo, hi, p)
    peak = divmod(int(log_post[0].argmax()), p)
    z_peak = torch.tensor([[z1[0, peak[0]], z2[0, peak[1]]]], dtype=torch.float32)
    log_joint = latent2d.vae_log_joint(vae)
    peaks[label] = {"index": index, "guide_mean": loc.tolist(), "posterior_peak": z_peak[0].tolist(),
                    "log_joint_at_guide_mean": log_joint(x[index : index + 1], loc[None].float()).item(),
                    "log_joint_at_posterior_peak": log_joint(x[index : index + 1], z_peak).item()}
    log_q = latent2d.site_log_density(vae.guide, x[index : index + 1], latent2d.grid_points(lo, hi, p))[0].reshape(p, p)
    name = "ABCD"[i]
    if i == 0:
        panels.append({"title": "guide q(z|x) of image A", "z1": z1[0], "z2": z2[0], "log_density": log_q, "image": x[index]})
    panels.append({
        "title": f"{name} ({label}): p(z|x), contours q(z|x)\nlog p(x) {exact[index]:.2f}, ELBO {elbo[index]:.2f}, gap {gap[index]:.2f}",
        "z1": z1[0], "z2": z2[0], "log_density": log_post[0], "contour": log_q, "image": x[index],
    })
densities = plots.plot_density_panels(panels, figures / "q5_densities.png", ncols=4, dpi=common.DPI)

results = {
    "config": config,
    "images": len(x),
    "grid": {"log_px": common.summary(exact), "error_max": grid.error.max().item(), "error_mean": grid.error.mean().item(),
             "error_median": grid.error.median().item(), "outer_mass_max": grid.outer_mass.max().item(),
             "tail_mass_max": grid.tail_mass.max().item(), "refinement_max": grid.refinement.max().item(),
             "local_points": {str(k): int((grid.points == k).sum()) for k in grid.points.unique().tolist()},
             "seconds": grid_seconds, "box_width_median": (grid.high - grid.low).median().item()},
    "global_grid_only": {"abs_difference_mean": (global_only.log_evidence - exact).abs().mean().item(),
                         "abs_difference_max": (global_only.log_evidence - exact).abs().max().item(),
                         "error_max": global_only.error.max().item()},
    "elbo": common.summary(elbo),
    "gap": {**common.summary(gap), "min": gap.min().item(), "max": gap.max().item()},
    "importance_sampling": importance,
    "guide_far_from_posterior": missed,
    "chosen_images": chosen,
    "peaks": peaks,
    "hardware": common.hardware(),
    "minutes": timer.minutes(),
}
is_rows = [[str(r["K"]), common.fmt(r["log_px"], 3), common.fmt(r["difference"], 4), f"{r['mean_stderr']:.4f}" if r["K"] > 1 else "-",
            f"{r['within_2_se']:.1%}" if "within_2_se" in r else "-", f"{r['within_3_se']:.1%}" if "within_3_se" in r else "-",
            f"{r['mean_ess']:.1f}", f"{r['seconds']:.1f}"] for r in importance]
g = results["grid"]
far_text = (f"{missed['count']} of {len(x)} images have a gap above {config['amortization_gap']:g} nats: there the guide sits away from "
            f"most of the posterior's mass. For them log p̂(x) (K = {last.num_samples}) - log p(x) is "
            f"{common.fmt(missed['difference_far'], 2) if missed['difference_far'] else '-'}, within 3 s.e. for "
            f"{missed['within_3_se_far']:.0%}; PSIS k-hat (ppl_vae.diagnostics, same draws) exceeds 0.7 for "
            f"{missed['khat_above_0.7_share_far']:.0%} of them (median k-hat {torch.tensor(missed['khat_far']).median():.2f}), "
            f"against {missed['khat_above_0.7_share_rest']:.1%} of the others. For the other {len(x) - missed['count']} images "
            f"the difference is {common.fmt(missed['difference_rest'], 3)} and {missed['within_3_se_rest']:.1%} are within 3 s.e."
            if missed["count"] else f"No image has a gap above {config['amortization_gap']:g} nats.")
section = f"""
Setup: the 2-D VAE of Q1 (784-{'-'.join(str(h) for h in config['hidden_sizes'])}-2 tanh MLP, Bernoulli likelihood, KL weight 1, {config['epochs']} epochs); the first
{len(x)} test images. Quadrature (ppl_vae.latent2d.log_evidence_2d): a {config['points']}x{config['points']} trapezoid grid over
[{low:g}, {high:g}]² (spacing {(high - low) / (config['points'] - 1):.3f}); per image a {config['zoom_points']}x{config['zoom_points']} grid
(final sizes after refinement: {', '.join(f'{k}x{k} for {v} images' for k, v in g['local_points'].items())}) over the box where log p(x, z) is within 30 nats of its
maximum (median width {g['box_width_median']:.2f}); a coarse ring grid out to three times the box; {g['seconds']:.0f} s for all images.

* log p(x) by quadrature: {common.fmt(g['log_px'], 3)} nats per image (± s.e. over images). Estimated quadrature error (change when
  every other local point is dropped + shares from outside the local box): median {g['error_median']:.1e}, at most {g['error_max']:.1e} nats
  (share from outside the local box at most {g['outer_mass_max']:.1e}, from outside the global box at most {g['tail_mass_max']:.1e}).
* ELBO ({config['elbo_samples']} draws): {common.fmt(results['elbo'], 3)}; the gap log p(x) - ELBO = KL(q(z|x) || p(z|x)):
  {common.fmt(results['gap'], 3)} nats per image, from {results['gap']['min']:.2f} (Monte Carlo noise of the ELBO) to {results['gap']['max']:.2f}.

Importance sampling with the guide as proposal against the quadrature value, per image (s.e. of log p̂(x): the delta-method
standard error that evidence_estimate reports; "within 2 s.e.": share of images with |log p̂(x) - log p(x)| < 2 s.e.):

{common.table(["K", "log p̂(x)", "log p̂(x) - log p(x)", "mean s.e. of log p̂(x)", "within 2 s.e.", "within 3 s.e.", "mean ESS", "seconds"], is_rows)}

{far_text}

![densities]({common.relative(densities)})

log p(x, z) at the guide's mean and at the posterior's peak (the grid point of highest density on the panel's grid), per drawn image:
{'; '.join(f"{'ABCD'[i]}: {r['log_joint_at_guide_mean']:.1f} and {r['log_joint_at_posterior_peak']:.1f}" for i, r in enumerate(peaks.values()))}.

Top row: the prior; the aggregate posterior of {config['aggregate_images']} test images with the prior's 1, 2, 3 sd circles; the
log-likelihood of image A over the same box; the guide q(z|x) of image A. Bottom row: the true posterior p(z|x) (colour) and the
guide's 1, 2, 3 sd contours (white) for four test images chosen by their gap KL(q || p(z|x)) (median, largest, 90th percentile,
smallest), each on its own box.

![evidence check]({common.relative(check)})

Time: {results['minutes']:.1f} minutes on {results['hardware']}.
"""
common.write_results(NAME, results, section, args)
