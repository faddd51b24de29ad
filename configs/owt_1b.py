"""A 1B-parameter masked diffusion model on OpenWebText, sized for a TPU pod slice.

The data, tokenizer (GPT-2, V = 50,257), schedule and recipe of ``configs/owt_mdm.py``
(read its docstring for data preparation) with a wider and deeper DiT: 24 layers,
d_model 2,048, 16 heads of 128, MLP 4x: 1.28 B parameters in the blocks and 0.21 B in
the token embedding and the output head (1.49 B in all), and a global batch of 1,024 sequences of 1,024 tokens
(about 1 M tokens per step).  Parameters, optimizer state and EMA are float32 and fully
sharded (FSDP over every chip); compute is bfloat16.  ``:ell=N`` trains Prime with N
digits per token instead of MDM; ``:smoke`` is a CPU-sized check of the same code path.

  python -m mdm_jax.main --config=owt_1b --workdir=gs://BUCKET/runs/owt_1b \\
      --config.data.path=gs://BUCKET/data/owt_gpt2_1024

Memory and speed per chip, compiled for v5e, v5p and v6e slices up to 256 chips, are in
BENCHMARKS.md ("Compiled for TPU, not run"):

  python -m mdm_jax.benchmarks.tpu_compile --config=owt_1b --topology=v5p:8x8x4 \\
      --per_chip_batch=4
"""

from mdm_jax.configs.owt_mdm import apply_variants, get_owt_base


def set_dit_1b(c):
  """DiT 24 x 2048, 16 heads, MLP 4x, 256-wide conditioning."""
  c.model.num_layers = 24
  c.model.d_model = 2048
  c.model.num_heads = 16
  c.model.mlp_ratio = 4
  c.model.cond_dim = 256
  return c


def get_config(arg: str = ""):
  c = get_owt_base()
  c.objective = "diffusion"
  c.prime.ell = 1
  c.prime.loss = "marginal"
  c.prime.carry_over = True
  set_dit_1b(c)
  c.training.batch_size = 1024
  c.training.learning_rate = 2e-4
  c.training.warmup_steps = 5000
  c.training.num_steps = 500_000
  c.eval.batch_size = 1024
  c.eval.num_batches = 8
  c = apply_variants(c, arg)
  return c
