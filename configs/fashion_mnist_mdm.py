"""Plain masked diffusion (MDM, ell = 1) on Fashion-MNIST pixels: the baseline of
``configs/fashion_mnist_prime.py`` with the same backbone and budget.

  python -m mdm_jax.main --config=fashion_mnist_mdm --workdir=runs/fmnist_mdm

Variants: ``:tiny``, ``:levels=K``.
"""

from mdm_jax.configs.fashion_mnist_prime import apply_variants, get_fashion_base


def get_config(arg: str = ""):
  c = get_fashion_base()
  c.objective = "diffusion"
  c.prime.ell = 1
  return apply_variants(c, arg, allow_ell=False)
