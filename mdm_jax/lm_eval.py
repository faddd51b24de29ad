"""``python -m mdm_jax.lm_eval``: EleutherAI's lm-evaluation-harness with mdm_jax runs as a model.

Registers the model ``mdm_jax`` (``mdm_jax/cli/lm_eval_model.py``) and hands over to
lm-eval's own command line with every flag unchanged, e.g.

    python -m mdm_jax.lm_eval --model mdm_jax \\
        --model_args workdir=runs/prime,num_time_samples=8 --batch_size 16 \\
        --tasks my_task --include_path my_tasks/

(docs/evaluation.md).  On a CPU host the process first restarts itself with the tuned
glibc malloc of ``mdm_jax.core.host_env``, as ``python -m mdm_jax.main`` does.
"""

import sys


def run() -> None:
  from mdm_jax.core import host_env  # pylint: disable=import-outside-toplevel
  host_env.reexec_with_tuned_malloc(["-m", "mdm_jax.lm_eval", *sys.argv[1:]])
  from mdm_jax.cli import lm_eval_model  # pylint: disable=import-outside-toplevel
  lm_eval_model.register()
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=import-outside-toplevel
  cli_evaluate()


if __name__ == "__main__":
  run()
