"""Every registered masking schedule keeps the ``Schedule`` contract.

``mdm_jax.diffusion.schedules.conformance.check_schedule`` checks the hazards' shapes,
alpha(0) = 1 and alpha(1) = 0, the weight against -alpha'/(1 - alpha) by ``jax.jvp``,
``log_q`` against the Bernoulli law of the mask probabilities (and the order
estimator's Plackett-Luce weights against the masking times), and the ELBO at fixed
times against the enumeration of every mask pattern on a tiny exact network.  It runs
here over every name in ``SCHEDULES`` for Prime codecs with ell = 1 and 2, so a newly
registered family is checked without a test of its own (``test_extending.py`` shows it
for a family defined in a test file).
"""

import jax.numpy as jnp
import pytest

from mdm_jax.core.errors import ConfigError
from mdm_jax.diffusion import prime
from mdm_jax.diffusion.schedules import SCHEDULES, UnivariateSchedule, conformance

NAMES = sorted(name for name, _ in SCHEDULES.items())


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_schedule_conforms(name):
  checked = []
  for ell in (1, 2):
    codec = prime.PrimeCodec.create(4, ell)
    try:
      report = conformance.check_registered(name, codec)
    except ConfigError:                  # the family refuses this codec at config time
      continue
    checked.append(ell)
    assert report["mask_prob_at_0"] <= 1e-6 and report["alpha_at_1"] <= 1e-6, report
  assert checked, f"{name} refused both ell = 1 and ell = 2"


def test_a_univariate_schedule_from_alpha_alone_conforms():
  """dalpha and the weight default to jax.jvp of alpha: nothing else to write."""
  sched = UnivariateSchedule("quadratic", alpha=lambda t: 1.0 - jnp.asarray(t, jnp.float32) ** 2)
  report = conformance.check_schedule(sched, prime.PrimeCodec.create(4, 2))
  assert report["weight_rel_error"] < 1e-5, report
  t = jnp.asarray([0.25, 0.5])
  assert jnp.allclose(sched.weight(t), 2.0 / t, rtol=1e-6)       # -alpha'/(1-alpha) = 2/t


@pytest.mark.parametrize("alpha,weight,match", [
    (lambda t: 1.0 - t, lambda t: 2.0 / t, "weight != -alpha'"),     # weight of t**2, alpha of t
    (lambda t: 1.0 - 0.9 * t, None, r"alpha\(1\) != 0"),             # never fully masked
])
def test_a_broken_schedule_fails_the_check(alpha, weight, match):
  sched = UnivariateSchedule("broken", alpha=alpha, weight=weight)
  with pytest.raises(conformance.ConformanceError, match=match):
    conformance.check_schedule(sched, prime.PrimeCodec.create(4, 1))
