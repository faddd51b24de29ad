"""Autoregressive baseline on OpenWebText: DiT-small with a causal mask, exact NLL.

The same data, backbone size, optimizer and schedule as ``configs/owt_mdm.py``
(read its docstring for data preparation and hardware), trained with next-token
cross-entropy; evaluation reports the exact NLL / perplexity.

  python -m mdm_jax.main --config=owt_ar --workdir=runs/owt_ar \\
      --config.data.path=data/owt_gpt2_1024
"""

from mdm_jax.configs.owt_mdm import apply_variants, get_owt_base


def get_config(arg: str = ""):
  c = get_owt_base()
  c.objective = "ar"
  c.prime.ell = 1
  c.sampling.sampler = "ar"
  return apply_variants(c, arg, allowed=("microbatches", "smoke"))
