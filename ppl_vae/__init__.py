"""ppl_vae: variational autoencoders written as Pyro probabilistic programs.

The public evaluation API lives in :mod:`ppl_vae.evaluate` (``elbo_decomposition``,
``log_evidence``); the model in :mod:`ppl_vae.model`; training in :mod:`ppl_vae.train`.
"""

__version__ = "0.1.0"
