"""Masked diffusion over tokens: MDM (ell = 1) and Prime (ell > 1), any masking schedule.

``config.objective = "diffusion"``.  The loss is the continuous-time ELBO of
``mdm_jax.diffusion.elbo`` (Prime's ``marginal`` or ``joint`` form, any registered
schedule, univariate or per position); evaluation always reports the valid
``marginal`` bound; generation uses any registered diffusion sampler.  A learned
schedule's parameters join the model's parameter tree (``params["schedule"]``), and
after each evaluation a per-position schedule's decoding order is drawn to
``<workdir>/order/step_N.{json,png}``.
"""

from __future__ import annotations

import json

from mdm_jax.core import distributed, paths
from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion import elbo
from mdm_jax.diffusion import prime as prime_lib
from mdm_jax.diffusion.schedules import Schedule, get_schedule
from mdm_jax.networks import attach_schedule, build_model
from mdm_jax.pictures.order import write_order
from mdm_jax.sampling import sampler_entry
from mdm_jax.tasks.base import TASKS, TokenTask, loss_config


@TASKS.register("diffusion")
class MaskedDiffusionTask(TokenTask):
  """MDM / Prime with a masking schedule (see the module docstring)."""
  objective = "diffusion"
  bound_name = "valid ELBO (marginal)"

  def __init__(self, *, schedule: Schedule, **kwargs):
    super().__init__(**kwargs)
    self.schedule = schedule

  @classmethod
  def from_config(cls, config, vocab_size: int) -> "MaskedDiffusionTask":
    codec = prime_lib.codec_from_config(vocab_size, config.prime)
    loss_cfg = loss_config(config)
    schedule = get_schedule(config.schedule).for_codec(codec)
    schedule.check(loss_cfg, codec)
    if schedule.needs_time_agnostic and bool(config.model.time_conditioning):
      raise ConfigError(f"schedule.name={schedule.name!r} trains without a time (the t-free order "
                        "estimator): it needs model.time_conditioning=False.")
    if schedule.value_dependent and config.sampling.sampler != "ancestral":
      raise ConfigError(f"schedule.name={schedule.name!r} reveals a digit at a rate that depends "
                        "on its value, which only sampling.sampler='ancestral' implements; got "
                        f"{config.sampling.sampler!r}.")
    model = build_model(config.model, vocab_size=vocab_size, ell=codec.ell, base=codec.base,
                        causal=False)
    return cls(codec=codec, model=attach_schedule(model, schedule), schedule=schedule,
               seq_len=int(config.data.seq_len), loss_cfg=loss_cfg,
               time_conditioning=bool(config.model.time_conditioning),
               num_time_samples=int(config.eval.num_time_samples),
               loss_chunk=int(config.model.get("loss_chunk", 0)))

  @classmethod
  def validate(cls, config) -> None:
    if config.sampling.sampler == "ar":
      raise ConfigError("sampling.sampler='ar' needs objective='ar'; diffusion models use e.g. "
                        "'ancestral', 'first_hitting', 'punt' or 'remdm'.")

  def describe(self) -> str:
    return super().describe() + f"; schedule {self.schedule.name}"

  def loss(self, params, tokens, key, *, train: bool, t=None, row_ids=None, **fields):
    del fields
    return elbo.diffusion_loss(self.apply_fn, params, tokens, key, codec=self.codec,
                               schedule=self.schedule, cfg=self.loss_cfg, train=train, t=t,
                               row_ids=row_ids, split=self.split)

  def bound(self, params, tokens, key, num_time_samples: int, row_ids=None):
    return elbo.diffusion_bound(self.apply_fn, params, tokens, key, codec=self.codec,
                                schedule=self.schedule, cfg=self.loss_cfg,
                                num_time_samples=num_time_samples, split=self.split,
                                row_ids=row_ids)

  def sampler_kwargs(self, sampler, config, num_samples, seq_len, num_steps):
    if sampler == "ar":
      raise ConfigError("sampler 'ar' needs objective='ar'; diffusion models use e.g. "
                        "'ancestral'.")
    kw = dict(codec=self.codec, schedule=self.schedule, batch_size=num_samples,
              seq_len=seq_len, num_steps=num_steps, carry_over=bool(config.prime.carry_over),
              time_conditioning=self.time_conditioning)
    accepted = sampler_entry(sampler).takes     # what the sampler declares it takes
    if "chunk_point" in accepted:
      kw["chunk_point"] = self.loss_cfg.chunk_point   # grouped reveals mirror training
    if "eps" in accepted:
      # The grid ends where training's times start (training.t_min): the network is never
      # asked about t < t_min, and what is still masked there is filled by the final
      # denoising draw at t_min.
      kw["eps"] = float(self.loss_cfg.t_min)
    return kw

  def after_eval(self, params, workdir, step, *, write=True):
    """The decoding-order picture of a per-position schedule, and a value-dependent
    schedule's learned exponents in ``<workdir>/schedule/step_N.json``.

    Every process calls it: the schedule's parameters (``params["schedule"]``, the only
    part read here) may be sharded across processes, so they are gathered collectively
    (``distributed.host_arrays``); the process with ``write`` writes the files.
    """
    host = (distributed.host_arrays({"schedule": params["schedule"]})
            if "schedule" in params else {})
    if not write:
      return None
    parameters = self.schedule.parameter_summary(host, step=step)
    if parameters is not None:
      d = paths.join(workdir, "schedule")
      paths.makedirs(d)
      paths.atomic_write(paths.join(d, f"step_{int(step)}.json"), json.dumps(parameters))
    summary = self.schedule.order_summary(host, self.seq_len, step=step)
    if summary is None:
      return None
    _, png = write_order(summary, workdir)
    return {"order/decoding_order": png}
