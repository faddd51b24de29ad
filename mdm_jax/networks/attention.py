"""Attention kernels and rematerialisation policies of the transformer blocks.

``attention(q, k, v, causal=..., impl=...)`` takes [B, L, H, K] queries, keys and values
and dispatches on ``model.attention_impl``:

* ``xla`` (default): ``jax.nn.dot_product_attention``'s XLA path; the [B, H, L, L]
  probabilities are materialised.
* ``cudnn``: the same call with cuDNN's fused kernel (GPUs, bfloat16/float16).
* ``splash``: the Pallas TPU kernel ``splash_attention`` (flash-style: scores are made
  block by block and never stored; the backward pass recomputes them from the saved
  output and log-sum-exp).  Full (non-causal) mask per head, or causal for the AR
  baseline.  The kernel runs per device, so it is wrapped in ``shard_map`` over the
  mesh axes that the logical axes ``batch`` and ``heads`` map to.  The length must be
  a multiple of 128 (the kernel's tile).  On a backend other than TPU it falls back to
  the XLA path with a warning; ``splash_attention(..., interpret=True)`` runs the kernel
  in Pallas interpret mode on any backend (slow; for checking numerics).

``REMAT_POLICIES`` names what each block keeps for the backward pass
(``model.remat``); ``remat_policy(name)`` returns the ``jax.checkpoint`` policy.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from mdm_jax.core import sharding as shd

ATTENTION_IMPLS = ("xla", "cudnn", "splash")

# The name under which a block's attention output (and splash's log-sum-exp) is saved.
ATTENTION_OUT = "attention_out"

_cp = jax.checkpoint_policies

# model.remat -> (policy, what one block keeps for the backward pass).  ``None`` as the
# policy: the block is not wrapped in jax.checkpoint at all.
REMAT_POLICIES = {
    "none": (None, "everything autodiff keeps: elementwise intermediates, f32 and bf16 "
                   "copies of the attention probabilities; nothing is recomputed"),
    "matmuls": (_cp.dots_saveable,
                "every matmul output (the four projections, the attention scores and "
                "the attention output); elementwise work (norms, modulation, softmax, "
                "GELU, rotary) is recomputed"),
    "dots": (_cp.dots_with_no_batch_dims_saveable,
             "the outputs of the four projections (qkv, out, mlp_in, mlp_out); the "
             "attention and all elementwise work are recomputed"),
    "dots_attention": (_cp.save_from_both_policies(
        _cp.dots_with_no_batch_dims_saveable, _cp.save_only_these_names(ATTENTION_OUT)),
        "the four projections' outputs and the attention output (with splash, its "
        "log-sum-exp too, so its forward kernel is not rerun)"),
    "attention": (_cp.save_only_these_names(ATTENTION_OUT),
                  "the attention output only (with splash, its log-sum-exp too); the "
                  "projections, the MLP and all elementwise work are recomputed"),
    "full": (_cp.nothing_saveable, "the block input only; the whole block is recomputed"),
}


def remat_policy(name: str):
  """``(wrap, policy)``: whether ``model.remat=name`` wraps a block in jax.checkpoint, and
  the policy it passes."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"model.remat must be one of {'|'.join(REMAT_POLICIES)}, got {name!r}.")
  policy = REMAT_POLICIES[name][0]
  return name != "none", policy


def attention(q, k, v, *, causal: bool, impl: Optional[str] = None):
  """Multi-head attention on [B, L, H, K] (scaled by 1/sqrt(K)); the output is named
  ``ATTENTION_OUT`` for the rematerialisation policies."""
  if impl == "splash":
    platform = _platform()
    if platform == "tpu":
      out = splash_attention(q, k, v, causal=causal)
    else:
      _warn_once(f"model.attention_impl='splash' needs a TPU; the devices here are "
                 f"{platform}, so the XLA attention runs instead (on GPUs use "
                 "model.attention_impl='cudnn').")
      out = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  else:
    impl = None if impl in (None, "xla") else impl
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
  return checkpoint_name(out, ATTENTION_OUT)


def _platform() -> str:
  """The platform the program is built for: that of the mesh in context (which may be
  compile-only TPU devices on a CPU host), else the default backend's."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  platform = getattr(device, "platform", None)
  return str(platform) if platform else jax.default_backend()


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  logging.getLogger(__name__).warning(message)


SPLASH_TILE = 128


def splash_block(length: int) -> int:
  """The kernel's tile along the sequence: the largest of 512, 256, 128 dividing it."""
  if length % SPLASH_TILE:
    raise ValueError(f"model.attention_impl='splash' needs a sequence length that is a "
                     f"multiple of {SPLASH_TILE}, got {length}; use model.attention_impl="
                     "'xla' or pad data.seq_len.")
  return next(b for b in (512, 256, 128) if length % b == 0)


@functools.lru_cache(maxsize=None)
def _splash_kernel(length: int, heads: int, causal: bool, interpret: bool, block: int):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=import-outside-toplevel
  one = sa.CausalMask((length, length)) if causal else sa.FullMask((length, length))
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                            q_seq_shards=1, residual_checkpoint_name=ATTENTION_OUT,
                            interpret=interpret)


def _qkv_spec(shape, mesh) -> P:
  """[B, L, H, K] split as the logical rules split (batch, heads); length and head
  dimension whole on every device (the kernel needs the full key sequence)."""
  spec = tuple(nn.logical_to_mesh_axes(("batch", "length", "heads", "kv")))
  spec = spec + (None,) * (4 - len(spec))
  return shd.fit_spec(P(spec[0], None, spec[2], None), shape, mesh, "splash attention")


def splash_attention(q, k, v, *, causal: bool = False, interpret: bool = False,
                     block: Optional[int] = None):
  """Splash attention on [B, L, H, K] arrays; the same result as ``jax.nn.dot_product_attention``.

  Under a mesh with more than one device the kernel runs per device under ``shard_map``
  (batch and heads split as the logical rules say).  ``block``: the tile along the
  sequence (default ``splash_block(L)``; a multiple of 128 dividing L).
  """
  length, head_dim = q.shape[1], q.shape[-1]
  block = splash_block(length) if block is None else int(block)
  scale = 1.0 / math.sqrt(head_dim)

  def local(q, k, v):
    kernel = _splash_kernel(length, q.shape[2], bool(causal), bool(interpret), block)
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    to_heads = lambda a: jnp.swapaxes(a, 1, 2)     # noqa: E731  [B, L, H, K] -> [B, H, L, K]
    out = jax.vmap(kernel)(to_heads(qs), to_heads(k), to_heads(v))
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(q, k, v)
  spec = _qkv_spec(q.shape, mesh)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)
