"""Gaussian (continuous) diffusion for images: schedules, losses, samplers, guidance, masks.

Everything here is a pure function of arrays and PRNG keys (jit-able); the
network is passed in as a callable.  Two formulations (``docs/method/mc_dit.md`` §3.1):

* ``ddpm`` (default): the variance-preserving chain of DDPM with ``T`` steps and a
  named beta schedule (``GAUSSIAN_SCHEDULES``: ``linear`` 1e-4..0.02 as DiT/MDT,
  ``cosine``), integer time ``n`` in [0, T), ε-prediction with a fixed (not
  learned) variance; x_n = a_n x0 + s_n ε with a_n² = ᾱ_n, s_n² = 1 - ᾱ_n.
* ``edm``: Karras et al.'s preconditioning as MaskDiT uses it: ln σ ~ N(P_mean,
  P_std²), D(x; σ) = c_skip x + c_out F(c_in x; c_noise), loss weight
  (σ² + σ_d²) / (σ σ_d)².

Samplers (``GAUSSIAN_SAMPLERS``): ``ddim`` (η, respaced), ``ddpm`` (ancestral,
fixed variance ``small`` = posterior β̃ or ``large`` = β, respaced) for the
``ddpm`` form, and ``edm_heun`` (2nd-order deterministic) for ``edm``.  Each takes
``model_fn(x, level) -> output`` where ``level`` is the integer step (ddpm) or σ
(edm) per sample and the output is ε̂ (ddpm) or D (edm).  Classifier-free guidance
wraps a conditional model: ``guided_model_fn``.

Masks for the masked-reconstruction arms (``docs/method/mc_dit.md`` §3.2-3.3): exactly
``K = round(r N)`` masked tokens per sample, from an argsort of uniform noise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax.core.registry import Registry

FORMS = ("ddpm", "edm")
GAUSSIAN_SCHEDULES: Registry[Callable] = Registry("gaussian_schedule", "gaussian.schedule")
GAUSSIAN_SAMPLERS: Registry[Callable] = Registry("gaussian_sampler", "gaussian.sampler")


# ------------------------------------------------------------------ DDPM schedules
@GAUSSIAN_SCHEDULES.register("linear")
def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
  """DDPM's linear betas (scaled by 1000/T so other T keep the same chain shape)."""
  scale = 1000.0 / num_steps
  return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)


@GAUSSIAN_SCHEDULES.register("cosine")
def cosine_betas(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal's cosine ᾱ, as betas clipped at max_beta."""
  f = lambda i: math.cos((i / num_steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
  return np.array([min(1 - f(i + 1) / f(i), max_beta) for i in range(num_steps)], np.float64)


@dataclasses.dataclass(frozen=True)
class DDPMSchedule:
  """A discrete VP chain: betas [T] and ᾱ [T] (float64 numpy, used as jit constants)."""
  betas: np.ndarray
  alphas_cumprod: np.ndarray

  @property
  def num_steps(self) -> int:
    return int(len(self.betas))


def make_schedule(name: str = "linear", num_steps: int = 1000) -> DDPMSchedule:
  betas = np.asarray(GAUSSIAN_SCHEDULES.get(name)(int(num_steps)), np.float64)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
    raise ValueError(f"gaussian schedule {name!r} must give betas in (0, 1).")
  return DDPMSchedule(betas=betas, alphas_cumprod=np.cumprod(1.0 - betas))


def alpha_sigma(sched: DDPMSchedule, n) -> Tuple[jax.Array, jax.Array]:
  """(a_n, s_n) = (sqrt ᾱ_n, sqrt(1 - ᾱ_n)) for integer steps n (any shape)."""
  ac = jnp.asarray(sched.alphas_cumprod, jnp.float32)[n]
  return jnp.sqrt(ac), jnp.sqrt(1.0 - ac)


def _bcast(v, x):
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def q_sample(sched: DDPMSchedule, x0, n, eps):
  """x_n = a_n x0 + s_n ε, with n [B] broadcast over x0's trailing dims."""
  a, s = alpha_sigma(sched, n)
  return _bcast(a, x0) * x0 + _bcast(s, x0) * eps


def times_to_steps(u, num_steps: int):
  """Continuous u in [0, 1] (the trainer's stratified times) -> integer steps in [0, T)."""
  return jnp.clip(jnp.floor(u * num_steps), 0, num_steps - 1).astype(jnp.int32)


def per_sample_mse(pred, target):
  """Mean squared error over all non-batch dims: [B, ...] -> [B]."""
  d = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.mean(d.reshape(d.shape[0], -1), axis=-1)


# ------------------------------------------------------------------ EDM
@dataclasses.dataclass(frozen=True)
class EDMConfig:
  p_mean: float = -1.2
  p_std: float = 1.2
  sigma_data: float = 0.5
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0


def edm_sigma(u, cfg: EDMConfig):
  """Training σ from u in (0, 1) (stratified times stay stratified): exp(P_mean + P_std Φ⁻¹(u))."""
  u = jnp.clip(u, 1e-6, 1.0 - 1e-6)
  return jnp.exp(cfg.p_mean + cfg.p_std * jax.scipy.special.ndtri(u))


def edm_precond(sigma, sigma_data: float):
  """(c_skip, c_out, c_in, c_noise) of EDM for σ [B]."""
  sd2 = sigma_data ** 2
  c_skip = sd2 / (sigma ** 2 + sd2)
  c_out = sigma * sigma_data / jnp.sqrt(sigma ** 2 + sd2)
  c_in = 1.0 / jnp.sqrt(sigma ** 2 + sd2)
  c_noise = jnp.log(sigma) / 4.0
  return c_skip, c_out, c_in, c_noise


def edm_weight(sigma, sigma_data: float):
  return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def edm_denoised(net_out, x, sigma, sigma_data: float):
  """D(x; σ) = c_skip x + c_out F."""
  c_skip, c_out, _, _ = edm_precond(sigma, sigma_data)
  return _bcast(c_skip, x) * x + _bcast(c_out, x) * net_out


def edm_sigmas(num_steps: int, cfg: EDMConfig) -> np.ndarray:
  """Karras et al.'s ρ-spaced σ grid, from σ_max down to σ_min, then 0: [num_steps + 1]."""
  i = np.arange(num_steps, dtype=np.float64)
  lo, hi = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
  s = (hi + i / max(num_steps - 1, 1) * (lo - hi)) ** cfg.rho
  return np.concatenate([s, [0.0]])


# ------------------------------------------------------------------ masks
def num_masked(num_tokens: int, ratio: float) -> int:
  """K = round(r N), rounding halves up."""
  if not 0.0 <= float(ratio) < 1.0:
    raise ValueError(f"mask ratio must be in [0, 1), got {ratio}.")
  return int(math.floor(float(ratio) * num_tokens + 0.5))


def row_token_mask(key, num_tokens: int, k: int) -> Tuple[jax.Array, jax.Array]:
  """One sample's mask: (bool [N], True = masked, exactly k of them; sorted kept indices [N-k])."""
  order = jnp.argsort(jax.random.uniform(key, (num_tokens,)))
  rank = jnp.argsort(order)
  mask = rank < k
  keep = jnp.sort(order[k:]).astype(jnp.int32)
  return mask, keep


def token_masks(keys, num_tokens: int, k: int) -> Tuple[jax.Array, jax.Array]:
  """Per-row keys [B] -> (masks bool [B, N], kept indices int32 [B, N - k])."""
  return jax.vmap(lambda kk: row_token_mask(kk, num_tokens, k))(keys)


def mix_clean_noisy(x0, x_noisy, mask):
  """Branch C's input Z = (1 - m) ⊙ x0 + m ⊙ x_noisy, bit-exact: [B, N, P] with mask [B, N]."""
  return jnp.where(mask[..., None], x_noisy, x0)


def masked_token_mse(pred, target, mask):
  """(1 / (K P)) Σ_{masked i} ||pred_i - target_i||² per sample: [B]; 0 where K = 0."""
  d = jnp.sum(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
  m = mask.astype(jnp.float32)
  k = jnp.sum(m, axis=-1)
  return jnp.sum(d * m, axis=-1) / jnp.maximum(k * pred.shape[-1], 1.0)


# ------------------------------------------------------------------ guidance
def cfg_combine(out_cond, out_uncond, w: float):
  """Classifier-free guidance: u + w (c - u); w = 1 is the plain conditional model."""
  return out_uncond + w * (out_cond - out_uncond)


def guided_model_fn(apply: Callable, labels, null_label: int, w: float) -> Callable:
  """(x, level) -> guided output from apply(x, level, labels); one batched call when w != 1."""
  if float(w) == 1.0:
    return lambda x, level: apply(x, level, labels)

  def fn(x, level):
    b = x.shape[0]
    out = apply(jnp.concatenate([x, x]), jnp.concatenate([level, level]),
                jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    return cfg_combine(out[:b], out[b:], w)
  return fn


# ------------------------------------------------------------------ samplers
def respaced_steps(total: int, num_steps: int) -> np.ndarray:
  """num_steps integer steps evenly spread over [0, total), descending (T-1 first)."""
  if not 1 <= num_steps <= total:
    raise ValueError(f"sampling.num_steps must be in [1, {total}], got {num_steps}.")
  return np.unique(np.round(np.linspace(0, total - 1, num_steps)).astype(np.int64))[::-1].copy()


def _ac_pairs(sched: DDPMSchedule, num_steps: int):
  ts = respaced_steps(sched.num_steps, num_steps)
  ac = sched.alphas_cumprod[ts]
  ac_prev = np.concatenate([sched.alphas_cumprod[ts[1:]], [1.0]])
  return ts, ac, ac_prev


@GAUSSIAN_SAMPLERS.register("ddim")
def ddim_sample(model_fn, key, shape, sched: DDPMSchedule, num_steps: int, eta: float = 0.0,
                clip_x0: bool = True, **unused):
  """DDIM (η = 0: deterministic) over a respaced grid; returns (x0 [shape], NFE)."""
  del unused
  ts, ac, acp = _ac_pairs(sched, num_steps)
  k0, key = jax.random.split(key)
  x = jax.random.normal(k0, shape, jnp.float32)

  def step(x, inp):
    t, a, ap, k = inp
    eps = model_fn(x, jnp.full((shape[0],), t, jnp.int32)).astype(jnp.float32)
    x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    sig = eta * jnp.sqrt((1 - ap) / (1 - a)) * jnp.sqrt(1 - a / ap)
    noise = jax.random.normal(k, shape, jnp.float32)
    x = jnp.sqrt(ap) * x0 + jnp.sqrt(jnp.maximum(1 - ap - sig ** 2, 0.0)) * eps + sig * noise
    return x, None

  keys = jax.random.split(key, len(ts))
  x, _ = jax.lax.scan(step, x, (jnp.asarray(ts, jnp.int32), jnp.asarray(ac, jnp.float32),
                                jnp.asarray(acp, jnp.float32), keys))
  return x, len(ts)


@GAUSSIAN_SAMPLERS.register("ddpm")
def ddpm_sample(model_fn, key, shape, sched: DDPMSchedule, num_steps: int,
                variance: str = "small", clip_x0: bool = True, **unused):
  """Ancestral DDPM with a fixed variance over a respaced grid; returns (x0, NFE).

  ``variance``: ``small`` = posterior β̃ (β (1 - ᾱ_prev)/(1 - ᾱ)), ``large`` = β of the
  respaced chain.  No noise is added on the last step.
  """
  del unused
  if variance not in ("small", "large"):
    raise ValueError(f"gaussian.ddpm_variance must be small|large, got {variance!r}.")
  ts, ac, acp = _ac_pairs(sched, num_steps)
  beta = 1.0 - ac / acp
  if variance == "small":
    var = beta * (1.0 - acp) / (1.0 - ac)
  else:
    var = beta.copy()
  var[-1] = 0.0
  k0, key = jax.random.split(key)
  x = jax.random.normal(k0, shape, jnp.float32)

  def step(x, inp):
    t, a, ap, b, v, k = inp
    eps = model_fn(x, jnp.full((shape[0],), t, jnp.int32)).astype(jnp.float32)
    x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
    mean = (jnp.sqrt(ap) * b / (1 - a)) * x0 + (jnp.sqrt(1 - b) * (1 - ap) / (1 - a)) * x
    x = mean + jnp.sqrt(v) * jax.random.normal(k, shape, jnp.float32)
    return x, None

  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  keys = jax.random.split(key, len(ts))
  x, _ = jax.lax.scan(step, x, (jnp.asarray(ts, jnp.int32), f32(ac), f32(acp), f32(beta),
                                f32(var), keys))
  return x, len(ts)


@GAUSSIAN_SAMPLERS.register("edm_heun")
def edm_heun_sample(model_fn, key, shape, edm: EDMConfig, num_steps: int, **unused):
  """EDM's deterministic 2nd-order (Heun) sampler; model_fn(x, σ) -> D(x; σ).  (x0, NFE)."""
  del unused
  sig = edm_sigmas(int(num_steps), edm)
  x = jax.random.normal(key, shape, jnp.float32) * sig[0]
  b = shape[0]

  def step(x, inp):
    s, s_next = inp
    d = (x - model_fn(x, jnp.full((b,), s))) / s
    x_e = x + (s_next - s) * d
    d2 = (x_e - model_fn(x_e, jnp.full((b,), jnp.maximum(s_next, 1e-8)))) / jnp.maximum(
        s_next, 1e-8)
    x_h = x + (s_next - s) * 0.5 * (d + d2)
    return jnp.where(s_next > 0, x_h, x_e), None

  x, _ = jax.lax.scan(step, x, (jnp.asarray(sig[:-1], jnp.float32),
                                jnp.asarray(sig[1:], jnp.float32)))
  return x, 2 * int(num_steps)   # the last Heun correction is computed and discarded


# ------------------------------------------------------------------ information (docs/method/mc_dit.md §2)
def mi_clean_to_clean(rho) -> float:
  """I(X0^U; X0^M) in nats for Gaussian blocks with canonical correlations rho."""
  rho = np.asarray(rho, np.float64)
  return float(-0.5 * np.sum(np.log1p(-rho ** 2)))


def mi_noisy_to_noisy(rho, alpha_bar: float) -> float:
  """I(X_t^U; X_t^M) = -½ Σ log(1 - ᾱ² ρ²) for unit-variance whitened blocks."""
  rho = np.asarray(rho, np.float64)
  return float(-0.5 * np.sum(np.log1p(-(float(alpha_bar) ** 2) * rho ** 2)))
