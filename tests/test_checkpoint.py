"""Orbax checkpoints: restore onto a different mesh; clear errors for bad checkpoints."""


import jax
import numpy as np
import pytest

from mdm_jax.trainers import checkpoint as ckpt_lib
from mdm_jax.core import sharding as shd
from mdm_jax.tasks import build_task
from mdm_jax.trainers.state import init_state
from mdm_jax.trainers.state import make_optimizer
from mdm_jax.trainers.state import state_shardings
from tests.test_sharding import _config


def _state_on(mesh_shape, seed=0):
  c = _config(mesh_shape)
  mesh = shd.make_mesh(c.mesh, devices=jax.devices()[: int(np.prod(mesh_shape))])
  rules = shd.logical_rules(c.mesh)
  task = build_task(c, vocab_size=40)
  tx, _ = make_optimizer(c.training)
  state, shardings = init_state(task, tx, mesh, rules, seed=seed)
  return c, task, tx, mesh, rules, state, shardings


def test_save_on_8_devices_restore_on_1(tmp_path):
  _, _, _, _, _, state8, _ = _state_on((1, 4, 2), seed=3)
  assert len(state8.params["blocks"]["qkv"].sharding.device_set) == 8
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
  ck.save(7, state8, config_dict={"model": {"d_model": 64}})
  ck.close()

  _, task, tx, mesh1, rules, _, sh1 = _state_on((1, 1, 1), seed=0)
  abstract, _ = state_shardings(task, tx, mesh1, rules)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
  restored = ck.restore(ckpt_lib.abstract_with_shardings(abstract, sh1))
  assert int(restored.step) == 0 and ck.latest_step() == 7
  q = restored.params["blocks"]["qkv"]
  assert len(q.sharding.device_set) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               jax.device_get(restored.params), jax.device_get(state8.params))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               jax.device_get(restored.opt_state), jax.device_get(state8.opt_state))


def test_missing_partial_and_mismatched_checkpoints(tmp_path):
  _, task, tx, mesh, rules, state, sh = _state_on((1, 1, 1))
  abstract = ckpt_lib.abstract_with_shardings(state_shardings(task, tx, mesh, rules)[0], sh)
  empty = ckpt_lib.Checkpointer(str(tmp_path / "none"), async_save=False)
  with pytest.raises(ckpt_lib.CheckpointError, match="No checkpoint found"):
    empty.restore(abstract)

  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
  ck.save(5, state, config_dict={"model": {"d_model": 64}, "prime": {"ell": 2}})
  ck.close()
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"prime\.ell.*checkpoint=2.*current=3"):
    ck.check_compatible({"model": {"d_model": 64}, "prime": {"ell": 3}})
  ck.check_compatible({"model": {"d_model": 64, "dropout": 0.1}, "prime": {"ell": 2}})
  # A key added later (absent from the checkpoint) matches only at its neutral default.
  ck.check_compatible({"model": {"d_model": 64, "local_conv": 0}, "prime": {"ell": 2}})
  with pytest.raises(ckpt_lib.CheckpointError, match=r"model\.local_conv.*checkpoint=0.*current=3"):
    ck.check_compatible({"model": {"d_model": 64, "local_conv": 3}, "prime": {"ell": 2}})

  # A checkpoint whose array data has been deleted (a partial copy) -> a clear error.
  step_dir = tmp_path / "ck" / "5" / "state"
  victims = [p for p in step_dir.rglob("*") if p.is_file() and "metadata" not in p.name]
  assert victims
  for p in victims:
    p.unlink()
  with pytest.raises(ckpt_lib.CheckpointError, match="step 5"):
    ck.restore(abstract)


def test_best_by_eval_keeps_the_lowest_and_restores_it(tmp_path):
  _, task, tx, mesh, rules, state, sh = _state_on((1, 1, 1))
  abstract = ckpt_lib.abstract_with_shardings(state_shardings(task, tx, mesh, rules)[0], sh)
  best = ckpt_lib.Checkpointer(str(tmp_path / "best"), async_save=False, max_to_keep=2,
                               best_metric="eval_nll")
  # Not monotone, so "best" differs from "latest": keep steps 20 (1.0) and 40 (1.5).
  for step, nll in [(10, 3.0), (20, 1.0), (30, 2.5), (40, 1.5), (50, 4.0)]:
    marked = state.replace(step=jax.numpy.asarray(step, jax.numpy.int32))
    best.save(step, marked, metrics={"eval_nll": nll}, force=True)
  best.close()
  best = ckpt_lib.Checkpointer(str(tmp_path / "best"), async_save=False, max_to_keep=2,
                               best_metric="eval_nll", read_only=True)
  assert sorted(best.all_steps()) == [20, 40]
  assert best.best_step() == 20 and best.latest_step() == 40
  assert int(best.restore(abstract, step=best.best_step()).step) == 20
  plain = ckpt_lib.Checkpointer(str(tmp_path / "best"), async_save=False, read_only=True)
  with pytest.raises(ValueError, match="best_metric"):
    plain.best_step()
