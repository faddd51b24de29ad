"""Gaussian diffusion on images as a Task: the dit | mdt | mcdit arms of docs/method/mc_dit.md.

``config.objective = "gaussian"`` (with ``model.name = "mc_dit"``).  It implements the
trainer's ``Task`` contract, so sharding, EMA, Orbax checkpoints, metrics and
``--mode=train|eval|sample`` are the shared ones.

Data: the image pipeline's pixel tokens ``[B, H*W*C]`` are dequantised to
floats in [-1, 1] and cut into patches.  Class labels come with the batch
(``data.class_labels=True``) and are dropped with ``gaussian.label_dropout``
for classifier-free guidance.

Objectives (per sample; ``arm_loss`` is a pure function of the branch callables):

* ``dit``:   L = L_G = mean ||ε̂(X_t) - ε||²  (or EDM's weighted x0 loss).
* ``mdt``:   L = L_G + L_M, L_M the same loss of MDT-v1's masked pass (own ε, same
  t, all tokens), mask ratio ``gaussian.mask_ratio``.
* ``mcdit``: L = L_G + λ_C L_C, L_C = (1/(K P)) Σ_masked ||X̂0 - X0||² of branch C on
  Z = (1-m) X0 + m (a_t X0 + s_t ε') (``gaussian.context="noisy"``: the visible
  patches are X_t instead: the n2c ablation).

Evaluation: L_G on the fixed held-out batches at ``gaussian.eval_buckets`` fixed
noise levels with fixed ε (the same for every arm), per level and averaged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax.core import distributed
from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion import elbo
from mdm_jax.diffusion import gaussian as g
from mdm_jax.networks import build_model
from mdm_jax.networks.mc_dit import MCDiT, patchify_images, unpatchify_images
from mdm_jax.sampling.generate import BoundedCache, jit_with_shardings, sharding_key
from mdm_jax.tasks.base import TASKS, Task


CONTEXTS = ("clean", "noisy", "small_t")


@dataclasses.dataclass(frozen=True)
class GaussianConfig:
  form: str = "ddpm"                 # ddpm | edm
  schedule: str = "linear"           # GAUSSIAN_SCHEDULES (ddpm)
  num_timesteps: int = 1000
  edm: g.EDMConfig = g.EDMConfig()
  mask_ratio: float = 0.5            # mdt / mcdit
  lambda_c: float = 1.0              # mcdit: weight of L_C
  context: str = "clean"             # mcdit: clean (c2c) | noisy (n2c) | small_t (context_t)
  lambda_g: float = 1.0              # mcdit: weight of L_G (0: "C without G")
  label_dropout: float = 0.1
  sampler: str = "ddim"              # ddim | ddpm (form ddpm); edm_heun (form edm)
  ddim_eta: float = 0.0
  ddpm_variance: str = "small"
  guidance: float = 1.0              # classifier-free guidance w (1 = conditional, no guidance)
  clip_x0: bool = True
  eval_buckets: int = 8
  num_levels: int = 256

  def __post_init__(self):
    if self.form not in g.FORMS:
      raise ValueError(f"gaussian.form={self.form!r} must be one of {g.FORMS}.")
    if self.context not in CONTEXTS:
      raise ValueError(f"gaussian.context={self.context!r} must be one of {CONTEXTS}.")
    if self.lambda_g < 0:
      raise ValueError(f"gaussian.lambda_g must be >= 0, got {self.lambda_g}.")
    g.num_masked(1, self.mask_ratio)       # range check
    if self.lambda_c < 0:
      raise ValueError(f"gaussian.lambda_c must be >= 0, got {self.lambda_c}.")
    if not 0.0 <= self.label_dropout <= 1.0:
      raise ValueError(f"gaussian.label_dropout must be in [0, 1], got {self.label_dropout}.")
    if self.sampler not in g.GAUSSIAN_SAMPLERS:
      raise ValueError(f"gaussian.sampler={self.sampler!r}; choose one of "
                       f"{g.GAUSSIAN_SAMPLERS.names()}.")
    if (self.sampler == "edm_heun") != (self.form == "edm"):
      raise ValueError(f"gaussian.sampler={self.sampler!r} does not fit gaussian.form="
                       f"{self.form!r}: use ddim|ddpm with ddpm and edm_heun with edm.")
    if self.eval_buckets < 1:
      raise ValueError("gaussian.eval_buckets must be >= 1.")


class Branches(NamedTuple):
  """The network paths an arm's loss needs: callables of (params, inputs..., train)."""
  denoise: Callable          # (params, x [B,N,P], level [B], y [B], train) -> [B,N,P]
  clean: Optional[Callable] = None   # (params, z, visible [B,N], level, y, train) -> X̂0
  mdt: Optional[Callable] = None     # (params, x, keep_idx, mask, level, y, train) -> out


class Draws(NamedTuple):
  """Per-sample randomness of one training step (drawn per global row)."""
  eps: jax.Array             # [B, N, P] for branch G
  eps_aux: jax.Array         # [B, N, P] ε' of branch C / the MDT masked pass
  mask: jax.Array            # bool [B, N], exactly K True per row
  keep: jax.Array            # int32 [B, N-K], sorted kept indices
  drop: jax.Array            # bool [B]: label replaced by the null label
  u_ctx: jax.Array           # [B] in [0, 1): context_t's level of the visible patches, t_u = u t


def draw(key, row_ids, num_tokens: int, patch_dim: int, k: int, label_dropout: float) -> Draws:
  """Per-row draws from fold_in(key, row): microbatching does not change them."""
  row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids)
  keys = jax.vmap(lambda kk: jax.random.split(kk, 4))(row_keys)
  normal = jax.vmap(lambda kk: jax.random.normal(kk, (num_tokens, patch_dim), jnp.float32))
  mask, keep = g.token_masks(keys[:, 2], num_tokens, k)
  drop = jax.vmap(lambda kk: jax.random.uniform(kk) < label_dropout)(keys[:, 3])
  u_ctx = jax.vmap(lambda kk: jax.random.uniform(jax.random.fold_in(kk, 5)))(row_keys)
  return Draws(eps=normal(keys[:, 0]), eps_aux=normal(keys[:, 1]), mask=mask, keep=keep,
               drop=drop, u_ctx=u_ctx)


def context_noise(gc: GaussianConfig, noise, u):
  """context_t: the visible patches' level t_u = u * t (a DDPM step below t, or σ_u = u σ)."""
  if gc.form == "ddpm":
    return jnp.floor(u * noise.astype(jnp.float32)).astype(noise.dtype)
  return jnp.maximum(u * noise, gc.edm.sigma_min)


# ------------------------------------------------------------------ the two formulations
def net_input(gc: GaussianConfig, sched: g.DDPMSchedule, x0, eps, noise):
  """What the network sees for clean x0 and noise ε at level ``noise`` (step n or σ)."""
  if gc.form == "ddpm":
    return g.q_sample(sched, x0, noise, eps)
  _, _, c_in, _ = g.edm_precond(noise, gc.edm.sigma_data)
  return c_in[:, None, None] * (x0 + noise[:, None, None] * eps)


def net_level(gc: GaussianConfig, noise):
  """The network's scalar time input: the DDPM step, or 1000 c_noise = 250 ln σ for EDM."""
  if gc.form == "ddpm":
    return noise.astype(jnp.float32)
  return 250.0 * jnp.log(noise)


def g_loss(gc: GaussianConfig, out, x0, eps, noise):
  """Per-sample L_G: ε-MSE (ddpm) or EDM's λ(σ)-weighted x0 error (edm)."""
  if gc.form == "ddpm":
    return g.per_sample_mse(out, eps)
  x = x0 + noise[:, None, None] * eps
  d = g.edm_denoised(out, x, noise, gc.edm.sigma_data)
  return g.edm_weight(noise, gc.edm.sigma_data) * g.per_sample_mse(d, x0)


def arm_loss(arm: str, gc: GaussianConfig, sched: g.DDPMSchedule, fns: Branches, params, x0,
             y, noise, dr: Draws, train: bool = True):
  """Per-sample total loss [B] and {"loss_g", "loss_aux"} [B] for one arm.

  x0: clean patches [B, N, P]; y: labels [B] (already dropped to the null label);
  noise: int steps (ddpm) or σ (edm) [B], shared by every branch of a sample.
  """
  level = net_level(gc, noise)
  out = fns.denoise(params, net_input(gc, sched, x0, dr.eps, noise), level, y, train)
  l_g = g_loss(gc, out, x0, dr.eps, noise)
  zero = jnp.zeros_like(l_g)
  if arm == "dit":
    return l_g, {"loss_g": l_g, "loss_aux": zero}
  if arm == "mdt":
    x_m = net_input(gc, sched, x0, dr.eps_aux, noise)
    out_m = fns.mdt(params, x_m, dr.keep, dr.mask, level, y, train)
    l_m = g_loss(gc, out_m, x0, dr.eps_aux, noise)       # all tokens, as MDT's code
    return l_g + l_m, {"loss_g": l_g, "loss_aux": l_m}
  if arm == "mcdit":
    if fns.clean is None or gc.lambda_c == 0.0 or dr.keep.shape[1] == x0.shape[1]:
      return l_g, {"loss_g": l_g, "loss_aux": zero}        # K = 0 or λ_C = 0: L_C := 0
    x_noisy = net_input(gc, sched, x0, dr.eps_aux, noise)
    vis_level = None
    if gc.context == "clean":
      context = x0
    elif gc.context == "noisy":
      context = net_input(gc, sched, x0, dr.eps, noise)
    else:                                                   # small_t
      noise_u = context_noise(gc, noise, dr.u_ctx)
      context = net_input(gc, sched, x0, dr.eps, noise_u)
      vis_level = net_level(gc, noise_u)
    z = g.mix_clean_noisy(context, x_noisy, dr.mask)
    x0_hat = (fns.clean(params, z, ~dr.mask, level, y, train) if vis_level is None else
              fns.clean(params, z, ~dr.mask, level, y, train, vis_level))
    l_c = g.masked_token_mse(x0_hat, x0, dr.mask)
    total = gc.lambda_g * l_g + gc.lambda_c * l_c
    return total, {"loss_g": l_g, "loss_aux": l_c}
  raise ValueError(f"model.arm={arm!r} is not one of dit | mdt | mcdit.")


def tokens_to_float(tokens, num_levels: int):
  """Pixel tokens -> floats in [-1, 1] (the bin centre of each level; exact v/127.5 - 1 for 256)."""
  q = tokens.astype(jnp.int32)
  k = int(num_levels)
  if k == 256:
    v = q
  else:
    lo = -((-q * 256) // k)
    hi = -((-(q + 1) * 256) // k) - 1
    v = (lo + hi) // 2
  return v.astype(jnp.float32) / 127.5 - 1.0


def float_to_tokens(x, num_levels: int):
  """Floats in [-1, 1] -> pixel tokens (rounded to uint8, then quantised to num_levels)."""
  v = jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.int32)
  return v if int(num_levels) == 256 else (v * int(num_levels)) >> 8


class GaussianSample(NamedTuple):
  tokens: jax.Array          # int32 [n, H*W*C]
  nfe: int
  labels: jax.Array          # int32 [n]


@TASKS.register("gaussian")
@dataclasses.dataclass(frozen=True, eq=False)
class GaussianTask(Task):
  """The Task of a Gaussian-diffusion image model (see the module docstring)."""
  objective = "gaussian"
  COMPAT_KEYS = ("objective", "model", "prime", "gaussian.form", "gaussian.schedule",
                 "gaussian.num_timesteps")
  bound_name = "none: held-out denoising loss L_G"
  schedule: g.DDPMSchedule
  loss_cfg: elbo.DiffusionLossConfig
  model: MCDiT
  seq_len: int
  gc: GaussianConfig
  time_conditioning: bool = True
  # The jitted samplers of this task, by setting (owned here: they go with the task).
  sample_fns: BoundedCache = dataclasses.field(default_factory=lambda: BoundedCache(4),
                                               init=False, repr=False, compare=False)

  @property
  def mc(self):
    return self.model.cfg

  @classmethod
  def from_config(cls, config, vocab_size: int) -> "GaussianTask":
    return build_gaussian_task(config, vocab_size)

  @classmethod
  def validate(cls, config) -> None:
    _check_gaussian(config)

  def describe(self) -> str:
    return f"gaussian ({self.gc.form}, arm {self.mc.arm})"

  def init_params(self, key, batch_size: int = 2):
    x = jnp.zeros((batch_size, self.seq_len, 1), jnp.int32)
    return self.model.init(key, x, jnp.ones((batch_size,), jnp.float32))["params"]

  def sample_times(self, key, batch_size: int):
    return elbo.sample_times(key, batch_size, self.loss_cfg.t_min, self.loss_cfg.antithetic)

  # ---- branch callables
  def branches(self) -> Branches:
    m = self.model

    def denoise(params, x, level, y, train=False):
      return m.apply({"params": params}, x, level, y, train, method=MCDiT.denoise)

    def clean(params, z, visible, level, y, train=False, visible_level=None):
      return m.apply({"params": params}, z, visible, level, y, train, visible_level,
                     method=MCDiT.clean)

    def mdt(params, x, keep, mask, level, y, train=False):
      return m.apply({"params": params}, x, keep, mask, level, y, train, method=MCDiT.mdt_masked)

    return Branches(denoise=denoise, clean=clean if self.mc.has_clean_branch else None,
                    mdt=mdt if self.mc.arm == "mdt" else None)

  def _noise_from_u(self, u):
    if self.gc.form == "ddpm":
      return g.times_to_steps(u, self.schedule.num_steps)
    return g.edm_sigma(u, self.gc.edm)

  def images_to_patches(self, tokens):
    x = tokens_to_float(tokens, self.gc.num_levels)
    return patchify_images(x, self.mc.image_shape, self.mc.patch_size)

  # ---- training objective (the trainer's interface)
  def loss(self, params, tokens, key, *, train: bool, t=None, row_ids=None, labels=None):
    """Per-image loss times H*W*C (the trainer divides by B * seq_len), and metrics."""
    b = tokens.shape[0]
    mc = self.mc
    if row_ids is None:
      row_ids = jnp.arange(b, dtype=jnp.int32)
    k_t, k_rows = jax.random.split(key)
    if t is None:
      t = self.sample_times(k_t, b)
    x0 = self.images_to_patches(tokens)
    k = g.num_masked(mc.num_patches, self.gc.mask_ratio) if mc.arm != "dit" else 0
    dr = draw(k_rows, row_ids, mc.num_patches, mc.patch_dim, k, self.gc.label_dropout)
    y = (jnp.full((b,), mc.null_label, jnp.int32) if labels is None or mc.num_classes == 0
         else labels.astype(jnp.int32))
    y = jnp.where(dr.drop, mc.null_label, y)
    total, parts = arm_loss(mc.arm, self.gc, self.schedule, self.branches(), params, x0, y,
                            self._noise_from_u(t), dr, train)
    metrics = {name: jnp.mean(v) for name, v in parts.items()}
    return total * self.seq_len, metrics

  # ---- evaluation: held-out L_G by noise level
  def eval_levels(self):
    """The fixed noise levels of the eval buckets: DDPM steps at bucket centres, or σ log-spaced."""
    nb = int(self.gc.eval_buckets)
    if self.gc.form == "ddpm":
      t = self.schedule.num_steps
      return np.array([int((i + 0.5) * t / nb) for i in range(nb)], np.int32)
    e = self.gc.edm
    return np.exp(np.linspace(math.log(e.sigma_min * 10), math.log(e.sigma_max / 4), nb)
                  ).astype(np.float32)

  def eval_losses(self, params, tokens, labels, key, row_ids=None):
    """Per-image L_G [nb, B] at the fixed eval levels with fixed ε (fold_in(key, bucket)).

    With ``row_ids`` (the images' global eval indices) image r's ε at bucket i comes from
    fold_in(fold_in(key, i), r), so it does not depend on the eval batch.
    """
    mc = self.mc
    x0 = self.images_to_patches(tokens)
    b = x0.shape[0]
    y = jnp.full((b,), mc.null_label, jnp.int32) if labels is None else labels.astype(jnp.int32)
    fns = self.branches()
    out = []
    for i, lvl in enumerate(self.eval_levels()):
      noise = jnp.full((b,), lvl)
      k_i = jax.random.fold_in(key, i)
      if row_ids is None:
        eps = jax.random.normal(k_i, x0.shape, jnp.float32)
      else:
        eps = jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(k_i, r), x0.shape[1:],
                                                   jnp.float32))(row_ids)
      pred = fns.denoise(params, net_input(self.gc, self.schedule, x0, eps, noise),
                         net_level(self.gc, noise), y, False)
      out.append(g_loss(self.gc, pred, x0, eps, noise))
    return jnp.stack(out)

  def clean_probes(self, params, tokens, labels, key, ratio: float = 0.5):
    """Branch C's probes (docs/method/mc_dit.md §5) at the fixed eval levels, each [nb, B]:

    * ``inpaint_mse``: the context probe, D_c's masked-patch MSE of X̂0 against X0 with
      clean context on round(ratio N) masked patches;
    * ``noise_sensitivity``: the collapse probe, ||ΔX̂0|| / ||Δinput|| on the masked
      patches when their noise ε' is redrawn (context and mask fixed).  Near 0 means
      D_c ignores the noisy patches and copies from clean context.
    """
    mc, gc = self.mc, self.gc
    fns = self.branches()
    if fns.clean is None:
      raise ValueError("clean_probes: this model has no clean branch (model.arm='mcdit' "
                       "with a D_c or model.shared_decoder).")
    x0 = self.images_to_patches(tokens)
    b = x0.shape[0]
    y = jnp.full((b,), mc.null_label, jnp.int32) if labels is None else labels.astype(jnp.int32)
    k = g.num_masked(mc.num_patches, ratio)
    k_mask, k_e1, k_e2 = jax.random.split(key, 3)
    mask, _ = g.token_masks(jax.random.split(k_mask, b), mc.num_patches, k)
    m = mask[..., None].astype(jnp.float32)
    inpaint, sens = [], []
    for i, lvl in enumerate(self.eval_levels()):
      noise = jnp.full((b,), lvl)
      level = net_level(gc, noise)
      vis_level = net_level(gc, jnp.zeros_like(noise) if gc.form == "ddpm" else
                            jnp.full((b,), gc.edm.sigma_min, noise.dtype))
      outs, inputs = [], []
      for k_e in (k_e1, k_e2):
        eps = jax.random.normal(jax.random.fold_in(k_e, i), x0.shape, jnp.float32)
        z = g.mix_clean_noisy(x0, net_input(gc, self.schedule, x0, eps, noise), mask)
        extra = (vis_level,) if mc.context_time else ()
        outs.append(fns.clean(params, z, ~mask, level, y, False, *extra))
        inputs.append(z)
      inpaint.append(g.masked_token_mse(outs[0], x0, mask))
      d_out = jnp.sqrt(jnp.sum(jnp.square((outs[1] - outs[0]) * m), axis=(1, 2)))
      d_in = jnp.sqrt(jnp.sum(jnp.square((inputs[1] - inputs[0]) * m), axis=(1, 2)))
      sens.append(d_out / jnp.maximum(d_in, 1e-12))
    return {"inpaint_mse": jnp.stack(inpaint), "noise_sensitivity": jnp.stack(sens)}

  def eval_sums(self, params, batch, key):
    """L_G summed over the eval images, per fixed noise level, and the image count."""
    labels = batch.get("labels")
    if self.mc.num_classes == 0:
      labels = None
    per = self.eval_losses(params, batch["tokens"], labels, key,
                           row_ids=batch.get("row_ids"))                # [nb, B]
    w = batch["weights"]
    return {"denoise_loss": jnp.sum(per * w[None], axis=1), "images": jnp.sum(w)}

  def eval_summary(self, sums):
    count = float(sums["images"])
    per = np.asarray(sums["denoise_loss"], np.float64) / max(count, 1.0)
    levels = self.eval_levels()
    name = "t" if self.gc.form == "ddpm" else "sigma"
    out = {"nll": float(per.mean()), "denoise_loss": float(per.mean()),
           "eval_images": count, "bound": "none: held-out denoising loss L_G (Gaussian "
           f"{self.gc.form}), mean over {len(levels)} fixed noise levels"}
    for lvl, v in zip(levels, per):
      out[f"denoise_loss_{name}{float(lvl):g}"] = float(v)
    out["message"] = (f"held-out denoising loss {per.mean():.4f} (by {name}: "
                      + ", ".join(f"{float(l):g}:{v:.3f}" for l, v in zip(levels, per)) + ")")
    return out

  # ---- sampling
  def sample_images(self, params, key, labels, *, num_steps: int, sampler: str,
                    guidance: float):
    """Floats in [-1, 1], [n, H*W*C], and the NFE (pure; jit it)."""
    gc, mc = self.gc, self.mc
    n = labels.shape[0]
    fns = self.branches()

    def apply(x, level, y):
      if gc.form == "ddpm":
        return fns.denoise(params, x, net_level(gc, level), y, False)
      _, _, c_in, _ = g.edm_precond(level, gc.edm.sigma_data)
      f = fns.denoise(params, c_in[:, None, None] * x, net_level(gc, level), y, False)
      return g.edm_denoised(f, x, level, gc.edm.sigma_data)

    model_fn = g.guided_model_fn(apply, labels, mc.null_label, guidance)
    fn = g.GAUSSIAN_SAMPLERS.get(sampler)
    shape = (n, mc.num_patches, mc.patch_dim)
    if sampler == "edm_heun":
      x, nfe = fn(model_fn, key, shape, gc.edm, int(num_steps))
    else:
      x, nfe = fn(model_fn, key, shape, self.schedule, int(num_steps), eta=gc.ddim_eta,
                  variance=gc.ddpm_variance, clip_x0=gc.clip_x0)
    x = jnp.clip(x, -1.0, 1.0)
    return unpatchify_images(x, mc.image_shape, mc.patch_size), nfe * (1 if guidance == 1.0
                                                                        else 2)

  def generate(self, params, config, *, seed=None, num_samples=None, num_steps=None,
               sampler=None, mesh=None, rules=None, labels=None, guidance=None, row_offset=0):
    """The ``Task.generate`` contract (``tasks/base.py``): (GaussianSample, stats).  Labels
    default to classes 0, 1, 2, ... in turn (the null label for an unconditional model).

    ``row_offset`` (the index of the first sample when samples are drawn in several calls)
    selects the call's key, fold_in(key(seed), row_offset); the Gaussian samplers draw one
    noise array per call, so unlike the token samplers their samples depend on the batch.
    """
    sc = config.sampling
    n = int(num_samples or sc.num_samples)
    steps = int(num_steps or sc.num_steps)
    sampler = sampler if sampler in g.GAUSSIAN_SAMPLERS else self.gc.sampler
    w = float(self.gc.guidance if guidance is None else guidance)
    mc = self.mc
    if labels is None:
      labels = (np.arange(n) % mc.num_classes if mc.num_classes else
                np.full((n,), mc.null_label))
    labels = jnp.asarray(labels, jnp.int32)
    fn = self._sample_jit(n, steps, sampler, w, rules, mesh, params)
    rng = jax.random.key(int(sc.seed if seed is None else seed))
    if row_offset:
      rng = jax.random.fold_in(rng, int(row_offset))
    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with ctx:
      t0 = time.time()
      compiled = fn.lower(params, rng, labels).compile()
      compile_s = time.time() - t0
      t0 = time.time()
      x, nfe = jax.block_until_ready(compiled(params, rng, labels))
      wall = time.time() - t0
    x, nfe = distributed.host_arrays((x, nfe))   # collective when x spans processes
    tokens = np.asarray(float_to_tokens(x, self.gc.num_levels))
    stats = {"sampler": sampler, "guidance": w, "num_samples": n, "seq_len": self.seq_len,
             "num_steps": steps, "nfe": int(nfe), "wall_time_s": wall,
             "compile_time_s": compile_s, "tokens_per_s": n * self.seq_len / max(wall, 1e-9),
             "arm": mc.arm}
    return GaussianSample(tokens=tokens, nfe=int(nfe), labels=np.asarray(labels)), stats

  def _sample_jit(self, n: int, steps: int, sampler: str, w: float, rules, mesh, params):
    """The jitted ``(params, rng, labels) -> (images, nfe)`` of one setting, with explicit
    shardings under a mesh (parameters as placed, the rest replicated)."""
    def make():
      def run(params, rng, labels):
        with nn.logical_axis_rules(rules or ()):
          return self.sample_images(params, rng, labels, num_steps=steps, sampler=sampler,
                                    guidance=w)
      return jit_with_shardings(run, mesh, params, num_replicated=2)
    key = (n, steps, sampler, w, tuple(map(tuple, rules or ())), sharding_key(mesh, params))
    return self.sample_fns.get(key, make)





# ------------------------------------------------------------------ construction
def gaussian_config_from(config) -> GaussianConfig:
  gcfg = config.gaussian
  edm = g.EDMConfig(p_mean=float(gcfg.edm_p_mean), p_std=float(gcfg.edm_p_std),
                    sigma_data=float(gcfg.edm_sigma_data), sigma_min=float(gcfg.edm_sigma_min),
                    sigma_max=float(gcfg.edm_sigma_max), rho=float(gcfg.edm_rho))
  return GaussianConfig(
      form=str(gcfg.form), schedule=str(gcfg.schedule), num_timesteps=int(gcfg.num_timesteps),
      edm=edm, mask_ratio=float(gcfg.mask_ratio), lambda_c=float(gcfg.lambda_c),
      context=str(gcfg.context), lambda_g=float(gcfg.lambda_g),
      label_dropout=float(gcfg.label_dropout), sampler=str(gcfg.sampler),
      ddim_eta=float(gcfg.ddim_eta), ddpm_variance=str(gcfg.ddpm_variance),
      guidance=float(gcfg.guidance), clip_x0=bool(gcfg.clip_x0),
      eval_buckets=int(gcfg.eval_buckets), num_levels=int(config.data.num_levels))


def _check_gaussian(config) -> None:
  if config.model.name != "mc_dit":
    raise ConfigError(f"objective='gaussian' needs model.name='mc_dit', got "
                      f"{config.model.name!r} (start from --config=fashion_mnist_mcdit).")
  if float(config.model.dropout) != 0.0:
    raise ConfigError("objective='gaussian' does not support model.dropout; set it to 0.")
  if int(config.prime.ell) != 1:
    raise ConfigError("objective='gaussian' works on pixel values, not digits: set "
                      "--config.prime.ell=1.")


def build_gaussian_task(config, vocab_size: int) -> GaussianTask:
  """The Task for ``config.objective == "gaussian"`` (model mc_dit, the ``gaussian`` block)."""
  _check_gaussian(config)
  try:
    gc = gaussian_config_from(config)
    model = build_model(config.model, vocab_size=vocab_size, ell=1, base=0)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  mc = model.cfg
  if (gc.context == "small_t") != mc.context_time:
    raise ConfigError("gaussian.context='small_t' (context_t) and model.context_time=True go "
                      "together: the visible tokens must be told their noise level (use the "
                      "config variant :context_t).")
  if gc.lambda_g != 1.0 and mc.arm != "mcdit":
    raise ConfigError(f"gaussian.lambda_g is an mcdit option (model.arm={mc.arm!r}).")
  h, w, c = mc.image_shape
  if h * w * c != int(config.data.seq_len):
    raise ConfigError(f"data.seq_len={config.data.seq_len} must equal H*W*C of "
                      f"model.image_shape={mc.image_shape} ({h * w * c}).")
  loss_cfg = elbo.DiffusionLossConfig(t_min=float(config.training.t_min),
                                      antithetic=bool(config.training.antithetic))
  return GaussianTask(schedule=g.make_schedule(gc.schedule, gc.num_timesteps),
                      loss_cfg=loss_cfg, model=model, seq_len=int(config.data.seq_len), gc=gc)
