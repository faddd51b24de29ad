"""GPT-2 in Flax, loaded from a local Hugging Face folder: the field's generative-perplexity judge.

MDLM, SEDD and ReMDM report generative perplexity under GPT-2 Large.  This module runs
that judge without torch and without downloads: point it at a folder holding the model as
the Hugging Face Hub stores it,

  FOLDER/config.json                      ``n_layer``, ``n_embd``, ``n_head``, ``n_positions``,
                                          ``vocab_size``, ``layer_norm_epsilon``, ...
  FOLDER/model.safetensors                the weights (or ``pytorch_model.bin``, read with
                                          ``mdm_jax.core.torch_files``; no torch needed)
  FOLDER/tokenizer.json                   the tokenizer (or ``vocab.json`` + ``merges.txt``)

(e.g. a ``git clone`` of huggingface.co/gpt2-large, or the snapshot folder of a Hub cache),
and ``load_gpt2(FOLDER)`` returns the network and its parameters; ``gpt2_scorer(FOLDER)``
returns a ``mdm_jax.metrics.gen_ppl.Scorer`` that scores texts with the peers' protocol
(``gen_ppl.score_texts_judge``).  Select it with ``--scorer=gpt2:FOLDER`` in
``--mode=score`` or ``--config.sampling.scorer_workdir=gpt2:FOLDER``.

The network is GPT-2 as published: learned token and position embeddings, pre-LayerNorm
blocks of causal multi-head attention (scale 1/sqrt(head dim)) and a 4x MLP with the tanh
GELU (``gelu_new``), a final LayerNorm, and the output head tied to the token embedding.
Hugging Face's ``Conv1D`` weights are stored [in, out], which is Flax's ``Dense`` kernel
layout, so they load unchanged.  It is checked against ``transformers``' ``GPT2LMHeadModel``
on a tiny random model (tests/fixtures/gpt2/make_gpt2_fixture.py, tests/test_gpt2_scorer.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax.core import torch_files
from mdm_jax.core.errors import ConfigError
from mdm_jax.metrics import gen_ppl

DEFAULT_NAME = "gpt2-large"     # the judge MDLM, SEDD and ReMDM use (a local folder of it)
PREFIX = "gpt2:"                # --scorer=gpt2:FOLDER
_ACTIVATIONS = {"gelu_new": lambda x: nn.gelu(x, approximate=True),
                "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
                "gelu": lambda x: nn.gelu(x, approximate=False)}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The parts of a Hugging Face GPT-2 ``config.json`` the network needs."""
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 1280
  n_layer: int = 36
  n_head: int = 20
  n_inner: Optional[int] = None
  layer_norm_epsilon: float = 1e-5
  activation_function: str = "gelu_new"
  eos_token_id: int = 50256

  @classmethod
  def from_hf(cls, hf: Dict[str, Any], where: str = "config.json") -> "GPT2Config":
    """From a parsed ``config.json``; refuses variants this network does not implement."""
    if hf.get("model_type", "gpt2") != "gpt2":
      raise ConfigError(f"{where} describes a {hf.get('model_type')!r} model, not GPT-2.")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
      if hf.get(key):
        raise ConfigError(f"{where} sets {key}=true, which the GPT-2 scorer does not implement.")
    if not hf.get("scale_attn_weights", True):
      raise ConfigError(f"{where} sets scale_attn_weights=false, which the GPT-2 scorer does "
                        "not implement.")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
      raise ConfigError(f"{where}: activation_function {act!r} is not one of "
                        f"{sorted(_ACTIVATIONS)}.")
    eos = hf.get("eos_token_id", 50256)
    return cls(vocab_size=int(hf["vocab_size"]), n_positions=int(hf["n_positions"]),
               n_embd=int(hf["n_embd"]), n_layer=int(hf["n_layer"]), n_head=int(hf["n_head"]),
               n_inner=None if hf.get("n_inner") is None else int(hf["n_inner"]),
               layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
               activation_function=act, eos_token_id=int(eos if eos is not None else 50256))


class _Block(nn.Module):
  cfg: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    b, t, d = x.shape
    h, hd = cfg.n_head, d // cfg.n_head
    ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, name=name)  # noqa: E731
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)  # noqa: E731
    y = ln("ln_1")(x)
    qkv = dense(3 * d, "c_attn")(y).reshape(b, t, 3, h, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(hd)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal[None, None], scores, jnp.finfo(jnp.float32).min)
    att = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
    x = x + dense(d, "c_proj")(y)
    y = ln("ln_2")(x)
    y = _ACTIVATIONS[cfg.activation_function](dense(cfg.n_inner or 4 * d, "c_fc")(y))
    return x + dense(d, "c_proj_mlp")(y)


class GPT2(nn.Module):
  """GPT-2 with the head tied to the token embedding: ids [B, T] -> float32 logits [B, T, V]."""
  cfg: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, features_only: bool = False):
    cfg = self.cfg
    wte = self.param("wte", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.n_embd))
    wpe = self.param("wpe", nn.initializers.normal(0.02), (cfg.n_positions, cfg.n_embd))
    t = ids.shape[1]
    if t > cfg.n_positions:
      raise ValueError(f"GPT-2 takes at most {cfg.n_positions} positions, got {t}.")
    x = (wte[ids] + wpe[None, :t]).astype(self.dtype)
    for i in range(cfg.n_layer):
      x = _Block(cfg, self.dtype, name=f"h_{i}")(x)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x)
    if features_only:
      return x.astype(jnp.float32)
    return jnp.einsum("btd,vd->btv", x.astype(jnp.float32), wte.astype(jnp.float32))


def _read_weights(folder: str) -> Dict[str, np.ndarray]:
  st = os.path.join(folder, "model.safetensors")
  if os.path.isfile(st):
    return torch_files.read_safetensors(st)
  pt = os.path.join(folder, "pytorch_model.bin")
  if os.path.isfile(pt):
    obj = torch_files.read_torch_checkpoint(pt)
    return dict(obj.get("state_dict", obj)) if isinstance(obj, dict) else obj
  raise ConfigError(f"{folder} holds neither model.safetensors nor pytorch_model.bin (a local "
                    f"copy of a Hugging Face GPT-2 folder, e.g. {DEFAULT_NAME}, is needed; "
                    "nothing is downloaded).")


def params_from_state_dict(state: Dict[str, np.ndarray], cfg: GPT2Config) -> Dict[str, Any]:
  """Hugging Face GPT-2 weight names -> this module's parameter tree (float32)."""
  state = {(k[len("transformer."):] if k.startswith("transformer.") else k): v
           for k, v in state.items()}

  def get(name, shape=None):
    if name not in state:
      raise ConfigError(f"The GPT-2 weights lack {name!r}.")
    a = np.asarray(state[name], np.float32)
    if shape is not None and a.shape != tuple(shape):
      raise ConfigError(f"GPT-2 weight {name!r} has shape {a.shape}, the config implies {shape}.")
    return a

  d, inner = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
  ln = lambda p: {"scale": get(p + ".weight", (d,)), "bias": get(p + ".bias", (d,))}  # noqa: E731
  dense = lambda p, i, o: {"kernel": get(p + ".weight", (i, o)), "bias": get(p + ".bias", (o,))}  # noqa: E731
  params = {"wte": get("wte.weight", (cfg.vocab_size, d)),
            "wpe": get("wpe.weight", (cfg.n_positions, d)), "ln_f": ln("ln_f")}
  if "lm_head.weight" in state and not np.array_equal(
      np.asarray(state["lm_head.weight"], np.float32), params["wte"]):
    raise ConfigError("The GPT-2 weights have an lm_head that differs from the token "
                      "embedding; only the tied head is implemented.")
  for i in range(cfg.n_layer):
    p = f"h.{i}"
    params[f"h_{i}"] = {
        "ln_1": ln(p + ".ln_1"), "ln_2": ln(p + ".ln_2"),
        "c_attn": dense(p + ".attn.c_attn", d, 3 * d), "c_proj": dense(p + ".attn.c_proj", d, d),
        "c_fc": dense(p + ".mlp.c_fc", d, inner), "c_proj_mlp": dense(p + ".mlp.c_proj", inner, d)}
  return params


def load_gpt2(folder: str, dtype: Any = jnp.float32) -> Tuple[GPT2, Dict[str, Any], GPT2Config]:
  """(network, parameters, config) of the GPT-2 in a local Hugging Face folder.

  Raises:
    ConfigError: no such folder, no config or weights in it, or a variant not implemented.
  """
  folder = os.path.expanduser(folder)
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"No GPT-2 config at {path}: pass a local Hugging Face GPT-2 folder "
                      f"(config.json, model.safetensors, tokenizer.json; e.g. {DEFAULT_NAME}).")
  with open(path) as f:
    cfg = GPT2Config.from_hf(json.load(f), path)
  params = params_from_state_dict(_read_weights(folder), cfg)
  return GPT2(cfg, dtype), jax.tree.map(jnp.asarray, params), cfg


class HFTokenizer:
  """The folder's tokenizer through the ``tokenizers`` package (no transformers)."""

  def __init__(self, folder: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=import-outside-toplevel
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
      self._tok = Tokenizer.from_file(path)
    elif all(os.path.isfile(os.path.join(folder, n)) for n in ("vocab.json", "merges.txt")):
      self._tok = Tokenizer(models.BPE.from_file(os.path.join(folder, "vocab.json"),
                                                 os.path.join(folder, "merges.txt")))
      self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
      self._tok.decoder = decoders.ByteLevel()
    else:
      raise ConfigError(f"{folder} has no tokenizer.json (nor vocab.json + merges.txt).")

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=False)


def token_nll_fn(model: GPT2, params):
  """ids [B, C] -> f32 [B, C]: column 0 is 0 (nothing predicts the first token), column j the
  NLL -log p(x_j | x_<j) of the chunk's own left context."""
  @jax.jit
  def fn(ids):
    logits = model.apply({"params": params}, ids)[:, :-1]
    lse = jax.scipy.special.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(lse - picked, ((0, 0), (1, 0)))
  return fn


def features_fn(model: GPT2, params):
  """ids [B, C] -> f32 [B, C, D]: the final hidden states (after ``ln_f``)."""
  return jax.jit(lambda ids: model.apply({"params": params}, ids, features_only=True))


def gpt2_scorer(folder: str, max_length: int = 1024) -> gen_ppl.Scorer:
  """The GPT-2 in ``folder`` as a generative-perplexity ``Scorer`` (the peers' protocol:
  rows of ``max_length`` judge tokens, chunks of the model's context; see
  ``gen_ppl.score_texts_judge``)."""
  folder = folder[len(PREFIX):] if folder.startswith(PREFIX) else folder
  model, params, cfg = load_gpt2(folder)
  fn, feats = token_nll_fn(model, params), features_fn(model, params)
  return gen_ppl.Scorer(token_nll=lambda ids: np.asarray(fn(jnp.asarray(ids, jnp.int32))),
                        tokenizer=HFTokenizer(os.path.expanduser(folder)),
                        seq_len=min(int(cfg.n_positions), int(max_length)),
                        name=PREFIX + folder, protocol="judge", max_length=int(max_length),
                        eos_id=int(cfg.eos_token_id),
                        features=lambda ids: np.asarray(feats(jnp.asarray(ids, jnp.int32))))
