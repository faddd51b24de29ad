"""A new schedule family is one class plus a registration: nothing else changes.

The family below is defined here, in the test file alone: a *learned* per-digit schedule
(one learned exponent per Prime digit slot, alpha_j(t) = 1 - t**w_j).  It is selected by
``config.schedule.name`` and trained by the unchanged train loop for a few steps; its
parameters travel in ``params["schedule"]``, get gradients through the RLOO estimator and
are checkpointed with the model.  It writes only its mask probabilities: the ELBO weight
(``jax.jvp``) and ``log_q`` (the Bernoulli law of the masks) come from ``Schedule``'s
defaults, and being registered is enough for the conformance check to cover it.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdm_jax.configs.shakespeare_prime import get_config
from mdm_jax.diffusion import prime
from mdm_jax.diffusion.schedules import SCHEDULES, Schedule, conformance
from mdm_jax.trainers.loop import train_and_evaluate
from mdm_jax.trainers.setup import restore_for_inference

NAME = "test_learned_slots"


class SlotExponents(nn.Module):
  ell: int

  @nn.compact
  def __call__(self, length: int):
    del length
    return self.param("log_w", nn.initializers.zeros_init(), (self.ell,), jnp.float32)


class LearnedSlotSchedule(Schedule):
  """alpha_j(t) = 1 - t**w_j, log w_j learned (one per digit slot j)."""
  per_position = True
  per_digit_hazards = True
  learned = True
  num_masks = 2
  calls = 0

  def __init__(self, ell: int = 1):
    self.name = NAME
    self.ell = ell

  def for_codec(self, codec):
    return LearnedSlotSchedule(int(codec.ell))

  def param_module(self):
    return SlotExponents(self.ell)

  def _w(self, params):
    LearnedSlotSchedule.calls += 1
    return jnp.exp(params["schedule"]["log_w"])[None, None, :]

  def mask_prob_ij(self, params, t, length):
    t = jnp.asarray(t, jnp.float32)[:, None, None]
    return jnp.broadcast_to(jnp.exp(self._w(params) * jnp.log(t)), (t.shape[0], length, self.ell))

  def alpha(self, t):
    return 1.0 - jnp.asarray(t, jnp.float32)


@pytest.fixture
def registered():
  @SCHEDULES.register(NAME)
  def _factory(config):   # noqa: ARG001  (takes the config.schedule block)
    return LearnedSlotSchedule()
  yield
  SCHEDULES.unregister(NAME)


def test_a_schedule_family_from_a_test_file_trains_with_the_unchanged_loop(registered, tmp_path):
  config = get_config("tiny")
  config.schedule.name = NAME
  config.training.num_steps = 4
  config.eval.every_steps = 4
  config.checkpoint.every_steps = 4
  config.sampling.num_samples = 2
  workdir = str(tmp_path / "run")
  LearnedSlotSchedule.calls = 0
  result = train_and_evaluate(config, workdir)
  assert LearnedSlotSchedule.calls > 0                       # the loss used this family
  assert result["step"] == 4 and np.isfinite(result["eval_nll"])
  task, state, *_ = restore_for_inference(config, workdir)
  assert task.schedule.name == NAME and task.schedule.ell == config.prime.ell
  log_w = np.asarray(jax.device_get(state.params["schedule"]["log_w"]))
  assert log_w.shape == (config.prime.ell,)
  assert np.all(np.isfinite(log_w)) and np.any(log_w != 0.0)   # it learned (RLOO gradient)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["schedule"]["name"] == NAME


@pytest.mark.parametrize("ell", [1, 2])
def test_a_registered_family_passes_the_conformance_check(registered, ell):
  """The check the suite runs over every registered name, on this family."""
  assert NAME in dict(SCHEDULES.items())
  report = conformance.check_registered(NAME, prime.PrimeCodec.create(4, ell))
  assert report["weight_rel_error"] < 1e-3 and report["log_q_error"] < 1e-5, report


def test_an_unregistered_family_names_the_registered_ones():
  config = get_config("tiny")
  config.schedule.name = NAME
  with pytest.raises(Exception, match=f"{NAME}.*is not a registered schedule.*learned_poly"):
    train_and_evaluate(config, "/nonexistent/never/written")
