"""The autoregressive baseline's objective: the exact left-to-right NLL.

The same backbone with a causal mask reads [BOS, x_0 .. x_{L-2}] and predicts x_0 .. x_{L-1};
BOS is the embedding row the diffusion models use for the mask (id V).  The sum over
positions is an exact -log p(x), so the AR baseline's evaluation number is a likelihood,
not a bound.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array
ApplyFn = Callable[..., Array]


def ar_token_nll(apply_fn: ApplyFn, params: Any, tokens: Array, key: Optional[Array] = None, *,
                 bos_id: int, train: bool = False) -> Array:
  """-log p(x_i | BOS, x_<i) at every position (nats, float32 [B, L]), causal backbone.

  The input is [BOS, x_0 .. x_{L-2}] (BOS = the embedding row the diffusion
  models use for the mask, id V), the target is x_0 .. x_{L-1}.
  """
  bsz, _ = tokens.shape
  inputs = jnp.concatenate(
      [jnp.full((bsz, 1), bos_id, tokens.dtype), tokens[:, :-1]], axis=1)
  t = jnp.zeros((bsz,), jnp.float32)
  logits = apply_fn(params, inputs[..., None], t, train=train, rng=key).astype(jnp.float32)
  lse = jax.scipy.special.logsumexp(logits, axis=-1)
  return lse - jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]


def ar_loss(apply_fn: ApplyFn, params: Any, tokens: Array, key: Array, *,
            bos_id: int, train: bool = True) -> Tuple[Array, Dict[str, Array]]:
  """Exact autoregressive NLL per sequence (nats): ``ar_token_nll`` summed over L."""
  nll = ar_token_nll(apply_fn, params, tokens, key, bos_id=bos_id, train=train)
  return jnp.sum(nll, axis=-1), {}
