"""The parameter map between the authors' MDLM / MDM-Prime DiT and mdm_jax's ``dit``.

Both papers released the same network (MDLM's ``DIT``; MDM-Prime's ``PerceiverDIT`` is
it with Prime's sub-token input): pre-LN blocks with adaLN-Zero modulation from a
sinusoidal time embedding, rotary positions on q and k, a GELU MLP, and an adaLN-modulated
output layer.  mdm_jax's ``dit`` computes the same function once three options are set
(``model.norm_eps=1e-5``, ``model.mlp_bias=True``, ``model.head_bias=True``) and its own
additions stay off (``local_conv=0``, ``digit_merge='concat'``, untied head).

=====================================================  ==========================================
authors' name (PyTorch, ``backbone.`` prefix dropped)  mdm_jax parameter (``blocks`` stacked over
                                                       layers, axis 0)
=====================================================  ==========================================
``vocab_embed.embedding`` [R, D/ell]                   ``embed/table`` [R, D/ell]; R = V+1
                                                       (ell = 1, mask = row V) or b+1 (mask = b)
``sigma_map.mlp.0.weight`` / ``.bias``                 ``cond_in/kernel`` (transposed) / ``bias``
``sigma_map.mlp.2.weight`` / ``.bias``                 ``cond_out/kernel`` (transposed) / ``bias``
``blocks.i.norm1.weight``, ``norm2.weight``            ``blocks/ln_attn/scale``, ``ln_mlp/scale``
``blocks.i.attn_qkv.weight`` [3D, D]                   ``blocks/qkv`` [D, 3, H, D/H]
                                                       (rows ordered (qkv, head, dim))
``blocks.i.attn_out.weight`` [D, D]                    ``blocks/out`` [H, D/H, D]
``blocks.i.mlp.0.weight`` / ``.bias``                  ``blocks/mlp_in`` [D, 4D] / ``mlp_in_bias``
``blocks.i.mlp.2.weight`` / ``.bias``                  ``blocks/mlp_out`` [4D, D] / ``mlp_out_bias``
``blocks.i.adaLN_modulation.weight`` / ``.bias``       ``blocks/adaLN/kernel`` [C, 6D] / ``bias``
                                                       (shift, scale, gate of attention, then MLP)
``output_layer.norm_final.weight``                     ``ln_final/scale``
``output_layer.adaLN_modulation.weight`` / ``.bias``   ``final_adaLN/kernel`` [C, 2D] / ``bias``
``output_layer.linear.weight`` / ``.bias`` [V', D]     ``head`` [D, V] / ``head_bias`` [V]; MDLM's
                                                       V' = V+1 row for [MASK] is dropped (its
                                                       logit is set to -inf before the softmax)
``rotary_emb.inv_freq`` (a buffer)                     checked: 10000^(-2i/(D/H)), non-interleaved
=====================================================  ==========================================

Conventions checked by ``tests/test_convert.py`` against the authors' code: sub-token
digits are most-significant first with base b = ceil(V^(1/ell)) (the same integers as
``mdm_jax.diffusion.prime.integer_base`` for GPT-2's V = 50,257 and every ell in 1..8),
the digit vectors of a token are concatenated in slot order, the time-agnostic networks
(``time_conditioning: False``, both papers' released models) embed t = 0.

Pure NumPy: ``from_torch_state`` and ``to_torch_state`` map ``{name: array}`` to the
``dit`` parameter tree and back; ``infer_architecture`` reads the sizes off the tensors.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

BACKBONE_PREFIX = "backbone."
ROTARY_BUFFER = "rotary_emb.inv_freq"
FREQUENCY_EMBEDDING = 256          # the authors' TimestepEmbedder width (ours: cond_mlp's 256)
SOURCES = ("mdlm", "mdm-prime")

# The DiT options a converted model must have (docs/published_models.md).
COMPATIBLE_MODEL = {
    "name": "dit", "norm_eps": 1e-5, "mlp_bias": True, "head_bias": True,
    "time_conditioning": False, "tie_embeddings": False, "digit_merge": "concat",
    "per_slot_tables": False, "local_conv": 0, "gate_init": 0.0, "vocab_multiple": 0,
}


class ConversionError(ValueError):
  """A checkpoint that does not hold the network it should; the message says what differs."""


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The sizes of an MDLM / MDM-Prime DiT."""
  num_layers: int
  d_model: int
  num_heads: int
  cond_dim: int
  mlp_ratio: int
  ell: int
  vocab_size: int           # V: tokens (without MDLM's appended [MASK])
  embed_rows: int           # V + 1 (ell = 1) or b + 1

  @property
  def base(self) -> int:
    return self.vocab_size if self.ell == 1 else self.embed_rows - 1

  def model_config(self) -> Dict[str, Any]:
    """The ``config.model`` entries of this network in mdm_jax."""
    return {**COMPATIBLE_MODEL, "num_layers": self.num_layers, "d_model": self.d_model,
            "num_heads": self.num_heads, "cond_dim": self.cond_dim, "mlp_ratio": self.mlp_ratio}


def strip_prefix(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """The backbone's tensors without the ``backbone.`` prefix (Lightning / Hugging Face);
  other modules' entries (a noise schedule, metrics) are dropped."""
  if any(k.startswith(BACKBONE_PREFIX) for k in state):
    return {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
  return dict(state)


def _need(state: Mapping[str, np.ndarray], name: str, source: str) -> np.ndarray:
  if name not in state:
    found = ", ".join(sorted(state)[:6]) + (", ..." if len(state) > 6 else "")
    raise ConversionError(
        f"The {source} checkpoint has no tensor {name!r}: it is not an MDLM/MDM-Prime DiT (or it "
        f"is damaged). Its tensors: {found or 'none'}.")
  return np.asarray(state[name])


def num_blocks(state: Mapping[str, np.ndarray]) -> int:
  idx = {int(m.group(1)) for k in state for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
  if not idx:
    return 0
  if idx != set(range(max(idx) + 1)):
    raise ConversionError(f"The checkpoint's blocks are not numbered 0..n-1: {sorted(idx)}.")
  return max(idx) + 1


def infer_architecture(state: Mapping[str, np.ndarray], *, num_heads: Optional[int],
                       source: str) -> Architecture:
  """Sizes from the tensors' shapes (the head count, which no shape shows, must be given).

  Raises:
    ConversionError: a missing tensor, inconsistent shapes, or a layout this map does not
      describe (for example a tokenizer whose [MASK] is not the appended last row).
  """
  if source not in SOURCES:
    raise ConversionError(f"--from must be one of {', '.join(SOURCES)}, got {source!r}.")
  n = num_blocks(state)
  if n == 0:
    raise ConversionError(f"The {source} checkpoint has no 'blocks.0.*' tensors: it is not an "
                          "MDLM/MDM-Prime DiT.")
  table = _need(state, "vocab_embed.embedding", source)
  qkv = _need(state, "blocks.0.attn_qkv.weight", source)
  d = int(qkv.shape[1])
  if qkv.shape != (3 * d, d):
    raise ConversionError(f"blocks.0.attn_qkv.weight has shape {qkv.shape}, expected "
                          f"(3D, D): not the authors' DiT.")
  width = int(table.shape[1])
  if d % width:
    raise ConversionError(f"The embedding is {width} wide and the blocks {d}: not a DiT whose "
                          "sub-token vectors concatenate to the model width.")
  ell = d // width
  cond = int(_need(state, "sigma_map.mlp.0.weight", source).shape[0])
  if _need(state, "sigma_map.mlp.0.weight", source).shape[1] != FREQUENCY_EMBEDDING:
    raise ConversionError("The time embedding is not 256 sinusoids wide, as the authors' "
                          "TimestepEmbedder is.")
  hidden = int(_need(state, "blocks.0.mlp.0.weight", source).shape[0])
  if hidden % d:
    raise ConversionError(f"MLP width {hidden} is not a multiple of d_model {d}.")
  out_rows = int(_need(state, "output_layer.linear.weight", source).shape[0])
  rows = int(table.shape[0])
  if ell == 1:
    if source == "mdm-prime" and rows == out_rows:
      raise ConversionError("This MDM-Prime checkpoint has ell = 1; convert it with --from=mdlm.")
    if out_rows != rows or rows < 3:
      raise ConversionError(
          f"An ell = 1 checkpoint should have V + 1 embedding rows and V + 1 outputs (the [MASK] "
          f"appended last); this one has {rows} rows and {out_rows} outputs. A tokenizer with "
          "its own [MASK] id inside the vocabulary is not supported.")
    vocab = rows - 1
  else:
    if source == "mdlm":
      raise ConversionError(f"This checkpoint has sub-token inputs (ell = {ell}): convert it "
                            "with --from=mdm-prime.")
    vocab = out_rows
  if num_heads is None or int(num_heads) < 1:
    raise ConversionError("The number of attention heads is not stored in the weights and the "
                          "checkpoint has no config that names it: pass --num_heads (the "
                          "published DiT-small has 12).")
  h = int(num_heads)
  if d % h or (d // h) % 2:
    raise ConversionError(f"num_heads={h} does not split d_model={d} into even-sized heads.")
  arch = Architecture(num_layers=n, d_model=d, num_heads=h, cond_dim=cond,
                      mlp_ratio=hidden // d, ell=ell, vocab_size=vocab, embed_rows=rows)
  if ell > 1:
    from mdm_jax.diffusion.prime import integer_base  # pylint: disable=import-outside-toplevel
    b = integer_base(vocab, ell)
    if rows != b + 1:
      raise ConversionError(
          f"The sub-token table has {rows} rows; mdm_jax's codec for V = {vocab} and ell = {ell} "
          f"uses base {b} ({b + 1} rows with the mask). The checkpoint's base differs.")
  _check_rotary(state, arch)
  return arch


def _check_rotary(state: Mapping[str, np.ndarray], arch: Architecture) -> None:
  if ROTARY_BUFFER not in state:
    return
  hd = arch.d_model // arch.num_heads
  inv = np.asarray(state[ROTARY_BUFFER], np.float64)
  want = 1.0 / (10000.0 ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
  if inv.shape != want.shape:
    raise ConversionError(
        f"rotary_emb.inv_freq has {inv.shape[0]} frequencies; a head of {hd} dimensions "
        f"(d_model {arch.d_model} / num_heads {arch.num_heads}) has {want.shape[0]}: check "
        "--num_heads.")
  if not np.allclose(inv, want, rtol=1e-5):
    raise ConversionError("rotary_emb.inv_freq is not 10000^(-2i/d): a different rotary base.")


def param_names(state: Mapping[str, np.ndarray]) -> List[str]:
  """The backbone's parameter names in ``module.parameters()`` order (the state dict's order
  without buffers): the order of the authors' EMA ``shadow_params``."""
  return [k for k in state if not k.endswith(ROTARY_BUFFER)]


def ema_state(state: Mapping[str, np.ndarray], shadow: Sequence[np.ndarray],
              source: str) -> Dict[str, np.ndarray]:
  """The EMA weights as a state dict: ``shadow`` zipped with ``param_names(state)``.

  Raises:
    ConversionError: a count or shape that does not line up.
  """
  names = param_names(state)
  if len(shadow) < len(names):
    raise ConversionError(f"The {source} checkpoint's EMA holds {len(shadow)} tensors, the "
                          f"network has {len(names)} parameters: the EMA is incomplete.")
  out = {}
  for name, value in zip(names, shadow):
    value = np.asarray(value)
    if value.shape != np.shape(state[name]):
      raise ConversionError(f"EMA tensor for {name} has shape {value.shape}, the parameter "
                            f"{np.shape(state[name])}: the EMA does not belong to this network.")
    out[name] = value
  if ROTARY_BUFFER in state:
    out[ROTARY_BUFFER] = state[ROTARY_BUFFER]
  return out


def _f32(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def from_torch_state(state: Mapping[str, np.ndarray], arch: Architecture,
                     scan_layers: bool = True) -> Dict[str, Any]:
  """The ``dit`` parameter tree (float32 NumPy) of the authors' state dict (prefix stripped)."""
  d, h, n = arch.d_model, arch.num_heads, arch.num_layers
  hd = d // h
  need = lambda name: _f32(_need(state, name, "published"))  # noqa: E731

  def block(i: int) -> Dict[str, Any]:
    p = f"blocks.{i}."
    b = {
        "ln_attn": {"scale": need(p + "norm1.weight")},
        "ln_mlp": {"scale": need(p + "norm2.weight")},
        "qkv": need(p + "attn_qkv.weight").T.reshape(d, 3, h, hd),
        "out": need(p + "attn_out.weight").T.reshape(h, hd, d),
        "mlp_in": need(p + "mlp.0.weight").T,
        "mlp_in_bias": need(p + "mlp.0.bias"),
        "mlp_out": need(p + "mlp.2.weight").T,
        "mlp_out_bias": need(p + "mlp.2.bias"),
        "adaLN": {"kernel": need(p + "adaLN_modulation.weight").T,
                  "bias": need(p + "adaLN_modulation.bias")},
    }
    return b

  head_w = need("output_layer.linear.weight")[: arch.vocab_size]
  head_b = need("output_layer.linear.bias")[: arch.vocab_size]
  params: Dict[str, Any] = {
      "embed": {"table": need("vocab_embed.embedding")},
      "cond_in": {"kernel": need("sigma_map.mlp.0.weight").T,
                  "bias": need("sigma_map.mlp.0.bias")},
      "cond_out": {"kernel": need("sigma_map.mlp.2.weight").T,
                   "bias": need("sigma_map.mlp.2.bias")},
      "final_adaLN": {"kernel": need("output_layer.adaLN_modulation.weight").T,
                      "bias": need("output_layer.adaLN_modulation.bias")},
      "ln_final": {"scale": need("output_layer.norm_final.weight")},
      "head": head_w.T.copy(),
      "head_bias": head_b.copy(),
  }
  blocks = [block(i) for i in range(n)]
  if scan_layers:
    params["blocks"] = _stack(blocks)
  else:
    for i, b in enumerate(blocks):
      params[f"block_{i}"] = b
  return params


def _stack(trees: List[Dict[str, Any]]) -> Dict[str, Any]:
  first = trees[0]
  return {k: (_stack([t[k] for t in trees]) if isinstance(first[k], dict)
              else np.stack([t[k] for t in trees])) for k in first}


def _unstack(tree: Dict[str, Any], n: int) -> List[Dict[str, Any]]:
  return [{k: (_unstack(v, n)[i] if isinstance(v, dict) else np.asarray(v)[i])
           for k, v in tree.items()} for i in range(n)]


def to_torch_state(params: Mapping[str, Any], arch: Architecture,
                   prefix: str = BACKBONE_PREFIX) -> Dict[str, np.ndarray]:
  """The authors' state dict (float32, with ``prefix``) of a ``dit`` parameter tree.

  The inverse of ``from_torch_state``; MDLM's [MASK] output row is written as zeros (the
  authors' code sets that logit to -inf whatever it is).  Parameters a converted model
  lacks (the biases of a model trained with them off) are written as zeros.
  """
  d, h, n = arch.d_model, arch.num_heads, arch.num_layers
  p = {k: v for k, v in params.items()}
  if "blocks" in p:
    blocks = _unstack(p["blocks"], n)
  else:
    blocks = [p[f"block_{i}"] for i in range(n)]
  out: Dict[str, np.ndarray] = {}

  def put(name, value):
    out[prefix + name] = np.ascontiguousarray(_f32(value))

  put("vocab_embed.embedding", p["embed"]["table"])
  put("sigma_map.mlp.0.weight", np.asarray(p["cond_in"]["kernel"]).T)
  put("sigma_map.mlp.0.bias", p["cond_in"]["bias"])
  put("sigma_map.mlp.2.weight", np.asarray(p["cond_out"]["kernel"]).T)
  put("sigma_map.mlp.2.bias", p["cond_out"]["bias"])
  hd = d // h
  out[prefix + ROTARY_BUFFER] = (1.0 / (10000.0 ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
                                 ).astype(np.float32)
  m = arch.mlp_ratio * d
  for i, b in enumerate(blocks):
    q = f"blocks.{i}."
    put(q + "norm1.weight", b["ln_attn"]["scale"])
    put(q + "attn_qkv.weight", np.asarray(b["qkv"]).reshape(d, 3 * d).T)
    put(q + "attn_out.weight", np.asarray(b["out"]).reshape(d, d).T)
    put(q + "norm2.weight", b["ln_mlp"]["scale"])
    put(q + "mlp.0.weight", np.asarray(b["mlp_in"]).T)
    put(q + "mlp.0.bias", b.get("mlp_in_bias", np.zeros((m,), np.float32)))
    put(q + "mlp.2.weight", np.asarray(b["mlp_out"]).T)
    put(q + "mlp.2.bias", b.get("mlp_out_bias", np.zeros((d,), np.float32)))
    put(q + "adaLN_modulation.weight", np.asarray(b["adaLN"]["kernel"]).T)
    put(q + "adaLN_modulation.bias", b["adaLN"]["bias"])
  head_w = np.asarray(p["head"]).T
  head_b = np.asarray(p.get("head_bias", np.zeros((arch.vocab_size,), np.float32)))
  if arch.ell == 1:     # MDLM's output has a [MASK] row
    head_w = np.concatenate([head_w, np.zeros((1, d), np.float32)])
    head_b = np.concatenate([head_b, np.zeros((1,), np.float32)])
  put("output_layer.norm_final.weight", p["ln_final"]["scale"])
  put("output_layer.linear.weight", head_w)
  put("output_layer.linear.bias", head_b)
  put("output_layer.adaLN_modulation.weight", np.asarray(p["final_adaLN"]["kernel"]).T)
  put("output_layer.adaLN_modulation.bias", p["final_adaLN"]["bias"])
  return out


def export_blockers(model_config: Mapping[str, Any]) -> List[str]:
  """Why a ``config.model`` block cannot be written in the authors' layout (empty: it can)."""
  why = []
  if model_config.get("name", "dit") != "dit":
    why.append(f"model.name={model_config.get('name')!r} (only 'dit' has the authors' layout)")
  for key in ("tie_embeddings", "per_slot_tables", "time_conditioning"):
    if bool(model_config.get(key, False)):
      why.append(f"model.{key}=True")
  if model_config.get("digit_merge", "concat") != "concat":
    why.append(f"model.digit_merge={model_config.get('digit_merge')!r}")
  if int(model_config.get("local_conv", 0)):
    why.append(f"model.local_conv={model_config.get('local_conv')}")
  if float(model_config.get("gate_init", 0.0)):
    why.append(f"model.gate_init={model_config.get('gate_init')}")
  return why


def export_changes_function(model_config: Mapping[str, Any]) -> List[str]:
  """The options whose values make the authors' network compute a slightly different function
  from the exported weights (their LayerNorm epsilon is 1e-5)."""
  eps = float(model_config.get("norm_eps", 1e-6))
  return [] if eps == 1e-5 else [f"model.norm_eps={eps:g} (the authors' LayerNorm uses 1e-5)"]


def tree_paths(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Tuple[int, ...]]:
  """``{"a/b/c": shape}`` of a nested parameter tree (for error messages and checks)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(tree_paths(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = tuple(np.shape(v))
  return out
