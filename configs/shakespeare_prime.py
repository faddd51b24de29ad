"""Prime (partial masking) on the complete Shakespeare plays, character level.

The embedded default: trains on 2 CPU cores in about 10 minutes and writes
readable, Shakespeare-like samples.

  python -m mdm_jax.main --config=configs/shakespeare_prime.py --workdir=runs/prime_l2

Variants: ``configs/shakespeare_prime.py:ell=4`` (any ell >= 2), ``:tiny``
(a seconds-long smoke run), combinable as ``:ell=3,tiny``.  Any key can be
overridden, e.g. ``--config.training.num_steps=4000``.

Evaluation always reports the *valid* bound (prime.loss is the training form;
"joint" is the withdrawn published objective and is never reported as a
likelihood).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.base import get_base_config


def parse_arg(arg: str) -> dict:
  out = {}
  for item in filter(None, (arg or "").split(",")):
    k, _, v = item.partition("=")
    out[k.strip()] = v.strip() if v else True
  return out


def apply_variants(c, arg: str):
  opts = parse_arg(arg)
  unknown = set(opts) - {"ell", "tiny", "loss"}
  if unknown:
    raise ValueError(f"Unknown config variant(s) {sorted(unknown)}; valid: ell=N, loss=..., tiny.")
  if "ell" in opts:
    c.prime.ell = int(opts["ell"])
  if "loss" in opts:
    c.prime.loss = str(opts["loss"])
  if opts.get("tiny"):
    c.model.num_layers, c.model.d_model, c.model.num_heads = 2, 64, 2
    c.data.seq_len = 64
    c.training.batch_size = 8
    c.training.num_steps = 30
    c.training.warmup_steps = 5
    c.training.log_every = 10
    c.eval.every_steps = 30
    c.eval.batch_size = 8
    c.eval.num_batches = 2
    c.eval.num_time_samples = 1
    c.checkpoint.every_steps = 30
    c.sampling.num_steps = 16
    c.sampling.num_samples = 2
  return c


def get_shakespeare_base():
  c = get_base_config()
  c.data.dataset = "shakespeare"
  c.data.tokenizer = "char"
  c.data.seq_len = 256
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.training.batch_size = 16
  c.training.num_steps = 1200
  c.training.learning_rate = 2e-3
  c.training.warmup_steps = 100
  c.training.ema_decay = 0.99
  c.training.log_every = 25
  c.eval.every_steps = 400
  c.eval.batch_size = 16
  c.eval.num_batches = 8
  c.eval.num_time_samples = 2
  c.checkpoint.every_steps = 400
  c.sampling.num_steps = 256
  c.sampling.num_samples = 4
  return c


def get_config(arg: str = ""):
  c = get_shakespeare_base()
  c.objective = "diffusion"
  c.prime.ell = 2
  return apply_variants(c, arg)
