"""Watch a VAE leave (or not) the mean-image plateau: reconstruction, KL and encoder spread per 100 steps.

    python experiments/plateau.py --prior vamp --activation tanh --steps 1000

Trains the package's model with SVI + Trace_ELBO on dynamically binarized MNIST and,
every 100 steps, prints on the current minibatch: the reconstruction term E_q[log p(x|z)]
and the KL term (one draw, nats per image), the spread of the encoder means across
images (std over the batch, averaged over latent dimensions) and the mean encoder scale.
A model on the plateau has reconstruction near -205 nats (the mean image), KL near 0 and
encoder means that barely depend on x. Used for the VampPrior diagnosis in
experiments/results/priors/NOTES.md.
"""

import argparse

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

from ppl_vae.data import load_mnist
from ppl_vae.model import VAE, VAEConfig
from ppl_vae.programs import Weighted

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--prior", default="standard")
parser.add_argument("--prior-components", type=int, default=100)
parser.add_argument("--activation", default="tanh")
parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[200, 200])
parser.add_argument("--latent-dim", type=int, default=50)
parser.add_argument("--beta", type=float, default=1.0, help="fixed KL weight")
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--batch-size", type=int, default=100)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--train-examples", type=int, default=None)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

pyro.set_rng_seed(args.seed)
pyro.clear_param_store()
data = load_mnist(binarize="dynamic", train_examples=args.train_examples).flattened()
config = VAEConfig(prior=args.prior, prior_components=args.prior_components, activation=args.activation,
                   hidden_sizes=tuple(args.hidden_sizes), latent_dim=args.latent_dim)
vae = VAE(config)
weighted = Weighted(vae, kl_weight=args.beta)  # beta on the latent sites, as training applies it to any program
svi = SVI(weighted.model, weighted.guide, pyro.optim.Adam({"lr": args.lr}), Trace_ELBO())
print(f"{config.describe()}, beta {args.beta}, Adam {args.lr}, batch {args.batch_size}")
print("step  reconstruction  KL (nats)  encoder-mean spread  encoder scale")
step = 0
while step < args.steps:
    for batch in data.train_batches(args.batch_size):
        svi.step(batch)
        step += 1
        if step % 100 == 0:
            with torch.no_grad():
                posterior = vae.guide_net(batch)
                z = posterior.rsample()
                kl = (posterior.log_prob(z) - vae.prior().log_prob(z)).mean().item()
                reconstruction = vae.likelihood(vae.decoder(z)).log_prob(batch).mean().item()
                spread = posterior.base_dist.loc.std(0).mean().item()
                scale = posterior.base_dist.scale.mean().item()
            print(f"{step:5d}  {reconstruction:14.1f}  {kl:9.2f}  {spread:19.3f}  {scale:13.3f}", flush=True)
        if step >= args.steps:
            break
