"""Built-in programs, one module each: every one an ``nn.Module`` with ``model`` and ``guide`` (see :mod:`ppl_vae.programs`).

* :class:`~ppl_vae.model.VAE` -- the one-stochastic-layer VAE with selectable prior, likelihood and guide;
* :class:`~ppl_vae.models.two_layer.TwoLayerVAE` -- the two-stochastic-layer VAE of Burda et al. (2015);
* :class:`~ppl_vae.models.conditional.ConditionalVAE` -- a VAE conditioned on class labels;
* :class:`~ppl_vae.models.m2.M2` -- Kingma et al. (2014)'s semi-supervised M2, its class summed out by enumeration.
"""

from .conditional import ConditionalVAE
from .m2 import M2
from .two_layer import TwoLayerVAE

__all__ = ["ConditionalVAE", "M2", "TwoLayerVAE"]
