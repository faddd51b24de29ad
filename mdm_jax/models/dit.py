"""A diffusion transformer (DiT) over token sequences, with Prime's input layer.

* Input: digits [B, L, ell] in [0, b] (b = the mask id).  Prime's embedding
  looks every digit up in ONE table of (b + 1) rows and width
  floor(d_model / ell) shared by all slots, and concatenates a token's ell
  digit vectors into one vector, zero-padded to d_model when ell does not
  divide d_model (prime.md §4.1).  With ell = 1 this is the ordinary token
  embedding with V + 1 rows (the last is [MASK], or BOS for the AR baseline).
* Backbone: pre-LN blocks with adaLN-Zero modulation from a conditioning
  vector (a sinusoidal time embedding, or a learned constant when the network
  is time-agnostic, the MDLM default), rotary positions, bidirectional (or
  causal, for AR) attention through ``jax.nn.dot_product_attention`` so XLA,
  cuDNN or TPU kernels can be chosen by config.
* Output: a V-way head (untied, or tied to the embedding when ell = 1).

Parameters are float32 (``param_dtype``), the matmuls run in ``dtype``
(bfloat16 is safe), LayerNorm statistics and the logits' log-softmax are f32.
Every parameter carries logical axis names (embed, mlp, heads, kv, vocab,
cond, layers) and the main activations are constrained to (batch, length,
embed); ``mdm_jax.sharding`` maps those names to mesh axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str):
  if name not in _DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; valid: {sorted(_DTYPES)}.")
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  vocab_size: int                  # V: size of the output distribution
  ell: int = 1                     # digits per token
  base: int = 0                    # b; the input table has b + 1 rows (b = mask/BOS)
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  mlp_ratio: int = 4
  cond_dim: int = 128
  dropout: float = 0.0
  time_conditioning: bool = False
  tie_embeddings: bool = False
  causal: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: Optional[str] = None   # None/"xla" | "cudnn"
  scan_layers: bool = True
  remat: str = "none"                    # none | full | dots
  gate_init: float = 0.0                 # 0: adaLN-Zero (blocks start as identity)

  def __post_init__(self):
    if self.d_model < self.ell:
      raise ValueError(f"model.d_model={self.d_model} must be >= prime.ell={self.ell}.")
    if self.d_model % self.num_heads:
      raise ValueError(f"model.d_model={self.d_model} must be divisible by "
                       f"model.num_heads={self.num_heads}.")
    if (self.d_model // self.num_heads) % 2:
      raise ValueError("The head dimension d_model/num_heads must be even (rotary).")
    if self.tie_embeddings and self.ell != 1:
      raise ValueError("model.tie_embeddings needs prime.ell == 1: with ell > 1 the input "
                       "table holds sub-token digits, not the V output tokens.")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"model.remat must be none|full|dots, got {self.remat!r}.")
    if self.attention_impl not in (None, "xla", "cudnn"):
      raise ValueError(f"model.attention_impl must be xla|cudnn, got {self.attention_impl!r}.")


def _dense_init(names, scale=1.0):
  return nn.with_logical_partitioning(
      nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal"), names)


def _zeros(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _kernel(module: nn.Module, name: str, shape, names, in_axis=0, out_axis=-1, zero=False,
            param_dtype=jnp.float32):
  """A weight with logical axis names (fan-in scaled, or zeros for adaLN-Zero / the head)."""
  init = (nn.initializers.zeros_init() if zero else nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis))
  return module.param(name, nn.with_logical_partitioning(init, names), shape, param_dtype)


class RMSLayerNorm(nn.Module):
  """LayerNorm with a scale and no bias, computed in float32."""
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, -1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + 1e-6)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rotary(x, positions):
  """Rotary position embedding on [B, L, H, D] (D even), computed in f32."""
  d = x.shape[-1]
  freqs = 1.0 / (10000.0 ** (jnp.arange(0, d // 2, dtype=jnp.float32) / (d // 2)))
  ang = positions.astype(jnp.float32)[:, None] * freqs[None, :]        # [L, D/2]
  cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _modulate(x, shift, scale):
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
  cfg: DiTConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, c):
    cfg = self.cfg
    d, h = cfg.d_model, cfg.num_heads
    hd = d // h
    m = cfg.mlp_ratio * d
    pd = cfg.param_dtype
    w_qkv = _kernel(self, "qkv", (d, 3, h, hd), ("embed", None, "heads", "kv"), 0, (1, 2, 3),
                    param_dtype=pd)
    w_out = _kernel(self, "out", (h, hd, d), ("heads", "kv", "embed"), (0, 1), 2, param_dtype=pd)
    w_in = _kernel(self, "mlp_in", (d, m), ("embed", "mlp"), param_dtype=pd)
    w_o2 = _kernel(self, "mlp_out", (m, d), ("mlp", "embed"), param_dtype=pd)
    cd = cfg.dtype

    mod = nn.Dense(6 * d, dtype=jnp.float32, param_dtype=cfg.param_dtype,
                   kernel_init=_zeros(("cond", "embed")),
                   bias_init=_zeros(("embed",)), name="adaLN")(c)
    sh_a, sc_a, g_a, sh_m, sc_m, g_m = jnp.split(mod, 6, axis=-1)
    g_a, g_m = g_a + cfg.gate_init, g_m + cfg.gate_init

    # ---- attention
    y = RMSLayerNorm(cfg.param_dtype, name="ln_attn")(x)
    y = _modulate(y.astype(jnp.float32), sh_a, sc_a).astype(cfg.dtype)
    qkv = jnp.einsum("bld,dthk->blthk", y, w_qkv.astype(cd))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))
    pos = jnp.arange(x.shape[1])
    q, k = rotary(q, pos), rotary(k, pos)
    impl = None if cfg.attention_impl in (None, "xla") else cfg.attention_impl
    att = jax.nn.dot_product_attention(q, k, v, is_causal=cfg.causal, implementation=impl)
    att = nn.with_logical_constraint(att, ("batch", "length", "heads", "kv"))
    o = jnp.einsum("blhk,hkd->bld", att, w_out.astype(cd))
    o = nn.Dropout(cfg.dropout)(o, deterministic=self.deterministic)
    x = x + (g_a[:, None, :] * o.astype(jnp.float32)).astype(x.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    # ---- MLP
    y = RMSLayerNorm(cfg.param_dtype, name="ln_mlp")(x)
    y = _modulate(y.astype(jnp.float32), sh_m, sc_m).astype(cfg.dtype)
    y = jnp.einsum("bld,dm->blm", y, w_in.astype(cd))
    y = nn.with_logical_constraint(y, ("batch", "length", "mlp"))
    y = nn.gelu(y, approximate=True)
    y = jnp.einsum("blm,md->bld", y, w_o2.astype(cd))
    y = nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)
    x = x + (g_m[:, None, :] * y.astype(jnp.float32)).astype(x.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, None


class SubTokenEmbed(nn.Module):
  """Prime's partially-masked input layer: [B, L, ell] digits -> [B, L, D]."""
  cfg: DiTConfig

  def setup(self):
    cfg = self.cfg
    self.table = self.param(
        "table", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        (cfg.base + 1, cfg.d_model // cfg.ell), cfg.param_dtype)

  def __call__(self, digits):
    b, l, ell = digits.shape
    e = jnp.take(self.table, digits, axis=0)            # [B, L, ell, D//ell]
    e = e.reshape(b, l, ell * e.shape[-1])
    pad = self.cfg.d_model - e.shape[-1]
    if pad:
      e = jnp.pad(e, ((0, 0), (0, 0), (0, pad)))
    return e.astype(self.cfg.dtype)

  def attend(self, x):
    """Tied head (ell == 1 only): logits against the first V rows."""
    return jnp.einsum("bld,vd->blv", x, self.table[: self.cfg.vocab_size].astype(x.dtype))


def dit_trunk(cfg: DiTConfig, x, t, train: bool):
  """Time conditioning, the DiTBlock stack and the final adaLN norm: [B, N, D] -> [B, N, D].

  Shared by every DiT front end (text sub-tokens, image patches).  Call it from
  inside an ``nn.compact`` method: the submodules it creates (``cond_in``,
  ``cond_out``, ``blocks`` / ``block_i``, ``final_adaLN``, ``ln_final``) belong
  to that module, so parameter names are the same as if written inline.
  """
  tt = t if cfg.time_conditioning else jnp.zeros_like(t)
  c = timestep_embedding(tt * 1000.0, 256)
  c = nn.Dense(cfg.cond_dim, param_dtype=cfg.param_dtype,
               kernel_init=_dense_init((None, "cond")), bias_init=_zeros(("cond",)),
               name="cond_in")(c)
  c = nn.silu(c)
  c = nn.Dense(cfg.cond_dim, param_dtype=cfg.param_dtype,
               kernel_init=_dense_init((None, "cond")), bias_init=_zeros(("cond",)),
               name="cond_out")(c)
  c = nn.silu(c)

  block = DiTBlock
  if cfg.remat != "none":
    policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
              if cfg.remat == "dots" else None)
    block = nn.remat(DiTBlock, policy=policy, prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    stack = nn.scan(block, variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,), length=cfg.num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(cfg, deterministic=not train, name="blocks")(x, c)
  else:
    for i in range(cfg.num_layers):
      x, _ = block(cfg, deterministic=not train, name=f"block_{i}")(x, c)

  mod = nn.Dense(2 * cfg.d_model, param_dtype=cfg.param_dtype,
                 kernel_init=_zeros(("cond", "embed")), bias_init=_zeros(("embed",)),
                 name="final_adaLN")(c)
  shift, scale = jnp.split(mod, 2, axis=-1)
  x = RMSLayerNorm(cfg.param_dtype, name="ln_final")(x)
  x = _modulate(x.astype(jnp.float32), shift, scale).astype(cfg.dtype)
  return x


class DiT(nn.Module):
  cfg: DiTConfig

  @nn.compact
  def __call__(self, digits, t, train: bool = False):
    cfg = self.cfg
    if digits.ndim != 3 or digits.shape[-1] != cfg.ell:
      raise ValueError(f"DiT expects digits [B, L, ell={cfg.ell}], got {digits.shape}.")
    embed = SubTokenEmbed(cfg, name="embed")
    x = embed(digits)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    x = dit_trunk(cfg, x, t, train)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      w = _kernel(self, "head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), zero=True,
                  param_dtype=cfg.param_dtype)
      logits = jnp.einsum("bld,dv->blv", x, w.astype(cfg.dtype))
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
