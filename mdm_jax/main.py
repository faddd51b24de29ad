"""``python -m mdm_jax.main``: the command line (``mdm_jax/cli/main.py``).

On a CPU host the process first restarts itself with a tuned glibc malloc
(``mdm_jax.core.host_env``), before JAX or anything large is imported, which is why this
entry module imports the command line only after that.  ``python -m mdm_jax`` and the
``mdm-jax`` command run the same.
"""

import sys


def run() -> None:
  from mdm_jax.core import host_env  # pylint: disable=import-outside-toplevel
  host_env.reexec_with_tuned_malloc(["-m", "mdm_jax.main", *sys.argv[1:]])
  from mdm_jax.cli import main as cli_main  # pylint: disable=import-outside-toplevel
  cli_main.run()


if __name__ == "__main__":
  run()
