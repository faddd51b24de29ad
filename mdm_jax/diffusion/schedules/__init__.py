"""Masking schedules, one file per family, each selected by ``config.schedule.name``.

============================  ===============================================  ==================
file                          family                                           names
============================  ===============================================  ==================
``univariate.py``             one alpha(t) for every element                   linear, loglinear,
                                                                               polynomial, cosine,
                                                                               geometric
``learned_poly.py``           a learned exponent per position (RLOO gradient)  learned_poly
``left_to_right.py``          fixed windows reaching the left-to-right limit   left_to_right
``slot_poly.py``              one exponent per Prime digit (coarse to fine)    slot_poly
``learned_tilt.py``           slot_poly with the per-digit tilt learned        learned_tilt
``genmd4.py``                 a learned exponent per (digit slot, value)       genmd4
``plackett_luce.py``          learned_poly trained by the t-free estimator     plackett_luce
============================  ===============================================  ==================

``base.py`` holds the ``Schedule`` interface and the ``SCHEDULES`` registry;
``conformance.py`` checks a family against that interface (``check_schedule``).  A new
family is one new file with a ``Schedule`` subclass and a function registered with
``@SCHEDULES.register(name)``; import it (or register it from your own code) and set
``--config.schedule.name=name``.
"""

from __future__ import annotations

import ml_collections

from mdm_jax.configs.base import get_base_config
from mdm_jax.core.config import merge_block
from mdm_jax.diffusion.schedules.base import (SCHEDULES, Hazards, PositionOrderSchedule,
                                              Schedule, UnivariateSchedule, f32)
# The built-in families register themselves on import.
from mdm_jax.diffusion.schedules import univariate  # noqa: F401
from mdm_jax.diffusion.schedules import learned_poly  # noqa: F401
from mdm_jax.diffusion.schedules import left_to_right  # noqa: F401
from mdm_jax.diffusion.schedules import slot_poly  # noqa: F401
from mdm_jax.diffusion.schedules import learned_tilt  # noqa: F401
from mdm_jax.diffusion.schedules import genmd4  # noqa: F401
from mdm_jax.diffusion.schedules import plackett_luce  # noqa: F401
from mdm_jax.diffusion.schedules.univariate import cosine, geometric, linear, loglinear, polynomial


def schedule_block(config=None) -> ml_collections.ConfigDict:
  """A complete ``config.schedule`` block: the base defaults updated with ``config``'s keys."""
  return merge_block(get_base_config().schedule, config)


def get_schedule(config) -> Schedule:
  """Builds the schedule named by ``config.name`` (a ``config.schedule`` block; keys it
  lacks take their defaults from ``configs/base.py``)."""
  block = schedule_block(config)
  return SCHEDULES.get(block.name)(block)


__all__ = ["SCHEDULES", "Hazards", "Schedule", "UnivariateSchedule", "PositionOrderSchedule", "get_schedule",
           "schedule_block", "linear", "loglinear", "polynomial", "cosine", "geometric", "f32"]
