"""Q2. Why sample z ~ q(z|x) instead of feeding the decoder the mean?

    python experiments/q2_sample_vs_mean.py     # about 3 minutes on 2 CPU cores

Part 1, on a VAE trained as usual: the reconstruction term E_q[log p(x|z)] (estimated with
`reconstruction_samples` draws per image) against log p(x | z = E_q[z]). They differ, because
E[f(z)] != f(E[z]) for the non-linear f(z) = log p(x|z).

Part 2, the same networks trained with the mean fed to the decoder: the guide is wrapped so
that its draw is its mean (the decoder sees E_q[z]) while its density, hence the KL, is the
Gaussian's. Both models are trained with TraceMeanField_ELBO (analytic KL), the same loop,
seed and data, so the only difference is z ~ q versus z = E_q[z] in the reconstruction term.
The variant is built with the package's extension point VAE(config, guide_net=...); as
`ppl_vae.train.train` builds its VAE from a config, both are trained by the short SVI loop
of common.fit_variant. Then, for each model, the ELBO with z ~ q and log p̂(x): what the
trained networks are worth as a VAE.
"""

import time

import pyro
import pyro.distributions as dist
import torch
from torch import nn

import common
from ppl_vae import plots
from ppl_vae.diagnostics import active_units
from ppl_vae.evaluate import elbo_decomposition, evidence_estimate
from ppl_vae.guides import DiagonalGaussianGuide
from ppl_vae.model import VAE, VAEConfig

NAME = "q2_sample_vs_mean"


class MeanDrawNormal(dist.Normal):
    """N(loc, scale) whose every draw is its mean; its density (and so the KL) is the Gaussian's."""

    def rsample(self, sample_shape=torch.Size()):
        return self.loc.expand(self._extended_shape(sample_shape))

    def sample(self, sample_shape=torch.Size()):
        return self.rsample(sample_shape).detach()


class MeanFedGuide(nn.Module):
    """The diagonal Gaussian guide, with draws replaced by the mean while ``decode_mean`` is on."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.decode_mean = True

    def forward(self, x):
        q = self.base(x)
        return MeanDrawNormal(q.base_dist.loc, q.base_dist.scale).to_event(1) if self.decode_mean else q


def build(kind: str, config) -> VAE:
    torch.manual_seed(config["seed"])  # the same initial weights for both
    model_config = VAEConfig(latent_dim=config["latent_dim"], hidden_sizes=tuple(config["hidden_sizes"]))
    base = DiagonalGaussianGuide(784, model_config.latent_dim, model_config.hidden_sizes, model_config.activation)
    return VAE(model_config, guide_net=MeanFedGuide(base) if kind == "mean-fed" else base)


TRAIN_SECONDS = {}


def train_or_load(kind: str, config, args, data) -> tuple[VAE, list[float]]:
    vae = build(kind, config)
    path = common.Path(args.runs_dir) / "q2" / f"{kind}.pt"
    if path.is_file() and not args.retrain:
        saved = torch.load(path, weights_only=False)
        if saved["config"] == config:
            vae.load_state_dict(saved["state"])
            print(f"loaded {path}", flush=True)
            common.LOADED.append(str(path))
            TRAIN_SECONDS[kind] = saved.get("train_seconds", float("nan"))
            return vae.eval(), saved["history"]
    print(f"training the {kind} model", flush=True)
    started = time.perf_counter()
    history = common.fit_variant(vae, data, config["epochs"], "meanfield", seed=config["seed"])
    TRAIN_SECONDS[kind] = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config, "state": vae.state_dict(), "history": history, "train_seconds": TRAIN_SECONDS[kind]}, path)
    return vae.eval(), history


config, args = common.parse_args(NAME, __doc__)
figures, _ = common.output_dirs(args)
timer = common.Timer()
data = common.mnist()
if config["train_examples"]:
    data.train = data.train[: config["train_examples"]]
x = data.test[: config["eval_examples"]]
models = {kind: train_or_load(kind, config, args, data) for kind in ("sampled", "mean-fed")}
train_minutes = timer.minutes()

# Part 1: E_q[log p(x|z)] against log p(x | E_q[z]) on the usual VAE.
sampled, _ = models["sampled"]
torch.manual_seed(config["seed"])
expected = elbo_decomposition(sampled.model, sampled.guide, x, num_samples=config["reconstruction_samples"])["reconstruction"]
with torch.no_grad():
    means = sampled.guide_net(x).base_dist.loc
    at_mean = sampled.likelihood(sampled.decoder(means)).log_prob(x).double()
difference = at_mean - expected
part1 = {"E_q_log_lik": common.summary(expected), "log_lik_at_mean": common.summary(at_mean),
         "difference": common.summary(difference), "share_mean_higher": (difference > 0).double().mean().item()}

# Part 2: what each model is worth: its training objective, the ELBO with z ~ q, log p̂(x), the encoder scales.
rows, scales, samples, reconstructions = {}, {}, [], [("test images", x[: config["images_per_row"]])]
for kind, (vae, history) in models.items():
    guide = vae.guide_net
    if kind == "mean-fed":
        objective = elbo_decomposition(vae.model, vae.guide, x, num_samples=1)["elbo"]  # z = E_q[z], analytic KL
        with torch.no_grad():
            reconstructions.append(("mean-fed: z = E_q[z]", vae.decode_mean(guide(x[: config["images_per_row"]]).mean)))
        guide.decode_mean = False
    evaluation = common.evaluate(vae, x, config["test_samples"], seed=config["seed"])
    if kind == "sampled":
        objective = elbo_decomposition(vae.model, vae.guide, x, num_samples=10)["elbo"]
    with torch.no_grad():
        q = guide(x)
        scale = q.base_dist.scale
        reconstructions.append((f"{kind}: z ~ q(z|x)", vae.decode_mean(q.sample()[: config["images_per_row"]])))
    torch.manual_seed(config["seed"])
    samples.append((f"{kind}: z ~ p(z)", vae.sample_prior(config["images_per_row"])))
    scales[kind] = scale.reshape(-1)
    rows[kind] = {
        "training_objective": common.summary(objective),
        "final_train_objective": history[-1],
        "elbo": evaluation["elbo"], "reconstruction": evaluation["reconstruction"], "kl": evaluation["kl"]["total"],
        "log_px": evaluation["log_evidence"], "gap": evaluation["gap"],
        "active_units": active_units(vae.model, vae.guide, x)["num_active"],
        "scale_median": scale.median().item(),
        "scale_share_above_0.9": (scale > 0.9).double().mean().item(),
        "mean_rms": q.base_dist.loc.pow(2).mean().sqrt().item(),
    }

# log p̂(x) of the mean-fed model with tighter proposals N(E_q[z], s^2 I): each is a lower bound in expectation.
meanfed = models["mean-fed"][0]
meanfed.guide_net.decode_mean = False


def proposal(scale):
    def guide(data):
        loc = meanfed.guide_net(data).base_dist.loc
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return guide


proposals = {}
for scale in config["proposal_scales"]:
    pyro.set_rng_seed(config["seed"])
    estimate = evidence_estimate(meanfed.model, proposal(scale), x, num_samples=config["test_samples"])
    proposals[str(scale)] = {"log_px": common.summary(estimate.log_evidence), "mean_ess": estimate.ess.mean().item()}
    print(f"mean-fed model, proposal N(E_q[z], {scale:g}^2 I): log p(x) {proposals[str(scale)]['log_px']['mean']:.2f}", flush=True)

jensen = plots.plot_histograms({"log p(x | E_q[z]) - E_q[log p(x|z)]": difference}, figures / "q2_jensen.png",
                               xlabel="nats per image", title=f"usual VAE, {len(x)} test images: f(E[z]) - E[f(z)]", dpi=common.DPI)
scale_figure = plots.plot_histograms({f"{kind} (median {scales[kind].median():.3g})": s for kind, s in scales.items()},
                                     figures / "q2_scales.png", xlabel="encoder scale sigma_d(x), all images and dimensions",
                                     title="encoder scales", log_x=True, dpi=common.DPI)
bars = plots.plot_bars({kind: {"training objective": (r["training_objective"]["mean"], r["training_objective"]["stderr"]),
                               "ELBO, z ~ q": (r["elbo"]["mean"], r["elbo"]["stderr"]),
                               f"log p̂(x), K={config['test_samples']}": (r["log_px"]["mean"], r["log_px"]["stderr"])}
                        for kind, r in rows.items()}, figures / "q2_bounds.png", title="test images, nats per image", dpi=common.DPI)
images = plots.plot_sample_rows(reconstructions + samples, figures / "q2_images.png", dpi=common.DPI)
results = {"config": config, "part1": part1, "models": rows, "mean_fed_proposals": proposals, "hardware": common.hardware(), "minutes": timer.minutes(),
           "train_minutes": train_minutes}

k = config["test_samples"]
table_rows = [[kind, common.fmt(r["training_objective"]), common.fmt(r["elbo"]), common.fmt(r["reconstruction"]), common.fmt(r["kl"]),
               common.fmt(r["log_px"]), f"{r['scale_median']:.3g}", f"{r['scale_share_above_0.9']:.1%}", f"{r['mean_rms']:.3g}",
               str(r["active_units"])] for kind, r in rows.items()]
section = f"""
Setup: 784-{'-'.join(str(h) for h in config['hidden_sizes'])}-{config['latent_dim']} tanh MLP, standard prior, Bernoulli likelihood, diagonal Gaussian guide; {config['epochs']} epochs on
{'all 50,000' if not config['train_examples'] else config['train_examples']} training images (dynamic binarization), Adam 1e-3, batch 100, seed {config['seed']},
TraceMeanField_ELBO (analytic KL) for both models. Measured on the first {len(x)} test images, nats per image ± standard error over images.

**Part 1, the usual VAE ("sampled").** E_q[log p(x|z)] with {config['reconstruction_samples']} draws per image: {common.fmt(part1['E_q_log_lik'])};
log p(x | z = E_q[z]): {common.fmt(part1['log_lik_at_mean'])}; difference f(E[z]) - E[f(z)]: {common.fmt(part1['difference'])},
positive for {part1['share_mean_higher']:.1%} of the images.

![Jensen gap]({common.relative(jensen)})

**Part 2, trained with z ~ q ("sampled") or with z = E_q[z] ("mean-fed").** "Training objective": what the model was trained to
maximize, on the test images (for mean-fed: log p(x | E_q[z]) - KL(q || p)). ELBO (z ~ q, 10 draws), its parts and log p̂(x) (K = {k})
are of the trained model p(z) p(x|z) with its Gaussian guide q(z|x). Scales: σ_d(x) of the guide over all images and dimensions;
"RMS of means": root mean square of the guide means E_q[z_d|x].

{common.table(["model", "training objective", "ELBO (z ~ q)", "reconstruction (z ~ q)", "KL", f"log p̂(x), K={k}",
               "median σ", "σ > 0.9", "RMS of means", "active units"], table_rows)}

The mean-fed model's log p(x) estimated with other proposals N(E_q[z], s² I) (K = {k}; each estimate is a lower bound on log p(x)
in expectation, so the largest is the best evidence we have): {', '.join(f"s = {s}: {common.fmt(r['log_px'])}" for s, r in proposals.items())}.

![bounds]({common.relative(bars)})
![encoder scales]({common.relative(scale_figure)})

Test images, reconstructions E[x|z] of each model, and samples E[x|z], z ~ N(0, I):

![images]({common.relative(images)})

{common.time_line(timer, sum(TRAIN_SECONDS.values()), results['hardware'])}
"""
common.write_results(NAME, results, section, args)
