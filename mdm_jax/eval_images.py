"""``python -m mdm_jax.eval_images`` still works: the program moved to ``mdm_jax.cli.eval_images``."""

import runpy
import sys

if __name__ == "__main__":
  print("note: 'python -m mdm_jax.eval_images' is now 'python -m mdm_jax.cli.eval_images'.", file=sys.stderr)
  runpy.run_module("mdm_jax.cli.eval_images", run_name="__main__", alter_sys=True)
