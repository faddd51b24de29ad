"""Every configuration key of mdm_jax, with its default.

Experiment configs (``configs/shakespeare_prime.py`` and friends) start from
``get_base_config()`` and override a few fields.  Any value can be overridden
on the command line: ``--config.model.num_layers=6``.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # "diffusion": masked diffusion (prime.ell == 1 is the plain MDM, ell > 1 is Prime).
  # "ar": autoregressive baseline with the same backbone and a causal mask.
  c.objective = "diffusion"

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  c.data.dataset = "shakespeare"      # shakespeare | text_files
  c.data.path = ""                    # text_files: comma-separated files or globs
  c.data.tokenizer = "char"           # char | byte | bpe | gpt2
  c.data.bpe_vocab_size = 1024        # tokenizer == "bpe"
  c.data.gpt2_bpe_path = ""           # tokenizer == "gpt2": path to gpt2.tiktoken (r50k_base)
  c.data.seq_len = 256                # tokens per training sequence
  c.data.eval_fraction = 0.01         # tail of the token stream held out for eval
  c.data.shuffle_seed = 0

  # ---------------------------------------------------------------- Prime
  c.prime = ml_collections.ConfigDict()
  c.prime.ell = 2                     # sub-tokens per token; 1 = plain MDM
  c.prime.permute = False             # fixed seeded permutation of token ids before encoding
  c.prime.perm_seed = 0
  c.prime.loss = "marginal"           # marginal (valid bound, default) | joint (paper, NOT a bound)
  c.prime.carry_over = True           # restrict predictions to tokens consistent with observed digits

  # ---------------------------------------------------------------- schedule
  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "linear"          # linear | cosine | polynomial | loglinear | geometric
  c.schedule.power = 1.0              # polynomial: alpha = 1 - t**power
  c.schedule.eps = 1e-3               # loglinear: alpha = 1 - (1 - eps) t
  c.schedule.sigma_min = 1e-4         # geometric
  c.schedule.sigma_max = 20.0         # geometric

  # ---------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  c.model.name = "dit"
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.mlp_ratio = 4
  c.model.cond_dim = 128
  c.model.dropout = 0.0
  c.model.time_conditioning = False   # MDLM default: time-agnostic network (enables sampler caching)
  c.model.tie_embeddings = False      # only possible with prime.ell == 1
  c.model.dtype = "float32"           # compute dtype: float32 | bfloat16
  c.model.param_dtype = "float32"
  c.model.attention_impl = "xla"      # xla | cudnn (passed to jax.nn.dot_product_attention)
  c.model.scan_layers = True
  c.model.remat = "none"              # none | full | dots
  # Residual gate offset: 0.0 is adaLN-Zero (MDLM/DiT; blocks start as the identity);
  # 1.0 starts them as ordinary pre-LN blocks, which learns faster on tiny budgets.
  c.model.gate_init = 0.0

  # ---------------------------------------------------------------- training
  c.training = ml_collections.ConfigDict()
  c.training.batch_size = 32          # global batch (sequences per step)
  c.training.num_microbatches = 1     # gradient accumulation
  c.training.num_steps = 2000
  c.training.learning_rate = 1e-3
  c.training.lr_schedule = "cosine"   # constant | cosine
  c.training.warmup_steps = 100
  c.training.min_lr_ratio = 0.1
  c.training.weight_decay = 0.0
  c.training.b1 = 0.9
  c.training.b2 = 0.99
  c.training.grad_clip = 1.0
  c.training.ema_decay = 0.999        # 0 disables the EMA
  c.training.t_min = 1e-3             # t ~ U[t_min, 1], stratified over the global batch
  c.training.antithetic = True
  c.training.log_every = 50

  # ---------------------------------------------------------------- eval
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 500
  c.eval.batch_size = 32
  c.eval.num_batches = 8              # 0 = the whole eval split
  c.eval.num_time_samples = 4         # stratified t samples per sequence
  c.eval.use_ema = True
  c.eval.seed = 1234                  # fixed eval key, never split from the training key

  # ---------------------------------------------------------------- sampling
  c.sampling = ml_collections.ConfigDict()
  c.sampling.sampler = "ancestral"
  c.sampling.num_steps = 256
  c.sampling.num_samples = 4
  c.sampling.seq_len = 0              # 0 = data.seq_len
  c.sampling.temperature = 1.0
  c.sampling.top_k = 0                # 0 = off
  c.sampling.top_p = 1.0              # 1.0 = off
  c.sampling.every_steps = 0          # 0 = only at the end of training
  c.sampling.seed = 42
  c.sampling.use_ema = True

  # ---------------------------------------------------------------- checkpoints
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True

  # ---------------------------------------------------------------- sharding
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)           # over axes (data, fsdp, tensor); -1 = the rest
  c.mesh.axes = ("data", "fsdp", "tensor")
  # logical axis name -> mesh axis (or None = replicated); order matters.
  c.mesh.logical_rules = (
      ("batch", ("data", "fsdp")),
      ("length", None),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("vocab", "tensor"),
      ("cond", None),
      ("layers", None),
  )
  return c


def get_config():
  return get_base_config()
