"""``python -m mdm_jax.eval_gaussian`` still works: the program moved to ``mdm_jax.cli.eval_gaussian``."""

import runpy
import sys

if __name__ == "__main__":
  print("note: 'python -m mdm_jax.eval_gaussian' is now 'python -m mdm_jax.cli.eval_gaussian'.", file=sys.stderr)
  runpy.run_module("mdm_jax.cli.eval_gaussian", run_name="__main__", alter_sys=True)
