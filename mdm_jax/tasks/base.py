"""The trainer's only contract: a ``Task`` turns batches into a loss, an eval metric and samples.

The train loop (``mdm_jax.trainers``) calls nothing but these methods, so a new kind of
model is one new file with a ``Task`` subclass registered by ``@TASKS.register(name)``
(``config.objective = name`` selects it):

* ``from_config(config, vocab_size)``: build it (and fail with a ``ConfigError`` on a
  combination it does not define); ``validate(config)`` checks that without building;
* ``init_params(key)``: the (logically boxed) parameters;
* ``sample_times(key, batch_size)`` and ``loss(params, tokens, key, *, train, t, row_ids,
  **fields)``: the per-row training loss in nats (the trainer divides by rows x seq_len)
  and scalar metrics; ``fields`` are the batch's other per-row fields (``labels``);
* ``eval_sums(params, batch, key)`` and ``eval_summary(sums)``: sums the trainer adds
  over the eval batches, and the report made of them (``nll`` is the headline number);
* ``generate(params, config, ...)``: samples and their stats;
* ``after_eval(params, workdir, step, write=...)``: pictures or files a task writes after each eval
  (it returns ``{tag: png_path}`` for TensorBoard, or None);
* ``sample_pictures(result, sampler)``: RGB pictures drawn from a ``generate`` result (the masking
  picture of a sampler's trajectory), written beside the samples;
* ``COMPAT_KEYS``: the config sections that must match when a run resumes;
* ``describe()``: one line for the log.

A task trained by parts (Di[M]O's generator and auxiliary, the feature classifier) sets
``trains_by_phases`` and returns its ``update_phases``: one optimizer update per phase,
each on one part of the parameters (``trainers.steps.make_phased_step``).  ``frozen`` is
what such a task reads and never trains (a teacher's parameters): the trainer passes it
to the jitted steps as an argument; ``init_train_params`` may start from it.

``TokenTask`` holds what the two token tasks (masked diffusion and autoregressive)
share: the Prime codec, the backbone, the exact or bound NLL per token as eval metric,
and the registered samplers.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax.core.errors import ConfigError
from mdm_jax.core.registry import Registry
from mdm_jax.diffusion import elbo
from mdm_jax.diffusion import prime as prime_lib
from mdm_jax.pictures.masking import masking_picture
from mdm_jax.sampling import generate as generate_lib

TASKS: Registry[Any] = Registry("task", "objective")


class Phase(NamedTuple):
  """One optimizer update of a task trained by parts.

  ``loss(part_params, params, batch, frozen, key) -> (scalar loss, metrics)`` is
  differentiated in ``part_params`` (= ``params[part]``, or every parameter when ``part``
  is None); ``params`` holds every part as updated by the phases before this one.
  Metrics ``<name>_loss`` and ``<name>_grad_norm`` are reported.
  """
  part: Optional[str]
  name: str
  loss: Callable[..., Tuple[Any, Dict[str, Any]]]
  key: Any


class Task:
  """The interface the trainer uses (see the module docstring)."""
  objective: ClassVar[str] = ""
  COMPAT_KEYS: ClassVar[Tuple[str, ...]] = ("objective", "model", "prime")
  bound_name: ClassVar[str] = ""
  trains_by_phases: ClassVar[bool] = False
  ema_part: ClassVar[Optional[str]] = None     # None: the EMA averages every parameter
  frozen: Any = None
  frozen_shardings: Any = None
  model: Any
  seq_len: int

  @classmethod
  def from_config(cls, config, vocab_size: int) -> "Task":
    raise NotImplementedError

  @classmethod
  def validate(cls, config) -> None:
    """Raises ``ConfigError`` for settings this task does not define (no building)."""
    del config

  def describe(self) -> str:
    return self.objective

  def init_params(self, key: jax.Array, batch_size: int = 2):
    raise NotImplementedError

  def init_train_params(self, key: jax.Array, batch_size: int = 2, frozen=None):
    """(parameters a run starts from, key of the train state's random stream): by default
    ``init_params`` of one half of ``key``, the other half for the stream.  ``frozen`` is
    ``self.frozen`` (None when only the shapes are asked for)."""
    del frozen
    k_param, k_state = jax.random.split(key)
    return self.init_params(k_param, batch_size), k_state

  def update_phases(self, key: jax.Array) -> Sequence[Phase]:
    """The updates of one train step, in order (only with ``trains_by_phases``)."""
    raise NotImplementedError

  def sample_times(self, key: jax.Array, batch_size: int) -> jax.Array:
    raise NotImplementedError

  def loss(self, params, tokens, key, *, train: bool, t=None, row_ids=None, **fields):
    raise NotImplementedError

  def eval_sums(self, params, batch: Dict[str, jax.Array], key: jax.Array) -> Dict[str, jax.Array]:
    raise NotImplementedError

  def eval_summary(self, sums: Dict[str, np.ndarray]) -> Dict[str, Any]:
    raise NotImplementedError

  def generate(self, params, config, *, seed: Optional[int] = None,
               num_samples: Optional[int] = None, num_steps: Optional[int] = None,
               sampler: Optional[str] = None, mesh=None, rules=None, **kwargs):
    raise NotImplementedError

  def after_eval(self, params, workdir: str, step: int, *,
                 write: bool = True) -> Optional[Dict[str, str]]:
    """Called on every process after each evaluation (``params`` may span processes, so
    any read of them must be collective); only the process with ``write`` writes files."""
    del params, workdir, step, write
    return None

  def sample_pictures(self, result, sampler: str = "") -> Dict[str, np.ndarray]:
    del result, sampler
    return {}


class TokenTask(Task):
  """A task over token sequences with a (Prime) codec and a backbone of token logits."""
  codec: prime_lib.PrimeCodec
  time_conditioning: bool = False

  def __init__(self, *, codec: prime_lib.PrimeCodec, model, seq_len: int,
               loss_cfg: elbo.DiffusionLossConfig, time_conditioning: bool = False,
               num_time_samples: int = 1, loss_chunk: int = 0):
    self.codec = codec
    self.model = model
    self.seq_len = int(seq_len)
    self.loss_cfg = loss_cfg
    self.time_conditioning = bool(time_conditioning)
    self.num_time_samples = int(num_time_samples)
    self.loss_chunk = int(loss_chunk)
    if self.loss_chunk < 0:
      raise ConfigError(f"model.loss_chunk must be >= 0 (0 = off), got {self.loss_chunk}.")
    if self.loss_chunk and not hasattr(getattr(model, "net", model), "head_logits"):
      raise ConfigError(f"model.loss_chunk={self.loss_chunk} needs a backbone that exposes its "
                        f"output head ({type(getattr(model, 'net', model)).__name__} does not); "
                        "set model.loss_chunk=0.")

  @property
  def vocab_size(self) -> int:
    return self.codec.vocab_size

  def describe(self) -> str:
    return (f"{self.objective}; codec V={self.codec.vocab_size} ell={self.codec.ell} "
            f"b={self.codec.base}")

  def apply_fn(self, params, digits, t, *, train: bool = False, rng=None):
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    return self.model.apply({"params": params}, digits, t, train=train, rngs=rngs)

  def features_fn(self, params, digits, t, *, train: bool = False, rng=None):
    """The backbone up to its output head: final features [B, L, D]."""
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    return self.model.apply({"params": params}, digits, t, train=train, rngs=rngs,
                            features_only=True)

  @property
  def split(self) -> Optional[elbo.SplitNetwork]:
    """The network cut before its head, ``model.loss_chunk`` positions per slice (None: off)."""
    if not self.loss_chunk:
      return None
    return elbo.SplitNetwork(features=self.features_fn, head=self.model.head_logits,
                             chunk=self.loss_chunk)

  def init_params(self, key, batch_size: int = 2):
    digits = jnp.zeros((batch_size, self.seq_len, self.codec.ell), jnp.int32)
    return self.model.init(key, digits, jnp.ones((batch_size,), jnp.float32))["params"]

  def sample_times(self, key, batch_size: int):
    """Stratified times in [t_min, 1] over the global batch."""
    return elbo.sample_times(key, batch_size, self.loss_cfg.t_min, self.loss_cfg.antithetic)

  def bound(self, params, tokens, key, num_time_samples: int, row_ids=None) -> jax.Array:
    """Per-sequence evaluation NLL in nats: exact (AR) or a valid bound (diffusion).

    ``row_ids``: the rows' global indices in the eval set (a row's random draws come from
    them, so its value does not depend on the eval batch); default 0..B-1.
    """
    raise NotImplementedError

  def eval_sums(self, params, batch, key):
    per_seq = self.bound(params, batch["tokens"], key, self.num_time_samples,
                         row_ids=batch.get("row_ids"))
    w = batch["weights"]
    return {"nll": jnp.sum(per_seq * w), "tokens": jnp.sum(w) * batch["tokens"].shape[1]}

  def eval_summary(self, sums):
    nll = float(sums["nll"]) / max(float(sums["tokens"]), 1.0)
    return {"nll": nll, "ppl_bound": float(math.exp(min(nll, 700.0))),
            "bits_per_token": nll / math.log(2.0), "eval_tokens": float(sums["tokens"])}

  # ---- generation
  def sample_pictures(self, result, sampler: str = "") -> Dict[str, np.ndarray]:
    """The masking picture of sample 0 (rows: sampler steps; columns: every digit of every
    token; grey masked, orange a partly observed token, green a complete one; axes, legend
    and a title naming ``sampler`` and ell), when the sampler returned its trajectory
    (``sampling.masking_picture``)."""
    traj = getattr(result, "trajectory", None)
    if traj is None:
      return {}
    traj = np.asarray(traj)[:, 0]                         # [steps + 1, L, ell]
    return {"masking": masking_picture(traj, self.codec.mask_id, sampler=sampler,
                                       ell=int(self.codec.ell))}

  def sampler_kwargs(self, sampler: str, config, num_samples: int, seq_len: int,
                     num_steps: int) -> Dict[str, Any]:
    """The static keyword arguments of ``sampler`` for this task."""
    raise NotImplementedError

  def default_sampler(self, config) -> str:
    return str(config.sampling.sampler)

  def generate(self, params, config, *, seed=None, num_samples=None, num_steps=None,
               sampler=None, mesh=None, rules=None, **kwargs):
    """Samples sequences; returns (SampleResult, stats with NFE, wall time, tokens/s, entropy).

    ``row_offset`` (keyword): the global index of the first sample, when a run's samples
    are drawn in several calls (sample i is drawn from fold_in(key(seed), i)).
    """
    row_offset = int(kwargs.pop("row_offset", 0))
    del kwargs
    sc = config.sampling
    sampler = sampler or self.default_sampler(config)
    n = int(num_samples or sc.num_samples)
    steps = int(num_steps or sc.num_steps)
    seq_len = int(sc.seq_len or self.seq_len)
    entry = generate_lib.sampler_entry(sampler)
    options = entry.bind(sc)             # the frozen, validated options of this sampler
    kw = self.sampler_kwargs(sampler, config, n, seq_len, steps)
    kw.update(temperature=float(sc.temperature), top_k=int(sc.top_k), top_p=float(sc.top_p))
    kw.update(options.kwargs())
    if (self.objective != "ar" and bool(sc.get("masking_picture", False))
        and "return_trajectory" in entry.takes):
      kw["return_trajectory"] = True
    return generate_lib.run_sampler(
        self.apply_fn, params, sampler, kw, seed=int(sc.seed if seed is None else seed),
        num_samples=n, seq_len=seq_len, num_steps=steps, mesh=mesh, rules=rules,
        report_idle=self.objective != "ar", row_offset=row_offset,
        precision=str(sc.get("precision", "float32")))


def loss_config(config) -> elbo.DiffusionLossConfig:
  """The diffusion objective's static settings from a config."""
  return elbo.DiffusionLossConfig(
      form=str(config.prime.loss), carry_over=bool(config.prime.carry_over),
      t_min=float(config.training.t_min), antithetic=bool(config.training.antithetic),
      weighting=str(config.training.loss_weighting), chunk_point=float(config.prime.chunk_point))
