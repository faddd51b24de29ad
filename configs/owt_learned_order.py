"""Learned decoding order on OpenWebText: the full-size setup with a per-position schedule.

``configs/owt_mdm.py`` (GPT-2 tokens, L = 1024, DiT-small, batch 512) with the
schedule switched to ``learned_poly``: alpha_i(t) = 1 - t**w_i, one exponent per
position learned with the model (see ``mdm_jax/diffusion/schedules/learned_poly.py``).  Training draws
two masks per sequence (leave-one-out score-function gradient for the exponents),
so a step costs about twice the network FLOPs of owt_mdm; evaluation costs the same.
The learned order is written to ``<workdir>/order/step_N.{json,png}`` at every eval.

  python -m mdm_jax.main --config=owt_learned_order --workdir=runs/owt_learned_order \\
      --config.data.path=data/owt_gpt2_1024

Variants (combinable): ``:ell=N`` (Prime, 2..8; default 1 = MDM), ``:microbatches=N``,
``:smoke``, ``:order=mlp`` (log w from a small position network).
"""

from mdm_jax.configs.owt_mdm import apply_variants, get_owt_base, parse_arg


def get_config(arg: str = ""):
  c = get_owt_base()
  c.objective = "diffusion"
  c.prime.ell = 1
  c.schedule.name = "learned_poly"    # the one line: the univariate schedule -> learned order
  c.schedule.order = "free"
  c.schedule.num_masks = 2
  opts = parse_arg(arg)
  if "order" in opts:
    c.schedule.order = str(opts.pop("order"))
  rest = ",".join(f"{k}={v}" if v is not True else k for k, v in opts.items())
  return apply_variants(c, rest)
