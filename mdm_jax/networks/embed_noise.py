"""Gaussian perturbation of input embeddings (Di[M]O's token initialisation,
docs/method/algorithms.md §5).

The backbones (``DiT``, ``ImageDiT``) take ``embed_noise=(sigma, eps)`` and replace
every input token embedding e by ``sigma * eps + sqrt(1 - sigma^2) * e``.
"""

import jax.numpy as jnp


def perturb_embeddings(e, sigma, eps):
  """sigma * eps + sqrt(1 - sigma^2) * e, computed in float32, returned in e's dtype.

  With eps ~ N(0, I) it keeps the second moment: E|e'|^2 = sigma^2 d + (1 - sigma^2) |e|^2.
  """
  if eps.shape != e.shape:
    raise ValueError(f"embed_noise eps has shape {eps.shape}; the embeddings are {e.shape}.")
  sigma = jnp.asarray(sigma, jnp.float32)
  out = sigma * eps.astype(jnp.float32) + jnp.sqrt(1.0 - sigma ** 2) * e.astype(jnp.float32)
  return out.astype(e.dtype)
