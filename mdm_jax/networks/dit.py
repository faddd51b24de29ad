"""A diffusion transformer (DiT) over token sequences, with Prime's input layer.

* Input: digits [B, L, ell] in [0, b] (b = the mask id).  Prime's embedding
  looks every digit up in ONE table of (b + 1) rows and width
  floor(d_model / ell) shared by all slots, and concatenates a token's ell
  digit vectors into one vector, zero-padded to d_model when ell does not
  divide d_model (docs/method/prime.md §4.1).  With ell = 1 this is the ordinary token
  embedding with V + 1 rows (the last is [MASK], or BOS for the AR baseline).
* Backbone: pre-LN blocks with adaLN-Zero modulation from a conditioning
  vector (a sinusoidal time embedding, or a learned constant when the network
  is time-agnostic, the MDLM default), rotary positions, bidirectional (or
  causal, for AR) attention chosen by config (``networks/attention.py``: XLA, cuDNN
  or the Pallas splash kernel on TPU), each block optionally rematerialised by a named
  policy (``model.remat``).
* Output: a V-way head (untied, or tied to the embedding when ell = 1), optionally
  padded to a multiple of ``vocab_multiple`` columns; ``features_only`` and ``dit_head``
  split the network before the head, for losses computed a slice of positions at a time.

Parameters are float32 (``param_dtype``), the matmuls run in ``dtype``
(bfloat16 is safe), LayerNorm statistics, the output head (float32 accumulation and
float32 logits, so no loss or sampler sees logits rounded to bfloat16's 8 bits) and the
logits' log-softmax are f32.
Every parameter carries logical axis names (embed, mlp, heads, kv, vocab,
cond, layers) and the main activations are constrained to (batch, length,
embed); ``mdm_jax.core.sharding`` maps those names to mesh axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mdm_jax.networks.attention import ATTENTION_IMPLS, attention, remat_policy
from mdm_jax.networks.base import MODELS, dtype_from_name
from mdm_jax.networks.embed_noise import perturb_embeddings


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
  attention_impl: Optional[str] = None   # None/"xla" | "cudnn" | "splash" (networks/attention.py)
  scan_layers: bool = True
  remat: str = "none"                    # a REMAT_POLICIES name (networks/attention.py)
  gate_init: float = 0.0                 # 0: adaLN-Zero (blocks start as identity)
  rotary: bool = True                    # False: no rotary (positions come from an absolute
                                         # embedding added by the front end, as in image DiTs)
  local_conv: int = 0                    # > 0: a residual depthwise conv of this width over
                                         # the length axis before each attention (odd width,
                                         # centred; causal: past-only); zero-initialised, so
                                         # it starts as the identity.  Hands each position
                                         # its neighbours directly: a masked token need not
                                         # wait for attention to learn to look next door
  digit_merge: str = "concat"            # Prime input layer: "concat" (the paper: each digit
                                         # a D/ell-wide slice) | "sum" (v2: each digit a full
                                         # D-wide vector, summed over the ell slots) | "joint"
                                         # (one D-wide row per partial state, (b+1)**ell rows)
  per_slot_tables: bool = False          # v2 "non-shared": one table per digit slot instead
                                         # of one table shared by all slots
  norm_eps: float = 1e-6                 # LayerNorm epsilon (MDLM's networks use 1e-5)
  mlp_bias: bool = False                 # biases on the two MLP matmuls (MDLM's networks have them)
  head_bias: bool = False                # a bias on the output head (MDLM's networks have one)
  vocab_multiple: int = 0                # > 1: the untied head (and its bias) is this many
                                         # columns wide, rounded up (V = 50,257 -> 50,304 at
                                         # 128), so it and its logits shard over a tensor axis;
                                         # the extra columns are masked (``dit_head``)

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
    if self.local_conv < 0 or (self.local_conv and not self.causal and self.local_conv % 2 == 0):
      raise ValueError(f"model.local_conv={self.local_conv} must be 0 (off) or a positive odd "
                       "width (a centred kernel; the causal AR model also accepts even widths).")
    if self.digit_merge not in ("concat", "sum", "joint"):
      raise ValueError(f"model.digit_merge must be concat|sum|joint, got {self.digit_merge!r}.")
    if self.digit_merge == "joint" and (self.base + 1) ** self.ell > _MAX_JOINT_ROWS:
      raise ValueError(
          f"model.digit_merge='joint' needs a table of (b+1)**ell = {(self.base + 1) ** self.ell:,} "
          f"rows (b={self.base}, ell={self.ell}); the limit is {_MAX_JOINT_ROWS:,}. Use "
          "model.digit_merge='concat' or 'sum' for this vocabulary.")
    if self.digit_merge == "joint" and self.per_slot_tables:
      raise ValueError("model.per_slot_tables has no meaning with model.digit_merge='joint' "
                       "(one row per partial state already); set it to False.")
    if self.tie_embeddings and self.head_bias:
      raise ValueError("model.head_bias needs an untied head: set model.tie_embeddings=False.")
    if self.tie_embeddings and (self.digit_merge != "concat" or self.per_slot_tables):
      raise ValueError("model.tie_embeddings needs the plain input table "
                       "(model.digit_merge='concat', model.per_slot_tables=False).")
    if self.vocab_multiple < 0:
      raise ValueError(f"model.vocab_multiple must be >= 0, got {self.vocab_multiple}.")
    if self.vocab_multiple > 1 and self.tie_embeddings:
      raise ValueError("model.vocab_multiple pads the untied head: set model.tie_embeddings=False "
                       "or model.vocab_multiple=0.")
    remat_policy(self.remat)                       # raises on an unknown name
    if self.attention_impl not in (None,) + ATTENTION_IMPLS:
      raise ValueError(f"model.attention_impl must be {'|'.join(ATTENTION_IMPLS)}, got "
                       f"{self.attention_impl!r}.")

  @property
  def head_width(self) -> int:
    """Columns of the output head: V, or V rounded up to ``vocab_multiple``."""
    m = self.vocab_multiple
    return self.vocab_size if m <= 1 else -(-self.vocab_size // m) * m


_MAX_JOINT_ROWS = 1 << 20
# The logit of a padded head column: finite (no NaN where a row is all padding), and
# exp(PAD_LOGIT - max) is exactly 0 in float32, so no softmax or logsumexp sees it.
PAD_LOGIT = -1e9


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


def project(x, w, n_in: int = 1, out_dtype=None):
  """``x [..., *in] . w [*in, *out] -> [..., *out]``, contracting the ``n_in`` trailing dims of x.

  ``out_dtype`` (e.g. float32 for an output head under bfloat16 compute): the dot
  accumulates in and returns that dtype instead of the inputs' dtype.

  The leading (batch, length) dims are flattened into one before the dot.  That is the
  same matmul, but its weight gradient then contracts over a single dimension: XLA's
  CPU backend otherwise transposes the [B, L, F] activation gradient in a separate copy
  for every weight (the head's [16, 128, 4096] one took 74 ms of a 600 ms default step;
  BENCHMARKS.md).  On GPU/TPU the reshape is free (a bitcast of the batch-major layout).
  """
  lead = x.shape[:x.ndim - n_in]
  x2 = x.reshape((-1,) + x.shape[x.ndim - n_in:])
  dims = (tuple(range(1, 1 + n_in)), tuple(range(n_in)))
  y = jax.lax.dot_general(x2, w, (dims, ((), ())), preferred_element_type=out_dtype)
  return y.reshape(lead + w.shape[n_in:])


class RMSLayerNorm(nn.Module):
  """LayerNorm with a scale and no bias, computed in float32."""
  param_dtype: Any = jnp.float32
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, -1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
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


def _length_conv(module: nn.Module, x, width: int, causal: bool, param_dtype):
  """Depthwise conv over axis 1 of [B, L, D] (zero padded), as shifted sums (no conv op,
  so it shards like any elementwise op).

  Tap offsets are ``-(width//2) .. width//2`` (``-(width-1) .. 0`` when causal, so no
  position sees the future).  Taps start at zero; the caller adds the result to a
  residual stream, so switching it on changes nothing at initialisation.
  """
  offsets = list(range(-(width - 1), 1)) if causal else list(range(-(width // 2), width // 2 + 1))
  w = module.param("local_conv", nn.with_logical_partitioning(nn.initializers.zeros,
                                                              (None, "embed")),
                   (width, x.shape[-1]), param_dtype).astype(x.dtype)
  length = x.shape[1]
  out = jnp.zeros_like(x)
  for i, o in enumerate(offsets):           # y[l] = sum_o w[o] * x[l + o]
    if abs(o) >= length:
      continue
    if o == 0:
      shifted = x
    elif o > 0:
      shifted = jnp.pad(x[:, o:], ((0, 0), (0, o)) + ((0, 0),) * (x.ndim - 2))
    else:
      shifted = jnp.pad(x[:, :o], ((0, 0), (-o, 0)) + ((0, 0),) * (x.ndim - 2))
    out = out + w[i] * shifted
  return out


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

    # ---- local mixing (optional): x += dwconv(norm(x)), zero-initialised taps
    if cfg.local_conv:
      y = RMSLayerNorm(cfg.param_dtype, cfg.norm_eps, name="ln_conv")(x)
      x = x + _length_conv(self, y, cfg.local_conv, cfg.causal, pd).astype(x.dtype)
      x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    # ---- attention
    y = RMSLayerNorm(cfg.param_dtype, cfg.norm_eps, name="ln_attn")(x)
    y = _modulate(y.astype(jnp.float32), sh_a, sc_a).astype(cfg.dtype)
    qkv = project(y, w_qkv.astype(cd))                     # [B, L, 3, H, K]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))
    if cfg.rotary:
      pos = jnp.arange(x.shape[1])
      q, k = rotary(q, pos), rotary(k, pos)
    att = attention(q, k, v, causal=cfg.causal, impl=cfg.attention_impl)
    att = nn.with_logical_constraint(att, ("batch", "length", "heads", "kv"))
    o = project(att, w_out.astype(cd), n_in=2)             # [B, L, D]
    o = nn.Dropout(cfg.dropout)(o, deterministic=self.deterministic)
    x = x + (g_a[:, None, :] * o.astype(jnp.float32)).astype(x.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    # ---- MLP
    y = RMSLayerNorm(cfg.param_dtype, cfg.norm_eps, name="ln_mlp")(x)
    y = _modulate(y.astype(jnp.float32), sh_m, sc_m).astype(cfg.dtype)
    y = project(y, w_in.astype(cd))
    if cfg.mlp_bias:
      y = y + self.param("mlp_in_bias", _zeros(("mlp",)), (m,), pd).astype(y.dtype)
    y = nn.with_logical_constraint(y, ("batch", "length", "mlp"))
    y = nn.gelu(y, approximate=True)
    y = project(y, w_o2.astype(cd))
    if cfg.mlp_bias:
      y = y + self.param("mlp_out_bias", _zeros(("embed",)), (d,), pd).astype(y.dtype)
    y = nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)
    x = x + (g_m[:, None, :] * y.astype(jnp.float32)).astype(x.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, None


class SubTokenEmbed(nn.Module):
  """Prime's partially-masked input layer: [B, L, ell] digits -> [B, L, D].

  Each digit (or the mask, row b) indexes a table.  ``digit_merge="concat"`` (the
  paper) gives each slot a D/ell-wide vector and concatenates them, so a slot is
  told apart by where its vector lands (zero-padded up to D when ell does not
  divide D); ``"sum"`` gives each a D-wide vector and sums them.  With
  ``per_slot_tables`` slot j reads its own rows (offset j * (b + 1)) of one table.
  ``"joint"`` gives every partial state of a token its own D-wide row: the ell
  digits, each in 0..b (b = masked), read as one base-(b + 1) number, so (b + 1)**ell
  rows, about V * (1 + 1/b)**ell.  A fully observed token then has its own vector, as
  in the plain MDM, and a half-seen one a vector for exactly what is seen.
  Changing digit j of token i only changes token i's vector either way.
  """
  cfg: DiTConfig

  def setup(self):
    cfg = self.cfg
    if cfg.digit_merge == "joint":
      rows, width = (cfg.base + 1) ** cfg.ell, cfg.d_model
    else:
      rows = (cfg.base + 1) * (cfg.ell if cfg.per_slot_tables else 1)
      width = cfg.d_model if cfg.digit_merge == "sum" else cfg.d_model // cfg.ell
    self.table = self.param(
        "table", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        (rows, width), cfg.param_dtype)

  def __call__(self, digits):
    cfg = self.cfg
    b, l, ell = digits.shape
    if cfg.digit_merge == "joint":
      # One row per partial state: the digits (mask = b) read as a base-(b+1) number.
      place = (cfg.base + 1) ** jnp.arange(ell - 1, -1, -1, dtype=digits.dtype)
      return jnp.take(self.table, jnp.sum(digits * place, axis=-1), axis=0).astype(cfg.dtype)
    if cfg.per_slot_tables:
      digits = digits + (cfg.base + 1) * jnp.arange(ell, dtype=digits.dtype)
    e = jnp.take(self.table, digits, axis=0)            # [B, L, ell, width]
    if cfg.digit_merge == "sum":
      return jnp.sum(e, axis=2).astype(cfg.dtype)
    e = e.reshape(b, l, ell * e.shape[-1])
    pad = cfg.d_model - e.shape[-1]
    if pad:
      e = jnp.pad(e, ((0, 0), (0, 0), (0, pad)))
    return e.astype(cfg.dtype)

  def attend(self, x):
    """Tied head (ell == 1 only): float32 logits against the first V rows."""
    return project(x, self.table[: self.cfg.vocab_size].astype(x.dtype).T, out_dtype=jnp.float32)


def cond_mlp(cfg: DiTConfig, t_in):
  """Sinusoidal embedding of ``t_in`` then Dense-silu-Dense (``cond_in``, ``cond_out``): [B] -> [B, cond_dim].

  Returns the pre-activation; ``dit_trunk`` applies silu (other front ends add a
  class embedding first, as DiT does).
  """
  c = timestep_embedding(t_in, 256)
  c = nn.Dense(cfg.cond_dim, param_dtype=cfg.param_dtype,
               kernel_init=_dense_init((None, "cond")), bias_init=_zeros(("cond",)),
               name="cond_in")(c)
  c = nn.silu(c)
  return nn.Dense(cfg.cond_dim, param_dtype=cfg.param_dtype,
                  kernel_init=_dense_init((None, "cond")), bias_init=_zeros(("cond",)),
                  name="cond_out")(c)


def dit_blocks(cfg: DiTConfig, x, c, train: bool, num_layers: Optional[int] = None,
               name: str = "blocks"):
  """``num_layers`` (default ``cfg.num_layers``) DiTBlocks on [B, N, D] with conditioning c.

  Scanned over layers (one submodule ``name``) or unrolled (``{name}_{i}``, with
  ``name="blocks"`` giving the historical ``block_{i}``), optionally
  rematerialised.  Call it from inside an ``nn.compact`` method.
  """
  n = cfg.num_layers if num_layers is None else int(num_layers)
  block = DiTBlock
  wrap, policy = remat_policy(cfg.remat)
  if wrap:
    block = nn.remat(DiTBlock, policy=policy, prevent_cse=not cfg.scan_layers)
  if n == 0:
    return x
  if cfg.scan_layers:
    stack = nn.scan(block, variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,), length=n,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(cfg, deterministic=not train, name=name)(x, c)
  else:
    prefix = "block" if name == "blocks" else name
    for i in range(n):
      x, _ = block(cfg, deterministic=not train, name=f"{prefix}_{i}")(x, c)
  return x


def final_adaln(cfg: DiTConfig, x, c, name: str = "final_adaLN", ln_name: str = "ln_final"):
  """The output norm: RMS LayerNorm modulated (shift, scale) by c, zero-initialised."""
  mod = nn.Dense(2 * cfg.d_model, param_dtype=cfg.param_dtype,
                 kernel_init=_zeros(("cond", "embed")), bias_init=_zeros(("embed",)),
                 name=name)(c)
  shift, scale = jnp.split(mod, 2, axis=-1)
  x = RMSLayerNorm(cfg.param_dtype, cfg.norm_eps, name=ln_name)(x)
  return _modulate(x.astype(jnp.float32), shift, scale).astype(cfg.dtype)


def dit_trunk(cfg: DiTConfig, x, t, train: bool):
  """Time conditioning, the DiTBlock stack and the final adaLN norm: [B, N, D] -> [B, N, D].

  Shared by every DiT front end (text sub-tokens, image patches).  Call it from
  inside an ``nn.compact`` method: the submodules it creates (``cond_in``,
  ``cond_out``, ``blocks`` / ``block_i``, ``final_adaLN``, ``ln_final``) belong
  to that module, so parameter names are the same as if written inline.
  """
  tt = t if cfg.time_conditioning else jnp.zeros_like(t)
  c = nn.silu(cond_mlp(cfg, tt * 1000.0))
  x = dit_blocks(cfg, x, c, train)
  return final_adaln(cfg, x, c)


class DiT(nn.Module):
  cfg: DiTConfig

  @nn.compact
  def __call__(self, digits, t, train: bool = False, embed_noise=None,
               features_only: bool = False):
    """digits [B, L, ell] -> float32 logits [B, L, V] (whatever the compute dtype).

    ``features_only``: the final features [B, L, D] instead (the input of ``dit_head``).

    ``embed_noise``: optional ``(sigma, eps)`` with ``eps`` [B, L, d_model]: the token
    embeddings are perturbed by ``perturb_embeddings`` (Di[M]O, docs/method/algorithms.md §5).
    """
    cfg = self.cfg
    if digits.ndim != 3 or digits.shape[-1] != cfg.ell:
      raise ValueError(f"DiT expects digits [B, L, ell={cfg.ell}], got {digits.shape}.")
    embed = SubTokenEmbed(cfg, name="embed")
    x = embed(digits)
    if embed_noise is not None:
      x = perturb_embeddings(x, *embed_noise)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    x = dit_trunk(cfg, x, t, train)
    if features_only:
      return x
    if cfg.tie_embeddings:
      params = {"embed": {"table": embed.table}}
    else:
      params = {"head": _kernel(self, "head", (cfg.d_model, cfg.head_width), ("embed", "vocab"),
                                zero=True, param_dtype=cfg.param_dtype)}
    if cfg.head_bias:
      params["head_bias"] = self.param("head_bias", _zeros(("vocab",)), (cfg.head_width,),
                                       cfg.param_dtype)
    return dit_head(cfg, params, x)

  @nn.nowrap
  def head_logits(self, params, x, padded: bool = True):
    """``dit_head`` with this network's config: features ``x`` [..., D] -> float32 logits."""
    return dit_head(self.cfg, params, x, padded)


def dit_head(cfg: DiTConfig, params, x, padded: bool = False):
  """The output head on final features ``x`` [..., D]: float32 logits.

  ``params`` is the DiT's parameter tree (only ``head``, ``head_bias`` and, when tied,
  ``embed/table`` are read), so a loss can apply the head to slices of the features
  (``DiT(..., features_only=True)``) and never hold all of [B, L, V] at once.  The logits
  are [..., V]; with ``padded`` and ``cfg.vocab_multiple`` they are [..., head_width] with
  the padded columns at ``PAD_LOGIT``.
  """
  v = cfg.vocab_size
  if cfg.tie_embeddings:
    w = params["embed"]["table"][:v].astype(x.dtype).T
  else:
    # Unpadded logits come from the first V columns of the weight, not from slicing the
    # [..., V'] product: no second copy of the logits.
    w = params["head"] if padded else params["head"][:, :v]
    w = w.astype(cfg.dtype)
  logits = project(x, w, out_dtype=jnp.float32)
  if cfg.head_bias:
    b = params["head_bias"] if padded else params["head_bias"][:v]
    logits = logits + b.astype(jnp.float32)
  if logits.ndim == 3:
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
  if logits.shape[-1] > v:
    column = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    logits = jnp.where(column < v, logits, PAD_LOGIT)
  return logits


def dit_config(model_config, vocab_size: int, ell: int, base: int, causal: bool) -> DiTConfig:
  """The DiTConfig of a complete ``config.model`` block."""
  m = model_config
  return DiTConfig(
      vocab_size=vocab_size, ell=ell, base=base,
      num_layers=int(m.num_layers), d_model=int(m.d_model), num_heads=int(m.num_heads),
      mlp_ratio=int(m.mlp_ratio), cond_dim=int(m.cond_dim), dropout=float(m.dropout),
      time_conditioning=bool(m.time_conditioning), tie_embeddings=bool(m.tie_embeddings),
      causal=causal, dtype=dtype_from_name(m.dtype), param_dtype=dtype_from_name(m.param_dtype),
      attention_impl=m.attention_impl, scan_layers=bool(m.scan_layers), remat=str(m.remat),
      gate_init=float(m.gate_init), local_conv=int(m.local_conv),
      digit_merge=str(m.digit_merge), per_slot_tables=bool(m.per_slot_tables),
      norm_eps=float(m.norm_eps), mlp_bias=bool(m.mlp_bias), head_bias=bool(m.head_bias),
      vocab_multiple=int(m.get("vocab_multiple", 0)))


@MODELS.register("dit")
def build_dit(model_config, vocab_size: int, ell: int, base: int, causal: bool) -> DiT:
  """The token DiT with Prime's sub-token embedding."""
  return DiT(dit_config(model_config, vocab_size, ell, base, causal))
