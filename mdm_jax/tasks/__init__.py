"""Tasks: the trainer's only contract (``base.Task``), one file per kind of model.

==================== ==========================================================
``masked.py``        ``diffusion``: MDM and Prime with any masking schedule
``autoregressive``   ``ar``: the causal baseline with the exact NLL
``gaussian.py``      ``gaussian``: DDPM / EDM image diffusion, dit | mdt | mcdit arms
``distill.py``       Di[M]O (``--mode=distill``): generator + auxiliary, frozen teacher
``classifier.py``    the image metrics' feature classifier (``eval_images``)
``validation.py``    config checks that see every registry
==================== ==========================================================

``config.objective`` selects the task (the last two are variants that a mode builds
around a run, not objectives, so they are not registered); a new one is one file with a ``Task`` subclass
registered by ``@TASKS.register(name)``.
"""

from mdm_jax.tasks.base import TASKS, Task, TokenTask, loss_config
# The built-in tasks register themselves on import.
from mdm_jax.tasks.masked import MaskedDiffusionTask
from mdm_jax.tasks.autoregressive import AutoregressiveTask
from mdm_jax.tasks.gaussian import GaussianTask
from mdm_jax.tasks.validation import validate_config


def build_task(config, vocab_size: int) -> Task:
  """Validates ``config`` and builds the task named by ``config.objective``."""
  validate_config(config)
  return TASKS.get(config.objective).from_config(config, vocab_size)


__all__ = ["TASKS", "Task", "TokenTask", "MaskedDiffusionTask", "AutoregressiveTask",
           "GaussianTask", "build_task", "loss_config", "validate_config"]
