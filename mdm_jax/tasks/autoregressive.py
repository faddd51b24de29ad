"""The autoregressive baseline: the same backbone with a causal mask, exact NLL.

``config.objective = "ar"`` (with ``prime.ell = 1``).  The input is
[BOS, x_0 .. x_{L-2}] with BOS the embedding row the diffusion models use for the mask
(id V); the eval number is the exact -log p(x) per token, not a bound; samples come
from the ``ar`` sampler.  An AR run also scores other runs' samples (generative
perplexity, ``mdm_jax.metrics.gen_ppl``).
"""

from __future__ import annotations

import jax

from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion import autoregressive as ar_lib
from mdm_jax.diffusion import prime as prime_lib
from mdm_jax.networks import build_model
from mdm_jax.tasks.base import TASKS, TokenTask, loss_config


@TASKS.register("ar")
class AutoregressiveTask(TokenTask):
  """Left-to-right language model over whole tokens."""
  objective = "ar"
  bound_name = "exact NLL (AR)"

  @classmethod
  def from_config(cls, config, vocab_size: int) -> "AutoregressiveTask":
    cls.validate(config)
    codec = prime_lib.codec_from_config(vocab_size, config.prime)
    model = build_model(config.model, vocab_size=vocab_size, ell=1, base=codec.base, causal=True)
    return cls(codec=codec, model=model, seq_len=int(config.data.seq_len),
               loss_cfg=loss_config(config),
               time_conditioning=bool(config.model.time_conditioning))

  @classmethod
  def validate(cls, config) -> None:
    if int(config.prime.ell) != 1:
      raise ConfigError("objective='ar' is the autoregressive baseline over whole tokens: set "
                        "--config.prime.ell=1 (or use --config=shakespeare_ar).")
    if config.model.name == "image_dit":
      raise ConfigError("model.name='image_dit' is a bidirectional diffusion backbone; use "
                        "objective='diffusion'.")

  @property
  def bos_id(self) -> int:
    return self.codec.mask_id

  def loss(self, params, tokens, key, *, train: bool, t=None, row_ids=None, **fields):
    del t, fields
    if row_ids is not None:
      key = jax.random.fold_in(key, row_ids[0])
    return ar_lib.ar_loss(self.apply_fn, params, tokens, key, bos_id=self.bos_id, train=train)

  def bound(self, params, tokens, key, num_time_samples: int, row_ids=None):
    del num_time_samples, row_ids     # exact: no random draw
    return ar_lib.ar_loss(self.apply_fn, params, tokens, key, bos_id=self.bos_id,
                          train=False)[0]

  def token_nll(self, params, tokens):
    """-log p(token | BOS, left context) [B, L]: the scorer's predict function."""
    return ar_lib.ar_token_nll(self.apply_fn, params, tokens, bos_id=self.bos_id)

  def default_sampler(self, config) -> str:
    return "ar"

  def sampler_kwargs(self, sampler, config, num_samples, seq_len, num_steps):
    if sampler != "ar":
      raise ConfigError(f"objective='ar' models sample with sampler 'ar', not {sampler!r}: "
                        "set --config.sampling.sampler=ar.")
    return dict(vocab_size=self.vocab_size, batch_size=num_samples, seq_len=seq_len,
                bos_id=self.bos_id)
