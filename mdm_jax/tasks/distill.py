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

``DistillTask`` is the method as a task trained by parts (``Task.trains_by_phases``):
its parameters are ``{"generator", "auxiliary"}``, the frozen teacher is ``Task.frozen``,
and one train step is the generator's update followed by ``distill.aux_steps``
auxiliary updates (``trainers.steps.make_phased_step``), so the common train loop runs
it.  The command line is ``python -m mdm_jax.main --mode=distill`` (``trainers/distill.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from mdm_jax.core import sharding as shd
from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion.prime import PrimeCodec
from mdm_jax.sampling import common
from mdm_jax.tasks.base import Phase, Task

Array = jax.Array

MASK_RATIOS = ("schedule", "arccos", "cosine", "uniform")


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
  return common.time_for_mask_prob(task.schedule, mask_fraction)


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
  """log p(x | x~) float32 [B, L, V] (restricted by carry-over at partially masked tokens):
  the samplers' ``sampling.common.model_logprobs`` without filters."""
  return common.model_logprobs(task.apply_fn, params, task.codec, digits, t, None,
                               carry_over=carry_over, temperature=1.0, top_k=0, top_p=1.0,
                               top_p_rule="holtzman")[0]


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



# ------------------------------------------------------------------ the task
@dataclasses.dataclass
class OneStepSamples:
  """What ``DistillTask.generate`` returns (the samplers' result, for one-step samples)."""
  tokens: Array
  trajectory: Any = None


class DistillTask(Task):
  """Di[M]O as a task trained by parts: generator then auxiliary, the teacher frozen.

  ``base`` is the teacher's masked diffusion task (codec, network, schedule); ``teacher``
  its parameters (None when only a generator is restored), placed by
  ``teacher_shardings``.  Parameters: ``{"generator": theta, "auxiliary": psi}``, both
  starting as copies of the teacher; the EMA averages the generator.
  """
  objective = "diffusion"
  trains_by_phases = True
  ema_part = "generator"

  def __init__(self, base, settings: DistillSettings, *, aux_steps: int = 1, teacher=None,
               teacher_shardings=None, num_samples: int = 64):
    if base.schedule.per_position:
      raise ConfigError("Di[M]O needs a scalar masking schedule (the re-mask ratio); the "
                        f"teacher's schedule {base.schedule.name!r} is multivariate.")
    self.base = base
    self.settings = settings
    self.aux_steps = int(aux_steps)
    self.frozen = teacher
    self.frozen_shardings = teacher_shardings
    self.num_samples = int(num_samples)
    self.model = base.model
    self.seq_len = base.seq_len

  @classmethod
  def from_config(cls, config, vocab_size: int) -> "DistillTask":
    raise ConfigError("Di[M]O distils a trained run: use --mode=distill --teacher_workdir=DIR "
                      "(objective stays the teacher's, 'diffusion').")

  def describe(self) -> str:
    return f"Di[M]O one-step distillation of {self.base.describe()}"

  def init_params(self, key, batch_size: int = 2):
    p = self.base.init_params(key, batch_size)
    return {"generator": p, "auxiliary": p}

  def init_train_params(self, key, batch_size: int = 2, frozen=None):
    """Generator and auxiliary start as copies of the teacher (fresh buffers); the train
    state's stream is ``key`` itself."""
    if frozen is None:          # shapes only
      return self.init_params(key, batch_size), key
    p = jax.tree.map(jnp.copy, frozen)
    return {"generator": p, "auxiliary": p}, key

  def update_phases(self, key):
    k_gen, k_aux = jax.random.split(key)
    return [Phase("generator", "gen", self._generator_loss, k_gen)] + [
        Phase("auxiliary", "aux", self._auxiliary_loss, jax.random.fold_in(k_aux, i))
        for i in range(self.aux_steps)]

  def _generator_loss(self, gen, params, batch, teacher, key):
    del batch
    return generator_loss(self.base, gen, teacher, params["auxiliary"], key, self.settings)

  def _auxiliary_loss(self, aux, params, batch, teacher, key):
    del batch, teacher
    return auxiliary_loss(self.base, aux, params["generator"], key, self.settings)

  def generate(self, params, config, *, seed: Optional[int] = None,
               num_samples: Optional[int] = None, num_steps=None, sampler=None, mesh=None,
               rules=None, **kwargs):
    """One-step samples of ``params["generator"]`` (every process runs it; every process
    gets all tokens)."""
    del num_steps, sampler, rules, kwargs
    n = int(num_samples or self.num_samples)
    seed = int(config.sampling.seed if seed is None else seed)
    fn = jax.jit(lambda p, k: one_step_generate(self.base, p, k, n, self.settings),
                 out_shardings=None if mesh is None else shd.replicated(mesh))
    tokens = fn(params["generator"], jax.random.key(seed))
    stats = {"num_samples": n, "nfe": 1, "num_steps": 1, "sampler": "Di[M]O one-step generator"}
    return OneStepSamples(tokens=tokens), stats
