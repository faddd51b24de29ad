"""Left-to-right sampling for the autoregressive baseline.

The AR model is the same backbone run causally with ell = 1: its input is
[BOS, x_0, ..., x_{L-2}] (BOS = the row the diffusion models use for the mask,
id V) and logits[:, i] predict x_i.  Each step runs the full causal forward
(no KV cache; correctness first) and draws position i: a high-range Gumbel
categorical in float32 (float64 with ``sampling.precision="float64"``), row b's
from its own key (``sampling/common.py``), so a sample does not depend on the
batch it was drawn in.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from mdm_jax.sampling.ancestral import SampleResult
from mdm_jax.sampling.common import row_keys, step_keys
from mdm_jax.sampling.filters import apply_filters, sample_categorical
from mdm_jax.sampling.registry import SAMPLERS

Array = jax.Array


@SAMPLERS.register("ar", exact=True, reports_idle=False,
                    nfe=lambda steps, elements, opts: (elements, elements))
def ar_sample(apply_fn: Callable[..., Array], params: Any, key: Array, *, vocab_size: int,
              batch_size: int, seq_len: int, bos_id: int, temperature=1.0, top_k: int = 0,
              top_p=1.0, prompt: Optional[Array] = None, prompt_len: int = 0,
              top_p_rule: str = "holtzman") -> SampleResult:
  """Draws batch_size sequences of seq_len tokens, one position per network call.

  Args:
    apply_fn: causal (params, inputs [B, L, 1], t [B], *, train, rng) -> logits [B, L, V'],
      V' >= vocab_size (only the first vocab_size logits are used).
    params, key: parameters and PRNG key.
    vocab_size: V; every output id is in [0, V).
    batch_size, seq_len: B, L.
    bos_id: the BOS input id (codec.mask_id = V for the diffusion embedding).
    temperature, top_k, top_p, top_p_rule: filters (see filters.py).
    prompt: int [prompt_len] or [B, >= prompt_len]; its first prompt_len
      tokens are fixed (static prompt_len).
  Returns:
    SampleResult with digits [B, L, 1], nfe = seq_len - prompt_len (the
    number of calls made), idle_steps = 0, num_steps = seq_len.
  """
  prompt_len = int(prompt_len)
  if not 0 <= prompt_len <= seq_len:
    raise ValueError(f"prompt_len must be in [0, {seq_len}], got {prompt_len}.")
  tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
  if prompt_len:
    if prompt is None:
      raise ValueError("prompt_len > 0 needs a prompt.")
    p = jnp.asarray(prompt, jnp.int32)
    p = p[..., :prompt_len]
    tokens = tokens.at[:, :prompt_len].set(jnp.broadcast_to(p, (batch_size, prompt_len)))
  t = jnp.zeros((batch_size,), jnp.float32)
  bos = jnp.full((batch_size, 1), bos_id, jnp.int32)
  rows = row_keys(key, batch_size)

  def body(i, tokens):
    k_net, k_tok = step_keys(rows, i, 2)
    inputs = jnp.concatenate([bos, tokens[:, :-1]], axis=1)
    logits = apply_fn(params, inputs[..., None], t, train=False, rng=k_net[0])
    row = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
    row = apply_filters(row[..., :vocab_size].astype(jnp.float32), temperature, top_k,
                        top_p, top_p_rule)
    x = sample_categorical(k_tok, row)
    return jax.lax.dynamic_update_index_in_dim(tokens, x, i, axis=1)

  tokens = jax.lax.fori_loop(prompt_len, seq_len, body, tokens)
  return SampleResult(tokens=tokens, digits=tokens[..., None],
                      nfe=jnp.array(seq_len - prompt_len, jnp.int32),
                      idle_steps=jnp.array(0, jnp.int32), num_steps=seq_len)
