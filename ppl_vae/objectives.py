r"""Training objectives: what SVI maximizes, all of them Pyro's own ELBO classes.

* ``elbo`` -- ``Trace_ELBO``: E_q[log p(x, z) - log q(z | x)] estimated with ``particles``
  draws per datapoint (vectorized when more than one);
* ``meanfield`` -- ``TraceMeanField_ELBO``: the same bound with the KL term analytic where a
  rule is registered (lower variance, same expectation);
* ``iwae`` -- the importance-weighted bound of Burda et al. (2015), per datapoint:

  .. math:: \mathcal{L}_K(x) = E_{z_{1..K} \sim q}\Big[\log \frac{1}{K} \sum_k \frac{p(x, z_k)}{q(z_k | x)}\Big]

  With K = 1 it is the ELBO; it tightens as K grows. This is ``RenyiELBO(alpha=0)``:
  Pyro sums the log-weights only over *dependent* plate dimensions, so with local latents
  inside the data plate the log-mean-exp is taken per datapoint
  (``tests/test_variants.py`` checks it against the per-datapoint bound computed by
  :mod:`ppl_vae.evaluate` from the same draws).

The KL weight beta (with its warm-up schedule) is not an objective: it is a
``poutine.scale`` on the latent site inside the model and guide (``VAE.kl_weight``).
"""

from __future__ import annotations

from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

from .errors import PplVaeError

OBJECTIVES = ("elbo", "meanfield", "iwae")
# The VAE's programs have one plate, over the data; the particle plate goes left of it.
MAX_PLATE_NESTING = 1


def make_objective(name: str = "elbo", particles: int = 1, max_plate_nesting: int = MAX_PLATE_NESTING) -> ELBO:
    """The loss for ``SVI(model, guide, optim, loss)`` by name (see the module docstring)."""
    if name not in OBJECTIVES:
        raise PplVaeError(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    if particles < 1:
        raise PplVaeError(f"particles must be at least 1, got {particles}")
    options = dict(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=max_plate_nesting)
    if name == "iwae":
        return RenyiELBO(alpha=0.0, **options)
    return (Trace_ELBO if name == "elbo" else TraceMeanField_ELBO)(**options)
