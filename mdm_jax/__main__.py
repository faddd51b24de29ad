"""``python -m mdm_jax``: the same command line as ``python -m mdm_jax.main``."""

from mdm_jax.main import run

run()
