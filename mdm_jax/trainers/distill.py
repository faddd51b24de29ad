"""Di[M]O: distil a trained masked diffusion model into a one-step generator.

Zhu, Wang, Lathuiliere, Kalogeiton (2025); the specification is
docs/method/algorithms.md §5.  Three networks share the teacher's architecture:

* the **teacher** phi (frozen): a trained MDM / Prime checkpoint;
* the **generator** theta, initialised as a copy of phi, maps the token
  initialisation ``x_init ~ p_init`` to logits z in ONE forward pass and
  samples every position from softmax(z / tau_g);
* the **auxiliary** model psi, initialised as a copy of phi, is trained as an
  ordinary MDM (cross-entropy on re-masked positions) on the generator's own
  samples, so that it tracks the generator's conditionals (on-policy).

**Token initialisation** (training and sampling alike): uniformly random
tokens, exactly ``round(r_init * L)`` (>= 1) of them replaced by [MASK], and
every input embedding perturbed, e <- sigma_p * eps + sqrt(1 - sigma_p^2) * e
(the ``embed_noise`` argument of the DiT backbones).

**Generator update** (token-level distribution matching): re-mask the
generator's sample x_theta with a ratio r from the teacher's schedule
(exactly round(r L) positions) to get x~; at the masked positions

    g = (1 - beta) (p_psi - p_phi) + beta p_psi (log p_psi - log p_phi - KL(p_psi || p_phi))

(the gradient of the forward KL D(p_phi || p_psi), resp. the reverse KL, with
respect to psi's logits), g = 0 elsewhere, and minimise the surrogate
0.5 * sum |z - sg(z - g)|^2 / B, whose gradient with respect to z is g / B:
the auxiliary model's KL gradient is applied to the generator's logits.  The
sample x_theta carries no gradient.

**Auxiliary update**: a fresh generator sample, independently re-masked, and
label-smoothed cross-entropy (mean over masked positions) for psi.

In theta and psi the token embeddings, the position embeddings and the output
bias stay frozen (``distill.frozen_params``); Adam, constant learning rate after
a linear warm-up, global-norm clipping, an EMA of theta.  The method is
data-free: the models here are unconditional, so there is no condition and no
classifier-free guidance.

Entry points: ``distill(config, teacher_workdir, workdir)`` (``python -m
mdm_jax.main --mode=distill --teacher_workdir=DIR --workdir=OUT``), and
``restore_generator`` / ``generate_images`` (``python -m mdm_jax.cli.eval_images
--mode=evaluate_distilled`` evaluates them: one-step samples, their classifier Frechet
distance and a PNG grid).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Dict, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from mdm_jax.core import sharding as shd
from mdm_jax.core.config import save_config, to_dict
from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion.prime import PrimeCodec
from mdm_jax.sampling.common import time_for_mask_prob
from mdm_jax.trainers import checkpoint as ckpt_lib
from mdm_jax.trainers.setup import CHECKPOINT_DIR, build_run, restore_for_inference
from mdm_jax.trainers.workdir_lock import WorkdirLock
from mdm_jax.trainers.writer import MetricsWriter, Progress, format_time

Array = jax.Array

MASK_RATIOS = ("schedule", "arccos", "cosine", "uniform")
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


# ------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class DistillSettings:
  """The hashable (static) part of ``config.distill`` used inside jit."""
  r_init: float = 0.6
  sigma_p: float = 0.1
  mask_ratio: str = "schedule"
  beta: float = 0.0
  gen_temperature: float = 1.0
  label_smoothing: float = 0.1
  t_min: float = 1e-3
  carry_over: bool = True
  batch_size: int = 64

  @classmethod
  def from_config(cls, config) -> "DistillSettings":
    d = config.distill
    return cls(r_init=float(d.r_init), sigma_p=float(d.sigma_p), mask_ratio=str(d.mask_ratio),
               beta=float(d.beta), gen_temperature=float(d.gen_temperature),
               label_smoothing=float(d.label_smoothing), t_min=float(config.training.t_min),
               carry_over=bool(config.prime.carry_over), batch_size=int(d.batch_size))


def validate_distill_config(config) -> None:
  """ConfigError naming the ``config.distill`` key to change."""
  if "distill" not in config:
    raise ConfigError("config has no `distill` block; start the config from "
                      "configs/base.py:get_base_config() (it defines config.distill).")
  d = config.distill
  if config.objective != "diffusion":
    raise ConfigError("Di[M]O distils a masked diffusion model: the teacher config needs "
                      "objective='diffusion'.")
  for key in ("num_steps", "batch_size", "log_every", "aux_steps"):
    if int(d[key]) < 1:
      raise ConfigError(f"config.distill.{key} must be >= 1, got {d[key]}.")
  for key in ("checkpoint_every", "warmup_steps", "num_samples"):
    if int(d[key]) < 0:
      raise ConfigError(f"config.distill.{key} must be >= 0, got {d[key]}.")
  if not 0.0 <= float(d.r_init) <= 1.0:
    raise ConfigError(f"config.distill.r_init must be in [0, 1] (fraction of [MASK] tokens in "
                      f"the initial state), got {d.r_init}.")
  if not 0.0 <= float(d.sigma_p) <= 1.0:
    raise ConfigError(f"config.distill.sigma_p must be in [0, 1] (embedding noise scale), got "
                      f"{d.sigma_p}.")
  if d.mask_ratio not in MASK_RATIOS:
    raise ConfigError(f"config.distill.mask_ratio={d.mask_ratio!r} is not valid; choose one of "
                      f"{list(MASK_RATIOS)}.")
  if not 0.0 <= float(d.beta) <= 1.0:
    raise ConfigError(f"config.distill.beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), "
                      f"got {d.beta}.")
  if not float(d.gen_temperature) > 0:
    raise ConfigError(f"config.distill.gen_temperature must be > 0, got {d.gen_temperature}.")
  if not 0.0 <= float(d.label_smoothing) < 1.0:
    raise ConfigError(f"config.distill.label_smoothing must be in [0, 1), got "
                      f"{d.label_smoothing}.")
  if not float(d.learning_rate) > 0:
    raise ConfigError(f"config.distill.learning_rate must be > 0, got {d.learning_rate}.")
  if not 0.0 <= float(d.ema_decay) < 1.0:
    raise ConfigError(f"config.distill.ema_decay must be in [0, 1), got {d.ema_decay}.")
  if isinstance(d.frozen_params, str):
    raise ConfigError("config.distill.frozen_params must be a tuple of parameter names, e.g. "
                      "('digit_table', 'pos_row'), not a string.")


# ------------------------------------------------------------------ token initialisation
def embed_width(model) -> int:
  """Width of the per-token input embedding that ``embed_noise`` perturbs."""
  cfg = model.cfg
  return int(cfg.pixel_dim) if hasattr(cfg, "pixel_dim") else int(cfg.d_model)


def mask_count(ratio, length: int):
  """round(ratio * length), clipped to [1, length] (jnp int32)."""
  n = jnp.floor(jnp.asarray(ratio, jnp.float32) * length + 0.5).astype(jnp.int32)
  return jnp.clip(n, 1, length)


def exact_mask(key: Array, ratio: Array, batch: int, length: int) -> Array:
  """bool [B, L]: exactly mask_count(ratio_b, L) uniformly chosen positions per row."""
  n = jnp.broadcast_to(mask_count(ratio, length), (batch,))
  scores = jax.random.uniform(key, (batch, length))
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  return ranks < n[:, None]


def init_tokens(key: Array, codec: PrimeCodec, batch: int, length: int,
                r_init: float) -> Tuple[Array, Array]:
  """x_init ~ p_init: (digits int32 [B, L, ell], masked bool [B, L]).

  Uniformly random tokens with exactly round(r_init * L) (>= 1) positions set
  to [MASK] (every digit of the token masked).
  """
  k_tok, k_mask = jax.random.split(key)
  tokens = jax.random.randint(k_tok, (batch, length), 0, codec.vocab_size, jnp.int32)
  masked = exact_mask(k_mask, jnp.float32(r_init), batch, length)
  digits = jnp.where(masked[..., None], codec.mask_id, codec.encode(tokens))
  return digits.astype(jnp.int32), masked


def sample_mask_ratio(key: Array, schedule, batch: int, kind: str, t_min: float) -> Array:
  """Re-mask ratios r [B]: from the teacher's schedule (t ~ U[t_min, 1], r = 1 - alpha(t)),
  MaskGIT's arccos (r = arccos(u) / (pi/2)), cosine (r = cos(pi u / 2)) or uniform."""
  u = jax.random.uniform(key, (batch,), jnp.float32)
  if kind == "schedule":
    return schedule.mask_prob(t_min + (1.0 - t_min) * u).astype(jnp.float32)
  if kind == "arccos":
    return jnp.arccos(u) / (jnp.pi / 2)
  if kind == "cosine":
    return jnp.cos(jnp.pi * u / 2)
  if kind == "uniform":
    return u
  raise ValueError(f"distill.mask_ratio must be one of {MASK_RATIOS}, got {kind!r}.")


# ------------------------------------------------------------------ forward passes
def _time_input(task, mask_fraction: Array) -> Array:
  """The network's t for a state with this masked fraction (ignored when time-agnostic)."""
  if not task.time_conditioning:
    return jnp.ones_like(mask_fraction, jnp.float32)
  return time_for_mask_prob(task.schedule, mask_fraction)


def generator_logits(task, params, digits: Array, noise_key: Array, sigma_p: float) -> Array:
  """z = z_theta(x_init): float32 [B, L, V] logits, the input embeddings perturbed by sigma_p."""
  b, length = digits.shape[:2]
  frac = jnp.mean((digits == task.codec.mask_id).all(-1), axis=-1).astype(jnp.float32)
  noise = None
  if sigma_p > 0:
    eps = jax.random.normal(noise_key, (b, length, embed_width(task.model)), jnp.float32)
    noise = (jnp.float32(sigma_p), eps)
  logits = task.model.apply({"params": params}, digits, _time_input(task, frac), train=False,
                            embed_noise=noise)
  return logits.astype(jnp.float32)


def sample_from_logits(key: Array, codec: PrimeCodec, z: Array, temperature: float) -> Array:
  """Tokens int32 [B, L] ~ softmax(z / temperature) over the V valid tokens."""
  lp = codec.token_logprobs(jax.lax.stop_gradient(z))
  return jax.random.categorical(key, lp / temperature, axis=-1).astype(jnp.int32)


def one_step_generate(task, params, key: Array, batch: int, settings: DistillSettings):
  """The one-step generator: x_init ~ p_init, one forward pass, sample every position.

  Returns tokens int32 [B, L] (a complete sequence: no [MASK]).
  """
  k_init, k_noise, k_sample = jax.random.split(key, 3)
  digits, _ = init_tokens(k_init, task.codec, batch, task.seq_len, settings.r_init)
  z = generator_logits(task, params, digits, k_noise, settings.sigma_p)
  return sample_from_logits(k_sample, task.codec, z, settings.gen_temperature)


def remask(key: Array, task, tokens: Array, settings: DistillSettings):
  """x~: (digits [B, L, ell] with exactly round(r L) whole tokens masked, masked [B, L], t [B])."""
  k_r, k_m = jax.random.split(key)
  b, length = tokens.shape
  r = sample_mask_ratio(k_r, task.schedule, b, settings.mask_ratio, settings.t_min)
  masked = exact_mask(k_m, r, b, length)
  digits = jnp.where(masked[..., None], task.codec.mask_id, task.codec.encode(tokens))
  frac = jnp.mean(masked, axis=-1).astype(jnp.float32)
  return digits.astype(jnp.int32), masked, _time_input(task, frac)


def model_logprobs(task, params, digits: Array, t: Array, carry_over: bool) -> Array:
  """log p(x | x~) float32 [B, L, V] (restricted by carry-over at partially masked tokens)."""
  logits = task.model.apply({"params": params}, digits, t, train=False)
  return task.codec.token_logprobs(logits.astype(jnp.float32), digits if carry_over else None)


# ------------------------------------------------------------------ the matching gradient
def token_kl(lp_p: Array, lp_q: Array) -> Array:
  """KL(p || q) [..] over the last axis, from log-probabilities (0 log 0 = 0)."""
  p = jnp.exp(lp_p)
  return jnp.sum(jnp.where(p > 0, p * (lp_p - lp_q), 0.0), axis=-1)


def dimo_grad_target(lp_aux: Array, lp_teacher: Array, masked: Array, beta: float) -> Array:
  """g [B, L, V]: (1-beta)(p_psi - p_phi) + beta p_psi (log p_psi - log p_phi - KL(p_psi||p_phi))
  at masked positions, 0 elsewhere; no gradient flows through it."""
  lp_aux = jax.lax.stop_gradient(lp_aux)
  lp_teacher = jax.lax.stop_gradient(lp_teacher)
  p_aux = jnp.exp(lp_aux)
  g = (1.0 - beta) * (p_aux - jnp.exp(lp_teacher))
  if beta:
    diff = jnp.where(p_aux > 0, lp_aux - lp_teacher, 0.0)
    kl = jnp.sum(p_aux * diff, axis=-1, keepdims=True)
    g = g + beta * p_aux * (diff - kl)
  return jnp.where(masked[..., None], g, 0.0)


def surrogate_loss(z: Array, g: Array) -> Array:
  """0.5 * sum |z - sg(z - g)|^2 / B: its gradient with respect to z is exactly g / B."""
  target = jax.lax.stop_gradient(z - g)
  return 0.5 * jnp.sum(jnp.square(z - target)) / z.shape[0]


def smoothed_cross_entropy(lp: Array, tokens: Array, masked: Array, smoothing: float) -> Array:
  """Mean over masked positions of the label-smoothed cross-entropy (targets (1-s) 1_x + s/V)."""
  nll = -jnp.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0]
  if smoothing:
    nll = (1.0 - smoothing) * nll - smoothing * jnp.mean(lp, axis=-1)
  w = masked.astype(jnp.float32)
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def generator_loss(task, gen_params, teacher_params, aux_params, key: Array,
                   settings: DistillSettings) -> Tuple[Array, Dict[str, Array]]:
  """The generator's surrogate loss on one batch (differentiable in ``gen_params`` only)."""
  k_init, k_noise, k_sample, k_mask = jax.random.split(key, 4)
  b = settings.batch_size
  digits, _ = init_tokens(k_init, task.codec, b, task.seq_len, settings.r_init)
  z = generator_logits(task, gen_params, digits, k_noise, settings.sigma_p)
  x_gen = sample_from_logits(k_sample, task.codec, z, settings.gen_temperature)
  noisy, masked, t = remask(k_mask, task, x_gen, settings)
  lp_teacher = model_logprobs(task, teacher_params, noisy, t, settings.carry_over)
  lp_aux = model_logprobs(task, aux_params, noisy, t, settings.carry_over)
  g = dimo_grad_target(lp_aux, lp_teacher, masked, settings.beta)
  loss = surrogate_loss(z, g)
  w = masked.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  lp_gen = task.codec.token_logprobs(jax.lax.stop_gradient(z))
  teacher_nll = -jnp.take_along_axis(lp_teacher, x_gen[..., None], axis=-1)[..., 0]
  metrics = {
      "fkl": jnp.sum(token_kl(lp_teacher, lp_aux) * w) / n,       # D(p_phi || p_psi), masked
      "teacher_nll": jnp.sum(teacher_nll * w) / n,                 # -log p_phi(x_gen | x~)
      "gen_entropy": jnp.mean(-jnp.sum(jnp.exp(lp_gen) * lp_gen, -1)),
      "g_norm": jnp.sqrt(jnp.sum(jnp.square(g)) / b),
  }
  return loss, metrics


def auxiliary_loss(task, aux_params, gen_params, key: Array,
                   settings: DistillSettings) -> Tuple[Array, Dict[str, Array]]:
  """MDM cross-entropy of psi on a fresh, independently re-masked generator sample."""
  k_gen, k_mask = jax.random.split(key)
  x_gen = jax.lax.stop_gradient(one_step_generate(task, gen_params, k_gen, settings.batch_size,
                                                  settings))
  noisy, masked, t = remask(k_mask, task, x_gen, settings)
  lp = model_logprobs(task, aux_params, noisy, t, settings.carry_over)
  loss = smoothed_cross_entropy(lp, x_gen, masked, settings.label_smoothing)
  return loss, {"aux_loss": loss}


# ------------------------------------------------------------------ optimiser and state
@flax.struct.dataclass
class DistillState:
  step: jax.Array
  gen_params: Any
  aux_params: Any
  gen_opt: Any
  aux_opt: Any
  ema_params: Any
  key: jax.Array        # uint32 raw key data


def _name_matches(path: Tuple[str, ...], names) -> bool:
  joined = "/".join(str(p) for p in path)
  return any(joined == n or joined.endswith("/" + n) for n in names)


def frozen_labels(params, names) -> Any:
  """'frozen' / 'train' per parameter (boxed leaves included), by name or path suffix."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: ("frozen" if _name_matches(k, names) else "train") for k in flat})


def make_optimizer(dc, learning_rate: float, frozen_names) -> optax.GradientTransformation:
  """Adam (b1, b2), linear warm-up then constant, global-norm clip; frozen names get no update."""
  warm = max(int(dc.warmup_steps), 1)
  lr = float(learning_rate)
  def sched(count):   # lr * (count + 1) / warm during the warm-up (the first step moves)
    return lr * jnp.minimum(1.0, (count + 1.0) / warm)
  train_tx = optax.chain(
      optax.clip_by_global_norm(float(dc.grad_clip)) if dc.grad_clip > 0 else optax.identity(),
      optax.adam(sched, b1=float(dc.b1), b2=float(dc.b2)))
  names = tuple(frozen_names)
  return optax.multi_transform({"train": train_tx, "frozen": optax.set_to_zero()},
                               lambda p: frozen_labels(p, names))


def optimizers(config) -> Tuple[optax.GradientTransformation, optax.GradientTransformation]:
  dc = config.distill
  aux_lr = float(dc.aux_learning_rate) if float(dc.aux_learning_rate) > 0 else \
      float(dc.learning_rate)
  names = tuple(dc.frozen_params)
  return make_optimizer(dc, dc.learning_rate, names), make_optimizer(dc, aux_lr, names)


def _state_from(params, tx_g, tx_a, key) -> DistillState:
  return DistillState(step=jnp.zeros((), jnp.int32), gen_params=params, aux_params=params,
                      gen_opt=tx_g.init(params), aux_opt=tx_a.init(params), ema_params=params,
                      key=jax.random.key_data(key))


def state_shardings(task, tx_g, tx_a, mesh, rules):
  """(abstract unboxed DistillState, NamedSharding tree), allocating nothing."""
  def boxed(key):
    digits = jnp.zeros((2, task.seq_len, task.codec.ell), jnp.int32)
    params = task.model.init(key, digits, jnp.ones((2,), jnp.float32))["params"]
    return _state_from(params, tx_g, tx_a, key)
  b = jax.eval_shape(boxed, jax.random.key(0))
  return nn.unbox(b), shd.logical_shardings(b, mesh, rules)


def init_state(teacher_params, tx_g, tx_a, seed: int, shardings) -> DistillState:
  """Generator, auxiliary and EMA all start as copies of the teacher (fresh buffers)."""
  fn = jax.jit(lambda p, k: _state_from(jax.tree.map(jnp.copy, p), tx_g, tx_a, k),
               out_shardings=shardings)
  return fn(teacher_params, jax.random.key(seed))


def make_distill_step(task, tx_g, tx_a, settings: DistillSettings, *, ema_decay: float,
                      aux_steps: int = 1, mesh=None, rules=None, shardings=None,
                      teacher_shardings=None, donate: bool = True):
  """jit'd (state, teacher_params) -> (state, metrics): one generator update, then
  ``aux_steps`` auxiliary updates on the updated generator's samples, then the EMA."""

  def step_fn(state: DistillState, teacher_params):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    k_gen, k_aux = jax.random.split(key)
    (g_loss, g_metrics), g_grads = jax.value_and_grad(
        lambda p: generator_loss(task, p, teacher_params, state.aux_params, k_gen, settings),
        has_aux=True)(state.gen_params)
    upd, gen_opt = tx_g.update(g_grads, state.gen_opt, state.gen_params)
    gen_params = optax.apply_updates(state.gen_params, upd)
    aux_params, aux_opt = state.aux_params, state.aux_opt
    a_metrics, a_norm = {}, jnp.zeros((), jnp.float32)
    for i in range(int(aux_steps)):
      (_, a_metrics), a_grads = jax.value_and_grad(
          lambda p, k=jax.random.fold_in(k_aux, i): auxiliary_loss(task, p, gen_params, k,
                                                                   settings),
          has_aux=True)(aux_params)
      upd, aux_opt = tx_a.update(a_grads, aux_opt, aux_params)
      aux_params = optax.apply_updates(aux_params, upd)
      a_norm = _tree_norm(a_grads)
    if ema_decay > 0:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params,
                         gen_params)
    else:
      ema = gen_params
    metrics = {"gen_loss": g_loss, "gen_grad_norm": _tree_norm(g_grads),
               "aux_grad_norm": a_norm, **g_metrics, **a_metrics}
    new = state.replace(step=state.step + 1, gen_params=gen_params, aux_params=aux_params,
                        gen_opt=gen_opt, aux_opt=aux_opt, ema_params=ema)
    return new, metrics

  def traced(state, teacher_params):
    with nn.logical_axis_rules(rules or ()):
      return step_fn(state, teacher_params)

  kwargs = {}
  if mesh is not None and shardings is not None:
    kwargs = dict(in_shardings=(shardings, teacher_shardings),
                  out_shardings=(shardings, shd.replicated(mesh)))
  return jax.jit(traced, donate_argnums=(0,) if donate else (), **kwargs)


# ------------------------------------------------------------------ the loop
def _checkpointer(workdir: str, config, read_only: bool = False):
  return ckpt_lib.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR),
                               max_to_keep=int(config.checkpoint.max_to_keep),
                               async_save=bool(config.checkpoint.async_save) and not read_only,
                               read_only=read_only,
                               check_free_space=bool(config.checkpoint.check_free_space))


def _build(config):
  """The run (data, task, mesh) of a diffusion config, with the checks Di[M]O needs."""
  validate_distill_config(config)
  run = build_run(config, None, check_batch=False)
  if run.task.schedule.per_position:
    raise ConfigError("Di[M]O needs a scalar masking schedule (the re-mask ratio); "
                      f"schedule.name={config.schedule.name!r} is multivariate.")
  return run


def write_generator_samples(task, params, config, data, workdir: str, step: int,
                            seed: int = 0) -> Dict[str, Any]:
  """``distill.num_samples`` one-step samples -> workdir/samples/step_N.* (the dataset's
  format: a PNG grid for images, text otherwise)."""
  settings = DistillSettings.from_config(config)
  n = int(config.distill.num_samples)
  tokens = np.asarray(jax.jit(lambda p, k: one_step_generate(task, p, k, n, settings))(
      params, jax.random.key(seed)))
  texts, stats = data.describe_samples(tokens)
  stats.update(num_samples=n, nfe=1, sampler="Di[M]O one-step generator")
  stats.update(data.write_samples(tokens, texts, stats, os.path.join(workdir, "samples"),
                                  f"step_{step}", header=f"one-step sample, step {step}"))
  return stats


def distill(config, teacher_workdir: str, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) Di[M]O from the teacher checkpoint in ``teacher_workdir``, holding
  ``workdir``'s lock (one run per workdir)."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with WorkdirLock(workdir, enabled=jax.process_index() == 0):
    return _distill(config, teacher_workdir, workdir)


def _distill(config, teacher_workdir: str, workdir: str) -> Dict[str, Any]:
  validate_distill_config(config)
  if not teacher_workdir:
    raise ConfigError("--mode=distill needs --teacher_workdir=DIR, a trained diffusion run.")
  teacher_workdir = os.path.abspath(teacher_workdir)
  workdir = os.path.abspath(workdir)
  if teacher_workdir == workdir:
    raise ConfigError("--workdir must differ from --teacher_workdir (the teacher's checkpoints "
                      "would be mixed with the generator's).")
  task, t_state, mesh, rules, data, t_shardings = restore_for_inference(
      config, teacher_workdir)
  if task.schedule.per_position:
    raise ConfigError("Di[M]O needs a scalar masking schedule; the teacher's is multivariate.")
  dc = config.distill
  teacher = t_state.ema_params if dc.teacher_use_ema else t_state.params
  del t_state
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  settings = DistillSettings.from_config(config)
  tx_g, tx_a = optimizers(config)
  _, shardings = state_shardings(task, tx_g, tx_a, mesh, rules)
  state = init_state(teacher, tx_g, tx_a, int(dc.seed), shardings)
  cfg_dict = to_dict(config)
  ckpt = _checkpointer(workdir, config)
  if ckpt.latest_step() is not None:
    abstract = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
    state, _ = ckpt.restore_intact(abstract, current_config=cfg_dict)
    print(f"Resumed Di[M]O from {ckpt.directory} at step {int(state.step)}.", file=sys.stderr,
          flush=True)
  save_config(config, workdir, is_main)
  if is_main:
    with open(os.path.join(workdir, "distill_meta.json"), "w") as f:
      json.dump({"teacher_workdir": teacher_workdir, "method": "Di[M]O",
                 "settings": dataclasses.asdict(settings)}, f, indent=2)
  step_fn = make_distill_step(task, tx_g, tx_a, settings, ema_decay=float(dc.ema_decay),
                              aux_steps=int(dc.aux_steps), mesh=mesh, rules=rules,
                              shardings=shardings, teacher_shardings=t_shardings.params)
  writer = MetricsWriter(workdir, enabled=is_main)
  num_steps, start = int(dc.num_steps), int(state.step)
  progress = Progress(num_steps, start, settings.batch_size * task.seq_len,
                                     enabled=False)
  t0 = time.time()
  m: Dict[str, float] = {}
  with jax.set_mesh(mesh):
    for step in range(start, num_steps):
      state, metrics = step_fn(state, teacher)
      done = step + 1
      if done % int(dc.log_every) == 0 or done == num_steps or done == start + 1:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in m.values()):
          raise FloatingPointError(f"Di[M]O metrics became non-finite at step {done}: {m}. "
                                   "Lower distill.learning_rate and resume.")
        progress.update(done, m)
        rate = progress.rates()["perf/steps_per_sec"]
        eta = (num_steps - done) / rate if rate > 0 else float("nan")
        if is_main:
          print(f"distill {done}/{num_steps} | aux CE {m['aux_loss']:.4f} | D(teacher||aux) "
                f"{m['fkl']:.4f} | teacher NLL of gen {m['teacher_nll']:.4f} | gen entropy "
                f"{m['gen_entropy']:.3f} | |g| {m['g_norm']:.4f} | "
                + (f"{rate:.3f} steps/s | ETA {format_time(eta)}"
                   if rate > 0 else "(compiling)"), file=sys.stderr, flush=True)
        writer.write(done, {f"distill/{k}": v for k, v in m.items()} | progress.rates())
      if (dc.checkpoint_every and done % int(dc.checkpoint_every) == 0) or done == num_steps:
        ckpt.save(done, state, None, cfg_dict, force=done == num_steps)
  ckpt.close()
  writer.close()
  result = {"step": int(state.step), "teacher_workdir": teacher_workdir,
            "seconds": time.time() - t0, **{f"final_{k}": v for k, v in m.items()}}
  if int(dc.num_samples) and is_main:
    params = state.ema_params if dc.use_ema else state.gen_params
    with jax.set_mesh(mesh):
      result.update(write_generator_samples(task, params, config, data, workdir,
                                            int(state.step), seed=int(config.sampling.seed)))
  if is_main:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result


# ------------------------------------------------------------------ inference
def restore_generator(config, workdir: str):
  """(task, generator params (EMA if distill.use_ema), data, step) from a distill workdir."""
  run = _build(config)
  task, data, mesh, rules = run.task, run.data, run.mesh, run.rules
  tx_g, tx_a = optimizers(config)
  abstract, shardings = state_shardings(task, tx_g, tx_a, mesh, rules)
  ckpt = _checkpointer(workdir, config, read_only=True)
  step = ckpt.latest_step()
  if step is None:
    raise ckpt_lib.CheckpointError(
        f"No Di[M]O checkpoint under {os.path.join(workdir, CHECKPOINT_DIR)}. Run "
        f"`python -m mdm_jax.main --mode=distill --teacher_workdir=TEACHER --workdir={workdir}`.")
  ckpt.check_compatible(to_dict(config), step)
  state = ckpt.restore(ckpt_lib.abstract_with_shardings(abstract, shardings), step=step)
  ckpt.close()
  params = state.ema_params if config.distill.use_ema else state.gen_params
  return task, params, data, int(step)


def generate_images(task, params, config, tokenizer, num_samples: int, batch_size: int = 0,
                    seed: int = 0) -> Tuple[np.ndarray, Dict[str, float]]:
  """uint8 images from the one-step generator, with compile and per-image wall times."""
  settings = DistillSettings.from_config(config)
  bs = int(batch_size or config.distill.num_samples or 64)
  fn = jax.jit(functools.partial(one_step_generate, task, batch=bs, settings=settings))
  t0 = time.time()
  compiled = fn.lower(params, jax.random.key(0)).compile()
  compile_s = time.time() - t0
  out, t0 = [], time.time()
  for i in range(-(-int(num_samples) // bs)):
    out.append(np.asarray(jax.block_until_ready(compiled(params, jax.random.key(seed + i)))))
  wall = time.time() - t0
  tokens = np.concatenate(out)[:int(num_samples)]
  return tokenizer.decode(tokens), {"sample_seconds": wall, "compile_seconds": compile_s,
                                    "seconds_per_image": wall / max(int(num_samples), 1),
                                    "nfe_per_sample": 1}
