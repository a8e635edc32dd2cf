r"""The classifier's gradient under each objective, against the exact (enumerated) gradient (issue 23, item 1).

An M2-like program (tests/discrete_models.py: y ~ Categorical, z ~ N(0, I), x ~ Bernoulli(f(y, z)); guide
q(y | x) q(z | x, y)) on one fixed batch of random binary data. For the classifier's parameters phi (q(y | x)),
the expected gradient of each objective's loss is estimated by averaging P vectorized particles, R times:

* exact: ``TraceEnum_ELBO`` with y enumerated in the guide (the sum over y exact, z reparameterized);
* elbo: ``Trace_ELBO`` (score-function term for y): unbiased, so it should match the exact one;
* meanfield: ``TraceMeanField_ELBO`` (no score-function term): biased;
* iwae: ``RenyiELBO(alpha=0)`` (its score-function term multiplied by alpha/(1-alpha) = 0).

Prints ||g||, ||g - g_exact|| / ||g_exact|| and the cosine to g_exact, with the spread over the R repeats.
Run: ``python experiments/objective_gradients.py`` (CPU, about a minute).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyro
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from discrete_models import M2  # noqa: E402


def classifier_gradient(program: M2, elbo, x: torch.Tensor) -> torch.Tensor:
    """d loss / d phi by the estimator's own ``loss_and_grads`` (RenyiELBO has no differentiable_loss)."""
    def registered(program_fn):  # loss_and_grads differentiates the parameters Pyro's param store holds
        def run(data):
            pyro.module("m2", program)
            return program_fn(data)
        return run

    program.zero_grad(set_to_none=False)
    elbo.loss_and_grads(registered(program.model), registered(program.guide), x)
    return torch.cat([p.grad.reshape(-1).clone() for p in program.classifier.parameters()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--points", type=int, default=64)
    parser.add_argument("--dim", type=int, default=10)
    args = parser.parse_args()
    pyro.enable_validation(False)
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((args.points, args.dim), 0.3))
    plain = M2(data_dim=args.dim, classes=3, latent=2, hidden=16)
    enumerated = M2(data_dim=args.dim, classes=3, latent=2, hidden=16, enumerate=True)
    enumerated.load_state_dict(plain.state_dict())
    options = dict(num_particles=args.particles, vectorize_particles=True, max_plate_nesting=1)
    estimators = {
        "exact (TraceEnum_ELBO, y enumerated)": (enumerated, TraceEnum_ELBO(**options)),
        "elbo (Trace_ELBO)": (plain, Trace_ELBO(**options)),
        "meanfield (TraceMeanField_ELBO)": (plain, TraceMeanField_ELBO(**options)),
        "iwae (RenyiELBO alpha=0, K=1 per particle)": (plain, RenyiELBO(alpha=0.0, num_particles=1, max_plate_nesting=1)),
        "iwae (RenyiELBO alpha=0, K=5)": (plain, RenyiELBO(alpha=0.0, num_particles=5, vectorize_particles=True,
                                                           max_plate_nesting=1)),
    }
    gradients = {name: torch.stack([classifier_gradient(program, elbo, x) for _ in range(args.repeats)])
                 for name, (program, elbo) in estimators.items()}
    exact = gradients[next(iter(gradients))].mean(0)
    print(f"classifier gradient on one batch of {args.points} points (dim {args.dim}); mean of {args.repeats} repeats "
          f"of {args.particles} particles (iwae: one or five)")
    print(f"{'objective':46s} {'||g||':>10s} {'rel. error':>12s} {'cosine':>8s}")
    for name, repeats in gradients.items():
        g = repeats.mean(0)
        norms = repeats.norm(dim=1)
        error = (g - exact).norm() / exact.norm()
        cosine = torch.nn.functional.cosine_similarity(g, exact, dim=0)
        print(f"{name:46s} {float(g.norm()):10.4f} {float(error):12.3f} {float(cosine):8.3f}"
              f"   (per-repeat ||g|| {float(norms.min()):.4f}..{float(norms.max()):.4f})")


if __name__ == "__main__":
    main()
