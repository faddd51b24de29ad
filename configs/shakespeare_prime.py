"""Prime (partial masking) on the complete Shakespeare plays, BPE-4096 tokens.

The embedded default: trains on 2 CPU cores in about 10 minutes and writes
Shakespeare-shaped samples (speaker names, verse lines, stage directions) in
which nearly nine words in ten are Shakespeare's words, with short runs of sense;
grammar across a line is not there yet at this budget
(docs/results/text_default.md).

  python -m mdm_jax.main --config=shakespeare_prime --workdir=runs/prime_l2

Variants: ``configs/shakespeare_prime.py:ell=4`` (any ell >= 2), ``:tiny``
(a seconds-long smoke run), combinable as ``:ell=3,tiny``.  Any key can be
overridden, e.g. ``--config.training.num_steps=4000``.

Evaluation always reports the *valid* bound (prime.loss is the training form;
"joint" is the withdrawn published objective and is never reported as a
likelihood).
"""

from mdm_jax.configs.base import get_base_config, parse_arg  # noqa: F401 (re-exported)


def apply_variants(c, arg: str):
  opts = parse_arg(arg)
  unknown = set(opts) - {"ell", "tiny", "loss"}
  if unknown:
    raise ValueError(f"Unknown config variant(s) {sorted(unknown)}; valid: ell=N, loss=..., tiny.")
  if "ell" in opts:
    c.prime.ell = int(opts["ell"])
  if "loss" in opts:
    c.prime.loss = str(opts["loss"])
    if c.prime.loss == "joint":   # one term per token: the per-digit schedule is not defined
      c.schedule.name = "linear"
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
  # Byte-level BPE trained locally on the corpus (a few seconds).  4096 tokens make
  # most common words one token, so a weak model still writes words: at 800 steps
  # 67% of sampled words are corpus words against 50% with BPE-1024, and the bound
  # per character is lower (1.84 against 2.22 nats).  4096 = 64**2 = 16**3 = 8**4:
  # exact digit bases for ell = 2, 3, 4 (and 6, 12).
  c.data.tokenizer = "bpe"
  c.data.bpe_vocab_size = 4096
  c.data.seq_len = 128                # ~390 characters
  # Number the vocabulary by context (mdm_jax/data/token_order.py): each block of 64
  # consecutive ids, i.e. each value of Prime's first digit at ell = 2, is a set of tokens
  # used alike (names, adjectives, word endings), so a half-seen token already tells its
  # word class.  Prime ell = 2 at 1,600 steps: bound 5.162 against 5.412 with BPE's own
  # ids (docs/results/vocabulary_order.md).  The ell = 1 configs (MDM, AR) keep "id".
  c.data.token_order = "context"
  # Sized for 2 CPU cores: ~0.24 s/step (~8.6k tokens/s idle), ~7 minutes end to end
  # (2,000 steps fit 10 minutes but gained only 0.024 nats; docs/results/text_default.md).
  # On this budget a narrower model that sees more tokens wins: 4 x 64 for 1,600
  # steps beats 4 x 128 for the ~900 steps that fit in the same time
  # (docs/results/text_default.md).
  c.model.num_layers = 4
  c.model.d_model = 64
  c.model.num_heads = 2
  c.model.gate_init = 1.0             # plain pre-LN start: learns faster on this budget
  # A width-3 residual conv over positions in each block: a masked token sees its
  # neighbours from step 1 instead of after attention has learnt to look next door
  # (ell = 1, 400 steps: eval bound 5.249 with it vs 5.728 without; docs/results/text_default.md).
  c.model.local_conv = 3
  c.training.batch_size = 16
  c.training.num_steps = 1600
  c.training.learning_rate = 3e-3
  c.training.warmup_steps = 50
  c.training.ema_decay = 0.99
  c.training.log_every = 25
  c.eval.every_steps = 800
  c.eval.batch_size = 16
  c.eval.num_batches = 16
  c.eval.num_time_samples = 2
  c.checkpoint.every_steps = 400
  c.sampling.num_steps = 128
  c.sampling.num_samples = 4
  # Nucleus sampling: at 800 steps the known-word rate of the samples goes from 67%
  # (top_p 1) to 76% (0.8) and 80% (0.7, but more repeats); the bound is unaffected.
  c.sampling.top_p = 0.8
  return c


def get_config(arg: str = ""):
  c = get_shakespeare_base()
  c.objective = "diffusion"
  c.prime.ell = 2
  # Coarse to fine: a token's leading digit (its word class under the context order) is
  # masked later, so it is learnt as context sooner and decoded first
  # (mdm_jax/diffusion/schedules/slot_poly.py).  At 1,600 steps: bound 4.992 against 5.168
  # with the linear schedule, and generative perplexity 232 against 328 at the same entropy
  # (docs/results/coarse_to_fine.md).
  c.schedule.name = "slot_poly"
  c.schedule.slot_tilt = 1.0
  return apply_variants(c, arg)
