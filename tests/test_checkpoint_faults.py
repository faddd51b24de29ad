"""Damaged checkpoint files, for real, against the Checkpointer: each damage is detected by
the checksums written at save, the step is set aside and the newest intact one restored."""

import glob
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdm_jax.trainers.checkpoint import CheckpointError, Checkpointer, verify_step_dir


def _state(v):
  return {"w": jnp.full((4096,), v, jnp.float32), "b": jnp.arange(8, dtype=jnp.float32) + v}


def _iter():
  return iter(grain.MapDataset.range(1000).to_iter_dataset())


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.fixture
def two_steps(tmp_path):
  d = str(tmp_path / "checkpoints")
  ck = Checkpointer(d, max_to_keep=5, async_save=False)
  it = _iter()
  for step in (1, 2):
    next(it)
    ck.save(step, _state(float(step)), it, {"step": step})
  ck.close()
  assert verify_step_dir(os.path.join(d, "2")) is None
  return d


def _largest_array(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f) and "/d/" in f]
  return max(files, key=os.path.getsize)


def _truncate(d):
  f = _largest_array(d)
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) // 2)


def _random_4k(d):
  f = _largest_array(d)
  with open(f, "r+b") as fh:
    fh.seek(max(os.path.getsize(f) // 2 - 2048, 0))
    fh.write(np.random.default_rng(0).bytes(4096))


def _eight_bytes(d):
  f = _largest_array(d)
  with open(f, "r+b") as fh:
    fh.seek(os.path.getsize(f) // 3)
    old = fh.read(8)
    fh.seek(os.path.getsize(f) // 3)
    fh.write(bytes(b ^ 0xFF for b in old))


def _delete(rel):
  def damage(d):
    os.remove(os.path.join(d, rel))
  return damage


DAMAGES = {"truncated_array": _truncate, "random_4kib": _random_4k, "eight_bytes": _eight_bytes,
           "no_metadata": _delete(os.path.join("state", "_METADATA")),
           "no_data_iterator": _delete(os.path.join("data", "process_0-of-1.json"))}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_step_is_set_aside_and_the_previous_restored(two_steps, damage):
  DAMAGES[damage](os.path.join(two_steps, "2"))
  reason = verify_step_dir(os.path.join(two_steps, "2"))
  assert reason not in (None, "unverified")
  ck = Checkpointer(two_steps, async_save=False)
  logs = []
  it = _iter()
  state, step = ck.restore_intact(_abstract(_state(0.0)), it, log=logs.append)
  ck.close()
  assert step == 1 and float(state["b"][0]) == 1.0
  assert next(it) == 1                               # the iterator is where step 1 left it
  assert "checkpoint 2 is damaged" in logs[0]
  assert not os.path.exists(os.path.join(two_steps, "2"))
  assert os.path.isdir(two_steps + "_damaged/2")


def test_unverified_step_is_set_aside_only_because_an_older_one_restores(two_steps):
  os.remove(os.path.join(two_steps, "2", "mdm_jax_checksums.json"))
  for f in glob.glob(os.path.join(two_steps, "2", "state", "**", "*"), recursive=True):
    if os.path.isfile(f) and "/d/" in f:            # every array file gone
      os.remove(f)
  assert verify_step_dir(os.path.join(two_steps, "2")) == "unverified"
  ck = Checkpointer(two_steps, async_save=False)
  logs = []
  _, step = ck.restore_intact(_abstract(_state(0.0)), _iter(), log=logs.append)
  ck.close()
  assert step == 1 and "does not restore, and step 1 does" in logs[0]


def test_a_structure_change_is_reported_and_nothing_is_moved(two_steps):
  ck = Checkpointer(two_steps, async_save=False)
  other = {"w": jnp.zeros((16,), jnp.float32), "b": jnp.zeros((8,), jnp.float32)}
  with pytest.raises(CheckpointError, match="could not be restored"):
    ck.restore_intact(_abstract(other), _iter(), log=lambda m: None)
  ck.close()
  assert sorted(os.listdir(two_steps)) == ["1", "2"]
  assert not os.path.exists(two_steps + "_damaged")
