import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mdm_jax.diffusion import schedules

NAMES = ["linear", "loglinear", "polynomial", "cosine", "geometric"]


def _get(name, **kw):
  c = ml_collections.ConfigDict({"name": name, "power": 2.0, "eps": 1e-3, "sigma_min": 1e-4,
                                 "sigma_max": 20.0, **kw})
  return schedules.get_schedule(c)


@pytest.mark.parametrize("name", NAMES)
def test_endpoints(name):
  s = _get(name)
  assert float(s.alpha(jnp.float32(0.0))) == pytest.approx(1.0, abs=1e-6)
  end = float(s.alpha(jnp.float32(1.0)))
  assert end <= (1e-3 + 1e-6 if name == "loglinear" else 1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_derivative_matches_finite_difference(name):
  s = _get(name)
  t = jnp.linspace(0.05, 0.95, 19, dtype=jnp.float64) if jax.config.jax_enable_x64 else \
      np.linspace(0.05, 0.95, 19)
  h = 1e-3
  fd = (np.asarray(s.alpha(jnp.asarray(t + h))) - np.asarray(s.alpha(jnp.asarray(t - h)))) / (2 * h)
  np.testing.assert_allclose(np.asarray(s.dalpha(jnp.asarray(t))), fd, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("name", NAMES)
def test_weight_is_minus_dalpha_over_one_minus_alpha(name):
  s = _get(name)
  t = jnp.linspace(0.05, 0.95, 19)
  direct = -s.dalpha(t) / (1.0 - s.alpha(t))
  np.testing.assert_allclose(np.asarray(s.weight(t)), np.asarray(direct), rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_weight_stable_near_zero(name):
  s = _get(name)
  t = jnp.array([1e-7, 1e-6, 1e-5, 1e-4], jnp.float32)
  w = np.asarray(s.weight(t))
  assert np.all(np.isfinite(w)) and np.all(w > 0)
  # The naive form -a'/(1-a) loses all precision in f32 at t=1e-7 (1 - alpha rounds);
  # the closed forms must behave like c/t with c = -alpha'(0)/lim (1-alpha)/t.
  c = w * np.asarray(t)
  assert np.allclose(c, c[-1], rtol=1e-2), c


def test_unknown_schedule_error_lists_valid_names():
  with pytest.raises(ValueError, match="cosine"):
    _get("not_a_schedule")


def test_register_new_schedule_is_one_function():
  name = "test_quadratic_tmp"
  if name not in schedules.SCHEDULES:
    @schedules.SCHEDULES.register(name)
    def _quad(config=None):
      return schedules.UnivariateSchedule(name, alpha=lambda t: 1 - t ** 2,
                                          dalpha=lambda t: -2 * t, weight=lambda t: 2.0 / t)
  try:
    s = _get(name)
    assert float(s.mask_prob(jnp.float32(0.5))) == pytest.approx(0.25)
  finally:
    schedules.SCHEDULES.unregister(name)
